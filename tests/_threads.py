"""Ranks as threads: a stand-in for torch.distributed in fast tests of collective code (sharded search, gathers)."""

from __future__ import annotations

import threading

import torch


class ThreadGroup:
    """W ranks as threads with an all_gather of LightningModule's signature (stacked [W, ...])."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = 0

    def gather_for(self, rank: int):
        def gather(t: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = torch.stack(self.slots)  # type: ignore[arg-type]
            if rank == 0:
                self.calls += 1
            self.barrier.wait()
            return out

        return gather

    def run(self, fn):
        """``fn(rank, gather)`` on every rank; returns the per-rank results (re-raises the first failure)."""
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def target(r: int) -> None:
            try:
                results[r] = fn(r, self.gather_for(r))
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results
