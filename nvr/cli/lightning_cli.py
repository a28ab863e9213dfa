"""``nvr fit | validate``: LightningCLI over BiEncoderModule + MinedDataModule.

* The data tokenizer and ``add_eos`` are linked from ``model.embedder`` (one source of truth).
* Default callbacks: a monitored ``ModelCheckpoint`` (best ``val/ndcg@10``, top 1) when eval sets exist, a
  :class:`LastCheckpoint` that rewrites ``last.ckpt`` after every validation and at the end of fit (both under
  ``<default_root_dir>/checkpoints``) and ``RetrievalEvaluator`` when eval sets are configured; ones given in the
  config are kept. Lightning's ``save_last=True`` only rewrites ``last.ckpt`` when a top-k file is saved (a run
  that stops improving leaves an old step there), so a configured ModelCheckpoint's ``last.ckpt`` is written by a
  LastCheckpoint in its folder (also when ``save_last`` is unset; ``save_last: false`` opts out). ``last.ckpt``
  has no version counter: a fresh run in the same folder replaces an earlier run's file (with a warning).
* ``--ckpt_path last|best`` is resolved here, under the run's checkpoint folder, for fit, validate and test
  (``best``: the best file of this run's monitored callback, as recorded in ``last.ckpt``); a missing
  ``best``/``last`` (validate, test), a missing/truncated file or a torch file that is not a Lightning checkpoint
  is a one-line error, never a silent evaluation of the base model. ``fit --ckpt_path last`` without a
  ``last.ckpt`` starts fresh (logged). A checkpoint of another embedder config (e.g. LoRA r) is a one-line error.
* ``trainer.precision: auto`` is the default: ``bf16-mixed`` (fp32 master weights) where the accelerator runs bf16
  natively (CUDA with bf16, a CPU with avx512_bf16/AMX), else ``32-true``; an explicit value is used as given.
* Resume: ``nvr fit --config <cfg> --ckpt_path last`` (full state incl. the train sampler position). Warm start
  from another run's weights is ``--model.init_from``.
"""

from __future__ import annotations

import logging
import sys
import zipfile
from pathlib import Path
from typing import Any, Literal, Union

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.states import TrainerFn

from nvr.evaluation.callback import RetrievalEvaluator
from nvr.training.datamodule import MinedDataModule
from nvr.training.module import BiEncoderModule
from nvr.utils.errors import ConfigError, InputError, nvr_error_in

log = logging.getLogger(__name__)

SUBCOMMANDS = ("fit", "validate", "test")
BEST_MONITOR = "val/ndcg@10"
LAST_NAME = "last.ckpt"


class NvrCLI(LightningCLI):
    def __init__(self, *args: Any, auto_configure_optimizers: bool = False, **kwargs: Any) -> None:
        """``auto_configure_optimizers`` is off: the module's own AdamW + warm-up schedule is the only optimizer, and
        an ``optimizer`` / ``lr_scheduler`` key is a one-line error (it would silently replace model.lr etc.)."""
        super().__init__(*args, auto_configure_optimizers=auto_configure_optimizers, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Parse errors become one line (``NvrError``) instead of the whole usage: an unknown key names the config
        file line or flag and the nearest accepted key; an uninstalled logger package names its extra."""
        from argparse import ArgumentError

        from nvr.cli.suggest import option_keys, parse_error

        argv = list(sys.argv[1:] if args is None else args) if args is None or isinstance(args, (list, tuple)) else []
        subcommand = next((a for a in argv if a in SUBCOMMANDS), None)
        sub = getattr(self, "_subcommand_parsers", {}).get(subcommand) if subcommand else None
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        previous = [p.exit_on_error for p in parsers]
        for p in parsers:
            p.exit_on_error = False
        try:
            check_logger_packages(argv)
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            keys = option_keys(sub) if sub is not None else option_keys(parser)
            raise parse_error(str(err), keys, argv, subcommand or "fit") from None
        finally:
            for p, value in zip(parsers, previous):
                p.exit_on_error = value

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.embedder.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.embedder.add_eos", "data.add_eos")
        allow_auto_precision(parser)

    def instantiate_classes(self) -> None:
        """A config dataclass that refuses its values (``ConfigError`` in ``__post_init__``, e.g.
        ``model.embedder.lora.dropout: .nan`` or ``data.mining.filter.perc``) reaches us wrapped in jsonargparse's
        multi-line "Does not validate against any of the Union subtypes" ValueError: re-raise the ConfigError."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = nvr_error_in(err)
            if cause is None:
                raise
            raise cause from None

    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        if trainer_cfg.get("precision") in (None, AUTO_PRECISION) and "precision" not in kwargs:
            kwargs["precision"] = resolve_trainer_precision(trainer_cfg.get("accelerator"))
        else:
            warn_emulated_bf16(kwargs.get("precision", trainer_cfg.get("precision")), trainer_cfg.get("accelerator"))
        configured = list(trainer_cfg.get("callbacks") or [])
        root = Path(trainer_cfg.get("default_root_dir") or ".")
        # checkpoint callbacks are also given to validate/test: they save nothing outside fit, and Lightning warns
        # that "callbacks used to create the checkpoint need to be provided" when they are missing
        checkpointing = trainer_cfg.get("enable_checkpointing") is not False
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = default_logger(root)
        kwargs["callbacks"] = configured + default_callbacks(self.datamodule, configured, root, checkpointing) + \
            display_callbacks(configured, progress_bar=trainer_cfg.get("enable_progress_bar") is not False)
        self._checkpoint_dirs = checkpoint_dirs(kwargs["callbacks"], root)
        self._monitors = [c.monitor for c in kwargs["callbacks"]
                          if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint) and c.monitor]
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
            kwargs["ckpt_path"] = resolve_ckpt_path(kwargs["ckpt_path"], self._checkpoint_dirs, subcommand,
                                                    monitors=self._monitors)
        return kwargs


AUTO_PRECISION = "auto"
"""``trainer.precision: auto`` (the default): ``bf16-mixed`` where the device runs bf16 natively, else ``32-true``."""


def allow_auto_precision(parser) -> None:
    """Let ``trainer.precision`` take ``auto`` and make it the default (Lightning's own type has no such value).

    jsonargparse keeps the accepted type of an option on its action (``_typehint``); extending that union is the
    only way to add a value to an argument LightningCLI derives from ``Trainer.__init__``."""
    action = parser._option_string_actions.get("--trainer.precision")
    if action is None or not hasattr(action, "_typehint"):
        return
    action._typehint = Union[action._typehint, Literal["auto"]]  # noqa: UP007 (a runtime typing object)
    action.default = AUTO_PRECISION
    parser.set_defaults({"trainer.precision": AUTO_PRECISION})


def resolve_trainer_precision(accelerator: Any) -> str:
    """``bf16-mixed`` (fp32 master weights, bf16 autocast) where the accelerator runs bf16 natively: CUDA with bf16
    support, a CPU with ``avx512_bf16``/``amx_bf16`` (:func:`nvr.utils.precision.bf16_supported`); ``32-true``
    elsewhere (emulated bf16 is slower than fp32). ``accelerator: auto`` follows Lightning's choice (CUDA, then MPS,
    then CPU)."""
    from nvr.utils.precision import bf16_supported

    device = accelerator_device(accelerator)
    precision = "bf16-mixed" if device in ("cpu", "cuda") and bf16_supported(device) else "32-true"
    log.info("trainer.precision auto: %s on %s (set trainer.precision to override)", precision, device)
    return precision


def accelerator_device(accelerator: Any) -> str:
    """The device type a ``trainer.accelerator`` value runs on; ``auto`` follows Lightning's choice (CUDA, then MPS,
    then CPU)."""
    name = str(accelerator or "auto").lower() if isinstance(accelerator, str) or accelerator is None else \
        type(accelerator).__name__.lower().replace("accelerator", "")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    return {"gpu": "cuda"}.get(name, name)


def warn_emulated_bf16(precision: Any, accelerator: Any) -> bool:
    """One warning when an explicit bf16 precision runs on a CPU without native bf16 (no ``avx512_bf16`` /
    ``amx_bf16``): torch then takes a generic GEMM fallback, measured 7x slower than fp32 for a MiniLM-sized
    ``linear`` on an AVX2-only EPYC (docs/benchmarks.md). Returns whether it warned."""
    from nvr.utils.precision import bf16_supported

    if not str(precision or "").startswith("bf16") or accelerator_device(accelerator) != "cpu":
        return False
    if bf16_supported("cpu"):
        return False
    log.warning("trainer.precision %s on a CPU without native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo): bf16 "
                "matmuls run in a generic fallback, several times slower than fp32; use trainer.precision auto or "
                "32-true", precision)
    return True


class LastCheckpoint(ModelCheckpoint):
    """Unmonitored checkpoint that always holds the latest state: ``last.ckpt`` is rewritten every
    ``every_n_train_steps`` steps (if set), after every validation and at the end of fit, whatever a monitored
    top-k callback decides. Put it after the monitored callback so the file carries that callback's best path."""

    def __init__(self, dirpath: str | Path | None = None, every_n_train_steps: int | None = None) -> None:
        # no version counter: a fresh run in a folder that holds an older run's last.ckpt must replace it (with
        # the counter it wrote last-v1.ckpt and ``--ckpt_path last`` / ``init_from .../last.ckpt`` took the old run)
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, monitor=None,
                         every_n_train_steps=every_n_train_steps, save_on_train_epoch_end=False,
                         enable_version_counter=False)

    def on_fit_start(self, trainer, pl_module) -> None:
        last = Path(self.dirpath) / LAST_NAME if self.dirpath else None
        if trainer.ckpt_path is None and last is not None and last.exists() and trainer.is_global_zero:
            log.warning("%s is from an earlier run and will be replaced by this one's latest state (pass "
                        "--ckpt_path last to continue that run instead)", last)
        folder = Path(self.dirpath) if self.dirpath else None
        if trainer.ckpt_path is None and folder is not None and folder.is_dir() and trainer.is_global_zero:
            earlier = sorted(p.name for p in folder.glob("*.ckpt") if p.name != LAST_NAME)
            if earlier:  # never deleted (they may be wanted); --ckpt_path best follows this run's record
                log.warning("%s holds %d checkpoint(s) of an earlier run (%s); this run's best is recorded in its "
                            "last.ckpt, so --ckpt_path best ignores them (use a fresh default_root_dir to avoid "
                            "mixing runs)", folder, len(earlier), ", ".join(earlier[:3]) +
                            (", ..." if len(earlier) > 3 else ""))

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


def default_logger(root: Path):
    """nvr's default logger is always a ``CSVLogger`` (``<root>/lightning_logs/version_N/metrics.csv``), whether or
    not tensorboard is installed (Lightning's ``logger: true`` switches to TensorBoard when it is); TensorBoard is
    ``--trainer.logger TensorBoardLogger --trainer.logger.save_dir DIR`` (extra ``nvr[tensorboard]``)."""
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(root))


def display_callbacks(configured: list[Callback], progress_bar: bool) -> list[Callback]:
    """nvr's progress bar (unless one is configured or ``enable_progress_bar: false``) and the final-step logger."""
    from lightning.pytorch.callbacks import ProgressBar

    from nvr.cli.progress import FinalStepLogger, NvrProgressBar

    extra: list[Callback] = []
    if progress_bar and not any(isinstance(c, ProgressBar) for c in configured):
        extra.append(NvrProgressBar())
    if not any(isinstance(c, FinalStepLogger) for c in configured):
        extra.append(FinalStepLogger())
    return extra


TENSORBOARD_LOGGERS = ("TensorBoardLogger",)


def check_logger_packages(argv: list[str]) -> None:
    """A TensorBoardLogger without tensorboard/tensorboardX installed is one line naming the extra to install
    (Lightning raises ModuleNotFoundError from inside jsonargparse's instantiation: a traceback). Checked on the
    command line and in every ``--config`` file's ``trainer.logger``."""
    import yaml

    from nvr.utils.yamlcheck import config_paths

    named: list[str] = [a for a in argv if any(t in a for t in TENSORBOARD_LOGGERS)]
    for path in config_paths(argv):
        try:
            cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # reported by the parser in its own words
        logger = (cfg.get("trainer") or {}).get("logger") if isinstance(cfg, dict) and \
            isinstance(cfg.get("trainer"), dict) else None
        items = logger if isinstance(logger, list) else [logger]
        paths = [i.get("class_path") if isinstance(i, dict) else i for i in items]
        named += [p for p in paths if isinstance(p, str) and any(t in p for t in TENSORBOARD_LOGGERS)]
    if named and not tensorboard_available():
        raise ConfigError("trainer.logger", "TensorBoardLogger needs the tensorboard package: pip install "
                                            "'nvr[tensorboard]' (or drop --trainer.logger for the default CSVLogger)")


def tensorboard_available() -> bool:
    """Lightning's own test (read at call time, so it and nvr always agree)."""
    from lightning.fabric.loggers import tensorboard

    return bool(tensorboard._TENSORBOARD_AVAILABLE) or bool(tensorboard._TENSORBOARDX_AVAILABLE)


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
            # no version counter: a re-run reaching the same step and score overwrites the file instead of writing
            # "...-v1.ckpt" next to it (--ckpt_path best always follows this run's record in last.ckpt)
            extra.append(ModelCheckpoint(
                dirpath=root / "checkpoints", monitor=BEST_MONITOR, mode="max", save_top_k=1, save_last=False,
                filename="step={step}-ndcg={val/ndcg@10:.4f}", auto_insert_metric_name=False,
                enable_version_counter=False,
            ))
        extra.append(LastCheckpoint(dirpath=root / "checkpoints"))
        return extra
    # last.ckpt is nvr's contract unless a callback says ``save_last: false``; a callback without a dirpath would
    # write into the logger's new version folder (never found again by --ckpt_path last): its last goes to root
    served: dict[Path, LastCheckpoint] = {}
    for callback in user:
        if callback.save_last is False:
            continue
        folder = Path(callback.dirpath) if callback.dirpath else root / "checkpoints"
        log.info("ModelCheckpoint(save_last=%s) in %s: last.ckpt is written by nvr's LastCheckpoint in %s "
                 "(Lightning only rewrites it when a top-k checkpoint is saved)", callback.save_last,
                 callback.dirpath, folder)
        callback.save_last = False
        every = callback._every_n_train_steps or None
        if folder not in served:
            served[folder] = LastCheckpoint(dirpath=folder, every_n_train_steps=every)
            extra.append(served[folder])
        elif every and not 0 < served[folder]._every_n_train_steps <= every:  # the most frequent one wins
            served[folder]._every_n_train_steps = every
    return extra


def checkpoint_dirs(callbacks: list[Callback], root: Path) -> list[Path]:
    """Where this run's ``last.ckpt`` lives: the LastCheckpoint folders, else every ModelCheckpoint folder, else
    ``root/checkpoints``."""
    lasts = [Path(c.dirpath) for c in callbacks if isinstance(c, LastCheckpoint) and c.dirpath]
    dirs = lasts or [Path(c.dirpath) for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    return list(dict.fromkeys(dirs)) or [root / "checkpoints"]


def resolve_ckpt_path(value: str | None, dirs: list[Path], subcommand: str,
                      monitors: list[str] | None = None) -> str | None:
    """``last``/``best`` -> a file under ``dirs``; any path -> checked to exist and be a readable checkpoint.

    ``best`` is the ``best_model_path`` of a monitored callback recorded in the run's ``last.ckpt`` (``monitors``:
    this run's monitored metrics, default ``val/ndcg@10``)."""
    if value is None or value == "hpc":
        return value
    where = ", ".join(str(d) for d in dirs)
    if value == "last":
        found = [d / LAST_NAME for d in dirs if _is_checkpoint_entry(d / LAST_NAME)]
        if not found:
            if subcommand == "fit":
                log.warning("--ckpt_path last: no %s in %s yet; starting a fresh run", LAST_NAME, where)
                return None
            raise ConfigError("ckpt_path", f"'last': no {LAST_NAME} in {where} (has this run been trained? pass "
                                           "the checkpoint file or the run's --trainer.default_root_dir)")
        path = max(found, key=lambda p: p.stat().st_mtime)
    elif value == "best":
        wanted = list(monitors or []) or [BEST_MONITOR]
        path = find_best(dirs, wanted)
        if path is None:
            why = "has this run been trained?" if monitors else \
                "no callback of this run monitors a metric: no eval_sets, or a ModelCheckpoint without monitor"
            raise ConfigError("ckpt_path", f"'best': no monitored ({', '.join(wanted)}) checkpoint recorded in "
                                           f"{where}/{LAST_NAME} ({why})")
    else:
        path = Path(value).expanduser()
    check_checkpoint_file(path)
    return str(path)


def _is_checkpoint_entry(path: Path) -> bool:
    """A single-file checkpoint or an FSDP2 (distributed) checkpoint folder of that name."""
    from nvr.modeling.export import is_distributed_checkpoint

    return path.is_file() or is_distributed_checkpoint(path)


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    """The non-tensor entries of a checkpoint (tensors memory-mapped, not read); FSDP2 folders: ``meta.pt``."""
    from nvr.modeling.export import DCP_META_FILE, is_distributed_checkpoint

    target = path / DCP_META_FILE if is_distributed_checkpoint(path) else path
    try:
        state = torch.load(str(target), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot read checkpoint: {first}", target) from err
    if not isinstance(state, dict):
        raise InputError(f"not a Lightning checkpoint (holds a {type(state).__name__}, not a dict)", path)
    return state


def find_best(dirs: list[Path], monitors: list[str] | None = None) -> Path | None:
    """The monitored callback's ``best_model_path`` as recorded in the run's ``last.ckpt`` (read lazily): the
    first of ``monitors`` (default ``val/ndcg@10``) that a recorded callback tracks."""
    wanted = list(monitors or []) or [BEST_MONITOR]
    candidates: list[tuple[int, float, Path]] = []
    for folder in dirs:
        last = folder / LAST_NAME
        if not _is_checkpoint_entry(last):
            continue
        check_checkpoint_file(last)
        state = _checkpoint_meta(last)
        for cb_state in (state.get("callbacks") or {}).values():
            if not isinstance(cb_state, dict) or cb_state.get("monitor") not in wanted:
                continue
            best = cb_state.get("best_model_path")
            if not best:
                continue
            best_path = Path(best)
            if not best_path.is_absolute() and not best_path.exists():
                best_path = folder / best_path.name
            if _is_checkpoint_entry(best_path):
                candidates.append((wanted.index(cb_state["monitor"]), -last.stat().st_mtime, best_path))
    return min(candidates)[2] if candidates else None


LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")


def check_checkpoint_file(path: Path) -> None:
    """A missing, non-checkpoint or truncated file is one line naming it (a torch zip's central directory sits at
    its end, so truncation is caught without reading the tensors), and so is a torch file that is not a Lightning
    checkpoint (e.g. a bare ``state_dict``): its entries are read with the tensors memory-mapped. FSDP2
    checkpoint folders are checked by their ``meta.pt``."""
    from nvr.modeling.export import is_distributed_checkpoint

    if is_distributed_checkpoint(path):
        meta = _checkpoint_meta(path)
        if "pytorch-lightning_version" not in meta:
            raise InputError("not a Lightning checkpoint folder (meta.pt has no pytorch-lightning_version)", path)
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
    missing = [k for k in LIGHTNING_KEYS if k not in _checkpoint_meta(path)]
    if missing:
        raise InputError(f"not a Lightning checkpoint (no {' / '.join(missing)}): a bare state_dict or another "
                         "tool's file? --ckpt_path takes a .ckpt written by `nvr fit`", path)


def main(argv: list[str], cli_class: type[NvrCLI] | None = None) -> int:
    """``argv[0]`` is the sub-command; the rest are LightningCLI arguments (``--config``, ``--print_config`` ...).

    ``cli_class``: an NvrCLI subclass that only adds ``before_<cmd>`` / ``after_<cmd>`` hooks (``nvr quickstart``
    wraps ``fit`` with evaluation and export this way, so parsing, instantiation and training stay this code)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        got = argv[0] if argv else "nothing"
        raise ConfigError("command", f"expected one of {list(SUBCOMMANDS)}, got {got!r} (use `nvr eval` to test a "
                                     "trained model on BEIR folders)")
    from nvr.utils.yamlcheck import check_config_args

    check_config_args(list(argv))  # duplicate YAML keys etc.: one line naming file:line, before jsonargparse
    # from the console script argv *is* sys.argv[1:]: let Lightning read it (passing both only triggers a warning)
    args = None if list(argv) == sys.argv[1:] else list(argv)
    (cli_class or NvrCLI)(
        BiEncoderModule, MinedDataModule, args=args, save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
    )
    return 0
