"""LoRA parameter counts, adapter/full save-load round trips, latent head persistence, bitsandbytes smoke test."""

from __future__ import annotations

import json

import pytest
import torch

from nvr.modeling.config import EmbedderConfig, LatentAttentionConfig, LoraSettings
from nvr.modeling.embedder import META_FILE, POOLER_FILE, Embedder
from nvr.utils.errors import ConfigError, InputError, OutputExistsError

TEXTS = ["wing lift drag", "heat transfer boundary layer study of the flow", "shock"]


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _perturb_lora(embedder: Embedder, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = no-op); give it values so a round trip is a real test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in embedder.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _embed(embedder: Embedder) -> torch.Tensor:
    embedder.eval()
    with torch.no_grad():
        return embedder(**embedder.tokenize(TEXTS, 32, prefix="query : ", mask_prefix=True))


def test_lora_trainable_count_mistral(tiny_mistral_dir) -> None:
    # hidden 32, 4 heads x 8, 2 kv heads -> k/v out 16; r=16: q,o 16*(32+32)=1024, k,v 16*(32+16)=768; x 2 layers
    emb = Embedder.from_config(EmbedderConfig(str(tiny_mistral_dir), bidirectional=True, lora=LoraSettings()))
    assert _trainable(emb) == 2 * (1024 + 768 + 768 + 1024) == 7168
    assert all("lora_" in n for n, p in emb.named_parameters() if p.requires_grad)


def test_lora_bert_maps_target_names_and_counts(tiny_bert_dir) -> None:
    # BERT has query/key/value/attention.output.dense (32x32 each): 16*(32+32) = 1024 each, 4 per layer, 2 layers
    emb = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings()))
    assert _trainable(emb) == 2 * 4 * 1024 == 8192
    lora_modules = {n.split(".lora_A")[0].split("layer.0.")[-1] for n, _ in emb.named_parameters()
                    if ".layer.0." in n and "lora_A" in n}
    assert lora_modules == {"attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense"}
    with pytest.raises(ConfigError, match="embedder.lora.target_modules"):
        Embedder.from_config(EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings(target_modules=["nope"])))


def test_lora_latent_head_trains_and_adapter_roundtrip(tiny_mistral_dir, tmp_path) -> None:
    latent = LatentAttentionConfig(num_latents=8, num_heads=2)
    cfg = EmbedderConfig(str(tiny_mistral_dir), bidirectional=True, pooling="latent_attention", latent=latent,
                         lora=LoraSettings(r=4, alpha=8))
    emb = Embedder.from_config(cfg, seed=1)
    head = sum(p.numel() for p in emb.pooler.parameters())
    # latents 8*32 + 3 LayerNorms 3*64 + to_q 32*64 + to_kv 32*128 + to_out 64*32 + ff 32*256+256 + 128*32+32
    assert head == 256 + 192 + 2048 + 4096 + 2048 + 8448 + 4128
    assert _trainable(emb) == head + 2 * 4 * (32 + 32 + 32 + 16 + 32 + 16 + 32 + 32)
    _perturb_lora(emb)
    before = _embed(emb)
    out = emb.save_pretrained(tmp_path / "emb")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["backbone"] == "adapter"
    assert (out / "adapter_model.safetensors").exists() and (out / POOLER_FILE).exists()
    assert not (out / "model.safetensors").exists()  # adapter only, the base stays where it was
    loaded = Embedder.from_pretrained(out)
    assert torch.equal(_embed(loaded), before)
    assert loaded.fingerprint() == emb.fingerprint()
    assert _trainable(loaded.backbone) == 0  # inference load freezes adapters
    with pytest.raises(OutputExistsError):
        emb.save_pretrained(out)


def test_full_save_load_roundtrip_keeps_bidirectional(tiny_mistral_dir, tmp_path) -> None:
    emb = Embedder.from_config(EmbedderConfig(str(tiny_mistral_dir), bidirectional=True, pooling="last_token",
                                              add_eos=True))
    with torch.no_grad():
        next(emb.backbone.parameters()).add_(0.01)  # fine-tuned weights must be the ones saved
    out = emb.save_pretrained(tmp_path / "full")
    loaded = Embedder.from_pretrained(out)
    assert loaded.config.bidirectional and loaded.config.add_eos and loaded.config.pooling == "last_token"
    assert torch.equal(_embed(loaded), _embed(emb))
    assert loaded.fingerprint() == emb.fingerprint()


def test_missing_pad_token_falls_back_to_eos(tiny_mistral_dir, tmp_path) -> None:
    from transformers import AutoTokenizer, MistralModel

    tok = AutoTokenizer.from_pretrained(str(tiny_mistral_dir))
    tok.pad_token = None
    model = MistralModel.from_pretrained(str(tiny_mistral_dir))
    model.config.pad_token_id = None
    tok.save_pretrained(str(tmp_path))
    model.save_pretrained(str(tmp_path))
    emb = Embedder.from_config(EmbedderConfig(str(tmp_path), pooling="last_token"))
    assert emb.tokenizer.pad_token_id == emb.tokenizer.eos_token_id
    assert emb.backbone.config.pad_token_id == emb.tokenizer.eos_token_id
    assert _embed(emb).shape == (3, 32)


def test_from_pretrained_rejects_non_embedder_folder(tmp_path) -> None:
    with pytest.raises(InputError, match=META_FILE):
        Embedder.from_pretrained(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(InputError, match=r":1: invalid JSON"):
        Embedder.from_pretrained(tmp_path)


def test_gradient_checkpointing_with_lora_backprops(tiny_mistral_dir) -> None:
    cfg = EmbedderConfig(str(tiny_mistral_dir), bidirectional=True, lora=LoraSettings(r=4), gradient_checkpointing=True)
    emb = Embedder.from_config(cfg).train()
    emb(**emb.tokenize(TEXTS, 16)).sum().backward()
    grads = [p.grad for n, p in emb.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_bitsandbytes_4bit_smoke(tiny_mistral_dir) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = EmbedderConfig(str(tiny_mistral_dir), bidirectional=True, quantization="4bit", lora=LoraSettings(r=4))
    emb = Embedder.from_config(cfg)
    assert any(type(m).__name__ == "Linear4bit" for m in emb.modules())
    out = emb.train()(**emb.tokenize(TEXTS, 16))  # train mode: CPU eval repacks 4-bit weights (stack-probe §5)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    out.sum().backward()
    assert isinstance(emb.fingerprint(), str)
