"""``nvr fit | validate``: LightningCLI over BiEncoderModule + MinedDataModule.

* The data tokenizer and ``add_eos`` are linked from ``model.embedder`` (one source of truth).
* Default callbacks: ``ModelCheckpoint`` (``<default_root_dir>/checkpoints``, ``save_last``, monitoring
  ``val/ndcg@10`` when eval sets exist) and ``RetrievalEvaluator`` when eval sets are configured; ones given in
  the config are kept and not duplicated.
* Resume: ``nvr fit --config <cfg> --ckpt_path last`` (full state incl. the train sampler position). Warm start
  from another run's weights is ``--model.init_from``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from nvr.evaluation.callback import RetrievalEvaluator
from nvr.training.datamodule import MinedDataModule
from nvr.training.module import BiEncoderModule
from nvr.utils.errors import ConfigError

SUBCOMMANDS = ("fit", "validate", "test")


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
        return super().instantiate_trainer(**kwargs)


def default_callbacks(datamodule: MinedDataModule, configured: list[Callback], root: Path,
                      checkpointing: bool) -> list[Callback]:
    """Evaluator when eval sets exist; a ModelCheckpoint under ``root/checkpoints`` unless one is configured."""
    extra: list[Callback] = []
    has_eval = bool(datamodule.eval_set_configs)
    if has_eval and not any(isinstance(c, RetrievalEvaluator) for c in configured):
        extra.append(RetrievalEvaluator())
    if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in configured):
        extra.append(ModelCheckpoint(
            dirpath=root / "checkpoints", save_last=True, monitor="val/ndcg@10" if has_eval else None,
            mode="max", save_top_k=1, filename="step={step}-ndcg={val/ndcg@10:.4f}" if has_eval else "step={step}",
            auto_insert_metric_name=False,
        ))
    return extra


def main(argv: list[str]) -> int:
    """``argv[0]`` is the sub-command; the rest are LightningCLI arguments (``--config``, ``--print_config`` ...)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        got = argv[0] if argv else "nothing"
        raise ConfigError("command", f"expected one of {list(SUBCOMMANDS)}, got {got!r} (use `nvr eval` to test a "
                                     "trained model on BEIR folders)")
    # from the console script argv *is* sys.argv[1:]: let Lightning read it (passing both only triggers a warning)
    args = None if list(argv) == sys.argv[1:] else list(argv)
    NvrCLI(
        BiEncoderModule, MinedDataModule, args=args, save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
    )
    return 0
