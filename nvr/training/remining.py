"""Re-mining during training (issue 13 section 4, as ANCE / Conan-embedding): every N epochs (and/or N optimizer
steps, applied at the next epoch boundary) the model being trained becomes the teacher of a new mined set.

One round, at ``on_train_epoch_start`` of the epoch after the boundary it is due at (so a round is only run when an
epoch follows that trains on it, the data loader of that epoch is built after the swap, and a run resumed from any
checkpoint, including one written between the last batch and the epoch end, runs it exactly once):

1. Encode the mining data's queries and corpus with the current weights, the way training encodes them (the data
   module's query instruction and masking, passage prefix, both max lengths, the trainer's precision context).
   Each rank encodes one contiguous slice padded to the same length (equal forward calls on every rank, which FSDP
   needs), gathered with :func:`nvr.evaluation.callback.gather_rows`, so every rank holds the full embeddings.
2. :func:`nvr.mining.pipeline.run_mining` on those embeddings through :class:`ModelTeacher` with the data module's
   mining config (``MinedDataModule.mining_config``, contract C3): the same data, depth / widening, exclusions,
   filter, sampler, shortfall policy, cross-encoder and relabel settings; a single teacher (ensembles become
   ``none``). Every rank runs it (deterministic, like ``nvr mine`` under torchrun); rank 0 writes.
3. The round's mined set is an artifact under ``<default_root_dir>/remining/round-NNN-<fingerprint>`` (``mined.jsonl``,
   ``manifest.json``, ``report.json``, ``report.png``), named by the mining content address whose teacher
   fingerprint covers every weight of the model at that point (``Embedder.fingerprint``) and the encoding settings;
   an existing folder that verifies is reused.
4. ``MinedDataModule.swap_mined`` (C3) swaps it in for the next epoch, and per-round statistics are logged under
   ``remine/`` (negative / positive scores, survivors, rows, extra positives) and kept in the callback state.
5. With ``fn_report`` (default) and queries with >= 2 positives, the false-negative rate of the round's filter and
   sampler is measured as ``nvr.mining.fn_report`` does (a seeded half of each such query's positives held back,
   mining re-run on the same embeddings with the rest as anchors; nothing is re-encoded) and logged as
   ``remine/fn_rate`` with its drift from the initial teacher's (``remine/fn_rate_drift``).

Resume: the callback state (rounds done, last round step, history with the epoch each round serves) is checkpointed
and the data module's own state holds the swapped folder (C3), so a resumed run continues with the mined set of its
round; a round already in the history for the epoch being started is not run again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from nvr.config.mining import MineConfig, TeacherConfig
from nvr.data.beir import Corpus
from nvr.search.exact import exact_topk, score_pairs
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.hashing import sha256_json

log = logging.getLogger(__name__)

ROUNDS_DIR = "remining"
TEACHER_KIND = "training-model"
TEACHER_NAME = "training-model"
"""The round teacher's name (provenance of its negatives): the same every round, so equal weights and settings
give an equal mined set and fingerprint whatever the round."""


class ModelTeacher:
    """A teacher over embeddings computed by the model being trained (no model of its own, nothing cached on disk
    but the candidate tables): ``rank_corpus`` looks queries up by text, so re-built (widened) subsets work."""

    kind = "dense"
    uses_query_ids = False

    def __init__(self, name: str, query_texts: Sequence[str], queries: np.ndarray, docs: np.ndarray,
                 weights: str, settings: dict[str, Any], dtype_label: str) -> None:
        self.name = name
        self._query_row = {t: i for i, t in enumerate(query_texts)}
        self._queries = np.ascontiguousarray(queries, dtype=np.float32)
        self._docs = np.ascontiguousarray(docs, dtype=np.float32)
        self.dtype_label = dtype_label
        self._fingerprint = sha256_json({"teacher": TEACHER_KIND, "weights": weights, **settings,
                                         "dtype": dtype_label})

    @property
    def settings_fingerprint(self) -> str:
        """Weights of the model at this round + every encoding setting: the table cache and mined-set key part."""
        return self._fingerprint

    def rank_corpus(self, query_texts: Sequence[str], corpus: Corpus, k: int, pair_idx: np.ndarray,
                    doc_order: np.ndarray | None = None, memory_mb: float = 1024):
        if len(corpus) != len(self._docs):
            raise ValueError(f"corpus has {len(corpus)} docs but {len(self._docs)} were encoded")
        queries = self._queries[[self._query_row[t] for t in query_texts]]
        scores, idx = exact_topk(queries, self._docs, k, memory_mb=memory_mb, doc_order=doc_order)
        rows = np.broadcast_to(np.arange(len(query_texts))[:, None], pair_idx.shape)
        return scores, idx, score_pairs(queries, self._docs, rows, pair_idx)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, padded length) of ``rank``'s contiguous slice of ``n`` texts: every rank gets the same padded
    length ``ceil(n / world)`` (its slice is filled up with repeats), so all ranks run the same forward calls."""
    per = max(1, -(-n // world))
    start = min(n, rank * per)
    return start, min(n, start + per), per


def encode_sharded(pl_module: pl.LightningModule, texts: Sequence[str], *, prefix: str, max_length: int,
                   mask_prefix: bool, batch_size: int) -> np.ndarray:
    """``[len(texts), H]`` float32 embeddings of ``texts`` by the module's embedder, split over the ranks and
    gathered; identical on every rank and equal to a single-process encode (up to batch float rounding)."""
    from nvr.evaluation.callback import _world, gather_rows
    from nvr.modeling.encode import encode_texts

    rank, world = _world()
    start, stop, per = shard_bounds(len(texts), rank, world)
    mine = list(texts[start:stop])
    mine += [texts[-1]] * (per - len(mine))  # equal row counts and batch counts on every rank
    trainer = pl_module.trainer
    with trainer.precision_plugin.forward_context():
        local = encode_texts(pl_module.embedder, mine, prefix=prefix, max_length=max_length, batch_size=batch_size,
                             mask_prefix=mask_prefix, show_progress=False)
    gathered = gather_rows(torch.from_numpy(local), pl_module.device).numpy()
    return np.ascontiguousarray(gathered[: len(texts)])  # slices are contiguous: the padding sits after row n-1


def weights_fingerprint(pl_module: pl.LightningModule) -> str:
    """Every weight (and the tokenizer and pooling settings) of the embedder now; under a sharded strategy the
    combination of every rank's shard hash, in rank order (identical on every rank)."""
    from nvr.evaluation.callback import _world

    local = _local_fingerprint(pl_module.embedder)
    _, world = _world()
    if world == 1:
        return local
    import torch.distributed as dist

    hashes: list[Any] = [None] * world
    dist.all_gather_object(hashes, local)
    return sha256_json(hashes) if len(set(hashes)) > 1 else local


def heldout_fn_metrics(cfg: MineConfig, teachers: Sequence[Any], data: Any, seed: int) -> dict[str, Any] | None:
    """False-negative metrics of ``cfg``'s filter + sampler with ``teachers`` (``fn_report.evaluate_selection``:
    ``fn_rate``, ``hardness``, ``heldout_rejected``...) over a seeded half of the positives of every query with at
    least two held back; None when no query has two positives (no held-out report is possible)."""
    from nvr.config.mining import FnReportConfig
    from nvr.mining.fn_report import evaluate_selection, held_out_set
    from nvr.mining.pipeline import MiningData, build_tables, filter_tables, select_negatives

    try:
        held = held_out_set(cfg, FnReportConfig(seed=seed), data.positives, data.corpus)
    except InputError:
        return None
    qids = held.query_ids
    sub = MiningData(queries=data.queries.subset(qids), positives=held.anchors, corpus=data.corpus, skipped_queries=0,
                     excluded={q: [d for d in data.excluded.get(q, ()) if d not in set(held.held[q])] for q in qids})
    tables = build_tables(cfg, teachers, sub, cfg.depth)
    results = filter_tables(cfg, tables, sub)
    selection, _ = select_negatives(cfg, tables, results)
    return evaluate_selection(tables, results, selection, held.held, cfg.num_negatives)


def _local_fingerprint(embedder: Any) -> str:
    """``Embedder.fingerprint`` (every weight, tokenizer, pooling settings); with FSDP2-sharded parameters (DTensor)
    the rank's local shards instead (the ranks' hashes are combined by :func:`weights_fingerprint`)."""
    state = embedder.state_dict()
    if not any(hasattr(t, "to_local") for t in state.values()):
        return embedder.fingerprint()
    import hashlib

    from nvr.modeling.embedder import tensor_bytes, tokenizer_fingerprint

    digest = hashlib.sha256(tokenizer_fingerprint(embedder.tokenizer).encode("utf-8"))
    for name, tensor in sorted(state.items()):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        digest.update(f"{name}{local.dtype}{tuple(local.shape)}".encode())
        digest.update(tensor_bytes(local))
    return digest.hexdigest()


def score_stats(res: Any) -> dict[str, float]:
    """Per-round statistics of a mining result (``MiningResult``): what drifts as the model trains."""
    sel = res.selection
    rows = res.kept_rows
    neg = sel.neg_scores[rows]
    neg = neg[np.isfinite(neg)]
    first = res.tables[0]
    row_of = {q: i for i, q in enumerate(first.query_ids)}
    pos = np.asarray(first.pos_scores)[[row_of[sel.query_ids[r]] for r in rows]]
    pos = pos[np.isfinite(pos)]
    survivors = res.results[0].num_kept

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x)) if x.size else math.nan

    stats = {
        "rows": float(len(rows)),
        "negatives_per_row": float(neg.size) / max(1, len(rows)),
        "negative_score_mean": mean(neg),
        "negative_score_max": float(np.max(neg)) if neg.size else math.nan,
        "positive_score_mean": mean(pos),
        "survivors_per_query": mean(np.asarray(survivors, dtype=np.float64)),
        "kept_short": float(res.counts.get("kept_short", 0)),
    }
    if res.relabelled is not None:
        stats["extra_positives"] = float(res.counts.get("relabel_extra_positives", 0))
    return stats


class ReMiningCallback(Callback):
    """Re-mine hard negatives with the model being trained (see the module doc).

    Args:
        every_n_epochs: run a round after every N-th epoch, before the next one (None = only ``every_n_steps``).
        every_n_steps: run a round at the first epoch boundary at least N optimizer steps after the previous round (or
            the start); None = only ``every_n_epochs``.
        max_rounds: stop re-mining after this many rounds (None = no limit).
        dataset: which dataset of the data module to re-mine (None = its only / default one).
        output_dir: where rounds are written (default ``<trainer.default_root_dir>/remining``).
        encode_batch_size: texts per forward while encoding the corpus.
        fn_report: log the held-out false-negative rate of every round and its drift from the initial teacher's
            (when some query has >= 2 positives).
    """

    def __init__(self, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 max_rounds: int | None = None, dataset: str | None = None, output_dir: str | None = None,
                 encode_batch_size: int = 64, fn_report: bool = True) -> None:
        for key, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps),
                           ("max_rounds", max_rounds)):
            if value is not None and value < 1:
                raise ConfigError(f"ReMiningCallback.{key}", f"must be >= 1 or null, got {value}")
        if every_n_epochs is None and every_n_steps is None:
            raise ConfigError("ReMiningCallback.every_n_epochs", "set every_n_epochs and/or every_n_steps")
        if encode_batch_size < 1:
            raise ConfigError("ReMiningCallback.encode_batch_size", f"must be >= 1, got {encode_batch_size}")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.max_rounds = max_rounds
        self.dataset = dataset
        self.output_dir = output_dir
        self.encode_batch_size = encode_batch_size
        self.fn_report = fn_report
        self.baseline_fn_rate: float | None = None
        self.rounds = 0
        self.last_round_step = 0
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "last_round_step": self.last_round_step, "history": list(self.history),
                "baseline_fn_rate": self.baseline_fn_rate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds = int(state_dict.get("rounds", 0))
        self.last_round_step = int(state_dict.get("last_round_step", 0))
        self.history = list(state_dict.get("history", []))
        self.baseline_fn_rate = state_dict.get("baseline_fn_rate")

    # ------------------------------------------------------------------------------------------------ rounds
    def due(self, trainer: pl.Trainer) -> bool:
        """Is a round due before the epoch now starting (``current_epoch`` e >= 1: the boundary after epoch e - 1)?
        ``every_n_epochs``: e % N == 0; ``every_n_steps``: N steps since the previous round; never twice for one
        epoch (a resumed run) and never beyond ``max_rounds``."""
        epoch = trainer.current_epoch
        if epoch < 1 or (self.max_rounds is not None and self.rounds >= self.max_rounds):
            return False
        if self.history and int(self.history[-1]["epoch"]) >= epoch:
            return False
        by_epoch = self.every_n_epochs is not None and epoch % self.every_n_epochs == 0
        by_step = self.every_n_steps is not None and trainer.global_step - self.last_round_step >= self.every_n_steps
        return by_epoch or by_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed from a checkpoint written after an epoch's last batch but before the next epoch started:
        Lightning then calls neither that epoch's end nor the next one's start hooks, so a round due there runs now,
        and the batch Lightning already prefetched with the old set is built again from the same sampler position
        (the position only advances when the loop receives a batch)."""
        if trainer.sanity_checking or not self.due(trainer):
            return
        self._round(trainer, pl_module)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.due(trainer):
            return
        self._round(trainer, pl_module)

    def _round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.monotonic()
        record = self.run_round(trainer, pl_module)
        self.rounds += 1
        self.last_round_step = int(trainer.global_step)
        self.history.append(record)
        pl_module.log_dict({f"remine/{k}": v for k, v in record["stats"].items() if math.isfinite(v)},
                           on_step=False, on_epoch=True, batch_size=1)
        log.info("re-mining round %d (epoch %d, step %d) in %.1fs -> %s: %s", self.rounds, trainer.current_epoch,
                 trainer.global_step, time.monotonic() - started, record["mined_dir"],
                 {k: round(v, 4) for k, v in record["stats"].items()})

    def run_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Encode, mine, write (rank 0) and swap in one round; returns its history record."""
        from nvr.mining.mined_set import mined_problem
        from nvr.mining.pipeline import load_data, mining_fingerprint, mining_inputs, run_mining, write_outputs
        from nvr.mining.pipeline import teacher_records as records
        from nvr.utils.atomic import atomic_dir

        dm = self._datamodule(trainer)
        cfg = dm.mining_config(self.dataset)
        if cfg is None:
            raise ConfigError("data.mining", "ReMiningCallback re-applies the mining config of the training set, but "
                                             "the data module has none (data.mined_dir was given without data.mining)")
        round_no = self.rounds + 1
        data = load_data(cfg.data)
        settings = encoding_settings(dm, self.dataset)
        teacher = self._teacher(trainer, pl_module, settings, data)
        round_cfg = round_config(cfg, teacher, pl_module.embedder_config, settings, self.encode_batch_size)
        inputs = mining_inputs(round_cfg, records([teacher], round_cfg.teachers))
        fingerprint = mining_fingerprint(round_cfg, inputs)
        root = Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / ROUNDS_DIR
        out = trainer.strategy.broadcast(str(root / f"round-{round_no:03d}-{fingerprint}"), src=0)
        round_cfg = dataclasses.replace(round_cfg, output_dir=out)
        res = run_mining(round_cfg, teachers=[teacher])
        if trainer.is_global_zero:
            if Path(out).exists() and mined_problem(out, require_manifest=True) is None:
                log.info("re-mining round %d: reusing %s (same weights, settings and data)", round_no, out)
            else:
                with atomic_dir(Path(out), overwrite=True) as tmp:
                    write_outputs(tmp, round_cfg, res, time.monotonic())
        stats = score_stats(res)
        if self.fn_report:
            stats.update(self._fn_stats(cfg, round_cfg, teacher, data))
        trainer.strategy.barrier("remining-written")
        dm.swap_mined(out, dataset=self.dataset)
        return {"round": round_no, "epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
                "mined_dir": out, "fingerprint": fingerprint, "stats": stats}

    def _fn_stats(self, cfg: MineConfig, round_cfg: MineConfig, teacher: ModelTeacher, data: Any) -> dict[str, float]:
        """``fn_rate`` (+ drift from the initial teacher's, measured once at the first round) when possible."""
        from nvr.mining.pipeline import make_teacher

        metrics = heldout_fn_metrics(round_cfg, [teacher], data, cfg.seed)
        if metrics is None or metrics["fn_rate"] is None:
            return {}
        if self.baseline_fn_rate is None:
            base = heldout_fn_metrics(cfg, [make_teacher(t, cfg.cache_dir, cfg.seed) for t in cfg.teachers], data,
                                      cfg.seed)
            self.baseline_fn_rate = None if base is None else base["fn_rate"]
        out = {"fn_rate": float(metrics["fn_rate"]),
               "fn_heldout_rejected": float(metrics["heldout_rejected"] if metrics["heldout_rejected"] is not None
                                            else math.nan)}
        if self.baseline_fn_rate is not None:
            out["fn_rate_drift"] = out["fn_rate"] - float(self.baseline_fn_rate)
        return out

    def _teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule, s: dict[str, Any],
                 data: Any) -> ModelTeacher:
        from nvr.evaluation.callback import TRAINER_PRECISION_LABELS

        query_texts = list(dict.fromkeys(data.queries.texts))
        queries = encode_sharded(pl_module, query_texts, prefix=s["query_prefix"], max_length=s["query_max_length"],
                                 mask_prefix=s["mask_instruction"], batch_size=self.encode_batch_size)
        docs = encode_sharded(pl_module, data.corpus.passages(), prefix=s["passage_prefix"],
                              max_length=s["passage_max_length"], mask_prefix=False,
                              batch_size=self.encode_batch_size)
        precision = str(trainer.precision)
        return ModelTeacher(TEACHER_NAME, query_texts, queries, docs, weights_fingerprint(pl_module), s,
                            TRAINER_PRECISION_LABELS.get(precision, precision))

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "swap_mined") or not hasattr(dm, "mining_config"):
            raise ConfigError("data", "ReMiningCallback needs nvr's MinedDataModule (swap_mined / mining_config)")
        return dm


def encoding_settings(dm: Any, dataset: str | None = None) -> dict[str, Any]:
    """How training encodes the dataset's queries and passages (its instruction and passage prefix, the data
    module's masking and max lengths): the round's teacher encodes the same way."""
    if dataset is None and len(getattr(dm, "mined_datasets", ())) == 1:
        dataset = dm.mined_datasets[0]
    spec = dm.spec(dataset) if hasattr(dm, "spec") else dm
    return {
        "query_prefix": spec.query_prefix, "mask_instruction": bool(dm.mask_instruction),
        "query_max_length": int(dm.query_max_length), "passage_prefix": spec.passage_prefix,
        "passage_max_length": int(dm.passage_max_length), "add_eos": bool(getattr(dm, "add_eos", False)),
    }


def round_config(cfg: MineConfig, teacher: ModelTeacher, emb: Any, s: dict[str, Any], batch_size: int) -> MineConfig:
    """The mining config of a round: the training set's, with the model being trained as its only teacher (the
    teacher entry records the base model and the encoding settings; its fingerprint holds the current weights). It
    keeps the first dense teacher's own filter, if one was set (else the run's ``filter`` applies). Shortfall is
    ``keep_short``: every training query must get a row (``swap_mined`` needs them all), a short one trains with the
    negatives it has."""
    tcfg = TeacherConfig(name=teacher.name, kind="dense", model_name_or_path=emb.model_name_or_path,
                         pooling=emb.pooling, normalize=emb.normalize, add_eos=emb.add_eos,
                         bidirectional=emb.bidirectional, query_prefix=s["query_prefix"],
                         passage_prefix=s["passage_prefix"], query_max_length=s["query_max_length"],
                         passage_max_length=s["passage_max_length"], batch_size=batch_size,
                         dtype="float32" if teacher.dtype_label == "float32" else "auto",
                         filter=next((t.filter for t in cfg.teachers if t.kind == "dense" and t.filter), None))
    return dataclasses.replace(cfg, teachers=[tcfg], ensemble="none", shortfall="keep_short", overwrite=True)
