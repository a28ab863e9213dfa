"""``nvr eval`` / evaluate_model: JSON output, cached corpus embeddings, model-folder metadata, real MiniLM run."""

from __future__ import annotations

import json

import pytest

import nvr.modeling.encode as encode_module
from nvr.cli import eval as eval_cli
from nvr.cli.main import main as nvr_main
from nvr.evaluation.evaluate import evaluate_model, read_folder_settings
from nvr.modeling.config import EmbedderConfig
from nvr.modeling.embedder import Embedder


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """Number of texts per encode_texts call (the evaluator imports it at call time, so patching works)."""
    calls: list[int] = []
    real = encode_module.encode_texts

    def counting(embedder, texts, **kwargs):
        calls.append(len(texts))
        return real(embedder, texts, **{**kwargs, "show_progress": False})

    monkeypatch.setattr(encode_module, "encode_texts", counting)
    return calls


def test_cli_writes_json_and_reuses_cached_corpus(tiny_bert_dir, tiny_beir_dir, tmp_path, encode_calls, capsys):
    args = ["--model", str(tiny_bert_dir), "--beir", str(tiny_beir_dir), "--cache_dir", str(tmp_path / "cache"),
            "--batch_size", "8", "--device", "cpu"]
    assert eval_cli.main([*args, "--output", str(tmp_path / "a.json")]) == 0
    assert encode_calls == [10, 60]  # test queries, then the whole corpus (one cache shard)
    first = json.loads((tmp_path / "a.json").read_text())
    name = tiny_beir_dir.name
    assert set(first["datasets"]) == {name}
    assert {"ndcg@10", "recall@100", "mrr@10"} <= set(first["datasets"][name])
    assert 0.0 < first["datasets"][name]["ndcg@10"] <= 1.0
    assert first["settings"]["pooling"] == "mean" and first["settings"]["normalize"] is True
    assert "ndcg@10" in capsys.readouterr().out

    encode_calls.clear()
    assert eval_cli.main([*args, "--output", str(tmp_path / "b.json")]) == 0
    assert encode_calls == [10]  # corpus embeddings came from the cache
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["datasets"] == first["datasets"]

    encode_calls.clear()  # another query instruction: queries re-encoded, passages still cached
    assert eval_cli.main([*args, "--output", str(tmp_path / "c.json"), "--query_instruction", "retrieve"]) == 0
    assert encode_calls == [10]
    third = json.loads((tmp_path / "c.json").read_text())
    assert third["settings"]["query_prefix"] == "retrieve: "


def test_cli_refuses_existing_output_and_bad_folder(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        nvr_main(["eval", "--model", str(tiny_bert_dir), "--beir", str(tiny_beir_dir), "--output", str(out)])
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        nvr_main(["eval", "--model", str(tiny_bert_dir), "--beir", str(tmp_path / "nope"), "--output",
                  str(tmp_path / "x.json"), "--cache_dir", ""])
    assert exc.value.code == 2
    assert "BEIR folder not found" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_nvr_folder_metadata_sets_pooling(tiny_bert_dir, tiny_beir_dir, tmp_path):
    folder = Embedder.from_config(EmbedderConfig(str(tiny_bert_dir), pooling="cls", normalize=False)).save_pretrained(
        tmp_path / "exported")
    from_folder = evaluate_model(str(folder), [str(tiny_beir_dir)], cache_dir=None, device="cpu")
    assert from_folder["settings"]["pooling"] == "cls" and from_folder["settings"]["normalize"] is False
    explicit = evaluate_model(str(tiny_bert_dir), [str(tiny_beir_dir)], pooling="cls", normalize=False,
                              cache_dir=None, device="cpu")
    assert from_folder["datasets"] == explicit["datasets"]
    mean = evaluate_model(str(tiny_bert_dir), [str(tiny_beir_dir)], cache_dir=None, device="cpu")
    assert mean["datasets"] != explicit["datasets"]


def test_two_folders_with_one_name_get_distinct_labels(tiny_bert_dir, tiny_beir_dir):
    result = evaluate_model(str(tiny_bert_dir), [str(tiny_beir_dir)] * 2, cache_dir=None, device="cpu")
    name = tiny_beir_dir.name
    assert list(result["datasets"]) == [name, f"{name}-2"]
    assert result["mean"]["ndcg@10"] == pytest.approx(result["datasets"][name]["ndcg@10"])


@pytest.mark.real_model
def test_sentence_transformers_folder_settings(minilm_dir):
    settings = read_folder_settings(str(minilm_dir))
    assert settings["pooling"] == "mean" and settings["normalize"] is True and settings["max_length"] == 256


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.real_data
def test_minilm_on_cranfield_is_plausible(minilm_dir, cranfield_dir, tmp_path):
    result = evaluate_model("sentence-transformers/all-MiniLM-L6-v2", [str(cranfield_dir)], batch_size=32,
                            cache_dir=None, device="cpu", output=str(tmp_path / "m.json"))
    ndcg = result["datasets"]["cranfield"]["ndcg@10"]
    print(f"all-MiniLM-L6-v2 cranfield test NDCG@10 = {ndcg:.4f}")
    assert 0.2 < ndcg < 0.6  # published-range sanity check (BM25 ~0.3 on this split), not a golden value
    assert result["datasets"]["cranfield"]["recall@100"] > ndcg


def test_every_beir_folder_is_checked_before_the_model_loads(tiny_bert_dir, tiny_beir_dir, tmp_path, monkeypatch):
    import shutil

    import nvr.evaluation.evaluate as evaluate_module
    from nvr.utils.errors import InputError

    monkeypatch.setattr(evaluate_module, "build_embedder", lambda *a, **k: pytest.fail("model loaded before checks"))
    no_split = shutil.copytree(tiny_beir_dir, tmp_path / "no_split")
    (no_split / "qrels" / "test.tsv").unlink()
    no_queries = shutil.copytree(tiny_beir_dir, tmp_path / "no_queries")
    (no_queries / "queries.jsonl").unlink()
    cases = [(no_split, r"no_split/qrels/test.tsv: qrels for split 'test' not found \(available splits: \['train'\]"),
             (no_queries, r"no_queries/queries.jsonl: queries file not found"),
             (tmp_path / "missing", r"missing: BEIR folder not found")]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            evaluate_model(str(tiny_bert_dir), [str(tiny_beir_dir), str(bad)], cache_dir=None, device="cpu")
