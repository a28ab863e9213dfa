"""Export a trained embedder to a folder that ``SentenceTransformer(path)`` and ``AutoModel`` load.

The folder is an ``Embedder.save_pretrained`` folder (so ``Embedder.from_pretrained`` reloads it exactly) plus the
sentence-transformers module files: ``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``
(mean / cls / lasttoken), ``2_Normalize``, ``config_sentence_transformers.json`` with the query/document prompts,
and a model card (``README.md``). LoRA is merged so ``AutoModel`` sees plain weights; a bidirectional decoder keeps
``is_causal: false`` in its ``config.json``.

Training's prompt handling is reproduced: the query instruction is masked from mean pooling when training masked
it, the passage prefix never is. When only one of the two prompts is masked, the pooling sits in a
sentence-transformers ``Router`` (one Pooling per task, sentence-transformers >= 5); otherwise a single Pooling
keeps the folder readable by older versions. A training checkpoint supplies the prompts, the masking and the max
lengths (recorded by BiEncoderModule under ``nvr_encoding``); ST has one ``max_seq_length``, so it gets the passage
max and both lengths are recorded in ``config_sentence_transformers.json`` (``nvr``) and ``nvr_embedder.json``.

A LoRA checkpoint (``nvr_trainable_only``) holds only the adapters and heads: the base weights are refilled from
the base model named in its config, then the adapter is loaded and merged.

Not expressible in sentence-transformers (export refuses unless ``sentence_transformers=False``):
latent-attention pooling (a trained head ST has no module for), ``add_eos`` (ST would not append the EOS), and an
unmerged LoRA adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvr.modeling.backbone import is_peft_model
from nvr.modeling.base_model import check_base_model
from nvr.modeling.config import EmbedderConfig, as_embedder_config
from nvr.modeling.embedder import Embedder
from nvr.utils.atomic import atomic_dir, atomic_file, write_json_atomic
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.models import resolve_model_path

log = logging.getLogger(__name__)

ST_POOLING = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}
CKPT_PREFIX = "embedder."
PARTIAL_KEY = "nvr_trainable_only"
"""Checkpoint flag: ``state_dict`` holds only the trainable tensors (frozen LoRA base left out)."""
ENCODING_KEY = "nvr_encoding"
"""Checkpoint entry: training's prompts, masking, max lengths, mined set and last metrics (for export)."""
CARD_FILE = "README.md"
DCP_META_FILE = "meta.pt"
"""Lightning's non-tensor part of a distributed checkpoint folder (``lightning.fabric.strategies`` name)."""


def load_embedder(source: Embedder | nn.Module | str | Path) -> Embedder:
    """An Embedder from a live Embedder, a module with ``.embedder``, a Lightning ``.ckpt`` or a saved folder."""
    if isinstance(source, Embedder):
        return source
    if isinstance(source, nn.Module) and isinstance(getattr(source, "embedder", None), Embedder):
        return source.embedder
    path = Path(str(source))
    if is_distributed_checkpoint(path):
        return embedder_from_checkpoint(path)
    if path.is_dir():
        return Embedder.from_pretrained(path)
    if path.is_file():
        return embedder_from_checkpoint(path)
    raise InputError("no such checkpoint file or embedder folder", path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A single-file or FSDP2 Lightning checkpoint as a dict; unreadable/foreign files are one-line errors."""
    path = Path(path)
    try:
        if is_distributed_checkpoint(path):
            ckpt = read_distributed_checkpoint(path)
        else:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot read checkpoint: {first}", path) from err
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "embedder" not in hparams or "state_dict" not in ckpt:
        raise InputError("not an nvr training checkpoint (needs hyper_parameters.embedder and state_dict)", path)
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> EmbedderConfig:
    return as_embedder_config(ckpt["hyper_parameters"]["embedder"], key=f"{path}:hyper_parameters.embedder")


def embedder_from_checkpoint(path: str | Path, ckpt: dict[str, Any] | None = None) -> Embedder:
    """Rebuild the Embedder of a Lightning checkpoint: ``hyper_parameters["embedder"]`` + ``embedder.*`` weights.

    The backbone is built unquantized from the base model (export merges into full-precision weights); LoRA keys
    load into the same peft structure the training module created. A trainable-only (LoRA) or quantized checkpoint
    lacks the frozen base tensors: they come from the base model, and only trained tensors may be missing.
    """
    path = Path(path)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    trained_cfg = checkpoint_config(ckpt, path)
    cfg = dataclasses.replace(trained_cfg, quantization=None, gradient_checkpointing=False)
    partial = bool(ckpt.get(PARTIAL_KEY)) or trained_cfg.quantization is not None
    if partial:  # the frozen base comes from model_name_or_path: it must be the weights training used
        check_base_model(ckpt, cfg.model_name_or_path, path)
    embedder = Embedder.from_config(cfg)
    state = {k[len(CKPT_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(CKPT_PREFIX)}
    if trained_cfg.quantization is not None:  # packed 4/8-bit base weights: keep only the trained parts
        state = {k: v for k, v in state.items() if _is_trained_key(k)}
    if partial and not any(_is_trained_key(k) for k in state) and cfg.lora is not None:
        raise InputError("LoRA checkpoint without adapter weights (lora_*)", path)
    keep_trained_dtypes(embedder, state)
    missing, unexpected = embedder.load_state_dict(state, strict=False)
    if partial:
        missing = [k for k in missing if _is_trained_key(k)]
    if unexpected or missing:
        raise InputError(
            f"checkpoint weights do not match the configured embedder: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})", path,
        )
    return embedder.eval()


def keep_trained_dtypes(embedder: Embedder, state: dict[str, Any]) -> list[str]:
    """Give the trained parameters (head, adapters, ``modules_to_save``) the dtype they were trained in: training
    keeps them in float32 over a bf16 backbone, and loading them into the bf16 module would round them."""
    cast = []
    for name, param in embedder.named_parameters():
        saved = state.get(name)
        if (_is_trained_key(name) and isinstance(saved, torch.Tensor) and saved.is_floating_point()
                and param.is_floating_point() and saved.dtype != param.dtype):
            param.data = param.data.to(saved.dtype)
            cast.append(name)
    return cast


def is_distributed_checkpoint(path: Path) -> bool:
    """A ``torch.distributed.checkpoint`` folder as written by FSDP2 (ModelParallelStrategy) runs: shards,
    ``.metadata`` and Lightning's ``meta.pt`` (hyper-parameters, loop state)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / DCP_META_FILE).is_file()


def read_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """Consolidate the sharded weights into one CPU ``state_dict`` (optimizer shards are not read) plus the
    ``meta.pt`` entries, i.e. what a single-file Lightning checkpoint holds. Runs in one process, no process group.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    weights: dict[str, Any] = {}
    _load_state_dict(weights, storage_reader=FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    meta = torch.load(str(path / DCP_META_FILE), map_location="cpu", weights_only=False)
    return {**meta, "state_dict": weights.get("state_dict", {})}


def _is_trained_key(key: str) -> bool:
    return "lora_" in key or "modules_to_save" in key or key.startswith("pooler.")


def export_embedder(
    source: Embedder | nn.Module | str | Path,
    out_dir: str | Path,
    *,
    merge_lora: bool = True,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    mask_prefix: bool | None = None,
    query_max_length: int | None = None,
    max_length: int | None = None,
    sentence_transformers: bool = True,
    overwrite: bool = False,
    checkpoint: dict[str, Any] | None = None,
) -> Path:
    """Write the export folder atomically and return its path. The source embedder is not modified.

    ``mask_prefix`` masks the *query* prefix from mean pooling (training's ``mask_instruction``); the passage
    prefix is never masked, as in training. ``max_length`` is the passage length (ST's ``max_seq_length``).
    Unset values come from a training checkpoint's record, else: no prompts, no masking, ``embedder.max_length``.
    ``checkpoint``: the already-read dict of a checkpoint ``source`` (spares a second read of a large file).
    """
    check_output_outside_inputs(out_dir, [source])
    embedder, record = load_source(source, out_dir, sentence_transformers, merge_lora, checkpoint)
    cfg = embedder.config
    check_output_outside_inputs(out_dir, [cfg.model_name_or_path])
    if sentence_transformers:
        check_st_expressible(cfg, merge_lora)
    enc = encoding_settings(record, cfg, query_prefix, passage_prefix, mask_prefix, query_max_length, max_length)
    enc = clamp_encoding_lengths(embedder, enc, explicit={"query_max_length": query_max_length is not None,
                                                          "passage_max_length": max_length is not None})
    backbone, out_cfg = export_backbone(embedder, merge_lora)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        embedder.write_to(tmp, backbone=backbone, cfg=out_cfg, extra_meta={"prompts": enc, "training": record})
        if sentence_transformers:
            write_st_files(tmp, out_cfg, embedder.hidden_size, enc, record.get("matryoshka_dims"))
        write_model_card(tmp, cfg, enc, record, sentence_transformers)
    return Path(out_dir)


def load_source(source: Embedder | nn.Module | str | Path, out_dir: str | Path | None = None,
                sentence_transformers: bool = False, merge_lora: bool = True,
                checkpoint: dict[str, Any] | None = None) -> tuple[Embedder, dict[str, Any]]:
    """The embedder plus, for a training checkpoint, what training recorded about its inputs (else ``{}``).

    With ``out_dir``, a checkpoint's base model folder and ST expressibility are checked from its config before
    the (possibly large) base model is loaded."""
    if isinstance(source, (str, Path)):
        path = Path(str(source))
        if is_distributed_checkpoint(path) or path.is_file():
            ckpt = read_checkpoint(path) if checkpoint is None else checkpoint
            cfg = checkpoint_config(ckpt, path)
            if out_dir is not None:
                check_output_outside_inputs(out_dir, [cfg.model_name_or_path])
                if sentence_transformers:
                    check_st_expressible(cfg, merge_lora)
            return embedder_from_checkpoint(path, ckpt), dict(ckpt.get(ENCODING_KEY) or {})
    return load_embedder(source), {}


def clamp_encoding_lengths(embedder: Embedder, enc: dict[str, Any], explicit: dict[str, bool]) -> dict[str, Any]:
    """Max lengths above the model's position limit would make sentence-transformers fail on long texts: clamp
    them with a warning naming the setting (``--max_length`` / ``--query_max_length`` when given)."""
    from nvr.modeling.backbone import position_limit

    limit = position_limit(getattr(embedder.backbone, "config", None))
    if limit is None:
        return enc
    out = dict(enc)
    for key, flag, fallback in (("query_max_length", "--query_max_length", "the passage length"),
                                ("passage_max_length", "--max_length", "embedder.max_length")):
        if out[key] > limit:
            name = flag if explicit.get(key) else f"{key} (not given: training's value, else {fallback})"
            log.warning("export %s: %d exceeds the %d positions of %s; clamped to %d", name, out[key], limit,
                        embedder.config.model_name_or_path, limit)
            out[key] = limit
    return out


def encoding_settings(record: dict[str, Any], cfg: EmbedderConfig, query_prefix: str | None,
                      passage_prefix: str | None, mask_prefix: bool | None, query_max_length: int | None,
                      max_length: int | None) -> dict[str, Any]:
    """Explicit arguments win over the checkpoint's record, which wins over the plain defaults."""

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else record.get(key, default)

    passage_max = pick(max_length, "passage_max_length", cfg.max_length)
    return {
        "query_prefix": pick(query_prefix, "query_prefix", ""),
        "passage_prefix": pick(passage_prefix, "passage_prefix", ""),
        "mask_prefix": bool(pick(mask_prefix, "mask_instruction", False)),
        "query_max_length": int(pick(query_max_length, "query_max_length", passage_max)),
        "passage_max_length": int(passage_max),
    }


def check_output_outside_inputs(out_dir: str | Path, inputs: list[Any]) -> None:
    """Refuse an export folder that equals, contains or lies inside an input (checkpoint, base model folder):
    ``--overwrite`` replaces the whole folder, which would delete the inputs."""
    out = Path(out_dir).expanduser().resolve()
    for item in inputs:
        if not isinstance(item, (str, Path)):
            continue
        path = Path(resolve_model_path(str(item))).expanduser()
        if not path.exists():
            continue
        path = path.resolve()
        if out == path or out in path.parents or path in out.parents:
            raise ConfigError("output", f"{out} overlaps the input {path} (it would be replaced or deleted); "
                                        "export to a folder outside the checkpoint and model folders")


def check_st_expressible(cfg: EmbedderConfig, merge_lora: bool) -> None:
    if cfg.pooling == "latent_attention":
        raise ConfigError(
            "embedder.pooling",
            "latent_attention pooling cannot be expressed in sentence-transformers (no module for the trained "
            "latent head); export with sentence_transformers=False (CLI: --sentence_transformers false) to get the "
            "backbone + nvr head, and load it with nvr.modeling.embedder.Embedder.from_pretrained",
        )
    if cfg.add_eos:
        raise ConfigError(
            "embedder.add_eos", "sentence-transformers does not append an EOS token, so last-token embeddings would "
            "differ; export with sentence_transformers=False",
        )
    if cfg.lora is not None and not merge_lora:
        raise ConfigError("merge_lora", "a sentence-transformers export needs merged LoRA weights (merge_lora=True)")


def st_expressible(cfg: EmbedderConfig) -> bool:
    """Whether a merged export of ``cfg`` can carry sentence-transformers files (see :func:`check_st_expressible`)."""
    try:
        check_st_expressible(cfg, merge_lora=True)
    except ConfigError:
        return False
    return True


def is_training_checkpoint(path: str | Path) -> bool:
    """``path`` names a Lightning checkpoint (a file, or an FSDP2 checkpoint folder), not a model folder/hub id."""
    candidate = Path(str(path)).expanduser()
    return candidate.is_file() or is_distributed_checkpoint(candidate)


@dataclasses.dataclass
class ExportedCheckpoint:
    """A checkpoint exported for reading: the folder, its encoding (:func:`export_encoding`), and whether it has
    sentence-transformers files."""

    folder: Path
    encoding: dict[str, Any]
    sentence_transformers: bool
    config: EmbedderConfig


@contextlib.contextmanager
def exported_checkpoint(path: str | Path, parent: str | Path | None = None) -> Iterator[ExportedCheckpoint]:
    """Export a training checkpoint (full, LoRA trainable-only, QLoRA or FSDP2) into a temporary folder that lives
    for the ``with`` block: the very folder ``nvr export`` would write (sentence-transformers files where the
    embedder is expressible there), so anything reading it sees the exported model's embeddings. ``parent``: where
    the temporary folder goes (default: the system temp dir; a merged 7B model needs ~15 GB there)."""
    path = Path(str(path)).expanduser()
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    st = st_expressible(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="nvr-checkpoint-", dir=parent))
    try:
        folder = export_embedder(path, tmp / "model", sentence_transformers=st, checkpoint=ckpt)
        del ckpt
        yield ExportedCheckpoint(folder, export_encoding(folder), st, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_encoding(folder: Path) -> dict[str, Any]:
    """The encoding an export folder was written with (``nvr_embedder.json`` ``prompts``: query/passage prefix,
    ``mask_prefix``, query/passage max length), ``{}`` for a folder that records none."""
    from nvr.modeling.embedder import read_meta

    return dict(read_meta(folder).get("prompts") or {})


def export_backbone(embedder: Embedder, merge_lora: bool) -> tuple[nn.Module, EmbedderConfig]:
    """The backbone to write (a merged copy when LoRA is merged) and the config that describes it."""
    cfg = embedder.config
    if not (merge_lora and is_peft_model(embedder.backbone)):
        return embedder.backbone, cfg
    source = dequantized(embedder) if cfg.quantization else embedder
    merged = copy.deepcopy(source.backbone).merge_and_unload()
    return merged, dataclasses.replace(cfg, lora=None, quantization=None, gradient_checkpointing=False)


def dequantized(embedder: Embedder) -> Embedder:
    """A full-precision copy of a QLoRA embedder: fresh base in ``dtype`` + the trained adapter/head weights."""
    cfg = dataclasses.replace(embedder.config, quantization=None, gradient_checkpointing=False)
    fresh = Embedder.from_config(cfg)
    trained = {k: v for k, v in embedder.state_dict().items() if _is_trained_key(k)}
    fresh.load_state_dict(trained, strict=False)
    return fresh


def st_pooling_config(cfg: EmbedderConfig, hidden_size: int, include_prompt: bool) -> dict[str, Any]:
    """``1_Pooling/config.json`` in the long-standing key format (read by sentence-transformers 2.x to 6.x)."""
    mode = ST_POOLING[cfg.pooling]
    return {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": mode == "lasttoken",
        "include_prompt": include_prompt,
    }


def write_st_files(folder: Path, cfg: EmbedderConfig, hidden_size: int, enc: dict[str, Any],
                   matryoshka_dims: list[int] | None = None) -> None:
    """modules.json + module configs. Pooling masks the query prompt iff training masked it (mean pooling only:
    cls/last-token read the attention mask); the passage prefix is never masked. If the two differ, a Router picks
    the Pooling by task (``encode_query`` / ``encode_document``)."""
    query_masked = cfg.pooling == "mean" and enc["mask_prefix"] and bool(enc["query_prefix"])
    passage_has_prompt = bool(enc["passage_prefix"])
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    ]
    (folder / "1_Pooling").mkdir()
    if query_masked and passage_has_prompt:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Router"})
        write_router(folder / "1_Pooling", cfg, hidden_size)
    else:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        write_st_json(folder / "1_Pooling" / "config.json", st_pooling_config(cfg, hidden_size, not query_masked))
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    write_st_json(folder / "modules.json", modules)
    write_st_json(folder / "sentence_bert_config.json",
                {"max_seq_length": enc["passage_max_length"], "do_lower_case": False})
    write_st_json(folder / "config_sentence_transformers.json", {
        "prompts": {"query": enc["query_prefix"], "document": enc["passage_prefix"]}, "default_prompt_name": None,
        "similarity_fn_name": "cosine" if cfg.normalize else "dot",
        "nvr": {"query_max_length": enc["query_max_length"], "passage_max_length": enc["passage_max_length"],
                "note": "sentence-transformers has one max_seq_length: the passage length; nvr truncates queries "
                        "at query_max_length",
                **({"matryoshka_dims": list(matryoshka_dims)} if matryoshka_dims else {})},
    })


def write_router(folder: Path, cfg: EmbedderConfig, hidden_size: int) -> None:
    """A Router with one Pooling per task: queries without their (masked) prompt, documents with theirs."""
    pooling = "sentence_transformers.models.Pooling"
    for route, include_prompt in (("query", False), ("document", True)):
        sub = folder / f"{route}_0_Pooling"
        sub.mkdir()
        write_st_json(sub / "config.json", st_pooling_config(cfg, hidden_size, include_prompt))
    write_st_json(folder / "router_config.json", {
        "types": {"query_0_Pooling": pooling, "document_0_Pooling": pooling},
        "structure": {"query": ["query_0_Pooling"], "document": ["document_0_Pooling"]},
        "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}},
    })


def write_model_card(folder: Path, cfg: EmbedderConfig, enc: dict[str, Any], record: dict[str, Any],
                     sentence_transformers: bool) -> None:
    """README.md: base model, encoding, training data (the mined set's manifest) and the last eval metrics."""
    masked = enc["mask_prefix"] and bool(enc["query_prefix"])
    lengths = f"- max length: queries {enc['query_max_length']}, passages {enc['passage_max_length']} tokens"
    lines = ["---", "library_name: sentence-transformers" if sentence_transformers else "library_name: nvr",
             "tags: [sentence-transformers, feature-extraction, nvr]" if sentence_transformers else
             "tags: [feature-extraction, nvr]", "---", "",
             f"# Embedding model fine-tuned from `{cfg.model_name_or_path}` with nvr", "",
             "## Encoding", "",
             f"- pooling: {cfg.pooling}, normalize: {cfg.normalize}, bidirectional: {cfg.bidirectional}, "
             f"add_eos: {cfg.add_eos}, dtype: {cfg.dtype}",
             f"- query prompt: {json.dumps(enc['query_prefix'])} (masked from pooling: {masked})",
             f"- document prompt: {json.dumps(enc['passage_prefix'])} (not masked)",
             lengths + (" (sentence-transformers uses the passage length for both)" if sentence_transformers else ""),
             *matryoshka_lines(record.get("matryoshka_dims"), sentence_transformers), ""]
    if sentence_transformers:
        lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
                  'model = SentenceTransformer("path/to/this/folder")',
                  'q = model.encode_query(["..."])', 'd = model.encode_document(["..."])', "```", ""]
    else:
        lines += ["```python", "from nvr.modeling.embedder import Embedder", "from nvr.modeling.encode import "
                  "encode_texts", "", 'model = Embedder.from_pretrained("path/to/this/folder")',
                  f"q = encode_texts(model, [\"...\"], prefix={json.dumps(enc['query_prefix'])}, mask_prefix={masked}, "
                  f"max_length={enc['query_max_length']})",
                  f"d = encode_texts(model, [\"...\"], prefix={json.dumps(enc['passage_prefix'])}, "
                  f"max_length={enc['passage_max_length']})", "```", ""]
    manifest = _read_manifest(record.get("mined_dir"))
    if manifest:
        lines += ["## Training data (hard-negative mining)", ""]
        for key in ("data", "teachers", "filter", "sampler", "ensemble", "num_negatives", "depth", "counts"):
            if key in manifest:
                lines.append(f"- {key}: `{json.dumps(manifest[key], sort_keys=True, default=str)[:400]}`")
        lines.append("")
    metrics = record.get("metrics") or {}
    if metrics:
        step, saved = record.get("metrics_step"), record.get("global_step")
        where = f", step {step}" if step is not None else ""
        if saved is not None and saved != step:
            where += f"; checkpoint saved at step {saved}"
        lines += [f"## Evaluation (last validation{where})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
        lines.append("")
    with atomic_file(folder / CARD_FILE) as fh:
        fh.write("\n".join(lines))


def matryoshka_lines(dims: list[int] | None, sentence_transformers: bool) -> list[str]:
    """Model-card line for a Matryoshka-trained model: the dims training optimised and how to truncate."""
    if not dims:
        return []
    how = (f"`SentenceTransformer(path, truncate_dim={min(dims)})`" if sentence_transformers
           else f"`nvr eval --truncate_dim {min(dims)}`")
    return [f"- Matryoshka dims (trained): {list(dims)}; truncate e.g. with {how}"]


def _read_manifest(mined_dir: str | None) -> dict[str, Any] | None:
    if not mined_dir:
        return None
    path = Path(mined_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_st_json(path: Path, obj: Any) -> None:
    """The sentence-transformers module files, in the bytes earlier exports wrote (ASCII, no final newline)."""
    write_json_atomic(path, obj, newline=False)
