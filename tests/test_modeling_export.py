"""Export round trips: SentenceTransformer and AutoModel reproduce our embeddings; checkpoint and CLI paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nvr.modeling.config import EmbedderConfig, LatentAttentionConfig, LoraSettings
from nvr.modeling.embedder import Embedder
from nvr.modeling.encode import encode_texts
from nvr.modeling.export import export_embedder
from nvr.utils.errors import ConfigError, InputError

QUERIES = ["wing lift drag", "shock wave supersonic flow", "heat"]
PASSAGES = ["heat transfer boundary layer study of the flow", "rocket nozzle thrust data", "panel flutter"]
QP, PP = "query : ", "passage : "

st = pytest.importorskip("sentence_transformers")


def _perturb_lora(embedder: Embedder) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in embedder.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _ours(embedder: Embedder, mask_prefix: bool) -> tuple[np.ndarray, np.ndarray]:
    q = encode_texts(embedder, QUERIES, prefix=QP, mask_prefix=mask_prefix, max_length=64, show_progress=False)
    # passages never have their prefix masked (as in training)
    p = encode_texts(embedder, PASSAGES, prefix=PP, mask_prefix=False, max_length=64, show_progress=False)
    return q, p


def _st(path) -> tuple[np.ndarray, np.ndarray]:
    model = st.SentenceTransformer(str(path), device="cpu")
    return model.encode_query(QUERIES, convert_to_numpy=True), model.encode_document(PASSAGES, convert_to_numpy=True)


@pytest.mark.parametrize("mask_prefix", [False, True])
def test_st_roundtrip_tiny_bert_lora_merged(tiny_bert_dir, tmp_path, mask_prefix) -> None:
    emb = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings(r=4)))
    _perturb_lora(emb)
    ours_q, ours_p = _ours(emb, mask_prefix)
    out = export_embedder(emb, tmp_path / "st", query_prefix=QP, passage_prefix=PP, mask_prefix=mask_prefix,
                          max_length=64)
    assert any("lora_" in n for n, _ in emb.named_parameters())  # the live embedder is not merged in place
    st_q, st_p = _st(out)
    np.testing.assert_allclose(st_q, ours_q, atol=1e-5)
    np.testing.assert_allclose(st_p, ours_p, atol=1e-5)
    if mask_prefix:  # masked query prompt, unmasked passage prefix: one Pooling per task
        router = json.loads((out / "1_Pooling" / "router_config.json").read_text())
        assert router["structure"] == {"query": ["query_0_Pooling"], "document": ["document_0_Pooling"]}
        pooling = json.loads((out / "1_Pooling" / "query_0_Pooling" / "config.json").read_text())
    else:
        pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"] is (not mask_prefix)
    # AutoModel sees merged plain weights and reproduces the token states
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in hf.named_parameters())
    batch = emb.tokenize(PASSAGES, 64)
    with torch.no_grad():
        ref = emb.eval().token_states(batch["input_ids"], batch["attention_mask"])
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-5)
    assert np.allclose(_ours(Embedder.from_pretrained(out), mask_prefix)[0], ours_q, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "last_token"])
def test_st_roundtrip_other_poolings_and_bidirectional_decoder(tiny_mistral_dir, tmp_path, pooling) -> None:
    emb = Embedder.from_config(EmbedderConfig(str(tiny_mistral_dir), bidirectional=True, pooling=pooling))
    ours_q, ours_p = _ours(emb, mask_prefix=True)
    out = export_embedder(emb, tmp_path / "st", query_prefix=QP, passage_prefix=PP, mask_prefix=True)
    assert json.loads((out / "config.json").read_text())["is_causal"] is False
    st_q, st_p = _st(out)
    np.testing.assert_allclose(st_q, ours_q, atol=1e-5)
    np.testing.assert_allclose(st_p, ours_p, atol=1e-5)


def test_latent_attention_export_refuses_st_and_writes_head(tiny_mistral_dir, tmp_path) -> None:
    cfg = EmbedderConfig(str(tiny_mistral_dir), bidirectional=True, pooling="latent_attention",
                         latent=LatentAttentionConfig(num_latents=4, num_heads=2), lora=LoraSettings(r=4))
    emb = Embedder.from_config(cfg)
    _perturb_lora(emb)
    with pytest.raises(ConfigError, match="latent_attention pooling cannot be expressed in sentence-transformers"):
        export_embedder(emb, tmp_path / "st")
    assert not (tmp_path / "st").exists()
    out = export_embedder(emb, tmp_path / "hf", sentence_transformers=False)
    assert not (out / "modules.json").exists() and (out / "pooler.safetensors").exists()
    reloaded = Embedder.from_pretrained(out)
    assert reloaded.config.lora is None  # merged
    np.testing.assert_allclose(_ours(reloaded, True)[0], _ours(emb, True)[0], atol=1e-5)


def _fake_checkpoint(emb: Embedder, path, cfg_value) -> None:
    state = {f"embedder.{k}": v for k, v in emb.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"embedder": cfg_value}}, str(path))


def test_checkpoint_export_and_cli(tiny_bert_dir, tmp_path) -> None:
    from nvr.cli.export import main

    cfg = EmbedderConfig(str(tiny_bert_dir), lora=LoraSettings(r=4))
    emb = Embedder.from_config(cfg)
    _perturb_lora(emb)
    ours_q, _ = _ours(emb, mask_prefix=True)
    _fake_checkpoint(emb, tmp_path / "a.ckpt", cfg)
    _fake_checkpoint(emb, tmp_path / "b.ckpt", cfg.to_dict())  # hyper_parameters may hold a plain mapping
    assert main(["--checkpoint", str(tmp_path / "a.ckpt"), "--output", str(tmp_path / "out_a"),
                 "--query_prefix", QP, "--passage_prefix", PP, "--mask_prefix", "true"]) == 0
    export_embedder(str(tmp_path / "b.ckpt"), tmp_path / "out_b", query_prefix=QP, passage_prefix=PP, mask_prefix=True)
    for name in ("out_a", "out_b"):
        np.testing.assert_allclose(_st(tmp_path / name)[0], ours_q, atol=1e-5)
    with pytest.raises(InputError, match="no such checkpoint"):
        main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x")])
    torch.save({"state_dict": {}}, str(tmp_path / "bad.ckpt"))
    with pytest.raises(InputError, match="not an nvr training checkpoint"):
        export_embedder(str(tmp_path / "bad.ckpt"), tmp_path / "y")


@pytest.mark.real_model
def test_st_roundtrip_real_minilm(minilm_dir, tmp_path) -> None:
    emb = Embedder.from_config(EmbedderConfig(str(minilm_dir), pooling="mean", normalize=True))
    ours_q, ours_p = _ours(emb, mask_prefix=False)
    original = st.SentenceTransformer(str(minilm_dir), device="cpu")
    np.testing.assert_allclose(original.encode([QP + q for q in QUERIES]), ours_q, atol=1e-5)
    out = export_embedder(emb, tmp_path / "st", query_prefix=QP, passage_prefix=PP)
    st_q, st_p = _st(out)
    np.testing.assert_allclose(st_q, ours_q, atol=1e-5)
    np.testing.assert_allclose(st_p, ours_p, atol=1e-5)


# ------------------------------------------------------------------------------------------- push_to_hub
class FakeHfApi:
    """Records what `nvr export --push_to_hub` asks of huggingface_hub (no network)."""

    calls: list[tuple[str, tuple, dict]] = []

    def __init__(self, **kwargs) -> None:
        FakeHfApi.calls.append(("init", (), kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", (repo_id,), kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        from pathlib import Path

        folder = Path(kwargs["folder_path"])
        FakeHfApi.calls.append(("upload_folder", (), {**kwargs, "files": sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())}))
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeHfApi.calls


def test_push_to_hub_creates_the_repo_and_uploads_the_export(tiny_bert_dir, tmp_path, fake_hub, capsys) -> None:
    from nvr.cli.export import main

    emb = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir)))
    _fake_checkpoint(emb, tmp_path / "a.ckpt", emb.config)
    out = tmp_path / "st"
    assert main(["--checkpoint", str(tmp_path / "a.ckpt"), "--output", str(out), "--push_to_hub", "me/tiny-nvr",
                 "--private", "--token", "hf_secret"]) == 0
    (_, _, init), (_, repo, create), (_, _, upload) = fake_hub
    assert init["token"] == "hf_secret"
    assert repo == ("me/tiny-nvr",) and create == {"private": True, "repo_type": "model", "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-nvr" and upload["repo_type"] == "model"
    assert upload["folder_path"] == str(out) and "a.ckpt" in upload["commit_message"]
    assert {"README.md", "modules.json", "config.json", "model.safetensors", "1_Pooling/config.json"} <= \
        set(upload["files"])
    assert "uploaded to https://huggingface.co/me/tiny-nvr" in capsys.readouterr().out


def test_push_to_hub_arguments_are_checked_before_exporting(tiny_bert_dir, tmp_path, fake_hub, monkeypatch,
                                                            capsys) -> None:
    from _cli import cli_error

    base = ["export", "--embedder", str(tmp_path / "never-read"), "--output", str(tmp_path / "o")]
    assert "user/name" in cli_error([*base, "--push_to_hub", "no-slash"], capsys)
    assert "user/name" in cli_error([*base, "--push_to_hub", "a/b/c"], capsys)
    assert "only apply with --push_to_hub" in cli_error([*base, "--private"], capsys)
    assert "only apply with --push_to_hub" in cli_error([*base, "--token", "hf_x"], capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in cli_error([*base, "--push_to_hub", "me/x"], capsys)
    assert fake_hub == [] and not (tmp_path / "o").exists()


def test_push_to_hub_refusal_is_one_line(tiny_bert_dir, tmp_path, fake_hub, monkeypatch, capsys) -> None:
    import httpx2
    from _cli import cli_error
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kwargs):
        response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError("403 Forbidden: you cannot create repos under 'someone'\nmore detail", response=response)

    monkeypatch.setattr(FakeHfApi, "create_repo", refuse)
    emb = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir)))
    emb.save_pretrained(tmp_path / "emb")
    line = cli_error(["export", "--embedder", str(tmp_path / "emb"), "--output", str(tmp_path / "o"),
                      "--push_to_hub", "someone/x"], capsys)
    assert "someone/x" in line and "403 Forbidden" in line
