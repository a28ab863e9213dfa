"""How much of a training step's compute is padding: the ceiling on what unpadded / packed sequences could win.

``train_vs_st.py`` measured nvr and sentence-transformers spending the same CPU seconds in the same BERT
forward/backward at equal settings, so a lead there can only come from less compute per sample. Both pad each field
(queries, passages) of a batch to its own longest text; perfect packing would compute only the real tokens. This
script draws seeded random batches of train_vs_st's shape (B queries, B positives + B x n hard negatives) from the
real tokenizer's truncated lengths and prints padded / real tokens per field: the largest speed-up packing could
give (an upper bound: attention is the only super-linear part, and it is small at these lengths).

    python benchmarks/padding_share.py [--batch 16] [--negatives 2] [--query_len 32] [--passage_len 128]
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import default_beir_dir, machine_info, print_machine, shared_beir_dir, verdict

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TARGET = 1.3
"""train_vs_st's equal-settings target (nvr >= 1.3x ST samples/s)."""


def lengths(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(x) for x in ids])


def padded_over_real(lens: np.ndarray, per_batch: int, draws: int, rng: np.random.Generator) -> float:
    """Padded tokens / real tokens over ``draws`` random batches of ``per_batch`` texts."""
    real = padded = 0
    for _ in range(draws):
        batch = rng.choice(lens, size=min(per_batch, len(lens)), replace=False)
        real, padded = real + int(batch.sum()), padded + int(batch.max()) * len(batch)
    return padded / real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=2)
    ap.add_argument("--query_len", type=int, default=32)
    ap.add_argument("--passage_len", type=int, default=128)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from nvr.data.beir import load_beir
    from nvr.utils.models import packaged_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_model_dir(MODEL) or MODEL))
    print_machine(machine_info())
    sets = {"cranfield": default_beir_dir(), "scifact": shared_beir_dir("scifact")}
    print("| dataset | queries padded/real | passages padded/real | step padded/real (ceiling of packing) | target |")
    print("|---|---:|---:|---:|---|")
    for name, folder in sets.items():
        if folder is None:
            print(f"| {name} | skipped: ../shared/data/{name} not found | | | |")
            continue
        ds = load_beir(folder, "train")
        q = lengths(tokenizer, [ds.queries.text(i) for i in ds.queries.ids], args.query_len)
        p = lengths(tokenizer, [ds.corpus.passage(i) for i in range(len(ds.corpus.ids))], args.passage_len)
        rng = np.random.default_rng(args.seed)
        q_ratio = padded_over_real(q, args.batch, args.draws, rng)
        p_ratio = padded_over_real(p, args.batch * (1 + args.negatives), args.draws, rng)
        q_tokens, p_tokens = q.mean() * args.batch, p.mean() * args.batch * (1 + args.negatives)
        step = (q_ratio * q_tokens + p_ratio * p_tokens) / (q_tokens + p_tokens)
        print(f"| {name} | {q_ratio:.3f} | {p_ratio:.3f} | {step:.3f} | >= {TARGET} "
              f"{verdict(step >= TARGET)} |")


if __name__ == "__main__":
    main()
