"""``nvr fit | validate``: LightningCLI over BiEncoderModule + MinedDataModule.

* The data tokenizer and ``add_eos`` are linked from ``model.embedder`` (one source of truth).
* Default callbacks: a monitored ``ModelCheckpoint`` (best ``val/ndcg@10``, top 1) when eval sets exist, a
  :class:`LastCheckpoint` that rewrites ``last.ckpt`` after every validation and at the end of fit (both under
  ``<default_root_dir>/checkpoints``) and ``RetrievalEvaluator`` when eval sets are configured; ones given in the
  config are kept. Lightning's ``save_last=True`` only rewrites ``last.ckpt`` when a top-k file is saved (a run
  that stops improving leaves an old step there), so a configured ``save_last`` is handed over to LastCheckpoint.
* ``--ckpt_path last|best`` is resolved here, under the run's checkpoint folder, for fit, validate and test; a
  missing ``best``/``last`` (validate, test) or a missing/truncated checkpoint file is a one-line error, never a
  silent evaluation of the base model. ``fit --ckpt_path last`` without a ``last.ckpt`` starts fresh (logged).
* Resume: ``nvr fit --config <cfg> --ckpt_path last`` (full state incl. the train sampler position). Warm start
  from another run's weights is ``--model.init_from``.
"""

from __future__ import annotations

import logging
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.states import TrainerFn

from nvr.evaluation.callback import RetrievalEvaluator
from nvr.training.datamodule import MinedDataModule
from nvr.training.module import BiEncoderModule
from nvr.utils.errors import ConfigError, InputError

log = logging.getLogger(__name__)

SUBCOMMANDS = ("fit", "validate", "test")
BEST_MONITOR = "val/ndcg@10"
LAST_NAME = "last.ckpt"


class NvrCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.embedder.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.embedder.add_eos", "data.add_eos")

    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        configured = list(trainer_cfg.get("callbacks") or [])
        root = Path(trainer_cfg.get("default_root_dir") or ".")
        checkpointing = trainer_cfg.get("enable_checkpointing") is not False and self.subcommand == "fit"
        kwargs["callbacks"] = configured + default_callbacks(self.datamodule, configured, root, checkpointing)
        self._checkpoint_dirs = checkpoint_dirs(configured, root)
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads a given checkpoint file's hyper-parameters here, before anything else: check it first."""
        subcommand = self.config.get("subcommand")
        value = self.config[subcommand].get("ckpt_path") if subcommand else None
        if value and value not in ("last", "best", "hpc"):
            check_checkpoint_file(Path(value).expanduser())
        super()._parse_ckpt_path()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs:
            kwargs["ckpt_path"] = resolve_ckpt_path(kwargs["ckpt_path"], self._checkpoint_dirs, subcommand)
        return kwargs


class LastCheckpoint(ModelCheckpoint):
    """Unmonitored checkpoint that always holds the latest state: ``last.ckpt`` is rewritten every
    ``every_n_train_steps`` steps (if set), after every validation and at the end of fit, whatever a monitored
    top-k callback decides. Put it after the monitored callback so the file carries that callback's best path."""

    def __init__(self, dirpath: str | Path | None = None, every_n_train_steps: int | None = None) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, monitor=None,
                         every_n_train_steps=every_n_train_steps, save_on_train_epoch_end=False)

    def _save_now(self, trainer, force: bool) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if force or self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        # forced: a save earlier in this step (every_n_train_steps) predates this validation's best/metrics
        self._save_now(trainer, force=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save_now(trainer, force=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_now(trainer, force=False)


def default_callbacks(datamodule: MinedDataModule, configured: list[Callback], root: Path,
                      checkpointing: bool) -> list[Callback]:
    """Evaluator when eval sets exist; best (monitored) + last checkpoints under ``root/checkpoints`` unless a
    ModelCheckpoint is configured; a configured ``save_last`` is served by a LastCheckpoint in the same folder."""
    extra: list[Callback] = []
    has_eval = bool(datamodule.eval_set_configs)
    if has_eval and not any(isinstance(c, RetrievalEvaluator) for c in configured):
        extra.append(RetrievalEvaluator())
    if not checkpointing:
        return extra
    if any(isinstance(c, LastCheckpoint) for c in configured):
        return extra
    user = [c for c in configured if isinstance(c, ModelCheckpoint)]
    if not user:
        if has_eval:
            extra.append(ModelCheckpoint(
                dirpath=root / "checkpoints", monitor=BEST_MONITOR, mode="max", save_top_k=1, save_last=False,
                filename="step={step}-ndcg={val/ndcg@10:.4f}", auto_insert_metric_name=False,
            ))
        extra.append(LastCheckpoint(dirpath=root / "checkpoints"))
        return extra
    for callback in user:
        if callback.save_last:
            log.info("ModelCheckpoint(save_last=%s) in %s: last.ckpt is written by nvr's LastCheckpoint instead "
                     "(Lightning only rewrites it when a top-k checkpoint is saved)", callback.save_last,
                     callback.dirpath)
            callback.save_last = False
            extra.append(LastCheckpoint(dirpath=callback.dirpath,
                                        every_n_train_steps=callback._every_n_train_steps or None))
    return extra


def checkpoint_dirs(configured: list[Callback], root: Path) -> list[Path]:
    """Where this run's checkpoints live: the configured ModelCheckpoint folders, else ``root/checkpoints``."""
    dirs = [Path(c.dirpath) for c in configured if isinstance(c, ModelCheckpoint) and c.dirpath]
    return dirs or [root / "checkpoints"]


def resolve_ckpt_path(value: str | None, dirs: list[Path], subcommand: str) -> str | None:
    """``last``/``best`` -> a file under ``dirs``; any path -> checked to exist and be a readable checkpoint."""
    if value is None or value == "hpc":
        return value
    where = ", ".join(str(d) for d in dirs)
    if value == "last":
        found = [d / LAST_NAME for d in dirs if (d / LAST_NAME).is_file()]
        if not found:
            if subcommand == "fit":
                log.warning("--ckpt_path last: no %s in %s yet; starting a fresh run", LAST_NAME, where)
                return None
            raise ConfigError("ckpt_path", f"'last': no {LAST_NAME} in {where} (has this run been trained? pass "
                                           "the checkpoint file or the run's --trainer.default_root_dir)")
        path = max(found, key=lambda p: p.stat().st_mtime)
    elif value == "best":
        path = find_best(dirs)
        if path is None:
            raise ConfigError("ckpt_path", f"'best': no monitored ({BEST_MONITOR}) checkpoint recorded in "
                                           f"{where}/{LAST_NAME} (no eval_sets, or not trained yet?)")
    else:
        path = Path(value).expanduser()
    check_checkpoint_file(path)
    return str(path)


def find_best(dirs: list[Path]) -> Path | None:
    """The monitored callback's ``best_model_path`` as recorded in the run's ``last.ckpt`` (read lazily)."""
    for folder in dirs:
        last = folder / LAST_NAME
        if not last.is_file():
            continue
        check_checkpoint_file(last)
        state = torch.load(str(last), map_location="cpu", weights_only=False, mmap=True)
        for cb_state in (state.get("callbacks") or {}).values():
            if not isinstance(cb_state, dict):
                continue
            best = cb_state.get("best_model_path")
            if cb_state.get("monitor") == BEST_MONITOR and best:
                best_path = Path(best)
                if not best_path.is_absolute() and not best_path.exists():
                    best_path = folder / best_path.name
                if best_path.is_file():
                    return best_path
    return None


def check_checkpoint_file(path: Path) -> None:
    """A missing, non-checkpoint or truncated file is one line naming it (a torch zip's central directory sits at
    its end, so truncation is caught without reading the tensors). FSDP2 checkpoint folders pass through."""
    from nvr.modeling.export import is_distributed_checkpoint

    if is_distributed_checkpoint(path):
        return
    if not path.exists():
        raise InputError("no such checkpoint file (--ckpt_path)", path)
    if not path.is_file():
        raise InputError("not a checkpoint file (a folder without .metadata/meta.pt)", path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            size = path.stat().st_size
            bad = [i.filename for i in archive.infolist() if i.header_offset + i.compress_size > size]
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(f"truncated or not a torch checkpoint ({err})", path) from err
    if bad or not any(n.endswith("data.pkl") for n in names):
        raise InputError("truncated or not a torch checkpoint (incomplete archive)", path)


def main(argv: list[str]) -> int:
    """``argv[0]`` is the sub-command; the rest are LightningCLI arguments (``--config``, ``--print_config`` ...)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        got = argv[0] if argv else "nothing"
        raise ConfigError("command", f"expected one of {list(SUBCOMMANDS)}, got {got!r} (use `nvr eval` to test a "
                                     "trained model on BEIR folders)")
    from nvr.utils.yamlcheck import check_config_args

    check_config_args(list(argv))  # duplicate YAML keys etc.: one line naming file:line, before jsonargparse
    # from the console script argv *is* sys.argv[1:]: let Lightning read it (passing both only triggers a warning)
    args = None if list(argv) == sys.argv[1:] else list(argv)
    NvrCLI(
        BiEncoderModule, MinedDataModule, args=args, save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
    )
    return 0
