"""``nvr eval --model NAME_OR_PATH --beir DIR [--beir DIR ...] --output metrics.json``."""

from __future__ import annotations

import argparse
import logging

from nvr.evaluation.evaluate import evaluate_model, format_table
from nvr.utils.errors import ConfigError
from nvr.utils.models import check_max_length, check_model_source
from nvr.utils.preflight import check_cache_dir, check_output_file


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _k_values(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from err
    if not ks or min(ks) <= 0:
        raise argparse.ArgumentTypeError(f"cutoffs must be positive, got {value!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nvr eval", description="Evaluate an HF model or exported folder on BEIR folders (NDCG@10, Recall@100, "
        "MRR@10 with trec_eval semantics); corpus embeddings are cached.",
    )
    p.add_argument("--model", required=True, help="HF id or local folder (nvr export / sentence-transformers)")
    p.add_argument("--beir", action="append", required=True, metavar="DIR",
                   help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/); repeat for several datasets")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument("--output", required=True, help="metrics JSON path (written atomically)")
    p.add_argument("--overwrite", type=_bool, default=False, help="replace an existing --output")
    p.add_argument("--pooling", choices=["mean", "cls", "last_token"], default=None,
                   help="default: from the model folder's metadata, else mean")
    p.add_argument("--normalize", type=_bool, default=None, help="L2-normalize (default: metadata, else true)")
    p.add_argument("--query_instruction", default=None,
                   help="task definition; queries become '<instruction>: <query>'")
    p.add_argument("--mask_instruction", type=_bool, default=None,
                   help="exclude instruction tokens from pooling (default: true, or the folder's include_prompt)")
    p.add_argument("--passage_prefix", default=None, help="text put before every passage (default none)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_tokens_per_batch", type=int, default=None,
                   help="cap on padded tokens per batch (length-sorted batches; never changes the embeddings)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bf16 autocast where the device runs bf16 natively, else float32 (exact parity)")
    p.add_argument("--max_length", type=int, default=None,
                   help="token budget for passages (and queries unless --query_max_length); default: metadata")
    p.add_argument("--query_max_length", type=int, default=None)
    p.add_argument("--k_values", type=_k_values, default=(10, 100), help="cutoffs, e.g. 10,100")
    p.add_argument("--search_memory_mb", type=int, default=512, help="memory bound of one block of scores")
    p.add_argument("--cache_dir", default=".nvr_cache", help="embedding cache ('' disables it)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    return p


def preflight(args: argparse.Namespace) -> None:
    """Checks that need no model, before any is loaded: output file, cache folder, model folder, max lengths
    (clamped to the model's position limit with a warning)."""
    check_output_file(args.output, "--output", overwrite=args.overwrite)
    if args.cache_dir:
        check_cache_dir(args.cache_dir, "--cache_dir")
    check_model_source(args.model, "--model")
    if args.max_tokens_per_batch is not None and args.max_tokens_per_batch <= 0:
        raise ConfigError("--max_tokens_per_batch", f"must be > 0, got {args.max_tokens_per_batch}")
    for key in ("max_length", "query_max_length"):
        value = getattr(args, key)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{key}", f"must be > 0, got {value}")
            setattr(args, key, check_max_length(args.model, value, f"--{key}"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    preflight(args)
    result = evaluate_model(
        args.model, args.beir, split=args.split, pooling=args.pooling, normalize=args.normalize,
        query_instruction=args.query_instruction, passage_prefix=args.passage_prefix,
        mask_instruction=args.mask_instruction, max_length=args.max_length, query_max_length=args.query_max_length,
        batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch, dtype=args.dtype,
        k_values=args.k_values, search_memory_mb=args.search_memory_mb,
        cache_dir=args.cache_dir or None, output=args.output, overwrite=args.overwrite, device=args.device,
    )
    print(format_table(result))
    print(f"wrote {args.output}")
    return 0
