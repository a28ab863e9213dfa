"""``data.datasets``: several training datasets in one run, each with its own data, instruction and settings.

Each entry is a mapping with these keys (anything else is a one-line ``ConfigError`` naming
``data.datasets[i].<key>``):

* ``name`` (required, unique; letters, digits, ``_ . -``): names its batches (``batch["dataset"]``) and its logs.
* ``task``: ``retrieval`` (default; a mined set: ``mining`` and/or ``mined_dir``, exactly like the single-dataset
  ``data.mining`` / ``data.mined_dir``, each dataset mined or reused with its own teachers and filter),
  ``classification`` or ``sts`` (``path`` to a JSONL/parquet file, see :mod:`nvr.training.tasks`; classification may
  give ``label_texts: {label: description}``, sts ``min_score``).
* ``query_instruction``, ``passage_prefix``, ``num_negatives``, ``max_extra_positives``: default to the ``data.*``
  value of the same name.
* ``weight`` (> 0): share of the steps under ``data.dataset_sampling: proportional``; unset on every entry = each
  dataset in proportion to its number of full batches (every batch once per epoch). Set on all or none.
* ``use_in_batch_negatives``: per-dataset override of ``model.use_in_batch_negatives`` (NV-Embed turns them off in
  stage 2); unset = the model's setting.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from nvr.config.mining import MineConfig
from nvr.utils.errors import ConfigError, nvr_error_in

Task = Literal["retrieval", "classification", "sts"]
TASKS = ("retrieval", "classification", "sts")
DATASET_KEYS = ("name", "task", "mining", "mined_dir", "path", "query_instruction", "passage_prefix", "weight",
                "use_in_batch_negatives", "num_negatives", "max_extra_positives", "label_texts", "min_score")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class DatasetSpec:
    """One resolved training dataset (defaults filled in); ``key`` is its config location for errors."""

    name: str
    key: str
    task: Task = "retrieval"
    mining: MineConfig | None = None
    mined_dir: str | None = None
    path: str | None = None
    query_instruction: str = ""
    passage_prefix: str = ""
    weight: float | None = None
    use_in_batch_negatives: bool | None = None
    num_negatives: int = 1
    max_extra_positives: int = 0
    label_texts: dict[str, str] | None = None
    min_score: float | None = None

    @property
    def query_prefix(self) -> str:
        """NV-Retriever query format ``"{instruction}: {query}"``."""
        return f"{self.query_instruction}: " if self.query_instruction else ""

    @property
    def mined(self) -> bool:
        """Trains on a mined set (retrieval) rather than on examples built from a task file."""
        return self.task == "retrieval"

    def field_key(self, field: str) -> str:
        """Dotted config key of one of this dataset's settings (``data.<field>`` for the single-dataset form)."""
        return f"{self.key}.{field}"


def build_mine_config(raw: Any, key: str) -> MineConfig:
    """A ``MineConfig`` from its YAML mapping (the same parser ``data.mining`` goes through), errors named under
    ``key``."""
    if isinstance(raw, MineConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a mining config mapping, got {type(raw).__name__}")
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--mining", type=MineConfig)
    try:
        return parser.instantiate_classes(parser.parse_object({"mining": dict(raw)})).mining
    except Exception as err:  # jsonargparse wraps our ConfigError / its own type errors in several exception types
        cause = nvr_error_in(err)
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{key}.{cause.key}", cause.message) from None
        if cause is not None:
            raise cause from None
        first = " ".join(str(err).split())
        raise ConfigError(key, first[:300]) from None


def _optional(entry: Mapping[str, Any], key: str, field: str, kinds: tuple[type, ...], what: str) -> Any:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ConfigError(f"{key}.{field}", f"must be {what}, got {value!r}")
    return value


def _count(entry: Mapping[str, Any], key: str, field: str, default: int) -> int:
    value = _optional(entry, key, field, (int,), "an integer >= 0")
    if value is None:
        return default
    if value < 0:
        raise ConfigError(f"{key}.{field}", f"must be >= 0, got {value}")
    return int(value)


def parse_dataset(entry: Any, index: int, defaults: Mapping[str, Any]) -> DatasetSpec:
    """Validate one ``data.datasets[index]`` entry and fill its defaults."""
    key = f"data.datasets[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(key, f"must be a mapping with at least 'name', got {type(entry).__name__}")
    for field in entry:
        if field not in DATASET_KEYS:
            raise ConfigError(f"{key}.{field}", f"unknown dataset key; expected one of {list(DATASET_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{key}.name", f"required: letters, digits, '_', '.', '-' (starting with a letter or digit), "
                                         f"got {name!r}")
    task = entry.get("task", "retrieval")
    if task not in TASKS:
        raise ConfigError(f"{key}.task", f"must be one of {list(TASKS)}, got {task!r}")
    mining, mined_dir, path = entry.get("mining"), entry.get("mined_dir"), entry.get("path")
    if task == "retrieval":
        if path is not None:
            raise ConfigError(f"{key}.path", "only for task classification/sts; a retrieval dataset takes mining "
                                             "or mined_dir")
        if mining is None and mined_dir is None:
            raise ConfigError(f"{key}.mining", "a retrieval dataset needs mining (a mining config) or mined_dir")
    else:
        for field in ("mining", "mined_dir"):
            if entry.get(field) is not None:
                raise ConfigError(f"{key}.{field}", f"a {task} dataset builds its examples from path; "
                                                    f"{field} is for retrieval datasets")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key}.path", f"a {task} dataset needs path (a JSONL or parquet file)")
    if mined_dir is not None and (not isinstance(mined_dir, str) or not mined_dir):
        raise ConfigError(f"{key}.mined_dir", f"must be a folder path, got {mined_dir!r}")
    weight = _optional(entry, key, "weight", (int, float), "a number > 0")
    if weight is not None and (not math.isfinite(weight) or weight <= 0):
        raise ConfigError(f"{key}.weight", f"must be > 0, got {weight}")
    label_texts = entry.get("label_texts")
    if label_texts is not None:
        if task != "classification":
            raise ConfigError(f"{key}.label_texts", "only for task classification")
        if not isinstance(label_texts, Mapping) or not all(
                isinstance(v, str) and v.strip() for v in label_texts.values()):
            raise ConfigError(f"{key}.label_texts", "must map each label to a non-empty text")
        label_texts = {str(k): v for k, v in label_texts.items()}
    min_score = _optional(entry, key, "min_score", (int, float), "a number")
    if min_score is not None:
        if task != "sts":
            raise ConfigError(f"{key}.min_score", "only for task sts")
        if not math.isfinite(min_score):
            raise ConfigError(f"{key}.min_score", f"must be finite, got {min_score}")
    in_batch = _optional(entry, key, "use_in_batch_negatives", (bool,), "true, false or null")
    if task == "sts" and in_batch is False:
        raise ConfigError(f"{key}.use_in_batch_negatives", "an sts dataset has no hard negatives: without in-batch "
                                                           "negatives its loss has nothing to contrast")
    texts = {}
    for field in ("query_instruction", "passage_prefix"):
        value = _optional(entry, key, field, (str,), "a string")
        texts[field] = defaults[field] if value is None else value
    return DatasetSpec(
        name=name, key=key, task=task,
        mining=build_mine_config(mining, f"{key}.mining") if mining is not None else None,
        mined_dir=mined_dir, path=path, weight=None if weight is None else float(weight),
        use_in_batch_negatives=in_batch, num_negatives=_count(entry, key, "num_negatives", defaults["num_negatives"]),
        max_extra_positives=_count(entry, key, "max_extra_positives", defaults["max_extra_positives"]),
        label_texts=label_texts, min_score=None if min_score is None else float(min_score), **texts,
    )


def parse_datasets(entries: Sequence[Any], defaults: Mapping[str, Any]) -> list[DatasetSpec]:
    """All ``data.datasets`` entries: each validated, names unique, weights on all or none."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise ConfigError("data.datasets", f"must be a list of dataset entries, got {type(entries).__name__}")
    if not entries:
        raise ConfigError("data.datasets", "is empty; list at least one dataset (or use data.mining/mined_dir)")
    specs: list[DatasetSpec] = []
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        spec = parse_dataset(entry, i, defaults)
        if spec.name in first:
            raise ConfigError(f"{spec.key}.name", f"duplicate dataset name {spec.name!r} (also "
                                                  f"data.datasets[{first[spec.name]}])")
        first[spec.name] = i
        specs.append(spec)
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        missing = specs[weighted.index(False)]
        raise ConfigError(f"{missing.key}.weight", "set a weight on every dataset or on none (none = in proportion "
                                                   "to each dataset's number of batches)")
    return specs
