"""Matryoshka: the objective equals the weighted sum of per-dim losses on truncated (re-normalized) embeddings;
``nvr eval --truncate_dim`` scores exactly the truncated embeddings and reuses the full-size corpus cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _cli import cli_error

from nvr.evaluation import evaluate as evaluate_module
from nvr.modeling.matryoshka import truncate, truncate_numpy
from nvr.training.kd import kd_kl_div
from nvr.training.loss import info_nce
from nvr.training.objective import Objective

TAU = 0.05


def _embeddings(seed: int = 0, batch: int = 4, group: int = 3, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    p = F.normalize(torch.randn(batch, group, dim, generator=gen), dim=-1)
    remote = F.normalize(torch.randn(5, dim, generator=gen), dim=-1)
    return q, p, remote


@pytest.mark.parametrize("normalize", [True, False])
def test_loss_is_the_weighted_sum_of_per_dim_infonce(normalize) -> None:
    q, p, remote = _embeddings()
    ids = torch.arange(12).reshape(4, 3)
    remote_ids = torch.arange(100, 105)
    dims, weights = (16, 8, 4), (1.0, 0.5, 2.0)
    objective = Objective(TAU, matryoshka_dims=dims, matryoshka_weights=weights, normalize=normalize,
                          self_mask_margin=0.2)
    out = objective(q, p, passage_ids=ids, positive_ids=ids[:, :1], remote_passage_emb=remote,
                    remote_passage_ids=remote_ids)
    expected = 0.0
    for dim, weight in zip(dims, weights, strict=True):
        cut = (lambda x, d=dim: F.normalize(x[..., :d], dim=-1)) if normalize else (lambda x, d=dim: x[..., :d])
        expected += weight * info_nce(cut(q), cut(p), TAU, passage_ids=ids, positive_ids=ids[:, :1],
                                      remote_passage_emb=cut(remote), remote_passage_ids=remote_ids,
                                      self_mask_margin=0.2).item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.infonce.item() == pytest.approx(expected, rel=1e-6) and out.kd is None
    # default weights: 1 each; without dims: the plain full-size loss
    plain = Objective(TAU, normalize=normalize)(q, p, passage_ids=ids).loss.item()
    assert plain == pytest.approx(info_nce(q, p, TAU, passage_ids=ids).item(), rel=1e-6)
    unweighted = Objective(TAU, matryoshka_dims=(16, 4), normalize=normalize)(q, p, passage_ids=ids).loss.item()
    cut4 = truncate(q, 4, normalize), truncate(p, 4, normalize)
    assert unweighted == pytest.approx(plain + info_nce(*cut4, TAU, passage_ids=ids).item(), rel=1e-6)


def test_kd_is_summed_over_dims_too_and_diagnostics_come_from_the_largest_dim() -> None:
    q, p, _ = _embeddings(1)
    ids = torch.arange(12).reshape(4, 3)
    teacher = torch.rand(4, 3, generator=torch.Generator().manual_seed(2))
    objective = Objective(TAU, loss="infonce+kd", kd_weight=0.3, matryoshka_dims=(4, 16))
    out = objective(q, p, passage_ids=ids, teacher_scores=teacher)
    kd = sum(kd_kl_div(torch.einsum("bh,bgh->bg", truncate(q, d, True), truncate(p, d, True)), teacher, TAU,
                       TAU, ids)[0].item() for d in (4, 16))
    nce = sum(info_nce(truncate(q, d, True), truncate(p, d, True), TAU, passage_ids=ids).item() for d in (4, 16))
    assert out.kd.item() == pytest.approx(0.3 * kd, rel=1e-5)
    assert out.loss.item() == pytest.approx(nce + 0.3 * kd, rel=1e-5)
    full = Objective(TAU)(q, p, passage_ids=ids)
    assert out.accuracy.item() == full.accuracy.item() and out.margin.item() == pytest.approx(full.margin.item())


def test_numpy_truncation_matches_torch() -> None:
    x = torch.randn(6, 10)
    for normalize in (True, False):
        np.testing.assert_allclose(truncate_numpy(x.numpy(), 4, normalize), truncate(x, 4, normalize).numpy(),
                                   rtol=1e-6, atol=1e-7)
    assert truncate(x, 10, True) is x and truncate(x, None, True) is x


def test_eval_truncate_dim_scores_the_truncated_embeddings(tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                           monkeypatch) -> None:
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = evaluate_module.evaluate_embeddings

    def capture(queries, docs, *args):
        seen.append((queries, docs))
        return real(queries, docs, *args)

    monkeypatch.setattr(evaluate_module, "evaluate_embeddings", capture)
    args = ["--model", str(tiny_bert_dir), "--beir", str(tiny_beir_dir), "--cache_dir", str(tmp_path / "cache"),
            "--batch_size", "8", "--device", "cpu", "--dtype", "float32"]
    assert evaluate_module_main([*args, "--output", str(tmp_path / "full.json")]) == 0
    assert evaluate_module_main([*args, "--output", str(tmp_path / "cut.json"), "--truncate_dim", "8"]) == 0
    (full_q, full_d), (cut_q, cut_d) = seen
    assert full_q.shape[1] == 32 and cut_q.shape[1] == cut_d.shape[1] == 8
    np.testing.assert_allclose(cut_q, truncate_numpy(full_q, 8, True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cut_d, truncate_numpy(full_d, 8, True), rtol=1e-5, atol=1e-6)
    full, cut = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "cut"))
    assert cut["settings"]["truncate_dim"] == 8 and full["settings"]["truncate_dim"] is None
    assert cut["settings"]["corpus_embedding_keys"] == full["settings"]["corpus_embedding_keys"]  # one cache entry
    assert cut["datasets"] != full["datasets"]


def evaluate_module_main(argv: list[str]) -> int:
    from nvr.cli import eval as eval_cli

    return eval_cli.main(argv)


@pytest.mark.parametrize("value, fragment", [("0", "must be > 0"), ("33", "must be in [1, 32]")])
def test_eval_bad_truncate_dim_is_a_one_line_error(value, fragment, tiny_bert_dir, tiny_beir_dir, tmp_path,
                                                   capsys) -> None:
    line = cli_error(["eval", "--model", str(tiny_bert_dir), "--beir", str(tiny_beir_dir), "--output",
                      str(tmp_path / "m.json"), "--cache_dir", "", "--device", "cpu", "--truncate_dim", value], capsys)
    assert "truncate_dim" in line and fragment in line
