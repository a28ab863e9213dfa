"""Encoding across ranks is balanced by token count (the teacher's tokenizer; characters without one), not text
count; the embeddings do not depend on who computed them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from nvr.teachers.cache import EmbeddingCache, shard_owners


def _loads(texts: list[str], shard_size: int, owners: list[int], world: int) -> list[int]:
    load = [0] * world
    for i, r in enumerate(owners):
        load[r] += sum(len(t) + 1 for t in texts[i * shard_size : (i + 1) * shard_size])
    return load


def test_equal_shards_are_round_robin_and_one_rank_owns_all() -> None:
    texts = ["abcd"] * 40
    assert shard_owners(texts, 4, 3) == [i % 3 for i in range(10)]
    assert shard_owners(texts, 4, 1) == [0] * 10


def test_long_texts_are_balanced_by_characters_not_counts() -> None:
    rng = np.random.default_rng(0)
    for world in (2, 3, 4):
        # every world-th shard holds long texts: round robin hands them all to rank 0
        texts = ["x" * (1000 if (i // 10) % world == 0 else 10) for i in range(10 * 8 * world)]
        n_shards = len(texts) // 10
        balanced = _loads(texts, 10, shard_owners(texts, 10, world), world)
        round_robin = _loads(texts, 10, [i % world for i in range(n_shards)], world)
        assert max(balanced) < 0.6 * max(round_robin)
        # any texts: the busiest rank ends at most one shard's work above the idlest
        lengths = np.where(rng.random(400) < 0.1, 2000, 20)
        texts = ["x" * int(n) for n in lengths]
        loads = _loads(texts, 10, shard_owners(texts, 10, world), world)
        assert max(loads) - min(loads) <= max(sum(len(t) + 1 for t in texts[i : i + 10]) for i in range(0, 400, 10))


def test_balanced_ranks_give_the_one_process_array(tmp_path) -> None:
    texts = ["w" * (500 if i % 7 == 0 else 5) + str(i) for i in range(60)]

    def encode(batch: list[str]) -> np.ndarray:
        return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in batch], dtype=np.float32)

    single = np.array(EmbeddingCache(tmp_path / "one").get_or_encode("k", texts, encode, shard_size=4))
    cache = EmbeddingCache(tmp_path / "two", poll_s=0.01)
    seen: dict[int, list[int]] = {0: [], 1: []}
    results: dict[int, np.ndarray] = {}

    def run(rank: int) -> None:
        def counting(batch: list[str]) -> np.ndarray:
            seen[rank].append(sum(len(t) + 1 for t in batch))
            return encode(batch)

        results[rank] = np.array(cache.get_or_encode("k", texts, counting, shard_size=4, rank=rank, world_size=2))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results[0], single)
    np.testing.assert_array_equal(results[1], single)
    owners = shard_owners(texts, 4, 2)
    assert len(seen[1]) == owners.count(1) and sum(seen[0]) + sum(seen[1]) == sum(len(t) + 1 for t in texts)


def test_text_cost_decides_the_balance_not_characters() -> None:
    texts = ["x" * 10] * 40  # equal characters: round robin by characters
    tokens = [50 if i < 5 else 1 for i in range(40)]  # but the first shard is long in tokens
    assert shard_owners(texts, 5, 2) == [0, 1] * 4
    assert shard_owners(texts, 5, 2, text_cost=lambda ts: tokens) == [0] + [1] * 7  # 250 tokens vs 7 x 5
    with pytest.raises(ValueError, match="costs for 40 texts"):
        shard_owners(texts, 5, 2, text_cost=lambda ts: [1])


def test_dense_teacher_balances_by_its_tokenizer(tiny_bert_dir, tmp_path, monkeypatch) -> None:
    from nvr.config.mining import TeacherConfig
    from nvr.modeling.encode import token_lengths
    from nvr.teachers.dense import DenseTeacher

    teacher = DenseTeacher(TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), device="cpu",
                                         dtype="float32", passage_max_length=8, passage_prefix="p: "), tmp_path)
    seen = {}
    real = EmbeddingCache.get_or_encode

    def spy(self, key, texts, encode_fn, *args, text_cost=None, **kwargs):
        seen["cost"] = text_cost(texts)
        return real(self, key, texts, encode_fn, *args, text_cost=text_cost, **kwargs)

    monkeypatch.setattr(EmbeddingCache, "get_or_encode", spy)
    texts = ["short", "a much longer passage that the max length truncates at eight tokens"]
    teacher.encode_passages(texts)
    assert seen["cost"] == token_lengths(teacher.embedder, texts, "p: ", 8) and seen["cost"][1] == 8
