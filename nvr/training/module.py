"""BiEncoderModule: one shared Embedder for queries and passages, trained with InfoNCE (NV-Retriever recipe).

Checkpoints and warm starts:

* ``--ckpt_path`` (Lightning) is a *full resume*: weights, optimizer, scheduler, loop counters and the train
  sampler position. ``init_from`` is a *warm start*: weights only (stage 2 starting from stage 1), applied in
  ``__init__`` so that a later ``--ckpt_path`` restore still wins.
* With LoRA (base frozen) ``on_save_checkpoint`` keeps only the trainable tensors (adapters, latent-attention
  head, ``modules_to_save``) and marks the checkpoint; ``on_load_checkpoint`` refills the frozen base weights from
  the freshly loaded base model, so strict loading and full resume still work while the file stays small.
  Sharded (FSDP2) checkpoints are written by the strategy and keep every tensor. ``nvr export`` refills the base
  the same way. Every checkpoint also records training's prompts, masking, max lengths, mined set and last
  metrics (``nvr_encoding``) so the export reproduces the embeddings and writes a model card.
* Trainable parameters are kept in float32 (master weights) even when the backbone is bf16/fp16, and again
  after a ``*-true`` precision plugin casts the whole module (``configure_optimizers``).
* Dropout randomness is reseeded every step from ``(seed, global_step, rank)``, so a resumed run replays exactly
  what the uninterrupted run would have done without storing RNG states.
* ``mini_batch_size`` / ``mini_batch_num_tokens`` turn on the cached (GradCache) InfoNCE of
  :mod:`nvr.training.cached` under Lightning's automatic optimization: ``training_step`` computes graph-free
  embeddings, the full-batch loss and its embedding gradients, and returns a leaf holding the loss; :meth:`backward`
  re-encodes each mini-batch (replayed dropout, same autocast) and back-propagates it. Gradient accumulation,
  clipping, the LR schedule, checkpoints/resume, DDP and FSDP2 (incl. cross-device negatives) work unchanged and
  are tested equal to the uncached loss. DDP with ``find_unused_parameters=True`` is refused (a ConfigError).
* The objective (:mod:`nvr.training.objective`) is a function of the embeddings only: InfoNCE with multi-positive
  targets, teacher and self-guided masking, KD from teacher scores and Matryoshka dims work the same in both paths.
  A batch may override ``use_in_batch_negatives`` (per-dataset setting, contract C1) and names its dataset, whose
  loss is logged as ``train/loss/<dataset>``; ``train/accuracy``, ``train/margin`` and ``train/grad_norm`` come
  from the step's own scores and gradients (no extra forward).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from nvr.modeling.base_model import BASE_KEY, base_model_record, check_base_model
from nvr.modeling.config import EmbedderConfig, as_embedder_config
from nvr.modeling.embedder import Embedder
from nvr.modeling.export import ENCODING_KEY, PARTIAL_KEY  # checkpoint format, shared with nvr export
from nvr.training.cached import (
    PendingBackward,
    cached_backward,
    encode_without_grad,
    plan_mini_batches,
    take_rows,
)
from nvr.training.kd import teacher_group_scores
from nvr.training.loss import MULTI_POSITIVE_MODES, PAD_ID, MultiPositive
from nvr.training.objective import LOSS_KINDS, LossKind, Objective, ObjectiveOutput
from nvr.utils.distributed import gather_padded
from nvr.utils.errors import ConfigError, InputError
from nvr.utils.fingerprint import memo_dir_for
from nvr.utils.seeding import derive_seed

log = logging.getLogger(__name__)

Schedule = Literal["linear", "cosine", "constant"]


class BiEncoderModule(pl.LightningModule):
    """Contrastive fine-tuning of an :class:`~nvr.modeling.embedder.Embedder`.

    Args:
        embedder: backbone, pooling, LoRA, quantization, dtype.
        temperature: InfoNCE temperature (NV-Embed / NV-Retriever style 0.02).
        use_in_batch_negatives: score each query against every passage of the batch, not only its own.
        gather_across_devices: also score against other ranks' passages (autograd all-gather).
        false_negative_perc: drop a hard negative from its query's row when its teacher score is
            ``>= perc * positive teacher score`` (sign-safe form); None = off.
        lr, weight_decay: AdamW over the trainable parameters (no decay on biases / norms).
        warmup_steps: linear warm-up from 0 to ``lr``.
        scheduler: shape after warm-up, over ``trainer.estimated_stepping_batches``.
        init_from: stage-1 ``.ckpt`` or an Embedder folder to take weights from (not optimizer state).
        seed: base of the per-step dropout seed; None = ``seed_everything``'s seed (``PL_GLOBAL_SEED``) or 0.
        mini_batch_size: cached InfoNCE (:mod:`nvr.training.cached`): encode at most this many sequences per
            forward; the loss still spans the whole batch (and the other ranks' passages) with the same gradients.
        mini_batch_num_tokens: cached InfoNCE with a budget of padded tokens (rows x longest) per forward.
            Either setting turns caching on; both may be combined. None (default) = one forward per field.
        loss: ``infonce`` | ``kd`` (KL divergence to the mined set's teacher scores over each query's own
            positive + hard negatives, :mod:`nvr.training.kd`) | ``infonce+kd`` (their sum).
        kd_weight: factor of the KD term.
        kd_temperature: student temperature of the KD softmax; None = ``temperature``.
        kd_teacher_temperature: teacher temperature of the KD softmax; None = the student's KD temperature (right
            for cosine teachers; set it for other scales, e.g. 1.0 for cross-encoder logits).
        multi_positive: with extra positives in the batch: ``each`` (every positive its own target, the others
            masked; mean over the query's positives) or ``logsumexp`` (log of the softmax mass on the positive set).
        self_mask_margin: Qwen3-Embedding's self-guided masking: drop in-batch and hard negatives whose score from
            the model being trained exceeds the positive's by more than this (0.1 in Qwen3); None = off.
        matryoshka_dims: sum the loss over these truncated embedding sizes (e.g. [768, 512, 256, 128, 64]),
            re-normalized when the embedder normalizes; None = the full embedding only.
        matryoshka_weights: one weight per Matryoshka dim; None = 1 each.
        length_bucket_size: encode each field (queries, passages) in length-sorted chunks of at most this many
            rows, each padded only to its own longest text; the graph is kept, so the loss is the full batch's.
            Worth it where lengths vary (at 512 passage tokens a batch is ~1.6-2.3x padding on SciFact /
            Cranfield: ``benchmarks/padding_share.py``); changes only the dropout draws. None = one forward per
            field. The cached loss (``mini_batch_*``) already length-sorts its mini-batches.
    """

    def __init__(
        self,
        embedder: EmbedderConfig,
        temperature: float = 0.02,
        use_in_batch_negatives: bool = True,
        gather_across_devices: bool = False,
        false_negative_perc: float | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        scheduler: Schedule = "linear",
        init_from: str | None = None,
        seed: int | None = None,
        mini_batch_size: int | None = None,
        mini_batch_num_tokens: int | None = None,
        loss: LossKind = "infonce",
        kd_weight: float = 1.0,
        kd_temperature: float | None = None,
        kd_teacher_temperature: float | None = None,
        multi_positive: MultiPositive = "each",
        self_mask_margin: float | None = None,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        length_bucket_size: int | None = None,
    ) -> None:
        settings = {k: v for k, v in locals().items() if k not in ("self", "embedder", "__class__")}
        super().__init__()
        cfg = as_embedder_config(embedder, key="model.embedder")
        check_finite_hparams(settings, cfg)
        _validate(temperature, false_negative_perc, lr, weight_decay, warmup_steps, scheduler)
        validate_objective(settings)
        for key, value in (("mini_batch_size", mini_batch_size), ("mini_batch_num_tokens", mini_batch_num_tokens),
                           ("length_bucket_size", length_bucket_size)):
            if value is not None and value < 1:
                raise ConfigError(f"model.{key}", f"must be >= 1 or null, got {value}")
        if length_bucket_size is not None and (mini_batch_size is not None or mini_batch_num_tokens is not None):
            raise ConfigError("model.length_bucket_size", "applies to the uncached forward; the cached loss "
                                                          "(mini_batch_size / mini_batch_num_tokens) already "
                                                          "length-sorts its mini-batches: set one of them")
        self.save_hyperparameters(ignore=["embedder"])
        self.hparams["embedder"] = cfg.to_dict()
        self.embedder_config = cfg
        self.embedder = Embedder.from_config(cfg)
        check_matryoshka_dims(matryoshka_dims, self.embedder.hidden_size)
        self.objective = Objective(
            temperature=temperature, loss=loss, kd_weight=kd_weight, kd_temperature=kd_temperature,
            kd_teacher_temperature=kd_teacher_temperature, multi_positive=multi_positive,
            self_mask_margin=self_mask_margin,
            matryoshka_dims=tuple(matryoshka_dims) if matryoshka_dims else None,
            matryoshka_weights=tuple(matryoshka_weights) if matryoshka_weights else None, normalize=cfg.normalize,
        )
        self.seed = seed
        self._pending: PendingBackward | None = None
        if init_from:
            load_warm_start(self.embedder, init_from)
        freeze_unused_heads(self.embedder)
        keep_fp32_master_weights(self.embedder)
        self.train()  # from_pretrained returns eval mode; Lightning 2.6 keeps module modes as it finds them

    # ------------------------------------------------------------------------------------------------ steps
    def encode(self, features: dict[str, Tensor]) -> Tensor:
        return self.embedder(features["input_ids"], features["attention_mask"], features.get("pool_mask"))

    def encode_field(self, features: dict[str, Tensor]) -> Tensor:
        """One field of a training batch, with its graph: in length buckets when ``length_bucket_size`` is set."""
        plan = plan_mini_batches(features["attention_mask"].sum(dim=1), self.hparams.get("length_bucket_size"), None)
        if len(plan) == 1:
            return self.encode(features)
        out = torch.cat([self.encode(take_rows(features, rows)) for rows in plan])
        return out.index_select(0, torch.argsort(torch.cat(plan)).to(out.device))  # back to batch order

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(derive_seed(base, "step", self.global_step, self.global_rank) % (2**63))

    @property
    def cached_loss(self) -> bool:
        return self.hparams.get("mini_batch_size") is not None or self.hparams.get("mini_batch_num_tokens") is not None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.cached_loss:
            return self._cached_training_step(batch)
        query_emb = self.encode_field(batch["query"])
        batch_size, group = batch["passage_ids"].shape
        passage_emb = self.encode_field(batch["passages"]).reshape(batch_size, group, -1)
        remote_emb, remote_ids = self._remote_passages(passage_emb, batch["passage_ids"], batch)
        out = self._objective(query_emb, passage_emb, batch, remote_emb, remote_ids)
        self._log_step(out, batch)
        return out.loss

    def _cached_training_step(self, batch: dict[str, Any]) -> Tensor:
        """GradCache: graph-free embeddings in mini-batches, the full-batch loss and its gradient w.r.t. them; the
        parameter gradients follow in :meth:`backward`. Returns a leaf holding the loss value."""
        batch_size, group = batch["passage_ids"].shape
        limits = (self.hparams.mini_batch_size, self.hparams.mini_batch_num_tokens)
        queries = encode_without_grad(self.encode, batch["query"], *limits)
        passages = encode_without_grad(self.encode, batch["passages"], *limits)
        query_emb = queries.embeddings.detach().float().requires_grad_()
        passage_emb = passages.embeddings.detach().float().requires_grad_()
        leaves = [query_emb, passage_emb]
        gathered = None
        if self._wants_remote(batch):
            gathered = self._gather_passages(passage_emb.detach(), batch["passage_ids"], sync_grads=False)
        remote_emb = remote_ids = None
        if gathered is not None:
            all_emb, all_ids, counts = gathered
            all_emb = all_emb.float().requires_grad_()
            leaves.append(all_emb)
            remote_emb, remote_ids = _others(all_emb, all_ids, counts, self.global_rank)
        with torch.enable_grad():
            out = self._objective(query_emb, passage_emb.reshape(batch_size, group, -1), batch, remote_emb,
                                  remote_ids)
            grads = list(torch.autograd.grad(out.loss, leaves, allow_unused=True))
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]
        if gathered is not None:
            # other ranks' losses scored this rank's passages too: sum every rank's gradient w.r.t. the gathered
            # passages and keep this rank's row (what all_gather(sync_grads=True)'s reduce-scatter does)
            total = self.trainer.strategy.reduce(grads[2].contiguous(), reduce_op="sum")
            grads[1] = grads[1] + total[self.global_rank, : passage_emb.shape[0]]
        leaf = out.loss.detach().clone().requires_grad_()
        self._pending = PendingBackward(leaf, [(queries, grads[0]), (passages, grads[1])])
        self._log_step(out, batch)
        return leaf

    def _in_batch(self, batch: dict[str, Any]) -> bool:
        """The batch's dataset setting (C1 ``use_in_batch_negatives``), else the module's."""
        flag = batch.get("use_in_batch_negatives")
        return bool(self.hparams.use_in_batch_negatives if flag is None else flag)

    def _wants_remote(self, batch: dict[str, Any]) -> bool:
        """Other ranks' passages are scored only by InfoNCE with in-batch negatives (every rank trains on the same
        dataset at the same step, so all ranks agree and the collectives stay matched)."""
        return self._in_batch(batch) and self.objective.uses_infonce

    def _objective(self, query_emb: Tensor, passage_emb: Tensor, batch: dict[str, Any], remote_emb: Tensor | None,
                   remote_ids: Tensor | None) -> ObjectiveOutput:
        extra = int(batch.get("num_extra_positives", 0) or 0)
        out = self.objective(
            query_emb, passage_emb, use_in_batch_negatives=self._in_batch(batch),
            passage_ids=batch["passage_ids"], positive_ids=batch["positive_ids"],
            remote_passage_emb=remote_emb, remote_passage_ids=remote_ids,
            hard_negative_mask=self._teacher_mask(batch), num_extra_positives=extra,
            teacher_scores=self._teacher_scores(batch, extra),
        )
        if self.objective.loss == "kd" and out.kd_queries == 0:
            raise ConfigError("model.loss", f"'kd' alone needs teacher scores, but no query of this batch (dataset "
                                            f"{batch.get('dataset', 'default')!r}) has a positive and a negative "
                                            "score; mine with a scoring teacher or use 'infonce+kd'")
        return out

    def _teacher_scores(self, batch: dict[str, Any], extra: int) -> Tensor | None:
        if not self.objective.uses_kd:
            return None
        if "positive_scores" not in batch or "negative_scores" not in batch:
            raise ConfigError("model.loss", f"{self.objective.loss!r} needs the batch's teacher scores "
                                            "(positive_scores / negative_scores); use MinedDataModule")
        return teacher_group_scores(batch["positive_scores"], batch["negative_scores"], extra,
                                    batch.get("extra_positive_scores"))

    def _log_step(self, out: ObjectiveOutput, batch: dict[str, Any]) -> None:
        """Loss (total, per dataset, per term) and the step's in-batch accuracy / margin: all from the loss's own
        scores. Nothing to log to outside a Trainer (a bare ``training_step`` call)."""
        if self._trainer is None:
            return
        size = int(batch["passage_ids"].shape[0])
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=size)
        if batch.get("dataset") is not None:
            self.log(f"train/loss/{batch['dataset']}", out.loss.detach(), batch_size=size)
        if out.infonce is not None and out.kd is not None:
            self.log("train/infonce", out.infonce.detach(), batch_size=size)
            self.log("train/kd", out.kd.detach(), batch_size=size)
        self.log("train/accuracy", out.accuracy, batch_size=size)
        if torch.isfinite(out.margin):
            self.log("train/margin", out.margin, batch_size=size)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``train/grad_norm``: total L2 norm of the trainable gradients as the optimizer will see them (after
        accumulation, AMP unscaling and the DDP all-reduce; before ``gradient_clip_val`` clipping)."""
        norm = grad_total_norm(p for p in self.parameters() if p.requires_grad)
        if norm is not None:
            self.log("train/grad_norm", norm)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Cached InfoNCE: re-encode each mini-batch with a graph and back-propagate its cached embedding gradient,
        times ``d loss / d leaf`` (Lightning's ``1/accumulate_grad_batches``, an AMP scaler's scale)."""
        pending, self._pending = self._pending, None
        if pending is None:
            super().backward(loss, *args, **kwargs)
            return
        (scale,) = torch.autograd.grad(loss, pending.loss_leaf)
        params = [p for p in self.parameters() if p.requires_grad]
        context = self.trainer.precision_plugin.forward_context if self._trainer is not None else nullcontext
        cached_backward(self.encode, pending, scale, params, context,
                        sharded=bool(getattr(self, "_fsdp_applied", False)))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Embeddings + sample positions for :class:`~nvr.evaluation.callback.RetrievalEvaluator`."""
        return {"embeddings": self.encode(batch), "index": batch["index"]}

    def on_validation_epoch_end(self) -> None:
        """After RetrievalEvaluator logged this validation's metrics, before any checkpoint is saved: remember the
        step they belong to (``last.ckpt`` is also written later, e.g. at the end of fit, with these metrics)."""
        if self._trainer is not None and not self.trainer.sanity_checking:
            self._metrics_step = int(self.trainer.global_step)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``nvr test``: the same BEIR evaluation as validation (metrics logged under ``test/``)."""
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def _remote_passages(self, passage_emb: Tensor, passage_ids: Tensor,
                         batch: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        """Other ranks' passages (with gradients) when cross-device negatives are on.

        ``all_gather`` needs equal shapes on every rank (gloo aborts, NCCL can hang or return garbage otherwise).
        MinedDataModule's batches all have the same shape, but a user dataloader may give one rank a shorter
        last batch, so the passage counts are gathered first and every rank pads to the largest and trims.
        """
        if not self._wants_remote(batch):
            return None, None
        gathered = self._gather_passages(passage_emb, passage_ids, sync_grads=True)
        if gathered is None:
            return None, None
        return _others(*gathered, self.global_rank)

    def _gather_passages(self, passage_emb: Tensor, passage_ids: Tensor,
                         sync_grads: bool) -> tuple[Tensor, Tensor, list[int]] | None:
        """Every rank's passages ``[W, max count, H]``, their ids and counts; None without cross-device negatives."""
        if not self.hparams.gather_across_devices:  # callers check the batch's in-batch setting (_wants_remote)
            return None
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1:
            return None
        flat_emb = passage_emb.reshape(-1, passage_emb.shape[-1])
        all_emb, all_ids, counts = gather_padded(flat_emb, passage_ids.reshape(-1), self.all_gather,
                                                 sync_grads=sync_grads, pad_id=PAD_ID)
        return all_emb, all_ids, counts

    def _teacher_mask(self, batch: dict[str, Any]) -> Tensor | None:
        perc = self.hparams.false_negative_perc
        if perc is None or "negative_scores" not in batch or "positive_scores" not in batch:
            return None
        return teacher_false_negative_mask(batch["negative_scores"], batch["positive_scores"], perc)

    # --------------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        if self.device_mesh is None:
            # a ``*-true`` precision plugin has just cast the whole module to bf16/fp16 (before this hook, after
            # __init__): put the trainable parameters back in float32 before the optimizer captures them
            cast = keep_fp32_master_weights(self.embedder)
            if cast:
                precision = getattr(self._trainer, "precision", None) if self._trainer is not None else None
                log.info("restored float32 master weights for %d trainable parameter(s) cast by precision=%s",
                         len(cast), precision)
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        if not decay and not no_decay:
            raise ConfigError("model.embedder", "no trainable parameters (LoRA targets or frozen backbone?)")
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_lambda(self.hparams.scheduler, self.hparams.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------- FSDP2
    def configure_model(self) -> None:
        """Shard each transformer layer, the pooling head and the root with FSDP2 under ModelParallelStrategy."""
        if self.device_mesh is None or getattr(self, "_fsdp_applied", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in transformer_layers(self.embedder.backbone):
            fully_shard(layer, mesh=mesh)
        if any(True for _ in self.embedder.pooler.parameters()):
            fully_shard(self.embedder.pooler, mesh=mesh)
        fully_shard(self.embedder, mesh=mesh)
        self._fsdp_applied = True

    # ------------------------------------------------------------------------------------------- checkpoints
    def _trainable_only(self) -> bool:
        return self.embedder_config.lora is not None and self.device_mesh is None

    def setup(self, stage: str) -> None:
        """Before any batch: data max lengths above the model's positions are clamped (warning names the key).
        The cached loss under DDP's unused-parameter search is refused: the step's output is a graph-free leaf, so
        DDP marks every parameter unused and the re-encoding's backward then fails with "marked ready twice"."""
        if self.cached_loss and self._trainer is not None and ddp_finds_unused_parameters(self.trainer.strategy):
            raise ConfigError("model.mini_batch_size", "cached InfoNCE (mini_batch_size / mini_batch_num_tokens) "
                                                       "does not work with DDP find_unused_parameters=True; "
                                                       "use strategy: ddp")
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None:
            clamp_data_max_lengths(self.embedder, data)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[ENCODING_KEY] = self._encoding_record()
        checkpoint[BASE_KEY] = self._base_model_record()
        if not self._trainable_only() or "state_dict" not in checkpoint:
            return
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[PARTIAL_KEY] = True

    def _memo_dir(self) -> Path | None:
        """The fingerprint memo of the mining cache (so a 7B base is hashed once per machine, not per save)."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        cache_dir = getattr(getattr(data, "mining", None), "cache_dir", None)
        return memo_dir_for(cache_dir) if isinstance(cache_dir, str | Path) else None

    def _base_model_record(self) -> dict[str, Any]:
        """The base model's name and content fingerprint, computed once per process (see nvr.modeling.base_model)."""
        if getattr(self, "_base_record", None) is None:
            self._base_record = base_model_record(self.embedder_config.model_name_or_path, self._memo_dir())
        return dict(self._base_record)

    def _encoding_record(self) -> dict[str, Any]:
        """How training fed texts (prompts, masking, max lengths), the mined set and the last metrics: what
        ``nvr export`` needs to reproduce the embeddings and write a model card."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        record: dict[str, Any] = {}
        for key in ("query_prefix", "mask_instruction", "passage_prefix", "query_max_length", "passage_max_length",
                    "query_instruction"):
            if data is not None and hasattr(data, key):
                record[key] = getattr(data, key)
        mined = getattr(data, "mined_path", None) if data is not None else None
        if mined is not None:
            record["mined_dir"] = str(Path(mined).resolve())
        if self.hparams.get("matryoshka_dims"):
            record["matryoshka_dims"] = [int(d) for d in self.hparams.matryoshka_dims]
        if self._trainer is not None:
            record["metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                                 if k.startswith(("val/", "test/")) and getattr(v, "numel", lambda: 1)() == 1}
            record["global_step"] = int(self.trainer.global_step)
            if record["metrics"] and getattr(self, "_metrics_step", None) is not None:
                record["metrics_step"] = self._metrics_step
        return record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning's strict load: a checkpoint of another embedder config (LoRA r / targets, pooling,
        latent size, backbone) is a one-line error naming the file and the first differing tensors, not a
        ``RuntimeError`` listing every key; a trainable-only (LoRA) checkpoint gets the frozen base refilled."""
        if "state_dict" not in checkpoint or self.device_mesh is not None:  # FSDP2: the strategy loads the shards
            return
        source = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        current = self.state_dict()
        saved = checkpoint["state_dict"]
        unknown = sorted(set(saved) - set(current))
        shapes = [f"{k} {tuple(v.shape)} vs this model's {tuple(current[k].shape)}" for k, v in saved.items()
                  if k in current and hasattr(v, "shape") and tuple(v.shape) != tuple(current[k].shape)]
        missing = [] if checkpoint.get(PARTIAL_KEY) else sorted(set(current) - set(saved))
        if unknown or shapes or missing:
            parts = [f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}" if shapes else "",
                     f"{len(unknown)} tensor(s) this model lacks, e.g. {unknown[:2]}" if unknown else "",
                     f"{len(missing)} tensor(s) missing, e.g. {missing[:2]}" if missing else ""]
            raise InputError("checkpoint does not fit this model (another model.embedder config: LoRA r / "
                             f"target_modules, pooling, latent size?): {'; '.join(p for p in parts if p)}", source)
        if checkpoint.get(PARTIAL_KEY):
            check_base_model(checkpoint, self.embedder_config.model_name_or_path, source, self._memo_dir())
            checkpoint["state_dict"] = {**current, **saved}


# ------------------------------------------------------------------------------------------------- helpers
def _others(all_emb: Tensor, all_ids: Tensor, counts: list[int], rank: int) -> tuple[Tensor, Tensor]:
    """The gathered passages of every rank but ``rank`` (padding rows trimmed)."""
    others = [r for r in range(len(counts)) if r != rank]
    return (torch.cat([all_emb[r, : counts[r]] for r in others]),
            torch.cat([all_ids[r, : counts[r]] for r in others]))


def check_finite_hparams(values: dict[str, Any], embedder: EmbedderConfig) -> None:
    """Every float setting of the module and of ``model.embedder`` (LoRA dropout, latent sizes...) must be finite:
    NaN passes every ``<=``/``<`` range check (``nan <= 0`` is False), so ``lr: .nan`` would only fail later as an
    optimizer traceback and ``temperature: .inf`` would train on all-zero logits."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"model.{key}", f"must be a finite number, got {value}")
    _check_finite_dataclass(embedder, "model.embedder")


def _check_finite_dataclass(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_finite_dataclass(value, f"{prefix}.{f.name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}.{f.name}", f"must be a finite number, got {value}")


def _validate(temperature: float, perc: float | None, lr: float, weight_decay: float, warmup: int,
              scheduler: str) -> None:
    if temperature <= 0:
        raise ConfigError("model.temperature", f"must be > 0, got {temperature}")
    if perc is not None and not 0 < perc <= 2:
        raise ConfigError("model.false_negative_perc", f"must be in (0, 2] or null, got {perc}")
    if lr <= 0:
        raise ConfigError("model.lr", f"must be > 0, got {lr}")
    if weight_decay < 0:
        raise ConfigError("model.weight_decay", f"must be >= 0, got {weight_decay}")
    if warmup < 0:
        raise ConfigError("model.warmup_steps", f"must be >= 0, got {warmup}")
    if scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError("model.scheduler", f"must be linear|cosine|constant, got {scheduler!r}")


def validate_objective(values: dict[str, Any]) -> None:
    """Ranges of the loss settings (finiteness of the scalar floats is checked by :func:`check_finite_hparams`);
    a KD setting without a KD loss, or Matryoshka weights without dims, would be silently ignored: refused."""
    loss = values.get("loss", "infonce")
    if loss not in LOSS_KINDS:
        raise ConfigError("model.loss", f"must be one of {'|'.join(LOSS_KINDS)}, got {loss!r}")
    if values.get("multi_positive", "each") not in MULTI_POSITIVE_MODES:
        raise ConfigError("model.multi_positive", f"must be each|logsumexp, got {values.get('multi_positive')!r}")
    if not values.get("kd_weight", 1.0) > 0:
        raise ConfigError("model.kd_weight", f"must be > 0, got {values.get('kd_weight')}")
    for key in ("kd_temperature", "kd_teacher_temperature"):
        value = values.get(key)
        if value is not None and not value > 0:
            raise ConfigError(f"model.{key}", f"must be > 0 or null, got {value}")
    if loss == "infonce":
        for key, default in (("kd_weight", 1.0), ("kd_temperature", None), ("kd_teacher_temperature", None)):
            if values.get(key, default) != default:
                raise ConfigError(f"model.{key}", "only used with model.loss kd or infonce+kd (model.loss is infonce)")
    margin = values.get("self_mask_margin")
    if margin is not None and not margin >= 0:
        raise ConfigError("model.self_mask_margin", f"must be >= 0 or null, got {margin}")
    dims, weights = values.get("matryoshka_dims"), values.get("matryoshka_weights")
    if dims is not None:
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ConfigError("model.matryoshka_dims", f"must be a non-empty list of positive ints, got {dims}")
        if len(set(dims)) != len(dims):
            raise ConfigError("model.matryoshka_dims", f"has a repeated dim: {dims}")
    if weights is not None:
        if dims is None:
            raise ConfigError("model.matryoshka_weights", "given without model.matryoshka_dims")
        if len(weights) != len(dims):
            raise ConfigError("model.matryoshka_weights", f"needs one weight per dim ({len(dims)}), got {len(weights)}")
        bad = [w for w in weights if not (isinstance(w, int | float) and math.isfinite(w) and w > 0)]
        if bad:
            raise ConfigError("model.matryoshka_weights", f"weights must be finite and > 0, got {bad[0]}")


def check_matryoshka_dims(dims: list[int] | None, embedding_size: int) -> None:
    too_big = [d for d in dims or [] if d > embedding_size]
    if too_big:
        raise ConfigError("model.matryoshka_dims", f"{too_big[0]} exceeds the embedding size {embedding_size}")


def grad_total_norm(params) -> Tensor | None:
    """Total L2 norm of the parameters' gradients (None without any); sharded (DTensor) gradients are reduced
    over their shards, so every rank logs the same full norm."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    full = getattr(norm, "full_tensor", None)
    return (full() if callable(full) else norm).float()


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at optimizer step ``s``: linear warm-up, then linear/cosine decay to 0 or flat."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def teacher_false_negative_mask(negative_scores: Tensor, positive_scores: Tensor, perc: float) -> Tensor:
    """``[B, n]`` True where a negative's teacher score reaches ``perc`` of its positive's (TopK-PercPos rule,
    sign-safe ``anchor - |anchor| * (1 - perc)``); unknown (nan) scores never mask."""
    anchor = positive_scores.unsqueeze(1).float()
    threshold = anchor - anchor.abs() * (1.0 - perc)
    mask = negative_scores.float() >= threshold
    return mask & ~torch.isnan(negative_scores) & ~torch.isnan(anchor)


def keep_fp32_master_weights(embedder: Embedder) -> list[str]:
    """Store every trainable parameter in float32 (a bf16/fp16 backbone stays in its dtype where frozen).

    In pure bf16 an AdamW update of lr 1e-5 is below the spacing of the weights (2**-8 relative) and vanishes, so
    the latent-attention head and LoRA adapters would not learn; ``bf16-mixed`` still computes in bf16.
    """
    cast = []
    for name, param in embedder.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
            cast.append(name)
    if cast:
        log.info("kept %d trainable parameter(s) in float32 (master weights), e.g. %s", len(cast), cast[:3])
    return cast


def clamp_data_max_lengths(embedder: Embedder, data: Any) -> list[str]:
    """Clamp ``data.query_max_length``/``passage_max_length`` (and the eval sets') to the model's positions.

    A longer setting would only fail (a traceback in the position embedding) once a text that long shows up; the
    default 512 passage tokens exceed e.g. a 128-position model, so this clamps with one warning per key.
    """
    from nvr.modeling.backbone import position_limit

    limit = position_limit(getattr(embedder.backbone, "config", None))
    if limit is None:
        return []
    targets = [(data, "data", k) for k in ("query_max_length", "passage_max_length")]
    for cfg in getattr(data, "eval_set_configs", None) or []:
        targets += [(cfg, f"data.eval_sets[{cfg.name}]", k) for k in ("query_max_length", "passage_max_length")]
    clamped = []
    for owner, prefix, attr in targets:
        value = getattr(owner, attr, None)
        if isinstance(value, int) and value > limit:
            log.warning("config key '%s.%s': %d exceeds the %d positions of %s; clamped to %d", prefix, attr, value,
                        limit, embedder.config.model_name_or_path, limit)
            setattr(owner, attr, limit)
            clamped.append(f"{prefix}.{attr}")
    return clamped


def freeze_unused_heads(embedder: Embedder) -> list[str]:
    """Freeze the backbone's own sentence head (BERT-style ``pooler``): nvr pools token states itself, so it gets
    no gradient, and DDP aborts on trainable parameters without one. Weights stay as loaded (still exported)."""
    frozen = []
    for name, module in embedder.backbone.named_modules():
        if name.rsplit(".", 1)[-1] == "pooler":
            for param_name, param in module.named_parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(f"{name}.{param_name}")
    if frozen:
        log.info("froze %d unused backbone head parameter(s): %s", len(frozen), frozen[:4])
    return frozen


def ddp_finds_unused_parameters(strategy: object) -> bool:
    """Whether Lightning's DDPStrategy will wrap the model with ``find_unused_parameters=True`` (it keeps the
    DistributedDataParallel kwargs without a public accessor)."""
    kwargs = getattr(strategy, "_ddp_kwargs", None) or {}
    return isinstance(strategy, DDPStrategy) and bool(kwargs.get("find_unused_parameters"))


def transformer_layers(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the longest ModuleList of same-class modules): one FSDP unit each."""
    best: list[nn.Module] = []
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    return best


def load_warm_start(embedder: Embedder, source: str) -> None:
    """Copy weights from a Lightning checkpoint (``embedder.*`` keys) or an Embedder folder into ``embedder``."""
    from nvr.modeling.export import is_distributed_checkpoint, read_checkpoint

    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError("model.init_from", f"{source}: no such checkpoint or folder")
    if path.is_dir() and not is_distributed_checkpoint(path):
        state = Embedder.from_pretrained(path).state_dict()
    else:  # a .ckpt file or an FSDP2 checkpoint folder; unreadable / truncated / foreign: one line naming it
        checkpoint = read_checkpoint(path)
        if checkpoint.get(PARTIAL_KEY):  # adapters only: this run's base must be the one they were trained on
            check_base_model(checkpoint, embedder.config.model_name_or_path, path)
        state = {k[len("embedder."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("embedder.")}
    own = embedder.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown or not state:
        raise InputError(f"weights do not fit this model (e.g. unexpected {unknown[:3]}); same embedder config "
                         "(pooling, LoRA) as the source run?", path)
    mismatched = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        first = mismatched[0]
        raise InputError(f"{len(mismatched)} shape mismatch(es), e.g. {first} {tuple(state[first].shape)} vs this "
                         f"model's {tuple(own[first].shape)} (another LoRA r or latent size than the source run?)",
                         path)
    embedder.load_state_dict(state, strict=False)
    log.info("init_from %s: loaded %d of %d tensors", path, len(state), len(own))
