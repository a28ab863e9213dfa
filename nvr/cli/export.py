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
    parser.add_argument("--query_prefix", default="", help="prompt stored for queries, e.g. 'query: '")
    parser.add_argument("--passage_prefix", default="", help="prompt stored for documents")
    parser.add_argument("--mask_prefix", type=_bool, default=False,
                        help="exclude prompt tokens from mean pooling (ST include_prompt=false)")
    parser.add_argument("--max_length", type=int, default=None, help="ST max_seq_length (default: embedder config)")
    parser.add_argument("--sentence_transformers", type=_bool, default=True,
                        help="write sentence-transformers module files (false for latent-attention pooling)")
    parser.add_argument("--overwrite", type=_bool, default=False)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.max_length is not None and args.max_length <= 0:
        raise ConfigError("max_length", f"must be > 0, got {args.max_length}")
    from nvr.modeling.export import export_embedder

    out = export_embedder(
        args.checkpoint or args.embedder, args.output, merge_lora=args.merge_lora, query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix, mask_prefix=args.mask_prefix, max_length=args.max_length,
        sentence_transformers=args.sentence_transformers, overwrite=args.overwrite,
    )
    print(f"exported to {out}")
    return 0
