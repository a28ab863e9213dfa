"""Checks of a mining job that need no model (local model folders, max lengths, output and cache locations), run
before any encoding; the clamped config they return is what the manifest records."""

from __future__ import annotations

import contextlib
import dataclasses

from nvr.config.mining import MineConfig
from nvr.utils.preflight import check_cache_dir, check_output_dir


def preflight_mine(cfg: MineConfig) -> MineConfig:
    """Every check of a mining job that needs no model: output and cache locations, local model folders, max
    lengths. Returns the config to run: max lengths above a model's position limit clamped (with a warning), so
    the manifest records the lengths actually used; ``cfg`` itself is not modified."""
    from nvr.utils.models import check_max_length, check_model_source

    check_output_dir(cfg.output_dir, "output_dir", cfg.overwrite)
    check_cache_dir(cfg.cache_dir, "cache_dir")
    teachers = []
    for teacher in cfg.teachers:
        if teacher.kind == "dense" and teacher.model_name_or_path:
            key = f"teachers[{teacher.name}]"
            check_model_source(teacher.model_name_or_path, f"{key}.model_name_or_path")
            lengths = {k: check_max_length(teacher.model_name_or_path, getattr(teacher, k), f"{key}.{k}",
                                           default=_default(teacher, k))
                       for k in ("query_max_length", "passage_max_length")}
            teacher = dataclasses.replace(teacher, **lengths)
        teachers.append(teacher)
    cross = cfg.cross_encoder
    if cross is not None:
        check_model_source(cross.model_name_or_path, "cross_encoder.model_name_or_path")
        limit = check_max_length(cross.model_name_or_path, cross.max_length, "cross_encoder.max_length",
                                 default=_default(cross, "max_length"))
        cross = dataclasses.replace(cross, max_length=limit)
    relabel = cfg.relabel  # the judge: a bad folder fails here, before any encoding
    if relabel is not None:
        check_model_source(relabel.model_name_or_path, "relabel.model_name_or_path")
        limit = check_max_length(relabel.model_name_or_path, relabel.max_length, "relabel.max_length",
                                 default=_default(relabel, "max_length"))
        relabel = dataclasses.replace(relabel, max_length=limit)
    return dataclasses.replace(cfg, teachers=teachers, cross_encoder=cross, relabel=relabel)


def _default(obj: object, name: str) -> object:
    """The dataclass default of field ``name`` (MISSING when it has none)."""
    return next(f.default for f in dataclasses.fields(obj) if f.name == name)  # type: ignore[arg-type]


def teacher_key_scope(cfg: MineConfig) -> contextlib.AbstractContextManager:
    """Report a dense teacher's load errors under ``teachers[<name>]`` (the loaders say ``embedder``). With one
    dense teacher the owner is unambiguous; with several the teacher itself must scope its own loading."""
    from nvr.utils.errors import config_key_scope

    dense = [t.name for t in cfg.teachers if t.kind == "dense"]
    if len(dense) != 1:
        return contextlib.nullcontext()
    return config_key_scope("embedder", f"teachers[{dense[0]}]")
