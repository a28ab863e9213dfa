"""``nvr eval``: evaluate any HF model or exported folder on BEIR folders, with cached corpus embeddings.

Corpus embeddings go through :class:`nvr.teachers.cache.EmbeddingCache` under ``<cache_dir>/embeddings`` (checksummed:
a corrupted cached file is re-encoded, never used) with THE key a dense teacher of the same model and settings uses
(:func:`nvr.teachers.dense.dense_embedding_key`: content of the model folder incl. tokenizer files, pooling,
normalize, EOS, attention direction, resolved precision, passage prefix and max length). So ``nvr eval`` and
``nvr mine`` with the same ``cache_dir`` encode a corpus once, re-evaluating the same model (e.g. with another query
instruction) only encodes the queries, and a copy with another tokenizer is re-encoded.

``dtype: auto`` (default) runs the fp32 weights under bf16 autocast where the device has native bf16
(``nvr.utils.precision``), fp32 elsewhere; ``float32`` gives exact parity with an fp32 reference.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvr.config.mining import TeacherConfig
from nvr.data.beir import beir_files
from nvr.evaluation.data import EvalSet, EvalSetConfig, load_eval_set
from nvr.evaluation.retrieval import evaluate_embeddings, mean_over_datasets
from nvr.modeling.config import EmbedderConfig
from nvr.teachers.cache import EmbeddingCache
from nvr.teachers.dense import dense_embedding_key, teacher_model_fingerprint
from nvr.utils.atomic import write_text_atomic
from nvr.utils.errors import ConfigError, InputError, OutputExistsError
from nvr.utils.fingerprint import memo_dir_for
from nvr.utils.models import resolve_model_path
from nvr.utils.precision import Precision, resolve_precision

log = logging.getLogger(__name__)

METADATA_FILE = "nvr_embedder.json"
CORPUS_SHARD_SIZE = 10000


@dataclass
class ModelSettings:
    """How to encode with one model: explicit options win over the folder's metadata, which wins over defaults."""

    pooling: str | None = None
    normalize: bool | None = None
    max_length: int | None = None
    query_prefix: str = ""
    """Raw text put before every query (an explicit ``query_instruction`` becomes ``"<instruction>: "``)."""
    passage_prefix: str = ""
    mask_instruction: bool = True
    """Exclude the query prefix from pooling (NV-Retriever); a sentence-transformers Pooling module's
    ``include_prompt`` decides for folders that have one."""


def read_folder_settings(model_dir: str) -> dict[str, Any]:
    """Settings a model folder records for sentence-transformers: pooling mode, Normalize module,
    max_seq_length, and the ``query`` / ``document`` (or ``passage``) prompts."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return {}
    settings: dict[str, Any] = {}
    nvr_meta = _read_json(folder / METADATA_FILE)
    if isinstance(nvr_meta.get("config"), dict):  # an nvr folder: its own config is authoritative
        config = nvr_meta["config"]
        settings.update({k: config[k] for k in ("pooling", "normalize", "max_length") if k in config})
        settings.update(_prompts(folder))
        settings.update(_export_prompts(nvr_meta.get("prompts")))
        return settings
    st_config = _read_json(folder / "sentence_bert_config.json")
    if isinstance(st_config.get("max_seq_length"), int) and st_config["max_seq_length"] > 0:
        settings["max_length"] = st_config["max_seq_length"]
    modules_path = folder / "modules.json"
    if modules_path.is_file():
        entries = json.loads(modules_path.read_text(encoding="utf-8"))
        types = [str(e.get("type", "")) for e in entries]
        settings["normalize"] = any(t.endswith("Normalize") for t in types)
        for entry in entries:
            if str(entry.get("type", "")).endswith("Pooling"):
                pooling_cfg = _read_json(folder / entry.get("path", "") / "config.json")
                pooling = _st_pooling_mode(pooling_cfg)
                if pooling is not None:
                    settings["pooling"] = pooling
                if isinstance(pooling_cfg.get("include_prompt"), bool):
                    settings["mask_instruction"] = not pooling_cfg["include_prompt"]
    settings.update(_prompts(folder))
    return settings


def _export_prompts(prompts: Any) -> dict[str, Any]:
    """What ``nvr export`` recorded in ``nvr_embedder.json`` (``prompts``): both prefixes, whether training masked
    the query prefix from pooling, the passage length. Authoritative for nvr folders, also those without ST files."""
    if not isinstance(prompts, dict):
        return {}
    found: dict[str, Any] = {}
    for src, dst, kind in (("query_prefix", "query_prefix", str), ("passage_prefix", "passage_prefix", str),
                           ("mask_prefix", "mask_instruction", bool), ("passage_max_length", "max_length", int)):
        value = prompts.get(src)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            found[dst] = value
    return found


def _prompts(folder: Path) -> dict[str, str]:
    """The ``query`` and ``document``/``passage`` prompts of ``config_sentence_transformers.json``."""
    prompts = _read_json(folder / "config_sentence_transformers.json").get("prompts") or {}
    found: dict[str, str] = {}
    if isinstance(prompts.get("query"), str):
        found["query_prefix"] = prompts["query"]
    for key in ("document", "passage", "corpus"):
        if isinstance(prompts.get(key), str):
            found["passage_prefix"] = prompts[key]
            break
    return found


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", path, err.lineno) from err
    return data if isinstance(data, dict) else {}


def _st_pooling_mode(cfg: dict[str, Any]) -> str | None:
    for flag, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                       ("pooling_mode_lasttoken", "last_token")):
        if cfg.get(flag):
            return mode
    return None


def resolve_settings(
    model_dir: str, *, pooling: str | None = None, normalize: bool | None = None, max_length: int | None = None,
    query_instruction: str | None = None, passage_prefix: str | None = None, mask_instruction: bool | None = None,
) -> ModelSettings:
    """Merge folder metadata with explicit (non-None) options; the options win."""
    settings = ModelSettings(**read_folder_settings(model_dir))
    if pooling is not None:
        settings.pooling = pooling
    if normalize is not None:
        settings.normalize = normalize
    if max_length is not None:
        settings.max_length = max_length
    if query_instruction is not None:
        settings.query_prefix = f"{query_instruction}: " if query_instruction else ""
    if passage_prefix is not None:
        settings.passage_prefix = passage_prefix
    if mask_instruction is not None:
        settings.mask_instruction = mask_instruction
    return settings


def pick_eval_device(device: str | None) -> str:
    """``None`` -> cuda when available, else cpu."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_embedder(model: str, settings: ModelSettings, device: str | None = None, dtype: str = "float32"):
    """An eval-mode Embedder: an nvr folder (``nvr_embedder.json``) is reloaded with its own config (LoRA,
    latent pooling...), anything else is built from an EmbedderConfig; explicit settings override both.
    ``dtype`` is the weights' dtype (``Precision.weights``: fp32 under ``dtype: auto``)."""
    from nvr.modeling.embedder import Embedder

    path = resolve_model_path(model)
    overrides = {k: v for k, v in (("pooling", settings.pooling), ("normalize", settings.normalize),
                                   ("max_length", settings.max_length)) if v is not None}
    overrides["dtype"] = dtype
    if (Path(path) / METADATA_FILE).is_file():
        embedder = Embedder.from_pretrained(path, **overrides)
    else:
        embedder = Embedder.from_config(EmbedderConfig(model_name_or_path=model, **overrides))
    return embedder.eval().to(pick_eval_device(device))


@dataclass
class EncodeOptions:
    """How ``nvr eval`` runs the encoder: batch size, token budget per batch, resolved precision."""

    batch_size: int = 64
    max_tokens_per_batch: int | None = None
    precision: Precision = Precision("float32")


def _encoder(embedder, prefix: str, max_length: int, options: EncodeOptions, mask_prefix: bool,
             desc: str) -> Callable[[list[str]], np.ndarray]:
    from nvr.modeling import encode as encode_module  # looked up at call time (tests count the calls)

    def encode(texts: list[str]) -> np.ndarray:
        return encode_module.encode_texts(
            embedder, texts, prefix=prefix, max_length=max_length, batch_size=options.batch_size,
            mask_prefix=mask_prefix, desc=desc, precision=options.precision,
            max_tokens_per_batch=options.max_tokens_per_batch,
        )

    return encode


def teacher_config_for(model: str, embedder, passage_prefix: str, passage_max_length: int,
                       dtype: str) -> TeacherConfig:
    """The dense teacher that encodes passages exactly as this evaluation does (its keys are the eval's keys)."""
    cfg = embedder.config
    return TeacherConfig(
        name="eval", model_name_or_path=model, pooling=cfg.pooling, normalize=cfg.normalize, add_eos=cfg.add_eos,
        bidirectional=cfg.bidirectional, trust_remote_code=cfg.trust_remote_code, passage_prefix=passage_prefix,
        passage_max_length=passage_max_length, dtype=dtype,
    )


def passage_cache_key(model: str, embedder, passage_prefix: str, passage_max_length: int, precision: Precision,
                      dtype: str, cache_dir: str | Path | None) -> str:
    """The embedding key of this corpus encoding: :func:`nvr.teachers.dense.dense_embedding_key` of the
    equivalent teacher (model folder content memoized under ``<cache_dir>/fingerprints``)."""
    tcfg = teacher_config_for(model, embedder, passage_prefix, passage_max_length, dtype)
    model_key = teacher_model_fingerprint(tcfg, memo_dir_for(cache_dir), lambda: embedder, precision.label)
    return dense_embedding_key(model_key, tcfg, passage_prefix, passage_max_length, precision.label)


def evaluate_model(
    model: str,
    beir_dirs: Sequence[str],
    *,
    split: str = "test",
    pooling: str | None = None,
    normalize: bool | None = None,
    query_instruction: str | None = None,
    passage_prefix: str | None = None,
    mask_instruction: bool | None = None,
    max_length: int | None = None,
    query_max_length: int | None = None,
    batch_size: int = 64,
    max_tokens_per_batch: int | None = None,
    dtype: str = "auto",
    k_values: Sequence[int] = (10, 100),
    search_memory_mb: int = 512,
    truncate_dim: int | None = None,
    cache_dir: str | None = ".nvr_cache",
    output: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Encode each BEIR split's judged queries and its corpus, search exactly, score with trec_eval semantics.

    Returns ``{"model", "settings", "datasets": {name: {metric: value}}, "mean": {...}, "timing_s": {...}}`` and
    writes it to ``output`` (atomically) when given. ``truncate_dim`` scores the first N embedding dims only
    (Matryoshka), re-normalized when the model normalizes; the corpus cache keeps the full embeddings.
    """
    if not beir_dirs:
        raise ConfigError("beir", "give at least one BEIR folder")
    if batch_size <= 0:
        raise ConfigError("batch_size", f"must be > 0, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch <= 0:
        raise ConfigError("max_tokens_per_batch", f"must be > 0 or unset, got {max_tokens_per_batch}")
    if output is not None and Path(output).exists() and not overwrite:
        raise OutputExistsError(output)
    for folder in beir_dirs:  # a typo in the last --beir must not cost a model load and the first encodes
        beir_files(folder, split)
    settings = resolve_settings(resolve_model_path(model), pooling=pooling, normalize=normalize,
                                max_length=max_length, query_instruction=query_instruction,
                                passage_prefix=passage_prefix, mask_instruction=mask_instruction)
    started = time.perf_counter()
    device = pick_eval_device(device)
    precision = resolve_precision(dtype, device)
    embedder = build_embedder(model, settings, device, precision.weights)
    if truncate_dim is not None and not 0 < truncate_dim <= embedder.hidden_size:
        raise ConfigError("truncate_dim", f"must be in [1, {embedder.hidden_size}] (the embedding size of {model}), "
                                          f"got {truncate_dim}")
    options = EncodeOptions(batch_size, max_tokens_per_batch, precision)
    cache = EmbeddingCache(Path(cache_dir) / "embeddings") if cache_dir else None
    configs = _eval_set_configs(beir_dirs, split, settings, embedder.config.max_length, query_max_length)
    eval_sets = [load_eval_set(cfg) for cfg in configs]
    per_dataset: dict[str, dict[str, float]] = {}
    keys: dict[str, str] = {}
    for eval_set in eval_sets:
        key = None
        if cache is not None:
            key = passage_cache_key(model, embedder, eval_set.config.passage_prefix,
                                    eval_set.config.passage_max_length, precision, dtype, cache_dir)
            keys[eval_set.name] = key
        queries, docs = encode_eval_set(eval_set, embedder, options, cache, key)
        if truncate_dim is not None:
            from nvr.modeling.matryoshka import truncate_numpy  # torch is loaded by now (the embedder)

            queries, docs = (truncate_numpy(x, truncate_dim, embedder.config.normalize) for x in (queries, docs))
        per_dataset[eval_set.name] = evaluate_embeddings(queries, docs, eval_set.query_ids, eval_set.doc_ids,
                                                         eval_set.qrels, k_values, search_memory_mb)
    result = {
        "model": model,
        "split": split,
        "settings": {"pooling": embedder.config.pooling, "normalize": embedder.config.normalize,
                     "query_prefix": settings.query_prefix, "passage_prefix": settings.passage_prefix,
                     "mask_instruction": settings.mask_instruction, "max_length": embedder.config.max_length,
                     "dtype": precision.label, "corpus_embedding_keys": keys, "truncate_dim": truncate_dim},
        "datasets": per_dataset,
        "mean": mean_over_datasets(per_dataset),
        "timing_s": {"total": round(time.perf_counter() - started, 3)},
    }
    if output is not None:
        write_text_atomic(output, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _eval_set_configs(beir_dirs: Sequence[str], split: str, settings: ModelSettings, max_length: int,
                      query_max_length: int | None) -> list[EvalSetConfig]:
    """One config per folder, named after the folder (``name-2`` etc. when two folders share a name)."""
    configs: list[EvalSetConfig] = []
    seen: dict[str, int] = {}
    for path in beir_dirs:
        base = Path(path).resolve().name or "beir"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}-{seen[base]}"
        configs.append(EvalSetConfig(
            name=name, path=str(path), split=split, query_prefix=settings.query_prefix,
            mask_instruction=settings.mask_instruction, passage_prefix=settings.passage_prefix,
            query_max_length=query_max_length or max_length, passage_max_length=max_length,
        ))
    return configs


def encode_eval_set(eval_set: EvalSet, embedder, options: EncodeOptions, cache: EmbeddingCache | None,
                    key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings, corpus embeddings); the corpus goes through the cache under ``key`` when both are given."""
    cfg = eval_set.config
    encode_queries = _encoder(embedder, cfg.query_text_prefix, cfg.query_max_length, options,
                              cfg.mask_instruction, f"{eval_set.name} queries")
    encode_docs = _encoder(embedder, cfg.passage_prefix, cfg.passage_max_length, options, False,
                           f"{eval_set.name} corpus")
    queries = encode_queries(eval_set.query_texts)
    if cache is None or key is None:
        return queries, encode_docs(eval_set.doc_texts)
    docs = cache.get_or_encode(key, eval_set.doc_texts, encode_docs, shard_size=CORPUS_SHARD_SIZE)
    return queries, np.asarray(docs)


def format_table(result: dict[str, Any], metrics: Sequence[str] = ("ndcg@10", "recall@100", "mrr@10")) -> str:
    """A plain-text table: one row per dataset plus the mean."""
    rows = [(name, values) for name, values in result["datasets"].items()]
    if len(rows) > 1:
        rows.append(("mean", result["mean"]))
    width = max(len("dataset"), *(len(name) for name, _ in rows))
    lines = [f"{'dataset':<{width}}  " + "  ".join(f"{m:>10}" for m in metrics)]
    for name, values in rows:
        cells = "  ".join(f"{values[m]:>10.4f}" if m in values else f"{'-':>10}" for m in metrics)
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines)
