"""ReMiningCallback (issue 13 section 4): rounds mined with the model being trained, swapped in at epoch ends,
artifacts with their own fingerprint, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _judge import make_tiny_judge
from lightning.pytorch.callbacks import Callback

from nvr.cli.lightning_cli import main
from nvr.mining.mined_set import load_mined, mined_problem
from nvr.training.remining import ROUNDS_DIR, ReMiningCallback, shard_bounds
from nvr.utils.errors import ConfigError

CALLBACK = "nvr.training.remining.ReMiningCallback"


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory) -> Path:
    return make_tiny_judge(tmp_path_factory.mktemp("tiny_judge"))


def _mining(beir: Path, bert: Path, cache: Path, judge: Path | None = None) -> dict:
    out = {"data": {"beir_dir": str(beir)}, "cache_dir": str(cache), "num_negatives": 2, "depth": 8,
           "max_depth": 20, "filter": {"method": "topk_percpos", "perc": 0.99},
           "teachers": [{"name": "tiny", "model_name_or_path": str(bert), "device": "cpu", "dtype": "float32",
                         "query_max_length": 16, "passage_max_length": 32, "batch_size": 16}]}
    if judge is not None:
        out["relabel"] = {"model_name_or_path": str(judge), "threshold": 0.5, "max_candidates": 3, "device": "cpu",
                          "dtype": "float32", "max_length": 64}
    return out


def _config(tmp_path: Path, bert: Path, beir: Path, run: str, lr: float, remine: dict, judge: Path | None = None,
            **trainer) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path / run),
                    "callbacks": [{"class_path": CALLBACK, "init_args": remine}], **trainer},
        "model": {"embedder": {"model_name_or_path": str(bert), "pooling": "mean"}, "lr": lr, "warmup_steps": 0,
                  "scheduler": "constant", "seed": 3},
        "data": {"mining": _mining(beir, bert, tmp_path / "cache", judge), "num_negatives": 2, "batch_size": 2,
                 "query_max_length": 16, "passage_max_length": 32, "seed": 5},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _rounds(root: Path) -> list[Path]:
    return sorted((root / ROUNDS_DIR).iterdir()) if (root / ROUNDS_DIR).exists() else []


def _state(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------ units
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 2, 5, 6, 13])
def test_shards_cover_every_row_once_with_equal_padded_lengths(n, world) -> None:
    texts = [f"t{i}" for i in range(n)]
    blocks = []
    for rank in range(world):
        start, stop, per = shard_bounds(n, rank, world)
        mine = texts[start:stop] + [texts[-1]] * (per - (stop - start))
        assert len(mine) == per == max(1, -(-n // world))  # same forward calls on every rank
        blocks.extend(mine)
    assert blocks[:n] == texts  # gathered in rank order, the first n rows are the texts in order


@pytest.mark.parametrize(("kw", "key"), [({"every_n_epochs": 0}, "every_n_epochs"),
                                         ({"every_n_steps": 0}, "every_n_steps"),
                                         ({"every_n_epochs": None}, "every_n_epochs"),
                                         ({"max_rounds": 0}, "max_rounds"),
                                         ({"encode_batch_size": 0}, "encode_batch_size")])
def test_bad_schedules_are_config_errors(kw, key) -> None:
    with pytest.raises(ConfigError) as err:
        ReMiningCallback(**kw)
    assert err.value.key == f"ReMiningCallback.{key}"


def _encode_worker(rank: int, world: int, init: str, bert: str, texts: list[str], out: str) -> None:
    """One gloo rank: encode ``texts`` sharded over the ranks with a bare embedder (module level for spawn)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from lightning.pytorch.plugins.precision import Precision

    from nvr.modeling.config import EmbedderConfig
    from nvr.modeling.embedder import Embedder
    from nvr.training.remining import encode_sharded, weights_fingerprint

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        embedder = Embedder.from_config(EmbedderConfig(model_name_or_path=bert, pooling="mean"))
        module = SimpleNamespace(embedder=embedder, device=torch.device("cpu"),
                                 trainer=SimpleNamespace(precision_plugin=Precision()))
        rows = encode_sharded(module, texts, prefix="query : ", max_length=16, mask_prefix=True, batch_size=2)
        np.save(Path(out) / f"rows{rank}.npy", rows)
        (Path(out) / f"fp{rank}").write_text(weights_fingerprint(module))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_encoding_under_two_processes_equals_one_process(tiny_bert_dir, tmp_path) -> None:
    import torch.multiprocessing as mp

    from nvr.modeling.config import EmbedderConfig
    from nvr.modeling.embedder import Embedder
    from nvr.modeling.encode import encode_texts

    texts = ["wing lift drag", "heat transfer", "shock wave supersonic flow data", "jet", "panel flutter",
             "rocket nozzle thrust study", "buckling shell"]  # 7 over 2 ranks: rank 1 pads one row
    mp.spawn(_encode_worker, args=(2, f"file://{tmp_path / 'init'}", str(tiny_bert_dir), texts, str(tmp_path)),
             nprocs=2, join=True)
    embedder = Embedder.from_config(EmbedderConfig(model_name_or_path=str(tiny_bert_dir), pooling="mean"))
    single = encode_texts(embedder, texts, prefix="query : ", max_length=16, mask_prefix=True, batch_size=2,
                          show_progress=False)
    for rank in range(2):
        rows = np.load(tmp_path / f"rows{rank}.npy")
        assert rows.shape == single.shape
        np.testing.assert_allclose(rows, single, atol=1e-5)  # identical on every rank, in text order
    assert (tmp_path / "fp0").read_text() == (tmp_path / "fp1").read_text() == embedder.fingerprint()


class _Trainer:
    def __init__(self, epoch: int, step: int) -> None:
        self.current_epoch, self.global_step = epoch, step


def test_schedule_by_epochs_steps_rounds_and_once_per_epoch() -> None:
    cb = ReMiningCallback(every_n_epochs=2)
    assert [e for e in range(7) if cb.due(_Trainer(e, 10 * e))] == [2, 4, 6]  # after epochs 1, 3, 5; never at 0
    cb.history.append({"epoch": 4})
    assert not cb.due(_Trainer(4, 40))  # a resumed run restarting epoch 4 does not redo its round
    cb = ReMiningCallback(every_n_epochs=None, every_n_steps=25)
    cb.last_round_step = 10
    assert not cb.due(_Trainer(2, 34)) and cb.due(_Trainer(2, 35))
    cb = ReMiningCallback(every_n_epochs=1, max_rounds=1)
    cb.rounds = 1
    assert not cb.due(_Trainer(3, 5))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_round_with_unchanged_weights_equals_offline_mining_with_that_model(tiny_bert_dir, tiny_beir_dir,
                                                                              tiny_judge_dir, tmp_path) -> None:
    """lr 1e-30 leaves every fp32 weight bit-identical: the round's negatives and relabelled extra positives are
    exactly what ``nvr mine`` with the base model as teacher (same prefixes and max lengths as training) mines, and
    its held-out false-negative rate equals the initial teacher's (drift 0)."""
    from nvr.config.mining import MineConfig
    from nvr.mining.pipeline import mine
    from nvr.training.multi_dataset import build_mine_config

    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, "frozen", 1e-30, {"every_n_epochs": 1},
                     judge=tiny_judge_dir, max_epochs=2)
    main(["fit", "--config", str(config)])
    rounds = _rounds(tmp_path / "frozen")
    assert len(rounds) == 1 and rounds[0].name.startswith("round-001-")  # epoch 1 was the last: no round
    assert mined_problem(rounds[0], require_manifest=True) is None
    assert {p.name for p in rounds[0].iterdir()} >= {"mined.jsonl", "manifest.json", "report.json", "report.png"}
    offline_cfg = build_mine_config({**_mining(tiny_beir_dir, tiny_bert_dir, tmp_path / "cache", tiny_judge_dir),
                                     "output_dir": str(tmp_path / "offline")}, "test")
    assert isinstance(offline_cfg, MineConfig)
    offline = {e.query_id: e for e in load_mined(mine(offline_cfg))}
    remined = load_mined(rounds[0])
    assert [e.query_id for e in remined] == list(offline)
    assert sum(len(e.negative_ids) for e in remined) >= len(remined)  # not vacuous
    for ex in remined:
        ref = offline[ex.query_id]
        assert ex.negative_ids == ref.negative_ids
        assert ex.negative_scores == pytest.approx(ref.negative_scores, abs=1e-5)
        assert ex.extra_positive_ids == ref.extra_positive_ids
        assert set(ex.negative_teachers) <= {"training-model"}
    state = _state(tmp_path / "frozen")["callbacks"]
    record = next(v for k, v in state.items() if "ReMiningCallback" in k)
    assert record["rounds"] == 1 and record["history"][0]["mined_dir"] == str(rounds[0])
    stats = record["history"][0]["stats"]
    assert np.isfinite(stats["negative_score_mean"]) and 0 <= stats["fn_rate"] <= 1
    assert stats["fn_rate_drift"] == 0.0 and record["baseline_fn_rate"] == stats["fn_rate"]
    assert stats["extra_positives"] == sum(len(e.extra_positive_ids) for e in remined) > 0


class Crash(Callback):
    """Kills a fit after ``at_step`` optimizer steps (before that step's checkpoint is written)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


def _with_step_checkpoints(config: Path, crash_at: int | None = None) -> Path:
    cfg = yaml.safe_load(config.read_text())
    root = cfg["trainer"]["default_root_dir"]
    cfg["trainer"]["callbacks"].append({"class_path": "nvr.cli.lightning_cli.LastCheckpoint",
                                        "init_args": {"dirpath": f"{root}/checkpoints", "every_n_train_steps": 1}})
    if crash_at is not None:
        cfg["trainer"]["callbacks"].append({"class_path": "test_remining.Crash", "init_args": {"at_step": crash_at}})
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert_dir, tiny_beir_dir, tmp_path_factory) -> dict:
    """3 epochs with a round before epochs 1 and 2, never interrupted."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = _with_step_checkpoints(_config(tmp, tiny_bert_dir, tiny_beir_dir, "full", 1e-3, {"every_n_epochs": 1},
                                            max_epochs=3))
    main(["fit", "--config", str(config)])
    rounds = _rounds(tmp / "full")
    state = _state(tmp / "full")
    history = next(v for k, v in state["callbacks"].items() if "ReMining" in k)["history"]
    return {"rounds": rounds, "state": state, "history": history}


@pytest.mark.slow
def test_rounds_are_artifacts_with_the_weights_in_their_fingerprint(uninterrupted) -> None:
    rounds, history = uninterrupted["rounds"], uninterrupted["history"]
    assert [p.name[:9] for p in rounds] == ["round-001", "round-002"]  # no round after the last epoch
    fps = [p.name.split("-", 2)[2] for p in rounds]
    assert fps[0] != fps[1]  # trained weights: another teacher fingerprint, another artifact
    manifests = [json.loads((p / "manifest.json").read_text()) for p in rounds]
    assert [m["fingerprint"] for m in manifests] == fps
    assert manifests[0]["teachers"][0]["fingerprint"] != manifests[1]["teachers"][0]["fingerprint"]
    assert all(mined_problem(p, require_manifest=True) is None for p in rounds)
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["step"] == 2 * history[0]["step"]
    assert [h["mined_dir"] for h in history] == [str(p) for p in rounds]
    datamodule_state = next(v for v in uninterrupted["state"].values() if isinstance(v, dict) and "mined_dirs" in v)
    assert datamodule_state["mined_dirs"]["default"] == str(rounds[1])  # C3: the set training ended on


@pytest.mark.slow
@pytest.mark.parametrize("after_round", [0, 2])
def test_two_rounds_with_a_resume_in_between_equal_the_uninterrupted_run(after_round, uninterrupted, tiny_bert_dir,
                                                                          tiny_beir_dir, tmp_path) -> None:
    """Killed ``after_round`` steps into epoch 1 (0: last.ckpt is the last step of epoch 0, written before round 1
    ran), resumed from last.ckpt: the same rounds, the same mined sets and the same final weights."""
    full_rounds, history = uninterrupted["rounds"], uninterrupted["history"]
    first_round_step = history[0]["step"]
    part = _with_step_checkpoints(_config(tmp_path, tiny_bert_dir, tiny_beir_dir, "part", 1e-3,
                                          {"every_n_epochs": 1}, max_epochs=3),
                                  crash_at=first_round_step + after_round + 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", "--config", str(part)])
    assert len(_rounds(tmp_path / "part")) == 1
    saved = _state(tmp_path / "part")
    assert saved["global_step"] == first_round_step + after_round
    if after_round:
        datamodule_state = next(v for v in saved.values() if isinstance(v, dict) and "mined_dirs" in v)
        assert datamodule_state["mined_dirs"]["default"] == str(_rounds(tmp_path / "part")[0])  # C3
    part = _with_step_checkpoints(_config(tmp_path, tiny_bert_dir, tiny_beir_dir, "part", 1e-3,
                                          {"every_n_epochs": 1}, max_epochs=3))
    main(["fit", "--config", str(part), "--ckpt_path", "last"])
    part_rounds = _rounds(tmp_path / "part")
    assert [p.name for p in part_rounds] == [p.name for p in full_rounds]  # same weights at each round
    for a, b in zip(full_rounds, part_rounds):
        assert (a / "mined.jsonl").read_bytes() == (b / "mined.jsonl").read_bytes()
    final = _state(tmp_path / "part")
    record = next(v for k, v in final["callbacks"].items() if "ReMining" in k)
    assert record["rounds"] == 2 and [h["mined_dir"] for h in record["history"]] == [str(p) for p in part_rounds]
    assert final["global_step"] == uninterrupted["state"]["global_step"]
    for name, value in uninterrupted["state"]["state_dict"].items():  # the resumed run trained on the same sets
        assert torch.equal(value, final["state_dict"][name]), name


def test_remining_needs_a_mining_config(tiny_bert_dir, tiny_beir_dir, tmp_path) -> None:
    from _training_data import write_fake_mined

    config = _config(tmp_path, tiny_bert_dir, tiny_beir_dir, "nomine", 1e-3, {"every_n_epochs": 1}, max_epochs=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"].pop("mining")
    cfg["data"]["mined_dir"] = str(write_fake_mined(tiny_beir_dir, tmp_path / "fake"))
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="data.mining"):
        main(["fit", "--config", str(config)])
