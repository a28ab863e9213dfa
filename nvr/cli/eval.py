"""``nvr eval --model NAME_OR_PATH --beir DIR [--beir DIR ...] --output metrics.json``."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from nvr.evaluation.evaluate import evaluate_model, format_table
from nvr.utils.atomic import write_text_atomic
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
    p.add_argument("--model", required=True, help="HF id, local folder (nvr export / sentence-transformers) or a "
                   "`nvr fit` .ckpt (exported to a temporary folder for the run: no export step needed)")
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
    p.add_argument("--truncate_dim", type=int, default=None,
                   help="keep the first N embedding dims (Matryoshka; re-normalized when the model normalizes)")
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
    if args.truncate_dim is not None and args.truncate_dim <= 0:
        raise ConfigError("--truncate_dim", f"must be > 0, got {args.truncate_dim}")
    for key in ("max_length", "query_max_length"):
        value = getattr(args, key)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{key}", f"must be > 0, got {value}")
            setattr(args, key, check_max_length(args.model, value, f"--{key}"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from nvr.modeling.export import is_training_checkpoint

    if is_training_checkpoint(args.model) or args.model.endswith(".ckpt"):
        result = evaluate_checkpoint(args)
    else:
        preflight(args)
        result = run(args, args.output)
    print(format_table(result))
    print(f"wrote {args.output}")
    return 0


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """A ``nvr fit`` checkpoint (full, LoRA trainable-only, FSDP2) is exported to a temporary folder, exactly as
    ``nvr export`` writes it, and that folder is evaluated; options left unset take training's encoding (prompts,
    query masking, query length) as the export recorded it. The output names the checkpoint."""
    from nvr.modeling.export import exported_checkpoint, is_training_checkpoint

    check_output_file(args.output, "--output", overwrite=args.overwrite)  # before the (possibly long) export
    if args.cache_dir:
        check_cache_dir(args.cache_dir, "--cache_dir")
    if not is_training_checkpoint(args.model):
        raise ConfigError("--model", f"no such checkpoint file: {args.model}")
    with exported_checkpoint(args.model) as exported:
        checkpoint, args.model = args.model, str(exported.folder)
        use_training_encoding(args, exported.encoding, exported.sentence_transformers)
        preflight(args)
        result = run(args, None)
    result["model"] = checkpoint
    result["settings"]["checkpoint_export"] = {"sentence_transformers": exported.sentence_transformers}
    write_text_atomic(args.output, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def use_training_encoding(args: argparse.Namespace, encoding: dict[str, Any], st_files: bool) -> None:
    """Fill unset options from the export's encoding. A sentence-transformers folder already carries the raw
    query/document prompts; an nvr-only folder (latent attention, add_eos) does not, so they are passed here."""
    if args.mask_instruction is None and "mask_prefix" in encoding:
        args.mask_instruction = bool(encoding["mask_prefix"])
    if args.query_max_length is None and encoding.get("query_max_length"):
        args.query_max_length = int(encoding["query_max_length"])
    if st_files:
        return
    if args.passage_prefix is None and "passage_prefix" in encoding:
        args.passage_prefix = encoding["passage_prefix"]
    prefix = encoding.get("query_prefix", "")
    if args.query_instruction is None:
        if not prefix or prefix.endswith(": "):
            args.query_instruction = prefix[:-2] if prefix else ""
        else:
            raise ConfigError("--query_instruction", f"training's query prompt {prefix!r} is not of the form "
                                                     "'<instruction>: ': pass --query_instruction explicitly")


def run(args: argparse.Namespace, output: str | None) -> dict[str, Any]:
    return evaluate_model(
        args.model, args.beir, split=args.split, pooling=args.pooling, normalize=args.normalize,
        query_instruction=args.query_instruction, passage_prefix=args.passage_prefix,
        mask_instruction=args.mask_instruction, max_length=args.max_length, query_max_length=args.query_max_length,
        batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch, dtype=args.dtype,
        k_values=args.k_values, search_memory_mb=args.search_memory_mb, truncate_dim=args.truncate_dim,
        cache_dir=args.cache_dir or None, output=output, overwrite=args.overwrite, device=args.device,
    )
