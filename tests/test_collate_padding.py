"""Training batches pad per field: queries to the longest query, passages to the longest passage (never to a
shared width or to max_length), and the cached loss pads each mini-batch to its own longest row."""

from __future__ import annotations

import torch

from nvr.modeling.backbone import load_tokenizer
from nvr.modeling.config import EmbedderConfig
from nvr.training.cached import encode_without_grad
from nvr.training.collate import TrainCollator


def _item(query: str, passages: list[str]) -> dict:
    return {"query": query, "passages": passages, "passage_ids": list(range(len(passages))), "positive_ids": [0],
            "negative_scores": [0.0] * (len(passages) - 1), "positive_score": 1.0, "epoch": 0, "position": 0}


def _lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]


def test_queries_and_passages_are_padded_separately_to_their_own_longest(tiny_bert_dir) -> None:
    tokenizer = load_tokenizer(EmbedderConfig(model_name_or_path=str(tiny_bert_dir)))
    collate = TrainCollator(tokenizer, query_max_length=64, passage_max_length=64)
    long_query = "wing lift drag airfoil shock wave heat transfer boundary layer"
    cases = [  # (queries, passages): long queries + short passages, then the other way round
        ([long_query, "wing"], [["drag", "shock"], ["heat", "lift"]]),
        (["wing", "heat"], [[long_query, "drag"], ["lift", "shock wave"]]),
    ]
    for queries, passages in cases:
        batch = collate([_item(q, p) for q, p in zip(queries, passages, strict=True)])
        query_lengths = _lengths(tokenizer, queries)
        passage_lengths = _lengths(tokenizer, [t for group in passages for t in group])
        assert batch["query"]["input_ids"].shape == (2, max(query_lengths))
        assert batch["passages"]["input_ids"].shape == (4, max(passage_lengths))
        assert batch["query"]["attention_mask"].sum(1).tolist() == query_lengths
        assert batch["passages"]["attention_mask"].sum(1).tolist() == passage_lengths
    assert max(_lengths(tokenizer, [long_query])) < 64  # the widths above are the data's, not max_length


def test_cached_mini_batches_are_padded_to_their_own_longest(tiny_bert_dir) -> None:
    tokenizer = load_tokenizer(EmbedderConfig(model_name_or_path=str(tiny_bert_dir)))
    collate = TrainCollator(tokenizer, query_max_length=64, passage_max_length=64)
    texts = ["wing lift drag airfoil shock wave heat transfer", "wing", "heat lift", "drag", "shock wave", "lift"]
    batch = collate([_item("q", texts[i: i + 2]) for i in range(0, 6, 2)])
    widths: list[tuple[int, int]] = []

    def encode(features: dict[str, torch.Tensor]) -> torch.Tensor:
        widths.append((features["input_ids"].shape[1], int(features["attention_mask"].sum(1).max())))
        assert bool((features["attention_mask"].sum(1) > 0).all())
        return features["attention_mask"].sum(1, keepdim=True).float()

    cached = encode_without_grad(encode, batch["passages"], 2, None)
    assert len(widths) == 3 and all(width == longest for width, longest in widths)
    assert widths[0][0] == batch["passages"]["input_ids"].shape[1] > widths[-1][0]
    # embeddings come back in the batch's row order
    assert cached.embeddings[:, 0].tolist() == batch["passages"]["attention_mask"].sum(1).float().tolist()
