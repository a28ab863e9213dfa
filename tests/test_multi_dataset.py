"""Multi-dataset training data (issue 12): homogeneous, seeded, rank-consistent, resumable batches; per-dataset
settings in the batch; config errors naming the key; negative_order; instruction length; swap_mined + resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _training_data import write_fake_mined
from torch.utils.data import DistributedSampler

from nvr.mining.mined_set import MINED_FILE, MinedExample, example_to_row, load_mined
from nvr.modeling.backbone import load_tokenizer
from nvr.modeling.config import EmbedderConfig
from nvr.modeling.tokenization import check_prefix_fits, prefix_room
from nvr.training.collate import MinedTrainDataset, TrainCollator
from nvr.training.datamodule import MinedDataModule
from nvr.training.loss import PAD_ID
from nvr.training.sampler import DatasetGroup, MultiDatasetBatchSampler, SampleKey
from nvr.utils.errors import ConfigError, InputError

SIZES = {"a": 40, "b": 23, "c": 61}


def _groups(weights: dict[str, float] | None = None, distinct: bool = True) -> list[DatasetGroup]:
    groups, offset = [], 0
    for i, (name, size) in enumerate(SIZES.items()):
        keys = (lambda e, n=size, o=i: (np.arange(n) * (1 + e) + o) % (n // 2 + 3)) if distinct else None
        groups.append(DatasetGroup(name, offset, size, keys, None if weights is None else weights[name],
                                   key=f"data.datasets[{i}]"))
        offset += size
    return groups


def _sampler(rank=0, world=2, seed=5, batch=4, sampling="proportional", weights=None,
             distinct=True) -> MultiDatasetBatchSampler:
    return MultiDatasetBatchSampler(None, batch, groups=_groups(weights, distinct), seed=seed, sampling=sampling,
                                    num_replicas=world, rank=rank)


def _owner(index: int) -> str:
    offset = 0
    for name, size in SIZES.items():
        if index < offset + size:
            return name
        offset += size
    raise AssertionError(index)


def _epoch(sampler: MultiDatasetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return [[k.index for k in batch] for batch in sampler]


# ------------------------------------------------------------------------------------------------ sampler
def test_every_step_is_one_dataset_on_every_rank_and_ranks_are_disjoint() -> None:
    ranks = [_epoch(_sampler(rank=r), 0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(_sampler())
    datasets = set()
    for b0, b1 in zip(*ranks, strict=True):
        owners = {_owner(i) for i in b0 + b1}
        assert len(owners) == 1  # homogeneous, and both ranks draw from the same dataset at this step
        assert not set(b0) & set(b1) and len(b0) == len(b1) == 4
        datasets |= owners
    assert datasets == set(SIZES)


def test_no_duplicate_positive_within_a_batch_of_each_dataset() -> None:
    sampler = _sampler()
    groups = {g.name: g for g in sampler.groups}
    for epoch in (0, 1):
        for batch in sampler.global_batches(epoch):
            group = groups[_owner(int(batch[0]))]
            keys = group.positive_keys(epoch)[batch - group.offset]
            assert len(set(keys.tolist())) == len(batch)


def test_proportional_without_weights_uses_every_batch_once_in_a_seeded_order() -> None:
    sampler = _sampler()
    steps = {name: size // 8 for name, size in SIZES.items()}  # batch 4 x 2 ranks
    assert len(sampler) == sum(steps.values())
    order = [_owner(int(b[0])) for b in sampler.global_batches(0)[::2]]
    assert {n: order.count(n) for n in SIZES} == steps
    assert _epoch(_sampler(), 0) == _epoch(_sampler(), 0)  # deterministic
    assert _epoch(_sampler(), 0) != _epoch(_sampler(), 1) and _epoch(_sampler(), 0) != _epoch(_sampler(seed=6), 0)
    plain = _sampler(distinct=False)  # (the no-duplicate rule may top a batch up with an example used before)
    flat = [int(i) for b in plain.global_batches(0) for i in b]
    assert len(flat) == len(set(flat)) == len(plain) * 8  # nothing repeated inside an epoch


def test_proportional_weights_share_the_steps_and_cycle_an_upweighted_dataset() -> None:
    sampler = _sampler(weights={"a": 1.0, "b": 6.0, "c": 1.0})
    total = sum(size // 8 for size in SIZES.values())  # 5 + 2 + 7 = 14 steps
    assert len(sampler) == total and sampler.step_counts == [2, 10, 2]  # 14 * (1/8, 6/8, 1/8) -> 1.75, 10.5, 1.75
    order = [_owner(int(b[0])) for b in sampler.global_batches(0)[::2]]
    assert order.count("b") == 10
    b_batches = [tuple(sorted(b.tolist())) for b in sampler.global_batches(0) if _owner(int(b[0])) == "b"]
    assert len(b_batches) == 20 and len(set(b_batches)) > 4  # b has 4 global batches: later rounds reshuffle


def test_round_robin_takes_turns_until_the_smallest_dataset_runs_out() -> None:
    sampler = _sampler(sampling="round_robin")
    assert len(sampler) == 3 * min(size // 8 for size in SIZES.values())
    order = [_owner(int(b[0])) for b in sampler.global_batches(3)[::2]]
    assert order == ["a", "b", "c"] * 2


@pytest.mark.parametrize("sampling", ["proportional", "round_robin"])
def test_mid_epoch_resume_on_two_ranks_continues_exactly(sampling: str) -> None:
    for rank in range(2):
        full = _epoch(_sampler(rank=rank, sampling=sampling), 1)
        first = _sampler(rank=rank, sampling=sampling)
        first.set_epoch(1)
        it = iter(first)
        for _ in range(3):
            batch = next(it)
            first.progress.mark_consumed(batch[0].epoch, batch[0].position)
        next(it)  # prefetched, never trained on
        resumed = _sampler(rank=rank, sampling=sampling)
        resumed.load_state_dict(first.state_dict())
        assert [[k.index for k in b] for b in resumed] == full[3:]
    changed = _sampler(weights={"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ConfigError, match="data.datasets"):
        changed.load_state_dict(_sampler().state_dict())


def test_one_dataset_matches_the_single_dataset_sampler() -> None:
    from nvr.training.sampler import NoDuplicatePositiveBatchSampler

    keys = _groups()[0].positive_keys
    single = NoDuplicatePositiveBatchSampler(None, 4, positive_keys=keys, num_examples=40, seed=5, num_replicas=2)
    multi = MultiDatasetBatchSampler(None, 4, groups=[DatasetGroup("x", 0, 40, keys)], seed=5, num_replicas=2)
    assert [b.tolist() for b in single.global_batches(2)] == [b.tolist() for b in multi.global_batches(2)]


def test_lightning_reinstantiates_it_with_the_injected_distributed_sampler() -> None:
    from lightning.pytorch.utilities.data import _update_dataloader

    from nvr.training.sampler import ResumableDataLoader

    with _patched_init():
        sampler = MultiDatasetBatchSampler(None, 4, True, groups=_groups(), seed=5)
        loader = ResumableDataLoader(list(range(sum(SIZES.values()))), batch_sampler=sampler,
                                     collate_fn=lambda items: items)
    dist = DistributedSampler(range(sum(SIZES.values())), num_replicas=2, rank=1, shuffle=False)
    rebuilt = _update_dataloader(loader, dist)
    assert rebuilt.batch_sampler.rank == 1 and rebuilt.batch_sampler.num_replicas == 2
    dist.set_epoch(0)
    assert [[k.index for k in b] for b in rebuilt.batch_sampler] == _epoch(_sampler(rank=1), 0)


def _patched_init():
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from torch.utils.data import BatchSampler, DataLoader

    class Both:
        def __enter__(self):
            self.a, self.b = _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler)
            self.a.__enter__(), self.b.__enter__()

        def __exit__(self, *exc):
            self.b.__exit__(*exc), self.a.__exit__(*exc)

    return Both()


def test_unsharded_dataset_too_small_names_its_entry() -> None:
    groups = _groups()
    groups[1] = DatasetGroup("b", 40, 7, None, key="data.datasets[1]")
    with pytest.raises(ConfigError, match=r"data\.datasets\[1\]'.*7 training examples"):
        MultiDatasetBatchSampler(None, 4, groups=groups, num_replicas=2)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def data_files(tiny_beir_dir: Path, tmp_path: Path) -> dict[str, Path]:
    cls_rows = [{"text": f"text {i} about topic {i % 3}", "label": f"L{i % 3}"} for i in range(12)]
    sts_rows = [{"sentence1": f"first {i}", "sentence2": f"second {i}", "score": float(i % 5)} for i in range(20)]
    cls, sts = tmp_path / "cls.jsonl", tmp_path / "sts.jsonl"
    cls.write_text("".join(json.dumps(r) + "\n" for r in cls_rows), encoding="utf-8")
    sts.write_text("".join(json.dumps(r) + "\n" for r in sts_rows), encoding="utf-8")
    return {"mined": write_fake_mined(tiny_beir_dir, tmp_path / "mined", num_negatives=3),
            "other": write_fake_mined(tiny_beir_dir, tmp_path / "other", num_negatives=3, seed=9),
            "cls": cls, "sts": sts}


def _module(tokenizer_dir: Path, datasets: list[dict] | None = None, **kwargs) -> MinedDataModule:
    base = {"tokenizer": str(tokenizer_dir), "batch_size": 2, "query_max_length": 24, "passage_max_length": 24,
            "num_negatives": 2, "seed": 3}
    return MinedDataModule(datasets=datasets, **{**base, **kwargs})


def _three(files: dict[str, Path]) -> list[dict]:
    return [{"name": "retrieval", "mined_dir": str(files["mined"]), "query_instruction": "Retrieve passages"},
            {"name": "classes", "task": "classification", "path": str(files["cls"]), "use_in_batch_negatives": False,
             "query_instruction": "Classify the topic", "num_negatives": 1},
            {"name": "pairs", "task": "sts", "path": str(files["sts"]), "min_score": 2.0,
             "query_instruction": "Find a similar sentence"}]


def _batches(data: MinedDataModule, epoch: int = 0) -> list[dict]:
    loader = data.train_dataloader()
    loader.batch_sampler.set_epoch(epoch)
    return list(loader)


# ----------------------------------------------------------------------------------------- datamodule
def test_three_task_run_gives_homogeneous_batches_with_each_datasets_settings(tiny_bert_dir, data_files) -> None:
    data = _module(tiny_bert_dir, _three(data_files))
    data.prepare_data()
    data.setup("fit")
    tokenizer = load_tokenizer(EmbedderConfig(model_name_or_path=str(tiny_bert_dir)))
    prefixes = {s.name: tokenizer(s.query_prefix, add_special_tokens=True)["input_ids"][:-1] for s in data.specs}
    seen = set()
    for batch in _batches(data):
        name = batch["dataset"]
        seen.add(name)
        ids = batch["query"]["input_ids"]
        assert ids[:, : len(prefixes[name])].tolist() == [prefixes[name]] * ids.shape[0]  # its own instruction
        groups = {"retrieval": 3, "classes": 2, "pairs": 3}  # 1 + num_negatives (1 for classes)
        assert batch["passage_ids"].shape == (2, groups[name])
        assert batch["negative_scores"].shape == (2, groups[name] - 1)
        if name == "classes":
            assert batch["use_in_batch_negatives"] is False
        else:
            assert "use_in_batch_negatives" not in batch
        if name == "pairs":
            assert (batch["passage_ids"][:, 1:] == PAD_ID).all()  # no hard negatives: padding slots
        assert "num_extra_positives" not in batch
    assert seen == {"retrieval", "classes", "pairs"}
    # sts rows below min_score 2.0 are left out: 12 of 20 remain
    assert len(data.parts["pairs"]) == 12 and len(data.parts["classes"]) == 12
    assert data.dataset_names == ["retrieval", "classes", "pairs"] and data.mined_datasets == ["retrieval"]


def test_classification_batches_may_repeat_a_label_and_share_its_id(tiny_bert_dir, data_files) -> None:
    data = _module(tiny_bert_dir, _three(data_files)[1:2], batch_size=4)
    data.setup("fit")
    batches = _batches(data)
    assert len(batches) == 3  # 12 examples over 3 labels still fill batches of 4 (no distinct-positive rule)
    for batch in batches:
        pos = batch["passage_ids"][:, 0]
        for row in range(4):  # the positive ids of a query list its label: same-label passages are masked
            assert int(pos[row]) in batch["positive_ids"][row].tolist()


def test_single_dataset_form_is_a_one_entry_datasets_list(tiny_bert_dir, data_files) -> None:
    single = _module(tiny_bert_dir, None, mined_dir=str(data_files["mined"]), query_instruction="Retrieve")
    listed = _module(tiny_bert_dir, [{"name": "default", "mined_dir": str(data_files["mined"])}],
                     query_instruction="Retrieve")
    for data in (single, listed):
        data.setup("fit")
    for epoch in (0, 1):
        a, b = _batches(single, epoch), _batches(listed, epoch)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["dataset"] == y["dataset"] == "default"
            assert x["passage_ids"].tolist() == y["passage_ids"].tolist()
            assert x["query"]["input_ids"].tolist() == y["query"]["input_ids"].tolist()


@pytest.mark.parametrize("entry,key,fragment", [
    ({"name": "x", "mined_dir": "m", "wieght": 2}, "data.datasets[1].wieght", "unknown dataset key"),
    ({"name": "x", "mined_dir": "m", "weight": 0}, "data.datasets[1].weight", "must be > 0"),
    ({"name": "x", "mined_dir": "m", "weight": -1.5}, "data.datasets[1].weight", "must be > 0"),
    ({"name": "a", "mined_dir": "m"}, "data.datasets[1].name", "duplicate dataset name 'a'"),
    ({"name": "x"}, "data.datasets[1].mining", "needs mining"),
    ({"name": "x", "task": "sts"}, "data.datasets[1].path", "needs path"),
    ({"name": "x", "task": "qa", "path": "p"}, "data.datasets[1].task", "must be one of"),
    ({"name": "x", "mined_dir": "m", "path": "p"}, "data.datasets[1].path", "only for task"),
    ({"name": "x/y", "mined_dir": "m"}, "data.datasets[1].name", "letters, digits"),
    ({"name": "x", "mined_dir": "m", "num_negatives": -1}, "data.datasets[1].num_negatives", ">= 0"),
    ({"name": "x", "task": "sts", "path": "p", "use_in_batch_negatives": False},
     "data.datasets[1].use_in_batch_negatives", "nothing to contrast"),
    ({"name": "x", "task": "sts", "path": "p", "label_texts": {"a": "b"}}, "data.datasets[1].label_texts",
     "only for task classification"),
    ({"name": "x", "mining": {"data": {"beir_dir": "d"}, "filter": {"perc": 5}}},
     "data.datasets[1].mining.filter.perc", "(0, 2]"),
    ({"name": "x", "mining": {"data": {"beir_dir": "d"}, "num_negatvies": 3}}, "data.datasets[1].mining", ""),
    ("not-a-mapping", "data.datasets[1]", "must be a mapping"),
])
def test_bad_dataset_entries_are_one_line_config_errors(tiny_bert_dir, entry, key, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        _module(tiny_bert_dir, [{"name": "a", "mined_dir": "m"}, entry])
    assert err.value.key == key and fragment in err.value.message
    assert "\n" not in str(err.value)


def test_other_config_errors(tiny_bert_dir, data_files) -> None:
    with pytest.raises(ConfigError, match="'data.datasets'.*is empty"):
        _module(tiny_bert_dir, [])
    with pytest.raises(ConfigError, match="not both"):
        _module(tiny_bert_dir, [{"name": "a", "mined_dir": "m"}], mined_dir="m")
    with pytest.raises(ConfigError, match=r"'data.datasets\[1\].weight'.*every dataset or on none"):
        _module(tiny_bert_dir, [{"name": "a", "mined_dir": "m", "weight": 1}, {"name": "b", "mined_dir": "m"}])
    with pytest.raises(ConfigError, match="'data.negative_order'"):
        _module(tiny_bert_dir, None, mined_dir="m", negative_order="random")
    with pytest.raises(ConfigError, match="'data.max_extra_positives'"):
        _module(tiny_bert_dir, None, mined_dir="m", max_extra_positives=-1)


def test_empty_dataset_names_its_entry(tiny_bert_dir, data_files) -> None:
    entries = _three(data_files)
    entries[2]["min_score"] = 99.0  # every pair filtered out
    data = _module(tiny_bert_dir, entries)
    with pytest.raises(ConfigError, match=r"'data.datasets\[2\]'.*'pairs' has no training examples"):
        data.setup("fit")
    too_small = _module(tiny_bert_dir, _three(data_files)[:2], batch_size=16)
    too_small.setup("fit")
    with pytest.raises(ConfigError, match=r"'data.datasets\[0\]'.*cannot fill one batch of 16"):
        too_small.train_dataloader()


def test_cli_reports_a_bad_dataset_key_in_one_line(tiny_bert_dir, tmp_path, capsys) -> None:
    import yaml
    from _cli import cli_error

    cfg = {"trainer": {"accelerator": "cpu", "logger": False},
           "model": {"embedder": {"model_name_or_path": str(tiny_bert_dir)}},
           "data": {"datasets": [{"name": "a", "mined_dir": "m"}, {"name": "b", "mined_dir": "m", "weight": 0}]}}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    line = cli_error(["fit", "--config", str(path)], capsys)
    assert "data.datasets[1].weight" in line and "must be > 0" in line


# --------------------------------------------------------------------------------------- negative order
def _example(pool: int) -> MinedExample:
    return MinedExample("q1", "query", ["p"], ["pos"], [f"n{i}" for i in range(pool)],
                        [f"neg {i}" for i in range(pool)], [1.0 - 0.1 * i for i in range(pool)], ["t"] * pool,
                        list(range(pool)))


def test_negative_orders() -> None:
    ex = _example(5)
    rotate = MinedTrainDataset([ex], 2, negative_order="rotate")
    assert [rotate._negative_slots(ex, e) for e in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]  # today's order
    top = MinedTrainDataset([ex], 2, negative_order="top_first")
    assert [top._negative_slots(ex, e) for e in range(5)] == [[0, 1], [0, 2], [0, 3], [0, 4], [0, 1]]
    one = MinedTrainDataset([_example(4)], 1, negative_order="top_first")
    assert all(one._negative_slots(one.examples[0], e) == [0] for e in range(8))  # the top-1 every epoch
    sample = MinedTrainDataset([ex], 3, negative_order="sample", seed=11)
    draws = [sample._negative_slots(ex, e) for e in range(12)]
    assert all(len(set(d)) == 3 and d == sorted(d) and set(d) <= set(range(5)) for d in draws)
    assert len({tuple(d) for d in draws}) > 3  # varies across epochs ...
    again = MinedTrainDataset([ex], 3, negative_order="sample", seed=11)
    assert draws == [again._negative_slots(ex, e) for e in range(12)]  # ... and is seeded
    assert draws != [MinedTrainDataset([ex], 3, negative_order="sample", seed=12)._negative_slots(ex, e)
                     for e in range(12)]
    short = _example(1)
    for order in ("rotate", "top_first", "sample"):  # a short pool: all of it, then padding
        assert MinedTrainDataset([short], 3, negative_order=order)._negative_slots(short, 2) == [0, -1, -1]
        assert MinedTrainDataset([short], 0, negative_order=order)._negative_slots(short, 2) == []


def test_negative_order_reaches_the_batches(tiny_bert_dir, data_files) -> None:
    data = _module(tiny_bert_dir, None, mined_dir=str(data_files["mined"]), num_negatives=1,
                   negative_order="top_first")
    data.setup("fit")
    from nvr.training.collate import doc_hash

    top = {doc_hash(ex.positive_ids[0]): doc_hash(ex.negative_ids[0]) for ex in data.parts["default"].examples}
    for epoch in range(3):
        for batch in _batches(data, epoch):
            for row in batch["passage_ids"].tolist():
                if row[0] in top:
                    assert row[1] == top[row[0]] or row[1] in top.values()


# ----------------------------------------------------------------------------------- instruction length
def test_instruction_leaving_no_room_for_the_query_is_a_config_error(tiny_bert_dir, data_files) -> None:
    tokenizer = load_tokenizer(EmbedderConfig(model_name_or_path=str(tiny_bert_dir)))
    instruction = "retrieve the passages that answer this question about wing lift and drag"
    prefix = f"{instruction}: "
    used = len(tokenizer(prefix, add_special_tokens=True)["input_ids"])  # [CLS] prefix [SEP]
    assert prefix_room(tokenizer, prefix, used, add_eos=False) == 0
    assert prefix_room(tokenizer, prefix, used + 1, add_eos=False) == 1
    check_prefix_fits(tokenizer, prefix, used + 1, False, "k", "data.query_max_length")
    with pytest.raises(ConfigError, match="'k'.*leaving no room.*data.query_max_length=12"):
        check_prefix_fits(tokenizer, prefix, 12, False, "k", "data.query_max_length")
    single = _module(tiny_bert_dir, None, mined_dir=str(data_files["mined"]), query_instruction=instruction,
                     query_max_length=used)
    with pytest.raises(ConfigError, match="'data.query_instruction'"):
        single.train_dataloader()
    entries = _three(data_files)
    entries[1]["query_instruction"] = instruction
    multi = _module(tiny_bert_dir, entries, query_max_length=used)
    with pytest.raises(ConfigError, match=r"'data.datasets\[1\].query_instruction'"):
        multi.train_dataloader()
    fits = _module(tiny_bert_dir, None, mined_dir=str(data_files["mined"]), query_instruction=instruction,
                   query_max_length=used + 1)
    batch = _batches(fits)[0]
    pooled = batch["query"]["pool_mask"].sum(1)
    assert (pooled >= 1).all()  # a query token is pooled, not only [SEP]


def test_prefix_room_counts_the_appended_eos_and_sentencepiece_prefixes(tiny_mistral_dir) -> None:
    """Decoder tokenizers (BOS, Metaspace "▁" pieces, EOS appended with add_eos): the check measures exactly what
    tokenize() keeps for pooling, so the error fires exactly when no query token would be pooled."""
    tokenizer = load_tokenizer(EmbedderConfig(model_name_or_path=str(tiny_mistral_dir)))
    prefix = "Given a question, retrieve passages that answer the question: "
    used = len(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    rooms = {length: prefix_room(tokenizer, prefix, length) for length in range(2, used + 6)}
    assert rooms[used] == 0 and rooms[used + 3] > 0
    for length in range(3, used + 6):
        assert prefix_room(tokenizer, prefix, length, add_eos=True) == rooms[length - 1]  # EOS takes one slot
        fits = prefix_room(tokenizer, prefix, length, add_eos=True) > 0
        if fits:
            check_prefix_fits(tokenizer, prefix, length, True, "k", "data.query_max_length")
        else:
            with pytest.raises(ConfigError, match="leaving no room"):
                check_prefix_fits(tokenizer, prefix, length, True, "k", "data.query_max_length")


# ----------------------------------------------------------------------------------------- extra positives
def test_extra_positive_columns_follow_the_positive(tiny_bert_dir) -> None:
    from nvr.training.collate import doc_hash

    a, b = _example(3), _example(3)
    b.query_id, b.positive_ids = "q2", ["p2"]
    a.extra_positive_ids, a.extra_positive_texts, a.extra_positive_scores = ["e1", "e2", "e3"], ["x", "y", "z"], \
        [0.9, 0.8, 0.7]
    dataset = MinedTrainDataset([a, b], 2, max_extra_positives=2)
    items = [dataset[SampleKey(0, 0, 0)], dataset[SampleKey(0, 0, 1)]]
    tokenizer = load_tokenizer(EmbedderConfig(model_name_or_path=str(tiny_bert_dir)))
    batch = TrainCollator(tokenizer, 16, 16)(items)
    assert batch["num_extra_positives"] == 2 and batch["passage_ids"].shape == (2, 1 + 2 + 2)
    assert batch["passage_ids"][0].tolist() == [doc_hash(x) for x in ("p", "e1", "e2", "n0", "n1")]
    assert batch["passage_ids"][1, 1:3].tolist() == [PAD_ID, PAD_ID]
    assert batch["extra_positive_scores"][0].tolist() == pytest.approx([0.9, 0.8])
    assert np.isnan(batch["extra_positive_scores"][1].numpy()).all()
    assert batch["negative_scores"].shape == (2, 2)
    # every extra positive (also the third, not collated) is one of the query's positives: never its negative
    assert {doc_hash(x) for x in ("p", "e1", "e2", "e3")} <= set(batch["positive_ids"][0].tolist())
    plain = TrainCollator(tokenizer, 16, 16)([MinedTrainDataset([a], 2)[SampleKey(0, 0, 0)]])
    assert "num_extra_positives" not in plain and plain["passage_ids"].shape == (1, 3)


def test_mined_rows_with_extra_positives_reach_the_batch_and_swap(tiny_bert_dir, data_files, tmp_path) -> None:
    """C2 rows (``extra_positives`` after ``negatives``) read back, collated with max_extra_positives, and replaced
    by swap_mined like the negatives."""
    from nvr.training.collate import doc_hash

    rows = load_mined(data_files["mined"])
    for i, ex in enumerate(rows):
        if i % 2 == 0:
            ex.extra_positive_ids, ex.extra_positive_texts = [f"x{i}"], [f"relabelled passage {i}"]
            ex.extra_positive_scores, ex.extra_positive_judge_scores = [0.5], [0.9]
    folder = tmp_path / "with_extras"
    folder.mkdir()
    (folder / MINED_FILE).write_text("".join(json.dumps(example_to_row(r)) + "\n" for r in rows), encoding="utf-8")
    data = _module(tiny_bert_dir, None, mined_dir=str(folder), max_extra_positives=1)
    data.setup("fit")
    allowed: dict[int, set[int]] = {}  # epoch-0 positive -> what its extra column may hold (examples may share one)
    for ex in data.parts["default"].examples:
        extra = doc_hash(ex.extra_positive_ids[0]) if ex.extra_positive_ids else PAD_ID
        allowed.setdefault(doc_hash(ex.positive_ids[0]), set()).add(extra)
    seen = set()
    for batch in _batches(data):
        assert batch["num_extra_positives"] == 1 and batch["passage_ids"].shape[1] == 1 + 1 + 2
        for row, ids in enumerate(batch["passage_ids"].tolist()):
            assert ids[1] in allowed[ids[0]]
            seen.add(ids[1])
            score = float(batch["extra_positive_scores"][row, 0])
            assert score == pytest.approx(0.5) if ids[1] != PAD_ID else np.isnan(score)
    assert PAD_ID in seen and len(seen) > 1
    data.swap_mined(data_files["other"])  # a set without extra positives: they go too
    assert all(not ex.extra_positive_ids and not ex.extra_positive_judge_scores
               for ex in data.parts["default"].examples)


# -------------------------------------------------------------------------------------- swap_mined + resume
def _negatives(data: MinedDataModule, name: str = "default") -> dict[str, list[str]]:
    return {ex.query_id: ex.negative_ids for ex in data.parts[name].examples}


def test_swap_mined_replaces_negatives_and_survives_a_resume(tiny_bert_dir, data_files) -> None:
    entries = _three(data_files)
    data = _module(tiny_bert_dir, entries)
    data.setup("fit")
    assert data.mining_config("retrieval") is None  # a mined_dir without a mining config
    other = {ex.query_id: ex.negative_ids for ex in load_mined(data_files["other"])}
    before = _negatives(data, "retrieval")
    assert before != other
    data.swap_mined(data_files["other"], "retrieval")
    assert _negatives(data, "retrieval") == other
    assert data.current_mined_path("retrieval") == data_files["other"]
    rows = [b for b in _batches(data) if b["dataset"] == "retrieval"]
    from nvr.training.collate import doc_hash

    allowed = {doc_hash(n) for negs in other.values() for n in negs} | {PAD_ID}
    assert rows and all(set(b["passage_ids"][:, 1:].reshape(-1).tolist()) <= allowed for b in rows)
    state = data.state_dict()
    assert state["mined_dirs"] == {"retrieval": str(data_files["other"])}
    # resume: Lightning restores the datamodule after setup ...
    resumed = _module(tiny_bert_dir, entries)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert _negatives(resumed, "retrieval") == other
    # ... and a state loaded before setup is applied when the data is loaded
    early = _module(tiny_bert_dir, entries)
    early.load_state_dict(state)
    early.setup("fit")
    assert _negatives(early, "retrieval") == other and early.current_mined_path("retrieval") == data_files["other"]
    with pytest.raises(ConfigError, match="classification dataset, not a mined set"):
        data.swap_mined(data_files["other"], "classes")
    assert data.mining_config() is None  # the only mined dataset needs no name
    with pytest.raises(ConfigError, match="several datasets"):
        data.spec()


def test_swap_mined_reaches_persistent_workers(tiny_bert_dir, data_files) -> None:
    """Persistent DataLoader workers hold a copy of the dataset: after a swap the next epoch uses new ones."""
    from nvr.training.collate import doc_hash

    data = _module(tiny_bert_dir, None, mined_dir=str(data_files["mined"]), num_workers=1)
    data.setup("fit")
    loader = data.train_dataloader()
    old = {doc_hash(n) for negs in _negatives(data).values() for n in negs}
    new = {doc_hash(n) for ex in load_mined(data_files["other"]) for n in ex.negative_ids}
    assert old != new
    first = [b["passage_ids"][:, 1:].reshape(-1).tolist() for b in loader]
    data.swap_mined(data_files["other"])
    loader.batch_sampler.set_epoch(1)
    second = [b["passage_ids"][:, 1:].reshape(-1).tolist() for b in loader]
    assert set(sum(first, [])) <= old | {PAD_ID} and set(sum(second, [])) <= new | {PAD_ID}


def test_swap_mined_missing_query_names_the_folder_and_changes_nothing(tiny_bert_dir, data_files, tmp_path) -> None:
    data = _module(tiny_bert_dir, None, mined_dir=str(data_files["mined"]))
    data.setup("fit")
    before = _negatives(data)
    partial = tmp_path / "partial"
    partial.mkdir()
    rows = load_mined(data_files["other"])[1:]
    (partial / MINED_FILE).write_text("".join(json.dumps(example_to_row(r)) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(InputError, match=rf"{partial}/mined.jsonl: 1 of the \d+ training queries"):
        data.swap_mined(partial)
    assert _negatives(data) == before and data.current_mined_path() == data_files["mined"]


def test_mining_config_follows_the_swapped_manifest(tiny_bert_dir, data_files, tiny_beir_dir, tmp_path) -> None:
    from nvr.config.mining import DataSource, MineConfig, TeacherConfig
    from nvr.mining.pipeline import content_config

    base = MineConfig(data=DataSource(beir_dir=str(tiny_beir_dir)), teachers=[TeacherConfig(kind="bm25", name="b")],
                      cache_dir=str(tmp_path / "cache"), num_negatives=3)
    data = MinedDataModule(mining=base, mined_dir=str(data_files["mined"]), tokenizer=str(tiny_bert_dir),
                           batch_size=2)
    data.setup("fit")
    assert data.mining_config() is base
    remined = MineConfig(data=DataSource(beir_dir=str(tiny_beir_dir)), teachers=[TeacherConfig(kind="bm25", name="b")],
                         num_negatives=2, seed=7)
    (data_files["other"] / "manifest.json").write_text(json.dumps({"config": content_config(remined)}),
                                                       encoding="utf-8")
    data.swap_mined(data_files["other"])
    got = data.mining_config()
    assert got is not None and (got.num_negatives, got.seed) == (2, 7)
    assert got.cache_dir == base.cache_dir and got.output_dir == str(data_files["other"])


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["nv_retriever_v1_stage2.yaml", "miniature_stage2_cranfield_scifact.yaml"])
def test_shipped_multi_dataset_configs_build_their_datasets(name: str) -> None:
    import yaml

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "configs" / "fit" / name).read_text(encoding="utf-8"))["data"]
    raw.pop("eval_sets")
    data = MinedDataModule(**raw)
    assert len(data.specs) >= 2 and all(s.mined == (s.mining is not None) for s in data.specs)
    if name.startswith("nv_retriever"):
        assert [s.task for s in data.specs] == ["retrieval", "classification", "sts"]
        assert data.specs[1].use_in_batch_negatives is False and data.specs[2].min_score == 4.0
    else:
        for spec in data.specs:
            assert spec.mining.data.beir_dir.startswith("../shared/data/")
            if (repo / spec.mining.data.beir_dir).exists():
                assert (repo / spec.mining.data.beir_dir / "corpus.jsonl").is_file()


class _CrashAt:
    """Saves a checkpoint after training step ``step`` (as a step-checkpoint callback does), then dies."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def make(self):
        import lightning as L

        outer = self

        class Crash(L.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                if trainer.global_step == outer.step:
                    trainer.save_checkpoint(outer.path)
                    raise RuntimeError("simulated crash")

        return Crash()


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["max_steps", "max_epochs"])
def test_lightning_fit_over_three_tasks_and_mid_epoch_resume(tiny_bert_dir, data_files, tmp_path, limit) -> None:
    """Killed in epoch 1 after a step checkpoint, resumed: the same batches as the uninterrupted run. With
    ``max_epochs`` Lightning builds the train loader before restoring its state (estimated_stepping_batches), so
    only the DataModule's copy of the sampler position carries it."""
    import lightning as L

    from nvr.modeling.config import EmbedderConfig as Cfg
    from nvr.training.module import BiEncoderModule

    steps = len(_batches(_module(tiny_bert_dir, _three(data_files))))  # per epoch
    bound = {"max_steps": steps + 4} if limit == "max_steps" else {"max_epochs": 2}
    ckpt = tmp_path / "mid.ckpt"

    def run(resume: bool = False, crash: bool = False) -> list[tuple[str, list[int]]]:
        data = _module(tiny_bert_dir, _three(data_files))
        seen: list[tuple[str, list[int]]] = []
        original = data.on_before_batch_transfer

        def record(batch, idx):
            seen.append((batch["dataset"], batch["passage_ids"][:, 0].tolist()))
            return original(batch, idx)

        data.on_before_batch_transfer = record
        module = BiEncoderModule(Cfg(model_name_or_path=str(tiny_bert_dir), pooling="mean"), lr=1e-3, warmup_steps=0)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[_CrashAt(steps + 2, ckpt).make()] if crash else [], **bound)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if resume else None)
        except RuntimeError as err:
            assert crash and "simulated crash" in str(err)
        return seen

    full = run()
    assert {name for name, _ in full} == {"retrieval", "classes", "pairs"}
    assert run(crash=True)[: steps + 2] == full[: steps + 2]
    assert run(resume=True) == full[steps + 2 :]
