"""BatchNorm and the second (perturbed) forward pass.

SAM-style training runs two forwards per step on the same batch. In train mode each forward
updates BatchNorm's running statistics, so without care the perturbed weights' statistics get
mixed into the running mean/var, and every step counts twice in ``num_batches_tracked``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["frozen_bn_stats"]


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, BatchNorm layers of ``model`` normalise with batch statistics as usual
    in train mode but leave ``running_mean``, ``running_var`` and ``num_batches_tracked``
    bit-for-bit untouched. Restored on exit, also when the block raises.

    Use it around the second forward of every step (the usual SAM recipe)::

        loss = criterion(model(x), y); loss.backward()
        def closure():
            with frozen_bn_stats(model):
                loss = criterion(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

    Eval-mode layers are unaffected; SyncBatchNorm is covered (it is a BatchNorm). Models
    without BatchNorm (most ViTs) need nothing.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    # With track_running_stats off, a train-mode BatchNorm passes no running buffers to
    # F.batch_norm, so it uses the batch statistics and updates nothing.
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.track_running_stats = True
