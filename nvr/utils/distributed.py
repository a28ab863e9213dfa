"""The one "gather sizes, pad to the max, gather, trim" primitive for torch.distributed.

``all_gather`` collectives need the same shape on every rank (gloo aborts, NCCL hangs or returns garbage
otherwise), but ranks often hold different row counts: the last short batch, an evaluation shard, a corpus shard
of sharded search. :func:`gather_padded` gathers the counts first, pads every rank to the largest and returns the
counts so callers trim. It takes the gather as a callable so the same code serves ``LightningModule.all_gather``
(with ``sync_grads``) and plain ``torch.distributed`` (:func:`dist_all_gather`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

AllGather = Callable[..., torch.Tensor]
"""``all_gather(tensor, sync_grads=False) -> [W, *tensor.shape]`` (the signature of ``LightningModule.all_gather``)."""
PAD_ID = -1


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment, (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_all_gather(tensor: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
    """``[W, *tensor.shape]`` from every rank of the default group; ``sync_grads`` keeps the autograd graph
    (gradients flow back to each rank's own rows). Single process: ``tensor[None]``."""
    _, world = world_info()
    if world == 1:
        return tensor.unsqueeze(0)
    home = tensor.device
    tensor = tensor.to(_collective_device(home)).contiguous()
    if sync_grads:
        from torch.distributed.nn.functional import all_gather as grad_all_gather

        return torch.stack(list(grad_all_gather(tensor))).to(home)
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor)
    return torch.stack(out).to(home)


def _collective_device(device: torch.device) -> torch.device:
    """NCCL gathers CUDA tensors only: a CPU tensor goes through the current CUDA device there."""
    if device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def ensure_process_group() -> int:
    """World size of the default group, initializing a gloo group from the torchrun environment (``WORLD_SIZE``,
    ``MASTER_ADDR`` ...) when the launcher set one up but nobody initialized it (``nvr mine`` under torchrun)."""
    _, world = world_info()
    if world > 1 or not dist.is_available():
        return world
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")
        return dist.get_world_size()
    return 1


def gather_padded(
    rows: torch.Tensor,
    ids: torch.Tensor | None,
    all_gather: AllGather,
    sync_grads: bool = False,
    pad_id: int = PAD_ID,
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Every rank's ``rows`` as ``[W, max count, ...]`` (zero padded), their ``ids`` as ``[W, max count]`` padded
    with ``pad_id`` (or None), and the per-rank counts.

    Rows are gathered along dim 0; the trailing shape must agree across ranks, except that a rank with no rows
    may hold any empty shape of the same ndim (it is reshaped to the others' trailing shape).
    """
    if ids is not None and ids.shape[:1] != rows.shape[:1]:
        raise ValueError(f"gather_padded: {rows.shape[0]} rows but ids of shape {tuple(ids.shape)}")
    shape = torch.tensor(list(rows.shape), dtype=torch.long, device=rows.device)
    shapes = all_gather(shape).reshape(-1, rows.ndim)
    counts = [int(c) for c in shapes[:, 0].tolist()]
    trailing = tuple(int(x) for x in shapes[:, 1:].max(dim=0).values.tolist())
    if tuple(rows.shape[1:]) != trailing:
        if rows.shape[0]:
            raise ValueError(f"gather_padded: rows of shape {tuple(rows.shape)} on a rank, trailing {trailing} "
                             "on another (only a rank without rows may differ)")
        rows = rows.reshape(0, *trailing)
    padding = max(counts) - rows.shape[0]
    if padding:
        rows = torch.cat([rows, rows.new_zeros((padding, *trailing))])
    all_rows = all_gather(rows, sync_grads=sync_grads)
    all_ids = None
    if ids is not None:
        if padding:
            ids = torch.cat([ids, ids.new_full((padding, *ids.shape[1:]), pad_id)])
        all_ids = all_gather(ids)
    return all_rows, all_ids, counts


def concat_trimmed(gathered: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``[W, max, ...]`` -> the ``sum(counts)`` real rows in rank order."""
    return torch.cat([gathered[r, :c] for r, c in enumerate(counts)], dim=0)
