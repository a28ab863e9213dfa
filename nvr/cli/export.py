"""``nvr export``: a training checkpoint or a saved embedder -> SentenceTransformer / AutoModel folder."""

from __future__ import annotations

import argparse

from nvr.utils.errors import ConfigError


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvr export", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="Lightning .ckpt written by `nvr fit`")
    source.add_argument("--embedder", help="folder written by Embedder.save_pretrained")
    parser.add_argument("--output", required=True, help="export folder (created atomically)")
    parser.add_argument("--merge_lora", type=_bool, default=True, help="merge LoRA into the weights (default true)")
    parser.add_argument("--query_prefix", default=None,
                        help="prompt stored for queries, e.g. 'query: ' (default: the checkpoint's training prompt)")
    parser.add_argument("--passage_prefix", default=None, help="prompt stored for documents (default: training's)")
    parser.add_argument("--mask_prefix", type=_bool, default=None,
                        help="exclude the query prompt from mean pooling, as training's mask_instruction (default: "
                             "training's); the passage prefix is never masked")
    parser.add_argument("--query_max_length", type=int, default=None, help="recorded query length (training's)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="ST max_seq_length = passage length (default: training's passage_max_length)")
    parser.add_argument("--sentence_transformers", type=_bool, default=True,
                        help="write sentence-transformers module files (false for latent-attention pooling)")
    parser.add_argument("--overwrite", type=_bool, default=False)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for key in ("max_length", "query_max_length"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")
    from nvr.modeling.export import export_embedder

    out = export_embedder(
        args.checkpoint or args.embedder, args.output, merge_lora=args.merge_lora, query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix, mask_prefix=args.mask_prefix, max_length=args.max_length,
        query_max_length=args.query_max_length,
        sentence_transformers=args.sentence_transformers, overwrite=args.overwrite,
    )
    print(f"exported to {out}")
    return 0
