"""Cost of the training objective's options (loss + backward over the embeddings, no encoder) vs plain InfoNCE.

The peer is a bare ``F.cross_entropy`` over the same in-batch score matrix (what the loss did before issue 12/13
options existed); every row prints its time and the ratio to that peer in the same run. The encoder forward/backward,
which dominates a real step by orders of magnitude, is left out on purpose: this measures only what the options add.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/objective_overhead.py [--batch 128 --group 8 --dim 384]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nvr.training.objective import Objective


def _time(fn, repeats: int) -> float:
    """Best of ``repeats`` runs in ms (the least disturbed by other load on a shared machine)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--group", type=int, default=8, help="1 positive + E extra + n hard negatives")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    b, g, h = args.batch, args.group, args.dim
    q = F.normalize(torch.randn(b, h, generator=gen), dim=-1).requires_grad_()
    p = F.normalize(torch.randn(b, g, h, generator=gen), dim=-1).requires_grad_()
    ids = torch.arange(b * g).reshape(b, g)
    teacher = torch.rand(b, g, generator=gen)
    dims = tuple(d for d in (768, 512, 256, 128, 64) if d <= h)

    def peer() -> None:
        logits = q @ p.reshape(b * g, h).T / 0.02
        F.cross_entropy(logits, torch.arange(b) * g).backward()

    rows = {
        "infonce (ids masking)": (Objective(0.02), {}),
        "infonce, 2 extra positives (each)": (Objective(0.02), {"num_extra_positives": 2}),
        "infonce, 2 extra positives (logsumexp)": (Objective(0.02, multi_positive="logsumexp"),
                                                   {"num_extra_positives": 2}),
        "infonce + self-mask 0.1": (Objective(0.02, self_mask_margin=0.1), {}),
        "infonce + kd": (Objective(0.02, loss="infonce+kd"), {"teacher_scores": teacher}),
        f"infonce, matryoshka {list(dims)}": (Objective(0.02, matryoshka_dims=dims), {}),
        "everything (kd, self-mask, 2 extra, matryoshka)": (
            Objective(0.02, loss="infonce+kd", self_mask_margin=0.1, matryoshka_dims=dims),
            {"teacher_scores": teacher, "num_extra_positives": 2}),
    }
    base = _time(peer, args.repeats)
    print(f"batch {b} x group {g}, dim {h}, threads {torch.get_num_threads()}: loss + backward, ms per step")
    print(f"{'F.cross_entropy (peer)':<50} {base:8.2f} ms  1.00x")
    for name, (objective, kw) in rows.items():
        def step(objective=objective, kw=kw) -> None:
            objective(q, p, passage_ids=ids, positive_ids=ids[:, :1], **kw).loss.backward()

        ms = _time(step, args.repeats)
        print(f"{name:<50} {ms:8.2f} ms  {ms / base:.2f}x")


if __name__ == "__main__":
    main()
