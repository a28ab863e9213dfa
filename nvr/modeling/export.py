"""Export a trained embedder to a folder that ``SentenceTransformer(path)`` and ``AutoModel`` load.

The folder is an ``Embedder.save_pretrained`` folder (so ``Embedder.from_pretrained`` reloads it exactly) plus the
sentence-transformers module files: ``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``
(mean / cls / lasttoken, ``include_prompt`` = not ``mask_prefix``), ``2_Normalize`` and
``config_sentence_transformers.json`` with the query/document prompts. LoRA is merged so ``AutoModel`` sees plain
weights; a bidirectional decoder keeps ``is_causal: false`` in its ``config.json``.

Not expressible in sentence-transformers (export refuses unless ``sentence_transformers=False``):
latent-attention pooling (a trained head ST has no module for), ``add_eos`` (ST would not append the EOS), and an
unmerged LoRA adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvr.modeling.backbone import is_peft_model
from nvr.modeling.config import EmbedderConfig, as_embedder_config
from nvr.modeling.embedder import Embedder
from nvr.utils.atomic import atomic_dir, atomic_file
from nvr.utils.errors import ConfigError, InputError

ST_POOLING = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}
CKPT_PREFIX = "embedder."
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


def embedder_from_checkpoint(path: str | Path) -> Embedder:
    """Rebuild the Embedder of a Lightning checkpoint: ``hyper_parameters["embedder"]`` + ``embedder.*`` weights.

    The backbone is built unquantized (export merges into full-precision weights); LoRA keys load into the same
    peft structure the training module created.
    """
    path = Path(path)
    try:
        if is_distributed_checkpoint(path):
            ckpt = read_distributed_checkpoint(path)
        else:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise InputError(f"cannot read checkpoint: {err}", path) from err
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "embedder" not in hparams or "state_dict" not in ckpt:
        raise InputError("not an nvr training checkpoint (needs hyper_parameters.embedder and state_dict)", path)
    trained_cfg = as_embedder_config(hparams["embedder"], key=f"{path}:hyper_parameters.embedder")
    cfg = dataclasses.replace(trained_cfg, quantization=None, gradient_checkpointing=False)
    embedder = Embedder.from_config(cfg)
    state = {k[len(CKPT_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(CKPT_PREFIX)}
    if trained_cfg.quantization is not None:  # packed 4/8-bit base weights: keep only the trained parts
        state = {k: v for k, v in state.items() if _is_trained_key(k)}
    missing, unexpected = embedder.load_state_dict(state, strict=False)
    if trained_cfg.quantization is not None:
        missing = [k for k in missing if _is_trained_key(k)]
    if unexpected or missing:
        raise InputError(
            f"checkpoint weights do not match the configured embedder: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})", path,
        )
    return embedder.eval()


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
    query_prefix: str = "",
    passage_prefix: str = "",
    mask_prefix: bool = False,
    max_length: int | None = None,
    sentence_transformers: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the export folder atomically and return its path. The source embedder is not modified."""
    embedder = load_embedder(source)
    cfg = embedder.config
    if sentence_transformers:
        check_st_expressible(cfg, merge_lora)
    backbone, out_cfg = export_backbone(embedder, merge_lora)
    max_length = max_length or cfg.max_length
    prompts = {"query_prefix": query_prefix, "passage_prefix": passage_prefix, "mask_prefix": mask_prefix}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        embedder.write_to(tmp, backbone=backbone, cfg=out_cfg, extra_meta={"prompts": prompts})
        if sentence_transformers:
            write_st_files(tmp, out_cfg, embedder.hidden_size, prompts, max_length)
    return Path(out_dir)


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


def write_st_files(folder: Path, cfg: EmbedderConfig, hidden_size: int, prompts: dict[str, Any],
                   max_length: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    (folder / "1_Pooling").mkdir()
    # prompt masking only affects mean pooling here (cls/last-token read the attention mask, as ST does with it on)
    has_prompt = bool(prompts["query_prefix"] or prompts["passage_prefix"])
    include_prompt = not (cfg.pooling == "mean" and prompts["mask_prefix"] and has_prompt)
    _write_json(folder / "1_Pooling" / "config.json", st_pooling_config(cfg, hidden_size, include_prompt))
    st_prompts = {"query": prompts["query_prefix"], "document": prompts["passage_prefix"]}
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": st_prompts, "default_prompt_name": None,
        "similarity_fn_name": "cosine" if cfg.normalize else "dot",
    })


def _write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2)
