"""Flat parameter buckets: the storage the fused ops work on.

The parameters of one param group that share a (device, dtype) are copied into one contiguous
1-D buffer, and each ``param.data`` becomes a view into it; gradients become views into a second
buffer of the same layout. A kernel then sees one tensor per bucket instead of hundreds.

Layout rules (what the kernels may rely on):
- every parameter starts at an offset that is a multiple of ``ALIGN`` elements (vector loads);
- the gaps and the tail are zero in both buffers, and stay zero, so they never change a norm;
- the grad region of a parameter whose ``.grad`` is None is zero, so it is neither counted in the
  norm nor perturbed (w + 0 * s = w exactly).

Gradients are bound lazily: a parameter gets a grad view the first time it has a gradient, so
frozen or unused parameters keep ``.grad = None`` exactly as torch's optimizers expect. After
that, backward accumulates into the view in place. If the user replaces or drops a ``.grad``
(``model.zero_grad(set_to_none=True)``), `bind_grads` notices and copies it back in: slower,
never wrong. Noticing costs one call per bucket and step (``first_moved``/``grads_changed`` of
the compiled extension), not a Python loop over the parameters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from operator import attrgetter, is_

import torch
from torch import Tensor

ALIGN = 16

try:  # the per-step checks, one call per bucket (csrc/bucket_checks.cpp)
    from ._C import first_moved, grads_changed
except (ImportError, OSError):  # built without the extension: the same checks, a Python loop over the parameters

    def first_moved(params: list[Tensor], views: list[Tensor]) -> int:
        for i, (p, view) in enumerate(zip(params, views)):
            if p.data_ptr() != view.data_ptr() or p.dtype != view.dtype or p.device != view.device:
                return i
        return -1

    def grads_changed(params: list[Tensor], expected: list[Tensor | None]) -> bool:
        return not all(map(is_, map(attrgetter("grad"), params), expected))


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _is_dense(t: Tensor) -> bool:
    """True when t's strides are a permutation of contiguous strides (e.g. channels_last)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _view(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """A view of flat[offset : offset + like.numel()] shaped like ``like``, keeping its memory format."""
    if _is_dense(like):
        return flat.as_strided(like.shape, like.stride(), offset)
    return flat[offset : offset + like.numel()].view(like.shape)


class _Bucket:
    """What the ops see of any bucket: ``param`` and ``grad`` (flat 1-D tensors), ``group_index``
    (which param group it belongs to), and the buffers a step allocates on first use, laid out
    like ``param``: ``backup`` (the exact copy of w the perturb op takes), ``center`` (the first
    gradient, kept for LE-SAM+ and LookSAM), ``delta`` (XSAM's ascent D = w_k - w_0, kept by its
    search) and ``look_dir`` (LookSAM's g_v, zeros until its first full step)."""

    param: Tensor
    grad: Tensor

    def __init__(self, group_index: int):
        self.group_index = group_index
        self.backup: Tensor | None = None
        self.center: Tensor | None = None
        self.delta: Tensor | None = None
        self.look_dir: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.param.device

    def ensure_backup(self) -> Tensor:
        if self.backup is None:
            self.backup = torch.empty_like(self.param)
        return self.backup

    def ensure_center(self) -> Tensor:
        if self.center is None:
            self.center = torch.empty_like(self.grad)
        return self.center

    def ensure_delta(self) -> Tensor:
        if self.delta is None:
            self.delta = torch.empty_like(self.param)
        return self.delta

    def ensure_look_dir(self) -> Tensor:
        if self.look_dir is None:
            self.look_dir = torch.zeros_like(self.grad)
        return self.look_dir


class ParamBucket(_Bucket):
    """The parameters of one param group on one (device, dtype), flattened (see the module's layout rules)."""

    def __init__(self, params: list[torch.nn.Parameter], group_index: int):
        super().__init__(group_index)
        first = params[0]
        self.params = params
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += _aligned(p.numel())
        self.param = torch.zeros(total, device=first.device, dtype=first.dtype)
        self.grad = torch.zeros_like(self.param)
        self.param_views = []
        self.grad_views = []
        # What each .grad must be for the bucket to be in step with the parameters: its view once
        # bound, None before (and after the user dropped it).
        self._expected_grads: list[Tensor | None] = [None] * len(params)
        self._n_bound = 0
        self._grad_mark = 0  # the grad buffer's version at `mark_grads`
        with torch.no_grad():
            for p, offset in zip(params, self.offsets):
                view = _view(self.param, offset, p)
                view.copy_(p)
                p.data = view
                self.param_views.append(view)
                self.grad_views.append(_view(self.grad, offset, p))
        self.bind_grads()

    def view_of(self, flat: Tensor, i: int) -> Tensor:
        """Parameter i's region of a flat buffer laid out like this bucket, shaped like the parameter."""
        return _view(flat, self.offsets[i], self.params[i])

    def span(self, first: int, stop: int) -> slice:
        """The elements of parameters first .. stop - 1 in the flat buffers, with the padding after them."""
        return slice(self.offsets[first], self.offsets[stop] if stop < len(self.params) else self.param.numel())

    def all_grads_bound(self) -> bool:
        """Every parameter had a gradient at the last `bind_grads`."""
        return self._n_bound == len(self.params)

    def grads_bound(self) -> list[bool]:
        """Per parameter: whether it had a gradient at the last `bind_grads`."""
        return [g is not None for g in self._expected_grads]

    def check_storage(self, after_base_step: str = "") -> None:
        """RuntimeError if a parameter no longer lives in this bucket (e.g. ``model.to()`` after the
        optimizer); ``after_base_step``: the base optimizer's class, when its step just ran."""
        i = first_moved(self.params, self.param_views)
        if i >= 0 and after_base_step:
            raise RuntimeError(
                f"the base optimizer {after_base_step}'s step() replaced parameter {i} of param group "
                f"{self.group_index} (p.data = ...) instead of updating it in place: the optimizer works on the "
                f"parameters' flat buckets, so the base must update in place (p.add_(...), p.copy_(...))"
            )
        if i >= 0:
            raise RuntimeError(
                f"parameter {i} of param group {self.group_index} (shape {tuple(self.params[i].shape)}) no longer "
                f"lives in the optimizer's flat bucket: it was moved or replaced after the optimizer "
                f"was built (model.to(), .half(), load_state_dict(assign=True), ...). Build the "
                f"optimizer after the model is on its final device and dtype."
            )

    @torch.no_grad()
    def bind_grads(self) -> None:
        """Make every existing ``.grad`` a view into ``self.grad``; zero the regions of dropped ones."""
        # Under torch.compile the loop below is traced instead: dynamo cannot call into the extension.
        if not torch.compiler.is_compiling() and not grads_changed(self.params, self._expected_grads):
            return
        for i, (p, view) in enumerate(zip(self.params, self.grad_views)):
            g = p.grad
            if g is view:
                continue
            if g is None:
                if self._expected_grads[i] is not None:  # dropped since last time: must read as "no gradient"
                    view.zero_()
                    self._expected_grads[i] = None
                    self._n_bound -= 1
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"parameter {i} of param group {self.group_index} (shape {tuple(p.shape)}) has a "
                    f"sparse gradient, and the optimizer keeps dense ones in a flat buffer: build the "
                    f"module with sparse=False (nn.Embedding(..., sparse=False))"
                )
            view.copy_(g)
            p.grad = view
            self._n_bound += self._expected_grads[i] is None
            self._expected_grads[i] = view

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the grad buffer in place; grads stay bound, so the next backward writes straight into it."""
        self.grad.zero_()

    def mark_grads(self) -> None:
        """Remember the gradients as they are now, for `grads_written`."""
        self._grad_mark = self.grad._version

    def grads_written(self) -> bool:
        """Whether a gradient was written since `mark_grads`: a backward accumulates into the bound
        views in place (which bumps the buffer's version counter, shared by its views) or sets a new
        ``.grad`` where there was none. One call per bucket unless a ``.grad`` was replaced."""
        if self.grad._version != self._grad_mark:
            return True
        if not grads_changed(self.params, self._expected_grads):
            return False
        return any(p.grad is not None and p.grad is not bound for p, bound in zip(self.params, self._expected_grads))

    def drop_grads(self) -> None:
        """``.grad = None`` for every parameter, as torch's ``zero_grad(set_to_none=True)`` does."""
        self.grad.zero_()
        for p in self.params:
            p.grad = None
        self._expected_grads = [None] * len(self.params)
        self._n_bound = 0


class ShardBucket(_Bucket):
    """The local shard of one DTensor parameter (FSDP2's ``fully_shard``), used in place.

    FSDP owns the shard's storage (it all-gathers from it), so this bucket aliases it instead of
    copying: ``param`` is a flat view of ``p.to_local()`` and ``grad`` a flat view of the local
    gradient, taken anew at each `bind_grads` (a zero buffer while there is none). The ops see a
    bucket as usual; the norm over shards is completed by an all-reduce (distributed.py).
    """

    def __init__(self, p: torch.nn.Parameter, group_index: int):
        local = p.to_local()
        if not local.is_contiguous():
            raise RuntimeError(f"fused_lesam needs contiguous local shards, got strides {local.stride()}")
        super().__init__(group_index)
        self.params = [p]
        self.mesh = p.device_mesh
        self.param = local.view(-1)
        self._no_grad = torch.zeros_like(self.param)
        self.grad = self._no_grad

    def check_storage(self, after_base_step: str = "") -> None:
        if self.params[0].to_local().data_ptr() != self.param.data_ptr():
            raise RuntimeError(
                "a sharded parameter's local storage changed after the optimizer was built "
                "(e.g. fully_shard() applied afterwards): build the optimizer last"
            )

    def bind_grads(self) -> None:
        grad = self.params[0].grad
        self.grad = self._no_grad if grad is None else grad.to_local().view(-1)

    @torch.no_grad()
    def zero_grad(self) -> None:
        self.grad.zero_()

    def drop_grads(self) -> None:
        self.params[0].grad = None
        self.grad = self._no_grad

    def mark_grads(self) -> None:
        grad = self.params[0].grad
        self._grad_mark = (grad, _local_version(grad))

    def grads_written(self) -> bool:
        """As ParamBucket's: a new gradient, or one written in place (FSDP accumulates into the local
        shard, whose version counter the DTensor wrapper does not share)."""
        grad = self.params[0].grad
        marked, version = getattr(self, "_grad_mark", (None, None))
        return grad is not marked or _local_version(grad) != version


def _local_version(grad: Tensor | None) -> int | None:
    return None if grad is None else grad.to_local()._version


def _is_dtensor(p: Tensor) -> bool:
    # A DTensor parameter means torch.distributed.tensor is loaded already; importing it just for
    # this check would add about half a second to `import fused_lesam`.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def build_buckets(param_groups: list[dict]) -> list:
    """One ParamBucket per (param group, device, dtype), in param-group order; one ShardBucket
    per DTensor parameter (FSDP2), whose storage is not ours to flatten."""
    buckets = []
    for index, group in enumerate(param_groups):
        by_key: dict[tuple[torch.device, torch.dtype], list] = {}
        for p in group["params"]:
            if p.is_sparse or not p.is_floating_point():
                raise TypeError(f"fused_lesam needs dense floating-point parameters, got {p.dtype} {p.layout}")
            if _is_dtensor(p):
                buckets.append(ShardBucket(p, index))
            else:
                by_key.setdefault((p.device, p.dtype), []).append(p)
        buckets.extend(ParamBucket(params, index) for params in by_key.values())
    sharded = [b for b in buckets if isinstance(b, ShardBucket)]
    if sharded and len(sharded) != len(buckets):
        raise TypeError(
            "fused_lesam takes either all sharded (DTensor, FSDP2) parameters or none: the global norm "
            "would count the unsharded ones once per rank"
        )
    return buckets


@dataclass(frozen=True)
class Launch:
    """The buckets that one call of a multi-tensor op takes (backends/spec.py, "multi-tensor
    forms"): those of one param group on one device with one dtype, so they share the op's scalars.
    That is one ParamBucket, or every shard of the group under FSDP2, which then costs one call (one
    kernel launch on a GPU) per op instead of one per parameter."""

    device: torch.device
    group_index: int
    buckets: tuple

    def tensors(self, role: str) -> list[Tensor]:
        """Each bucket's ``param``, ``grad``, ``backup``, ... (``role``), in the buckets' order."""
        return [getattr(bucket, role) for bucket in self.buckets]


def group_launches(buckets: list) -> list[Launch]:
    """The buckets grouped by (param group, device, dtype), in the order each key first appears."""
    by_key: dict[tuple[int, torch.device, torch.dtype], list] = {}
    for bucket in buckets:
        by_key.setdefault((bucket.group_index, bucket.device, bucket.param.dtype), []).append(bucket)
    return [Launch(device, index, tuple(members)) for (index, device, _), members in by_key.items()]
