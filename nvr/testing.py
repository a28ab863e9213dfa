"""Tiny, download-free models and data for tests, benchmarks and demos.

Models are built from configs (2-layer BERT / Mistral) with a word-level tokenizer over a fixed vocabulary, so
everything runs offline in milliseconds. The synthetic BEIR set has topical structure (each query shares words
with its positives) so that retrieval metrics are meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOPICS = [
    "wing lift drag airfoil", "heat transfer boundary layer", "shock wave supersonic flow",
    "turbulent jet mixing", "panel flutter vibration", "rocket nozzle thrust",
    "hypersonic reentry heating", "laminar stability transition", "propeller slipstream wake",
    "buckling shell cylinder",
]
FILLER = "the of a in and study results method data analysis model theory experiment measured".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def vocabulary() -> list[str]:
    words = sorted({w for t in TOPICS for w in t.split()} | set(FILLER) | {"query", "passage", "retrieve", ":"})
    return SPECIAL + words


def make_tiny_tokenizer(out_dir: str | Path, style: str = "bert"):
    """Save a word-level fast tokenizer; ``style`` 'bert' adds [CLS]/[SEP], 'llama' adds <s> (pad = </s>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]",
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="</s>", bos_token="<s>", eos_token="</s>",
        )
    fast.model_max_length = 512
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_bert(out_dir: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT with random weights and the tiny tokenizer, saved with ``save_pretrained``."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocabulary()), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(str(out_dir))
    make_tiny_tokenizer(out_dir, "bert")
    return out_dir


def make_tiny_mistral(out_dir: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer Mistral (GQA, no sliding window) with random weights and the tiny tokenizer."""
    import torch
    from transformers import MistralConfig, MistralModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    v = vocabulary()
    cfg = MistralConfig(
        vocab_size=len(v), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None, max_position_embeddings=256,
        bos_token_id=v.index("<s>"), eos_token_id=v.index("</s>"), pad_token_id=v.index("</s>"),
    )
    MistralModel(cfg).save_pretrained(str(out_dir))
    make_tiny_tokenizer(out_dir, "llama")
    return out_dir


def make_tiny_beir(out_dir: str | Path, docs_per_topic: int = 6, queries_per_topic: int = 2, seed: int = 0) -> Path:
    """A synthetic BEIR folder: topical docs, queries sharing words with 1-2 positives, train/test qrels."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    (out_dir / "qrels").mkdir(parents=True, exist_ok=True)
    docs, queries, qrels = [], [], {"train": [], "test": []}
    for t, topic in enumerate(TOPICS):
        words = topic.split()
        for j in range(docs_per_topic):
            body = " ".join(rng.choice(words + FILLER, size=12))
            docs.append({"_id": f"d{t}-{j}", "title": f"{words[j % len(words)]} {words[0]}", "text": body})
        for j in range(queries_per_topic):
            qid = f"q{t}-{j}"
            queries.append({"_id": qid, "text": " ".join(rng.choice(words, size=3))})
            split = "test" if j == queries_per_topic - 1 else "train"
            for d in sorted(rng.choice(docs_per_topic, size=2, replace=False)):
                qrels[split].append((qid, f"d{t}-{d}", int(rng.integers(1, 3))))
    with open(out_dir / "corpus.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in docs)
    with open(out_dir / "queries.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(q) + "\n" for q in queries)
    for split, rows in qrels.items():
        with open(out_dir / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            fh.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
    return out_dir
