"""Pooling, tokenization, config, Embedder forward semantics and encode_texts (tiny models, CPU, seconds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nvr.modeling.config import EmbedderConfig, LatentAttentionConfig, LoraSettings
from nvr.modeling.embedder import Embedder, build_pooler
from nvr.modeling.encode import encode_texts
from nvr.modeling.latent_attention import LatentAttentionPooling
from nvr.modeling.pooling import first_token, last_token, last_token_index, masked_mean
from nvr.modeling.tokenization import tokenize
from nvr.utils.errors import ConfigError

TEXTS = ["wing lift drag", "heat transfer boundary layer study of the flow", "shock", "rocket nozzle thrust data"]
PREFIX = "query : "


@pytest.fixture(scope="module")
def bert(tiny_bert_dir) -> Embedder:
    return Embedder.from_config(EmbedderConfig(str(tiny_bert_dir))).eval()


@pytest.fixture(scope="module")
def mistral_bidir(tiny_mistral_dir) -> Embedder:
    return Embedder.from_config(EmbedderConfig(str(tiny_mistral_dir), bidirectional=True)).eval()


@pytest.fixture(scope="module")
def mistral_causal(tiny_mistral_dir) -> Embedder:
    return Embedder.from_config(EmbedderConfig(str(tiny_mistral_dir), bidirectional=False)).eval()


# ------------------------------------------------------------------------------------------------------ pooling
def test_masked_mean_excludes_instruction_and_padding_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [4.0, 6.0], [100.0, 100.0]]])
    pool_mask = torch.tensor([[0, 1, 1, 0]])  # token 0 = instruction, token 3 = padding
    assert torch.allclose(masked_mean(hidden, pool_mask), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(masked_mean(hidden, torch.zeros(1, 4)), torch.zeros(1, 2))  # no NaN on empty rows


def test_last_token_right_and_left_padding_by_hand() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert last_token_index(right).tolist() == [1, 3]
    assert last_token_index(left).tolist() == [3, 3]
    assert last_token(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_cls_takes_first_real_token_by_hand() -> None:
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)
    assert first_token(hidden, torch.tensor([[1, 1, 0], [1, 1, 1]])).flatten().tolist() == [0.0, 3.0]
    assert first_token(hidden, torch.tensor([[0, 1, 1], [0, 0, 1]])).flatten().tolist() == [1.0, 5.0]


def test_latent_attention_shapes_and_mask_invariance() -> None:
    pooler = LatentAttentionPooling(16, LatentAttentionConfig(num_latents=8, num_heads=2, head_dim=4), seed=3)
    assert pooler.latents.shape == (8, 16)
    assert pooler.transform(torch.randn(3, 5, 16)).shape == (3, 5, 16)
    hidden = torch.randn(2, 5, 16)
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pool = attention.clone()
    pool[:, 0] = 0
    out = pooler(hidden, attention, pool)
    assert out.shape == (2, 16)
    changed = hidden.clone()
    changed[0, 3:] = torch.randn(2, 16) * 10  # padded positions
    changed[:, 0] = torch.randn(2, 16) * 10  # instruction position (excluded from pooling)
    assert torch.allclose(pooler(changed, attention, pool), out, atol=1e-6)
    changed[0, 1] += 1.0  # a pooled token does matter
    assert not torch.allclose(pooler(changed, attention, pool)[0], out[0], atol=1e-4)
    again = LatentAttentionPooling(16, LatentAttentionConfig(num_latents=8, num_heads=2, head_dim=4), seed=3)
    assert torch.equal(again.latents, pooler.latents)  # seeded init, independent of the global RNG


# ------------------------------------------------------------------------------------------------- tokenization
def test_tokenize_masks_cls_and_prefix_only(tiny_bert_dir, bert) -> None:
    out = tokenize(bert.tokenizer, ["wing lift", "heat"], max_length=16, prefix=PREFIX, mask_prefix=True)
    vocab = bert.tokenizer.get_vocab()
    expected = [vocab[w] for w in ["[CLS]", "query", ":", "wing", "lift", "[SEP]"]]
    assert out["input_ids"][0].tolist() == expected
    assert out["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert out["pool_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert out["input_ids"][1, -1].item() == bert.tokenizer.pad_token_id  # right padding
    plain = tokenize(bert.tokenizer, ["wing lift"], max_length=16, prefix=PREFIX, mask_prefix=False)
    assert torch.equal(plain["pool_mask"], plain["attention_mask"])


def test_tokenize_add_eos_survives_truncation(mistral_bidir) -> None:
    tok = mistral_bidir.tokenizer
    out = tokenize(tok, ["wing lift drag airfoil heat", "wing"], max_length=4, add_eos=True)
    assert out["input_ids"].shape[1] == 4
    assert out["input_ids"][0, -1].item() == tok.eos_token_id
    assert out["input_ids"][0, 0].item() == tok.bos_token_id
    row1 = out["input_ids"][1][out["attention_mask"][1].bool()].tolist()
    assert row1 == [tok.bos_token_id, tok.get_vocab()["wing"], tok.eos_token_id]
    with pytest.raises(ConfigError):
        tokenize(tok, ["wing"], max_length=1, add_eos=True)


# -------------------------------------------------------------------------------------------------------- config
def test_config_rejects_bad_values_with_key() -> None:
    with pytest.raises(ConfigError, match="embedder.pooling"):
        EmbedderConfig("m", pooling="max")
    with pytest.raises(ConfigError, match="embedder.dtype"):
        EmbedderConfig("m", dtype="float64")
    with pytest.raises(ConfigError, match="embedder.quantization"):
        EmbedderConfig("m", quantization="2bit")
    with pytest.raises(ConfigError, match="embedder.lora.r"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="embedder.latent.num_heads"):
        LatentAttentionConfig(num_heads=0)
    with pytest.raises(ConfigError, match="embedder.typo"):
        EmbedderConfig.from_dict({"model_name_or_path": "m", "typo": 1})


def test_config_roundtrips_through_dict_and_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    cfg = EmbedderConfig("m", pooling="latent_attention", lora=LoraSettings(r=8), latent=LatentAttentionConfig(4))
    assert EmbedderConfig.from_dict(cfg.to_dict()) == cfg
    parser = ArgumentParser()
    parser.add_argument("--embedder", type=EmbedderConfig)
    yaml_text = (
        "embedder:\n  model_name_or_path: m\n  pooling: last_token\n  bidirectional: true\n"
        "  lora: {r: 4, alpha: 8}\n  quantization: 4bit\n  latent: {num_latents: 16}\n"
    )
    ns = parser.parse_string(yaml_text)
    built = parser.instantiate_classes(ns).embedder
    assert isinstance(built, EmbedderConfig) and isinstance(built.lora, LoraSettings)
    assert (built.pooling, built.bidirectional, built.lora.r, built.quantization, built.latent.num_latents) == (
        "last_token", True, 4, "4bit", 16)
    with pytest.raises((SystemExit, ConfigError, ValueError)):
        parser.parse_string("embedder:\n  model_name_or_path: m\n  pooling: max\n")


# ------------------------------------------------------------------------------------------------------ embedder
def _token0_change(embedder: Embedder, padded_batch: bool) -> float:
    """Max change of token 0's hidden state when only token 3 changes (0 means causal)."""
    texts = ["wing lift drag airfoil"] + (["heat transfer boundary layer study"] if padded_batch else [])
    batch = embedder.tokenize(texts, 16)
    changed = batch["input_ids"].clone()
    changed[0, 3] = embedder.tokenizer.get_vocab()["shock"]
    with torch.no_grad():
        a = embedder.token_states(batch["input_ids"], batch["attention_mask"])
        b = embedder.token_states(changed, batch["attention_mask"])
    if padded_batch:
        assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 really is padded
    return (a[0, 0] - b[0, 0]).abs().max().item()


@pytest.mark.parametrize("padded_batch", [False, True])
def test_bidirectional_mistral_sees_later_tokens(mistral_bidir, mistral_causal, padded_batch) -> None:
    assert _token0_change(mistral_bidir, padded_batch) > 1e-3
    assert _token0_change(mistral_causal, padded_batch) == 0.0


@pytest.mark.parametrize("which", ["bert", "mistral_bidir", "mistral_causal"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
def test_padding_does_not_change_embeddings(request, which, pooling) -> None:
    base: Embedder = request.getfixturevalue(which)
    cfg = dataclasses.replace(base.config, pooling=pooling)
    embedder = Embedder(cfg, base.backbone, base.tokenizer, build_pooler(cfg, base.hidden_size)).eval()
    batch = embedder.tokenize(TEXTS, 32, prefix=PREFIX, mask_prefix=True)
    assert batch["attention_mask"].sum(1).min() < batch["input_ids"].shape[1]
    with torch.no_grad():
        together = embedder(**batch)
        alone = torch.cat([embedder(**embedder.tokenize([t], 32, prefix=PREFIX, mask_prefix=True)) for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)


def test_instruction_masking_changes_mean_pooling(bert) -> None:
    masked = bert(**bert.tokenize(["wing lift"], 16, prefix=PREFIX, mask_prefix=True))
    unmasked = bert(**bert.tokenize(["wing lift"], 16, prefix=PREFIX, mask_prefix=False))
    assert not torch.allclose(masked, unmasked, atol=1e-4)


def test_fingerprint_tracks_weights_and_pooling(tiny_bert_dir, bert) -> None:
    same = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir)))
    assert same.fingerprint() == bert.fingerprint()
    cls = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir), pooling="cls"))
    assert cls.fingerprint() != bert.fingerprint()
    with torch.no_grad():
        next(same.backbone.parameters()).view(-1)[0] += 1e-3
    assert same.fingerprint() != bert.fingerprint()


def test_encode_texts_restores_order_and_mode(bert) -> None:
    texts = [TEXTS[i % len(TEXTS)] + " data" * (i % 3) for i in range(7)]
    bert.train()
    out = encode_texts(bert, texts, prefix=PREFIX, mask_prefix=True, max_length=32, batch_size=3, show_progress=False)
    assert bert.training  # previous mode restored
    assert out.dtype == np.float32 and out.shape == (7, bert.hidden_size)
    bert.eval()
    with torch.no_grad():
        expected = np.stack([bert(**bert.tokenize([t], 32, prefix=PREFIX, mask_prefix=True))[0].numpy() for t in texts])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert encode_texts(bert, [], show_progress=False).shape == (0, bert.hidden_size)
