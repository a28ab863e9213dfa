"""Progress display of ``nvr fit|validate|test``: one tqdm bar in a terminal, periodic plain lines in logs.

Lightning's default bar (Rich when installed) shows ``Epoch 0/-2`` when ``max_steps`` drives a run
(``max_epochs=-1``) and a meaningless ``v_num: 0.000``; piped to a file, both Rich and tqdm write carriage-return
updates that a log viewer shows as one line at the very end (or not at all). :class:`NvrProgressBar`:

* counts ``step N/M`` over the whole run when ``max_steps`` is set (else ``epoch e/E`` over the epoch's batches),
* labels validation bars with the eval set and what is encoded (``validate cranfield corpus``),
* never shows ``v_num``,
* when its stream is not a terminal, prints ``nvr <stage>: ...`` lines every ``line_interval_s`` seconds (and
  when a stage starts and ends) instead of drawing bars.

:class:`FinalStepLogger` writes the last training step's metrics to the loggers when ``log_every_n_steps`` did
not fall on it, so ``metrics.csv`` has the final loss even for runs shorter than the logging interval.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

LINE_INTERVAL_S = 30.0
"""Seconds between two progress lines per stage in non-terminal logs."""


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def drives_by_steps(trainer: pl.Trainer) -> bool:
    """``max_steps`` bounds the run (set and positive): progress is counted in optimizer steps over the run."""
    return trainer.max_steps is not None and trainer.max_steps > 0


def eval_loader_label(trainer: pl.Trainer, dataloader_idx: int, loaders: Any) -> str | None:
    """``<eval set> <queries|corpus>`` for nvr's BEIR evaluation loaders, None for other loaders."""
    if loaders is None:
        return None
    seq = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    if not 0 <= dataloader_idx < len(seq):
        return None
    dataset = getattr(seq[dataloader_idx], "dataset", None)
    eval_set, kind = getattr(dataset, "eval_set", None), getattr(dataset, "kind", None)
    if eval_set is None or kind is None:
        return None
    return f"{getattr(eval_set, 'name', '?')} {kind}"


class NvrProgressBar(TQDMProgressBar):
    """tqdm bars in a terminal, periodic lines elsewhere (see the module docstring)."""

    def __init__(self, refresh_rate: int = 1, line_interval_s: float = LINE_INTERVAL_S,
                 lines: bool | None = None, stream: IO[str] | None = None) -> None:
        """``lines``: force line mode (True) or bars (False); default: lines unless ``stream`` (default
        ``sys.stderr``, read when the run starts) is a terminal."""
        super().__init__(refresh_rate=refresh_rate)
        self.line_interval_s = float(line_interval_s)
        self._lines_forced = lines
        self._stream = stream
        self._last_line: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._val_label: str | None = None

    # -- mode -----------------------------------------------------------------------------------------------
    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def lines(self) -> bool:
        return (not _isatty(self.stream)) if self._lines_forced is None else self._lines_forced

    @property
    def is_disabled(self) -> bool:
        # bars are created disabled in line mode; updates then go to _line()
        return super().is_disabled or self.lines

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _line(self, stage: str, text: str, force: bool = False) -> None:
        """Print ``nvr <stage>: <text>`` when forced or ``line_interval_s`` passed since the stage's last line."""
        if not self.lines or not self._enabled or self._trainer is None or not self.trainer.is_global_zero:
            return
        now = time.monotonic()
        if not force and now - self._last_line.get(stage, -math.inf) < self.line_interval_s:
            return
        self._last_line[stage] = now
        print(f"nvr {stage}: {text}", file=self.stream, flush=True)

    def _rate(self, stage: str, done: int, total: int | float | None) -> str:
        elapsed = time.monotonic() - self._started.get(stage, time.monotonic())
        text = f"elapsed {format_duration(elapsed)}"
        if done > 0 and total and not math.isinf(total) and elapsed > 0:
            remaining = elapsed / done * max(0.0, total - done)
            text += f", {done / elapsed:.2f} it/s, eta {format_duration(remaining)}"
        return text

    # -- training ---------------------------------------------------------------------------------------------
    def _train_position(self, trainer: pl.Trainer, batch_idx: int) -> tuple[int, int | float | None, str]:
        if drives_by_steps(trainer):
            return trainer.global_step, trainer.max_steps, f"step {trainer.global_step}/{trainer.max_steps}"
        total = self.total_train_batches
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        shown = "?" if total is None or math.isinf(total) else int(total)
        return batch_idx + 1, total, f"epoch {trainer.current_epoch + 1}{epochs} batch {batch_idx + 1}/{shown}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started["train"] = time.monotonic()
        self._steps_at_start = trainer.global_step
        target = f"{trainer.max_steps} steps" if drives_by_steps(trainer) else f"{trainer.max_epochs} epoch(s)"
        self._line("train", f"starting at step {trainer.global_step} (until {target})", force=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        if drives_by_steps(trainer):  # one bar over the whole run: step N/M, not "Epoch 0/-2"
            bar.reset(total=trainer.max_steps)
            bar.n = trainer.global_step
            bar.set_description(f"train (epoch {trainer.current_epoch})")
        else:
            epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
            bar.set_description(f"epoch {trainer.current_epoch + 1}{epochs}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not drives_by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes
        done, total, where = self._train_position(trainer, batch_idx)
        if drives_by_steps(trainer):
            done -= getattr(self, "_steps_at_start", 0)
            total = (total or 0) - getattr(self, "_steps_at_start", 0)
        metrics = format_metrics(self.get_metrics(trainer, pl_module))
        self._line("train", f"{where} | {metrics + ' | ' if metrics else ''}{self._rate('train', done, total)}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        metrics = format_metrics(self.get_metrics(trainer, pl_module))
        elapsed = format_duration(time.monotonic() - self._started.get("train", time.monotonic()))
        self._line("train", f"done at step {trainer.global_step} in {elapsed}{' | ' + metrics if metrics else ''}",
                   force=True)

    # -- validation / test ------------------------------------------------------------------------------------
    def _eval_start(self, stage: str, trainer: pl.Trainer) -> None:
        self._started[stage] = time.monotonic()
        self._last_line.pop(stage, None)
        where = f" at step {trainer.global_step}" if trainer.state.fn == "fit" else ""
        self._line(stage, f"encoding eval sets{where}", force=True)

    def _eval_batch(self, stage: str, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int, loaders: Any) -> None:
        label = eval_loader_label(trainer, dataloader_idx, loaders) or f"dataloader {dataloader_idx}"
        batches = trainer.num_val_batches if stage == "validate" else trainer.num_test_batches
        total = batches[dataloader_idx] if isinstance(batches, list) and dataloader_idx < len(batches) else None
        shown = "?" if total is None or math.isinf(total) else int(total)
        self._line(stage, f"{label} batch {batch_idx + 1}/{shown} | {self._rate(stage, batch_idx + 1, total)}")

    def _eval_end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        shown = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(f"{prefix}/") and k.count("/") == 1}
        values = format_metrics({k: float(v) for k, v in shown.items()})
        elapsed = format_duration(time.monotonic() - self._started.get(stage, time.monotonic()))
        self._line(stage, f"done in {elapsed}{' | ' + values if values else ''}", force=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        if not trainer.sanity_checking:
            self._eval_start("validate", trainer)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if not trainer.sanity_checking and batch_idx == 0 and self._val_progress_bar is not None:
            label = eval_loader_label(trainer, dataloader_idx, trainer.val_dataloaders)
            if label and not self.val_progress_bar.disable:
                self.val_progress_bar.set_description(f"validate {label}")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if not trainer.sanity_checking:
            self._eval_batch("validate", trainer, batch_idx, dataloader_idx, trainer.val_dataloaders)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._eval_end("validate", trainer, pl_module, "val")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._eval_start("test", trainer)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        label = eval_loader_label(trainer, dataloader_idx, trainer.test_dataloaders) if batch_idx == 0 else None
        if label and self._test_progress_bar is not None and not self.test_progress_bar.disable:
            self.test_progress_bar.set_description(f"test {label}")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_batch("test", trainer, batch_idx, dataloader_idx, trainer.test_dataloaders)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._eval_end("test", trainer, pl_module, "test")


class FinalStepLogger(Callback):
    """Log the final training step's metrics when ``log_every_n_steps`` does not fall on it.

    Lightning writes step metrics only every ``log_every_n_steps`` optimizer steps, so a 30-step run with the default
    of 50 leaves no training row in ``metrics.csv``. This runs in ``on_train_batch_end`` (before Lightning's own
    logging of the step) and only for the step that ends the run; it writes the same values Lightning would."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.loggers or trainer.log_every_n_steps <= 0 or trainer.fit_loop._should_accumulate():
            return
        if not self._is_final_step(trainer):
            return
        connector = trainer._logger_connector
        if connector.should_update_logs:  # Lightning logs this step itself
            return
        metrics = connector.metrics["log"]
        if metrics:
            connector.log_metrics(metrics)

    @staticmethod
    def _is_final_step(trainer: pl.Trainer) -> bool:
        if drives_by_steps(trainer) and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and \
            trainer.current_epoch + 1 >= trainer.max_epochs
        return bool(last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
