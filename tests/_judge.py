"""Test helper: a tiny cross-encoder judge (2-layer BERT sequence classifier, one logit) with the tiny tokenizer."""

from __future__ import annotations

from pathlib import Path


def make_tiny_judge(out: Path, seed: int = 3) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from nvr.testing import make_tiny_tokenizer, vocabulary

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocabulary()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    make_tiny_tokenizer(out, "bert")
    return out
