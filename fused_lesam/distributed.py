"""What the engine does across devices and ranks: its reductions, and the local (m-sharpness) mode.

A value over the whole model (the gradient's squared norm, XSAM's dots) is a partial per device,
summed on the main device; for sharded (FSDP2) parameters it is also summed over the ranks of the
mesh, on the device, so that every rank gets the value of the whole model. Plain DDP needs nothing
here: its backward all-reduces the gradients, so every rank holds the same ones already.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .buckets import ShardBucket

__all__ = ["shard_group", "reduce_buckets", "unsynced_backward", "average_over_ranks", "sum_over_ranks"]


def shard_group(buckets: list) -> Any | None:
    """The process group the norm is summed over: that of the mesh of sharded (FSDP2) buckets, which
    hold a part of the model each; None for ordinary buckets."""
    return buckets[0].mesh.get_group() if buckets and isinstance(buckets[0], ShardBucket) else None


def reduce_buckets(
    ops_of: dict[torch.device, Any],
    buckets: list,
    main_device: torch.device,
    group: Any | None,
    partial: Callable[[Any, list], Tensor],
) -> Tensor:
    """``partial(ops, buckets)`` for each device's buckets, summed on the main device, and over the
    ranks of ``group`` when there is one."""
    partials = [
        partial(ops, [b for b in buckets if b.device == device]).to(main_device) for device, ops in ops_of.items()
    ]
    total = partials[0] if len(partials) == 1 else torch.stack([p.to(partials[0].dtype) for p in partials]).sum(0)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


@contextlib.contextmanager
def unsynced_backward(model: torch.nn.Module) -> Iterator[None]:
    """A backward within this block is not all-reduced by DDP (its ``no_sync``)."""
    no_sync = getattr(model, "no_sync", None)
    if no_sync is None:
        raise TypeError(f"local_first_pass() needs the DistributedDataParallel model, got {type(model).__name__}")
    with no_sync():
        yield


def average_over_ranks(flats: list[Tensor]) -> None:
    """Average these flat buffers over the ranks in place, after a local first pass: the first
    gradients that LE-SAM+ combines with and LookSAM projects out (the centers), or the gradient of
    a one-pass step (fused_lesam.throughput), which the local pass left un-all-reduced."""
    world = dist.get_world_size()
    for flat in flats:
        dist.all_reduce(flat)  # SUM: gloo has no AVG
        flat.div_(world)


def sum_over_ranks(values: Tensor, group: Any | None) -> None:
    """Sum ``values`` over the ranks in place when torch.distributed runs with more than one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
