"""Training under 2 CPU processes (gloo): cross-device negatives under DDP (``ddp_spawn``) checked numerically
against a single-process computation over the union batch, and FSDP2 (ModelParallelStrategy, in a subprocess)
fit -> sharded checkpoint -> resume -> ``nvr export``."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _training_data import write_fake_mined
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from nvr.modeling.config import EmbedderConfig
from nvr.testing import make_tiny_beir
from nvr.training.datamodule import MinedDataModule
from nvr.training.loss import PAD_ID
from nvr.training.module import BiEncoderModule
from nvr.training.sampler import SampleKey
from nvr.utils.seeding import derive_seed

SEED = 7
TEMPERATURE = 0.05
BATCH = 4
NUM_NEGATIVES = 2
WORLD = 2
FSDP_SCRIPT = Path(__file__).parent / "scripts" / "train_fsdp2.py"


@pytest.fixture(scope="module")
def mined30(tmp_path_factory) -> Path:
    """30 train queries: 3 steps per rank per epoch with a batch of 4 on 2 ranks."""
    beir = make_tiny_beir(tmp_path_factory.mktemp("beir30"), queries_per_topic=4)
    return write_fake_mined(beir, tmp_path_factory.mktemp("mined30"), num_negatives=3)


class RankRecorder(Callback):
    """Writes, per rank, the step-0 batch, the per-step losses, the step-0 synchronised gradients and the final
    weights (module level so that ``ddp_spawn`` can pickle it)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.losses: list[float] = []

    def _path(self, trainer: pl.Trainer, name: str) -> str:
        return os.path.join(self.out_dir, f"rank{trainer.global_rank}_{name}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.save(batch, self._path(trainer, f"batch{batch_idx}"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self._path(trainer, "grads0"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"losses": self.losses, "world_size": trainer.world_size,
                    "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
                   self._path(trainer, "end"))


class UnevenBatches(MinedDataModule):
    """Rank 0 trains on batches of 4 then 4 queries, rank 1 on 4 then 3: a short last batch on one rank only."""

    SIZES = ((4, 4), (4, 3))

    def train_dataloader(self):
        loader = super().train_dataloader()
        rank = self.trainer.global_rank
        start = sum(sum(s) for s in self.SIZES[:rank])
        batches, pos = [], start
        for position, size in enumerate(self.SIZES[rank]):
            batches.append([SampleKey(0, position, i) for i in range(pos, pos + size)])
            pos += size
        return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn)


def _module(model_dir: Path) -> BiEncoderModule:
    cfg = EmbedderConfig(model_name_or_path=str(model_dir), pooling="mean")
    return BiEncoderModule(cfg, temperature=TEMPERATURE, gather_across_devices=True, lr=1e-3, weight_decay=0.0,
                           warmup_steps=0, scheduler="constant", seed=SEED)


def _data(model_dir: Path, mined: Path, cls: type[MinedDataModule] = MinedDataModule) -> MinedDataModule:
    return cls(mined_dir=str(mined), tokenizer=str(model_dir), query_max_length=16, passage_max_length=32,
               num_negatives=NUM_NEGATIVES, batch_size=BATCH, seed=3)


def _fit_ddp_spawn(module: BiEncoderModule, data: MinedDataModule, out: Path, max_steps: int, **kw) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # a collective mismatch must fail within a minute, not wait for gloo's 30-minute default
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(out), callbacks=[RankRecorder(str(out))], **kw,
    )
    trainer.fit(module, datamodule=data)


def _load(out: Path, rank: int, name: str):
    return torch.load(out / f"rank{rank}_{name}.pt", weights_only=False)


def _encode_rank_batches(module: BiEncoderModule, batches: list[dict], step: int) -> list[tuple]:
    """(queries, passages [B, 1+n, H]) of every rank's batch, with that rank's dropout seed for ``step``."""
    encoded = []
    for rank, batch in enumerate(batches):
        torch.manual_seed(derive_seed(SEED, "step", step, rank) % (2**63))
        queries = module.encode(batch["query"])
        size, group = batch["passage_ids"].shape
        encoded.append((queries, module.encode(batch["passages"]).reshape(size, group, -1)))
    return encoded


def union_batch_loss(encoded: list[tuple], batches: list[dict], rank: int, *, with_remote: bool = True) -> torch.Tensor:
    """Reference: ``rank``'s queries scored against every passage of the union batch (all ranks) in one process.

    Target = the query's own positive; padding slots and any other copy of one of the query's positives are
    masked; everything else is a negative. Column order does not matter for cross-entropy.
    """
    queries, _ = encoded[rank]
    ranks = range(len(batches)) if with_remote else [rank]
    passages = torch.cat([encoded[r][1].reshape(-1, queries.shape[1]) for r in ranks])
    ids = torch.cat([batches[r]["passage_ids"].reshape(-1) for r in ranks])
    size, group = batches[rank]["passage_ids"].shape
    offset = sum(batches[r]["passage_ids"].numel() for r in ranks if r < rank)
    targets = offset + torch.arange(size) * group
    logits = queries @ passages.T / TEMPERATURE
    positives = batches[rank]["positive_ids"]
    masked = (ids == PAD_ID).unsqueeze(0) | (ids.view(1, -1, 1) == positives.unsqueeze(1)).any(2)
    masked[torch.arange(size), targets] = False
    return F.cross_entropy(logits.masked_fill(masked, float("-inf")), targets)


@pytest.mark.slow
def test_ddp_gather_across_devices_matches_union_batch(tiny_bert_dir, mined30, tmp_path) -> None:
    module = _module(tiny_bert_dir)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    _fit_ddp_spawn(module, _data(tiny_bert_dir, mined30), tmp_path, max_steps=3)

    ends = [_load(tmp_path, r, "end") for r in range(WORLD)]
    assert all(end["world_size"] == WORLD and len(end["losses"]) == 3 for end in ends)
    for name, value in ends[0]["weights"].items():  # (a) gradients synchronised: identical weights after 3 steps
        torch.testing.assert_close(ends[1]["weights"][name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(ends[0]["weights"][k], v) for k, v in initial.items())

    # (b) step-0 loss of each rank == single-process loss over the union batch restricted to its queries
    batches = [_load(tmp_path, r, "batch0") for r in range(WORLD)]
    reference = _module(tiny_bert_dir)
    reference.load_state_dict(initial)
    reference.train()
    encoded = _encode_rank_batches(reference, batches, step=0)
    expected = [union_batch_loss(encoded, batches, r) for r in range(WORLD)]
    for rank in range(WORLD):
        assert ends[rank]["losses"][0] == pytest.approx(float(expected[rank].detach()), rel=1e-5)
        local_only = float(union_batch_loss(encoded, batches, rank, with_remote=False))
        assert abs(local_only - ends[rank]["losses"][0]) > 1e-3  # the other rank's passages really were scored

    # (c) the synchronised step-0 gradient == gradient of the mean of the per-rank losses
    (sum(expected) / WORLD).backward()
    grads = [_load(tmp_path, r, "grads0") for r in range(WORLD)]
    checked = 0
    for name, param in reference.named_parameters():
        if param.grad is None or name not in grads[0]:
            continue
        torch.testing.assert_close(grads[0][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(grads[1][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == sum(1 for p in reference.parameters() if p.grad is not None) > 10


@pytest.mark.slow
def test_ddp_gather_with_a_shorter_last_batch_on_one_rank(tiny_bert_dir, mined30, tmp_path) -> None:
    module = _module(tiny_bert_dir)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    data = _data(tiny_bert_dir, mined30, UnevenBatches)
    _fit_ddp_spawn(module, data, tmp_path, max_steps=2, use_distributed_sampler=False)

    ends = [_load(tmp_path, r, "end") for r in range(WORLD)]
    assert [len(end["losses"]) for end in ends] == [2, 2]
    for name, value in ends[0]["weights"].items():
        torch.testing.assert_close(ends[1]["weights"][name], value, rtol=0, atol=0, msg=name)
    last = [_load(tmp_path, r, "batch1") for r in range(WORLD)]
    assert [b["passage_ids"].shape[0] for b in last] == [4, 3]

    # replay step 0 in one process, then check step 1 (the uneven one) against the union-batch reference
    first = [_load(tmp_path, r, "batch0") for r in range(WORLD)]
    reference = _module(tiny_bert_dir)
    reference.load_state_dict(initial)
    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)  # = the module's (no decay)
    encoded = _encode_rank_batches(reference, first, step=0)
    (sum(union_batch_loss(encoded, first, r) for r in range(WORLD)) / WORLD).backward()
    optimizer.step()
    with torch.no_grad():
        encoded = _encode_rank_batches(reference, last, step=1)
        for rank in range(WORLD):
            assert ends[rank]["losses"][1] == pytest.approx(float(union_batch_loss(encoded, last, rank)), rel=1e-4)



# ---------------------------------------------------------------------------------------------------- FSDP2
def _run_fsdp2(model_dir: Path, mined: Path, out: Path, kind: str) -> dict[str, list[dict]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(FSDP_SCRIPT), str(model_dir), str(mined), str(out), kind]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {run: [json.loads((out / f"{run}_rank{r}.json").read_text()) for r in range(WORLD)]
            for run in ("straight", "first", "resumed")}


def tokenize_probe(tokenizer) -> dict[str, torch.Tensor]:
    """The FSDP2 script's probe texts, tokenized as it does."""
    from nvr.modeling.tokenization import tokenize

    return tokenize(tokenizer, runpy.run_path(str(FSDP_SCRIPT))["PROBE_TEXTS"], 16)


def _export_and_encode(checkpoint: Path, out: Path, st_files: bool) -> torch.Tensor:
    from nvr.cli.main import main as nvr_main
    from nvr.modeling.embedder import Embedder

    with pytest.raises(SystemExit) as done:
        nvr_main(["export", "--checkpoint", str(checkpoint), "--output", str(out),
                  "--sentence_transformers", str(st_files).lower()])
    assert done.value.code == 0
    embedder = Embedder.from_pretrained(out).eval()
    features = tokenize_probe(embedder.tokenizer)
    with torch.no_grad():
        return embedder(features["input_ids"], features["attention_mask"], features["pool_mask"]).float()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "mistral_lora"])
def test_fsdp2_fit_resume_and_export(kind, tiny_bert_dir, tiny_mistral_dir, mined30, tmp_path) -> None:
    model_dir = tiny_bert_dir if kind == "bert" else tiny_mistral_dir
    runs = _run_fsdp2(model_dir, mined30, tmp_path, kind)
    for run, records in runs.items():
        for rec in records:
            assert rec["world_size"] == WORLD and all(rec["sharded"]), (run, rec)  # trainable params are DTensors
            assert all(torch.isfinite(torch.tensor(rec["losses"]))), (run, rec)
    straight, resumed = runs["straight"], runs["resumed"]
    for rank in range(WORLD):
        assert straight[rank]["global_step"] == 4 and resumed[rank]["start_step"] == 2
        # full resume from the sharded checkpoint replays the uninterrupted run's remaining steps exactly
        assert resumed[rank]["losses"] == pytest.approx(straight[rank]["losses"][2:], rel=1e-5)
        assert straight[rank]["probe_loss_after"] < straight[rank]["probe_loss_before"]
    torch.testing.assert_close(torch.load(tmp_path / "resumed_embeddings.pt"),
                               torch.load(tmp_path / "straight_embeddings.pt"), rtol=1e-5, atol=1e-6)

    # nvr export reads the distributed checkpoint folder (consolidated in one process)
    (checkpoint,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert checkpoint.is_dir()
    exported = _export_and_encode(checkpoint, tmp_path / "export", st_files=kind == "bert")
    torch.testing.assert_close(exported, torch.load(tmp_path / "first_embeddings.pt"), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- fast, 1 process
def test_bert_pooler_head_is_frozen_so_every_trainable_parameter_gets_a_gradient(tiny_bert_dir, mined30) -> None:
    """DDP aborts on trainable parameters that receive no gradient (BERT's unused ``pooler``)."""
    module = _module(tiny_bert_dir)
    assert not any(p.requires_grad for p in module.embedder.backbone.pooler.parameters())
    data = _data(tiny_bert_dir, mined30)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.training_step(batch, 0).backward()
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []


def test_export_reads_a_distributed_checkpoint_folder(tiny_bert_dir, tmp_path) -> None:
    """A DCP folder (what FSDP2 runs write) written in one process: ``nvr export`` consolidates its weights."""
    import torch.distributed.checkpoint as dcp

    module = _module(tiny_bert_dir)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.01)
    folder = tmp_path / "step=1.ckpt"
    dcp.save({"state_dict": module.state_dict(), "optimizer_0": {"step": torch.tensor(1)}}, checkpoint_id=str(folder))
    torch.save({"hyper_parameters": dict(module.hparams), "global_step": 1}, folder / "meta.pt")
    exported = _export_and_encode(folder, tmp_path / "export", st_files=True)
    module.eval()
    features = tokenize_probe(module.embedder.tokenizer)
    with torch.no_grad():
        expected = module.encode(features).float()
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- extended objective (issues 12, 13)
def _objective_module(model_dir: Path, **kw) -> BiEncoderModule:
    cfg = EmbedderConfig(model_name_or_path=str(model_dir), pooling="mean")
    args = dict(temperature=TEMPERATURE, gather_across_devices=True, lr=1e-3, weight_decay=0.0, warmup_steps=0,
                scheduler="constant", seed=SEED, loss="infonce+kd", kd_weight=0.5, self_mask_margin=0.05,
                matryoshka_dims=[32, 8])
    return BiEncoderModule(cfg, **{**args, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_ddp_extended_objective_matches_the_loop_reference(cached, tiny_bert_dir, mined30, tmp_path) -> None:
    """2 gloo ranks, cross-device negatives, C1 batches with an extra positive, KD, self-masking and Matryoshka:
    each rank's step-0 loss equals a plain-loop reference over the union batch and the synchronised gradient the
    mean of the per-rank losses' gradients."""
    from _c1_batches import C1DataModule
    from test_kd import reference_kd
    from test_loss import reference_loss

    from nvr.modeling.matryoshka import truncate

    kw = dict(mini_batch_size=3) if cached else {}
    module = _objective_module(tiny_bert_dir, **kw)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    data = _data(tiny_bert_dir, mined30, C1DataModule)
    data.c1_kwargs = {"dataset": "toy"}
    _fit_ddp_spawn(module, data, tmp_path, max_steps=2)
    ends = [_load(tmp_path, r, "end") for r in range(WORLD)]
    for name, value in ends[0]["weights"].items():
        torch.testing.assert_close(ends[1]["weights"][name], value, rtol=0, atol=0, msg=name)

    batches = [_load(tmp_path, r, "batch0") for r in range(WORLD)]
    assert all(b["num_extra_positives"] == 1 for b in batches)
    reference = _objective_module(tiny_bert_dir)
    reference.load_state_dict(initial)
    reference.train()
    if cached:
        from test_cached_infonce import _encode_chunks

        encoded = []
        for rank, batch in enumerate(batches):
            torch.manual_seed(derive_seed(SEED, "step", 0, rank) % (2**63))
            size, group = batch["passage_ids"].shape
            encoded.append((_encode_chunks(reference, batch["query"], (3, None)),
                            _encode_chunks(reference, batch["passages"], (3, None)).reshape(size, group, -1)))
    else:
        encoded = _encode_rank_batches(reference, batches, step=0)
    losses = []
    for rank, batch in enumerate(batches):
        q, p = encoded[rank]
        other = 1 - rank
        remote, remote_ids = encoded[other][1].reshape(-1, q.shape[1]), batches[other]["passage_ids"].reshape(-1)
        losses.append(reference._objective(q, p, batch, remote, remote_ids).loss)
        teacher = torch.cat([batch["positive_scores"][:, None], batch["extra_positive_scores"],
                             batch["negative_scores"]], dim=1)
        expected = 0.0
        with torch.no_grad():
            for dim in (32, 8):
                qd, pd, rd = (truncate(x, dim, True) for x in (q, p, remote))
                expected += reference_loss(qd, pd, batch["passage_ids"], batch["positive_ids"], 1, "each",
                                           margin=0.05, remote=rd, remote_ids=remote_ids, tau=TEMPERATURE)[0]
                expected += 0.5 * reference_kd(torch.einsum("bh,bgh->bg", qd, pd), teacher, batch["passage_ids"],
                                               TEMPERATURE, TEMPERATURE)[0]
        assert ends[rank]["losses"][0] == pytest.approx(expected, rel=1e-5)
    (sum(losses) / WORLD).backward()
    grads = [_load(tmp_path, r, "grads0") for r in range(WORLD)]
    checked = 0
    for name, param in reference.named_parameters():
        if param.grad is None:
            continue
        for rank in range(WORLD):
            torch.testing.assert_close(grads[rank][name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
        checked += 1
    assert checked > 10


@pytest.mark.slow
def test_ddp_dataset_without_in_batch_negatives_skips_the_gather(tiny_bert_dir, mined30, tmp_path) -> None:
    """A batch whose dataset turns in-batch negatives off: no cross-device gather (every rank skips it at the
    same step), each rank's loss is its local own-group loss."""
    from _c1_batches import C1DataModule
    from test_loss import reference_loss

    module = _module(tiny_bert_dir)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    data = _data(tiny_bert_dir, mined30, C1DataModule)
    data.c1_kwargs = {"dataset": "no-ib", "use_in_batch_negatives": False, "drop_every_other": False}
    _fit_ddp_spawn(module, data, tmp_path, max_steps=1)
    batches = [_load(tmp_path, r, "batch0") for r in range(WORLD)]
    reference = _module(tiny_bert_dir)
    reference.load_state_dict(initial)
    reference.train()
    with torch.no_grad():
        encoded = _encode_rank_batches(reference, batches, step=0)
        for rank, batch in enumerate(batches):
            want = reference_loss(*encoded[rank], batch["passage_ids"], batch["positive_ids"], 1, "each",
                                  in_batch=False, tau=TEMPERATURE)[0]
            assert _load(tmp_path, rank, "end")["losses"][0] == pytest.approx(want, rel=1e-5)
