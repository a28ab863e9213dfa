"""``dtype: auto``: hardware detection, resolved labels in keys, bf16 autocast quality, token-budget batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nvr.utils.precision as precision_module
from nvr.config.mining import CrossEncoderConfig, TeacherConfig
from nvr.modeling.config import EmbedderConfig
from nvr.modeling.embedder import Embedder
from nvr.modeling.encode import budget_batches, encode_texts, token_lengths
from nvr.teachers.cross_encoder import CrossEncoderRescorer
from nvr.teachers.dense import DenseTeacher
from nvr.utils.errors import ConfigError
from nvr.utils.precision import (
    AUTOCAST_BF16,
    Precision,
    bf16_supported,
    cpu_flags,
    cpu_supports_bf16,
    precision_from_label,
    resolve_dtype,
    resolve_precision,
)

TEXTS = ["short", "a somewhat longer text about retrieval", "x " * 40, "mid length passage here", "one", "",
         "the quick brown fox jumps over the lazy dog " * 3, "hello world"]


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: fpu {flags}\n")
    return str(path)


@pytest.fixture
def fake_cpu(monkeypatch):
    """Set whether the (faked) CPU has native bf16."""
    def set_bf16(value: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_supports_bf16", lambda *a, **k: value)
    return set_bf16


@pytest.mark.parametrize("flags,expected", [("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True),
                                            ("avx512f avx512_vnni", False), ("", False)])
def test_cpu_bf16_detected_from_cpuinfo_flags(tmp_path, flags, expected):
    path = _cpuinfo(tmp_path, flags)
    assert ("avx2" in cpu_flags(path)) and cpu_supports_bf16(path) is expected


def test_unreadable_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset() and not cpu_supports_bf16(str(tmp_path / "missing"))


@pytest.mark.parametrize("has_bf16", [True, False])
def test_resolve_dtype_cpu(fake_cpu, has_bf16):
    fake_cpu(has_bf16)
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if has_bf16 else "float32")
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("float16", "cpu") == "float16"
    assert resolve_precision("auto", "cpu") == Precision("float32", "bfloat16" if has_bf16 else None)
    assert resolve_precision("bfloat16", "cpu") == Precision("bfloat16")  # explicit: bf16 weights, no autocast


@pytest.mark.parametrize("available,native,expected", [(True, True, "bfloat16"), (True, False, "float32"),
                                                       (False, False, "float32")])
def test_resolve_dtype_cuda(monkeypatch, fake_cpu, available, native, expected):
    fake_cpu(True)  # the CPU's answer must not leak into a CUDA device's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert resolve_dtype("auto", "cuda:0") == expected and bf16_supported(torch.device("cuda", 0)) is native


def test_other_devices_and_bad_names(fake_cpu):
    fake_cpu(True)
    assert resolve_dtype("auto", "mps") == "float32"
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("fp8", "cpu")


def test_labels_round_trip():
    assert resolve_precision("float32").label == "float32"
    assert Precision("float32", "bfloat16").label == AUTOCAST_BF16
    for label in ("float32", "bfloat16", "float16", AUTOCAST_BF16):
        assert precision_from_label(label).label == label


def _teacher(tiny_bert_dir, tmp_path, dtype):
    cfg = TeacherConfig(name="t", model_name_or_path=str(tiny_bert_dir), dtype=dtype, device="cpu",
                        passage_max_length=64, query_max_length=32)
    return DenseTeacher(cfg, tmp_path / "cache")


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_changes_the_key_only_when_it_resolves_to_bf16(tiny_bert_dir, tmp_path, fake_cpu, has_bf16):
    fake_cpu(has_bf16)
    auto, fp32 = _teacher(tiny_bert_dir, tmp_path, "auto"), _teacher(tiny_bert_dir, tmp_path, "float32")
    explicit_bf16 = _teacher(tiny_bert_dir, tmp_path, "bfloat16")
    assert auto.dtype_label == (AUTOCAST_BF16 if has_bf16 else "float32")
    assert (auto.settings_fingerprint == fp32.settings_fingerprint) is (not has_bf16)
    assert auto.settings_fingerprint != explicit_bf16.settings_fingerprint  # bf16 weights != fp32 under autocast


def test_explicit_float32_key_is_unchanged(tiny_bert_dir, tmp_path, fake_cpu):
    """The fp32 key is the one every cache written before ``dtype: auto`` existed used."""
    from nvr.teachers.cache import embedding_key
    from nvr.utils.fingerprint import model_fingerprint
    from nvr.utils.hashing import sha256_json

    fake_cpu(True)
    teacher = _teacher(tiny_bert_dir, tmp_path, "float32")
    model = model_fingerprint(str(tiny_bert_dir), tmp_path / "cache" / "fingerprints")
    legacy = sha256_json({"version": 2, "model": model, "pooling": "mean", "normalize": True, "dtype": "float32",
                          "add_eos": False, "bidirectional": False, "trust_remote_code": False})
    assert teacher._embedding_key("", 64) == embedding_key(legacy, "mean", "", 64, "float32")


def test_cross_encoder_key_follows_the_resolved_dtype(tiny_bert_dir, fake_cpu):
    fps = {}
    for has_bf16 in (True, False):
        fake_cpu(has_bf16)
        for dtype in ("auto", "float32"):
            cfg = CrossEncoderConfig(model_name_or_path=str(tiny_bert_dir), dtype=dtype, device="cpu")
            fps[has_bf16, dtype] = CrossEncoderRescorer(cfg).fingerprint
    assert fps[False, "auto"] == fps[False, "float32"] == fps[True, "float32"] != fps[True, "auto"]


@pytest.fixture(scope="module")
def embedder(tiny_bert_dir) -> Embedder:
    return Embedder.from_config(EmbedderConfig(str(tiny_bert_dir))).eval()


def test_bf16_autocast_embeddings_close_to_fp32(embedder):
    fp32 = encode_texts(embedder, TEXTS, max_length=64, batch_size=3, show_progress=False)
    bf16 = encode_texts(embedder, TEXTS, max_length=64, batch_size=3, show_progress=False,
                        precision=Precision("float32", "bfloat16"))
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)  # autocast really ran
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.999
    assert next(embedder.parameters()).dtype == torch.float32  # weights stay as loaded


@pytest.mark.parametrize("budget", [None, 1, 20, 64, 100000])
def test_token_budget_never_changes_fp32_embeddings(embedder, budget):
    reference = encode_texts(embedder, TEXTS, max_length=64, batch_size=len(TEXTS), show_progress=False)
    for batch_size in (1, 3):
        got = encode_texts(embedder, TEXTS, max_length=64, batch_size=batch_size, max_tokens_per_batch=budget,
                           show_progress=False)
        np.testing.assert_allclose(got, reference, atol=1e-6)


def test_budget_batches_respect_both_caps():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500).tolist()
    for batch_size, budget in ((7, None), (64, 512), (3, 100), (1000, 299)):
        batches = list(budget_batches(lengths, batch_size, budget))
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True)  # length-sorted, longest first
        for b in batches:
            assert len(b) <= batch_size
            if budget is not None and len(b) > 1:
                assert len(b) * max(lengths[i] for i in b) <= budget


def test_token_lengths_count_real_tokens(embedder):
    lengths = token_lengths(embedder, TEXTS, "query: ", 16)
    enc = embedder.tokenize(TEXTS, 16, prefix="query: ")
    assert lengths == enc["attention_mask"].sum(1).tolist() and max(lengths) <= 16


def test_bad_token_budget_is_a_config_error(embedder):
    with pytest.raises(ConfigError, match="max_tokens_per_batch"):
        encode_texts(embedder, TEXTS, max_tokens_per_batch=0, show_progress=False)


def test_cross_encoder_token_budget_never_changes_scores(tiny_bert_dir):
    cfg = CrossEncoderConfig(model_name_or_path=str(tiny_bert_dir), dtype="float32", device="cpu", batch_size=4,
                             max_length=32)
    rescorer = CrossEncoderRescorer(cfg)
    queries, passages = TEXTS, TEXTS[::-1]
    reference = rescorer.score(queries, passages)
    for budget in (1, 24, 10000):
        rescorer.cfg.max_tokens_per_batch = budget
        np.testing.assert_allclose(rescorer.score(queries, passages), reference, atol=1e-6)
