"""Exported sentence-transformers folders reproduce training's prompt handling (query instruction masked, passage
prefix not), for a WordPiece-style BERT tokenizer and a sentencepiece-style (Unigram + Metaspace) tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nvr.modeling.config import EmbedderConfig
from nvr.modeling.embedder import Embedder
from nvr.modeling.encode import encode_texts
from nvr.modeling.export import export_embedder
from nvr.modeling.tokenization import tokenize
from nvr.testing import vocabulary

st = pytest.importorskip("sentence_transformers")

QUERIES = ["wing lift drag", "shock wave supersonic flow", "heat"]
PASSAGES = ["heat transfer boundary layer study of the flow", "rocket nozzle thrust data", "panel flutter"]
QP, PP = "retrieve passage : ", "passage : "  # both end in a space, like NV-Retriever's "{instruction}: "


def make_metaspace_mistral(out_dir: Path) -> Path:
    """A 2-layer Mistral with a Unigram/Metaspace tokenizer: a trailing space becomes a lone '▁' piece."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import MistralConfig, MistralModel, PreTrainedTokenizerFast

    words = [w for w in vocabulary() if not w.startswith(("[", "<"))]
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(w, -3.0) for w in words]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz:"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(str(out_dir))
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(pieces), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    MistralModel(cfg).save_pretrained(str(out_dir))
    return out_dir


def _training_embeddings(emb: Embedder) -> tuple[np.ndarray, np.ndarray]:
    """How training and validation encode: instruction masked from pooling, passage prefix pooled."""
    q = encode_texts(emb, QUERIES, prefix=QP, mask_prefix=True, max_length=16, show_progress=False)
    p = encode_texts(emb, PASSAGES, prefix=PP, mask_prefix=False, max_length=32, show_progress=False)
    return q, p


@pytest.mark.parametrize("kind", ["bert", "metaspace"])
def test_st_export_equals_training_embeddings(kind, tiny_bert_dir, tmp_path) -> None:
    if kind == "bert":
        cfg = EmbedderConfig(str(tiny_bert_dir), pooling="mean", normalize=True)
    else:
        cfg = EmbedderConfig(str(make_metaspace_mistral(tmp_path / "sp")), pooling="mean", bidirectional=True)
    emb = Embedder.from_config(cfg)
    ours_q, ours_p = _training_embeddings(emb)
    out = export_embedder(emb, tmp_path / "st", query_prefix=QP, passage_prefix=PP, mask_prefix=True,
                          query_max_length=16, max_length=32)
    model = st.SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(model.encode_query(QUERIES), ours_q, atol=1e-5)
    np.testing.assert_allclose(model.encode_document(PASSAGES), ours_p, atol=1e-5)
    assert model.max_seq_length == 32


def test_prompt_span_is_measured_like_sentence_transformers(tmp_path) -> None:
    """The masked span is the prompt tokenized alone (its trailing '▁' included), as ST's include_prompt=False."""
    from transformers import AutoTokenizer

    folder = make_metaspace_mistral(tmp_path / "sp")
    tok = AutoTokenizer.from_pretrained(str(folder))
    alone = tok(QP)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[-1] == "\u2581"  # the case ST counts and a stripped prefix does not
    batch = tokenize(tok, ["wing lift"], 16, prefix=QP, mask_prefix=True)
    assert batch["pool_mask"][0].tolist() == [0] * len(alone) + [1] * (int(batch["attention_mask"].sum()) - len(alone))
