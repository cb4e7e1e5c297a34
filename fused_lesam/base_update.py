"""The base optimizer's update fused into the restore: torch.optim.SGD, Adam and AdamW on the buckets.

A sharpness-aware step ends with w <- w0 (the restore) and the base optimizer's step from w0 with
the final gradient. For the bases people use both are one pass of a backend op (``sgd_step_``,
``adam_step_``): it reads w0, the final gradient and the optimizer state, and writes w and the
state, with the LE-SAM+ combine and the skip of a non-finite step (read on the device) fused in.

The state stays torch's. It lives in flat buffers laid out like the bucket, and torch's own
per-parameter state holds views of them under torch's names (``base.state[p]["momentum_buffer"]``,
``"exp_avg"``, ``"exp_avg_sq"``, ``"max_exp_avg_sq"``, and ``"step"`` as a 0-d view of one float32
per parameter). So ``state_dict()``/``load_state_dict()`` are torch's, a checkpoint of a plain
torch.optim.SGD/Adam/AdamW loads (its tensors are copied into the buffers), and a step of torch's
own code (the generic path, taken when this one cannot be) updates the same memory in place.

Per bucket and step the work is one op call when every parameter of the bucket has a gradient and
shares the same history; otherwise one call per run of consecutive parameters that do (a
parameter without a gradient is left as it is, as torch leaves it: its region was not perturbed,
since its gradient region is zero).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .buckets import ParamBucket

__all__ = ["FusedBaseUpdate", "fused_kind"]

# The base classes whose step is fused, and which op does it. Exact classes: a subclass may change
# what step() computes.
_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}
# The per-parameter state tensors of each kind, under torch's names (Adam's "step" apart).
_STATE_NAMES = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def fused_kind(base: torch.optim.Optimizer, buckets: list) -> tuple[str | None, str]:
    """("sgd" or "adam", "") when this base's step can be fused over these buckets, else (None, why not)."""
    kind = _KINDS.get(type(base))
    if kind is None:
        return None, f"{type(base).__module__}.{type(base).__qualname__} is not torch.optim.SGD, Adam or AdamW"
    if any(not isinstance(b, ParamBucket) for b in buckets):
        return None, "sharded (FSDP2) parameters keep torch's own step"
    for group in base.param_groups:
        if group.get("differentiable", False):
            return None, "differentiable=True needs torch's own (autograd-recorded) step"
    return kind, ""


def _group_why_not(group: dict[str, Any]) -> str:
    """Why a step cannot be fused for this group now ("" if it can): hyperparameters held as tensors
    (a tensor lr, as torch allows) would need reading on the host."""
    for name in ("lr", "momentum", "dampening", "weight_decay", "betas", "eps"):
        value = group.get(name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, Tensor) for v in values):
            return f"{name} is a Tensor"
    return ""


class _FlatState:
    """One bucket's base-optimizer state, flat, and what the host knows of each parameter's history."""

    def __init__(self, bucket: ParamBucket, kind: str):
        self.bucket = bucket
        self.buffers: dict[str, Tensor] = {}
        n = len(bucket.params)
        # Adam's step count per parameter (float32, as torch keeps it), on the bucket's device so the
        # op reads it there and a skipped step leaves it unchanged without a host sync.
        self.steps = torch.zeros(n, dtype=torch.float32, device=bucket.device) if kind == "adam" else None
        # Whether the parameter has state in base.state yet: torch creates it at a parameter's first
        # step with a gradient (SGD's momentum buffer only when that step is taken, not skipped).
        self.started = [False] * n
        self.n_started = 0
        # Parameters with equal keys have equal step counts on the device (Adam): the keys change,
        # host-side, only in steps where some parameters of the bucket have no gradient.
        self.history: list[Any] = [0] * n
        self.same_history = True  # every key equal: one op call for the whole bucket

    def mark_started(self, i: int) -> None:
        if not self.started[i]:
            self.started[i] = True
            self.n_started += 1

    def history_changed(self) -> None:
        self.same_history = self.history.count(self.history[0]) == len(self.history)

    def buffer(self, name: str) -> Tensor:
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.zeros_like(self.bucket.param)
        return buf


class FusedBaseUpdate:
    """Runs the base optimizer's step for every bucket, fused with the restore.

    ``adopt()`` takes torch's per-parameter state into the flat buffers (after a load, a generic
    step, new param groups); ``step()`` makes the update; ``why_not()`` says when a step cannot be
    fused (the caller then restores and calls ``base.step()``).
    """

    def __init__(self, base: torch.optim.Optimizer, kind: str):
        self.base = base
        self.kind = kind
        self._states: list[_FlatState] = []
        self.stale = True  # base.state may hold tensors that are not views of our buffers
        self._partial_steps = 0  # steps in which some parameter of a bucket had no gradient (history keys)

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def adopt(self, buckets: list[ParamBucket]) -> None:
        """Copy every parameter's existing base state into the flat buffers and put views in its
        place. O(parameters), and it reads Adam's step counts on the host: done only when the
        state may have changed outside this module."""
        old = {id(s.bucket): s for s in self._states}
        self._states = []
        for bucket in buckets:
            flat = old.get(id(bucket)) or _FlatState(bucket, self.kind)
            for i, p in enumerate(bucket.params):
                self._adopt_param(flat, i, p)
            flat.history_changed()
            self._states.append(flat)
        self.stale = False

    def _adopt_param(self, flat: _FlatState, i: int, p: Tensor) -> None:
        state = self.base.state.get(p)
        if not state:
            return
        for name in _STATE_NAMES[self.kind]:
            value = state.get(name)
            if value is None:
                continue
            view = self._view(flat, name, i)
            if value is not view:
                view.copy_(value)
                state[name] = view
        if self.kind == "adam":
            step = state.get("step")
            if step is not None:
                view = flat.steps[i]
                if step is not view:
                    view.copy_(step)
                    state["step"] = view
                flat.history[i] = float(view)  # one host read per adopted parameter, not per step
        if self.kind == "adam" or state.get("momentum_buffer") is not None:
            flat.mark_started(i)

    def _view(self, flat: _FlatState, name: str, i: int) -> Tensor:
        """Parameter i's view of the flat state buffer ``name``, shaped (and strided) like the parameter."""
        bucket = flat.bucket
        return bucket.view_of(flat.buffer(name), i)

    def _start(self, flat: _FlatState, indices: range, group: dict[str, Any]) -> None:
        """Put parameter views into base.state for parameters taking their first step."""
        for i in indices:
            if flat.started[i]:
                continue
            state = self.base.state[flat.bucket.params[i]]
            if self.kind == "sgd":
                state["momentum_buffer"] = self._view(flat, "momentum_buffer", i)
            else:
                state["step"] = flat.steps[i]
                state["exp_avg"] = self._view(flat, "exp_avg", i)
                state["exp_avg_sq"] = self._view(flat, "exp_avg_sq", i)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = self._view(flat, "max_exp_avg_sq", i)
            flat.mark_started(i)

    def flat_buffers(self, name: str) -> list[Tensor]:
        """The flat state buffer ``name`` of every bucket, in the buckets' order (zero where a
        parameter has no state yet): what Momentum-SAM perturbs along."""
        if self.stale:
            self.adopt([s.bucket for s in self._states])
        return [flat.buffer(name) for flat in self._states]

    # ------------------------------------------------------------------ the step
    def why_not(self) -> str:
        """Why this step cannot be fused ("" when it can)."""
        for group in self.base.param_groups:
            why = _group_why_not(group)
            if why:
                return why
        return ""

    @torch.no_grad()
    def step(self, ops_of: dict, combine: list, found_inf: dict[torch.device, Tensor], restore: bool = True) -> None:
        """The restore and the base step of every bucket. ``combine[i]`` is param group i's LE-SAM+
        (ghat_coef, center_coef) or None; ``found_inf`` a 0-d float32 per device (nonzero: skip).
        ``restore=False``: the step starts from w itself (a one-pass step perturbed nothing), and
        the ops are given no backup (reading w0 from param, not from an alias of it)."""
        if self.stale:
            self.adopt([s.bucket for s in self._states])
        init_runs = []
        for flat in self._states:
            bucket = flat.bucket
            coefs = combine[bucket.group_index]
            group = self.base.param_groups[bucket.group_index]
            runs = self._runs(flat, group)
            for start, stop, init in runs:
                if init:  # SGD's first step of these parameters: its outcome decides their state
                    init_runs.append((flat, start, stop, group))
            ops = ops_of[bucket.device]
            skip = found_inf[bucket.device]
            for start, stop, init in runs:
                self._apply(ops, flat, group, start, stop, init, coefs, skip, restore)
        if init_runs:
            # torch's first SGD step copies g into a new buffer; a skipped one creates none. Whether it
            # was skipped is decided on the host here, once per parameter's first step only.
            taken = not any(bool(t) for t in found_inf.values())
            for flat, start, stop, group in init_runs:
                if taken:
                    self._start(flat, range(start, stop), group)

    def _runs(self, flat: _FlatState, group: dict[str, Any]) -> list[tuple[int, int, bool]]:
        """(first, last + 1, init) ranges of parameter indices to update in one op call each."""
        bucket = flat.bucket
        n = len(bucket.params)
        momentum = self.kind == "sgd" and group["momentum"] != 0
        if bucket.all_grads_bound():
            if self.kind == "adam":
                if flat.n_started < n:
                    self._start(flat, range(n), group)
                if flat.same_history:
                    return [(0, n, False)]
            elif not momentum or flat.n_started in (0, n):
                return [(0, n, momentum and flat.n_started == 0)]
        # Some parameters have no gradient, or histories differ: runs of equal parameters with one.
        has_grad = bucket.grads_bound()
        if self.kind == "adam":
            self._partial_steps += 1
            for i in range(n):
                if has_grad[i]:
                    self._start(flat, range(i, i + 1), group)
                    if not all(has_grad):  # those with a gradient advance, the others do not
                        flat.history[i] = (flat.history[i], self._partial_steps)
            flat.history_changed()
            key = flat.history
        else:
            key = flat.started if momentum else [False] * n
        runs: list[tuple[int, int, bool]] = []
        i = 0
        while i < n:
            if not has_grad[i]:
                i += 1
                continue
            j = i + 1
            while j < n and has_grad[j] and key[j] == key[i]:
                j += 1
            runs.append((i, j, momentum and not flat.started[i]))
            i = j
        return runs

    def _apply(
        self,
        ops,
        flat: _FlatState,
        group: dict[str, Any],
        start: int,
        stop: int,
        init: bool,
        coefs: tuple[float, float] | None,
        skip: Tensor,
        restore: bool,
    ) -> None:
        bucket = flat.bucket
        span = bucket.span(start, stop)
        center = bucket.center[span] if coefs is not None else None
        ghat_coef, center_coef = coefs if coefs is not None else (1.0, 0.0)
        common = dict(
            param=bucket.param[span],
            backup=bucket.backup[span] if restore else None,
            grad=bucket.grad[span],
            center=center,
            found_inf=skip,
            lr=float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            ghat_coef=ghat_coef,
            center_coef=center_coef,
        )
        if self.kind == "sgd":
            momentum = float(group["momentum"])
            ops.sgd_step_(
                **common,
                momentum_buffer=flat.buffer("momentum_buffer")[span] if momentum else None,
                momentum=momentum,
                dampening=float(group["dampening"]),
                nesterov=bool(group["nesterov"]),
                init_buffer=init,
            )
            return
        steps = flat.steps[start:stop]
        steps.add_(1.0 - skip)  # torch counts a step unless it is skipped (its fused Adam undoes the count)
        amsgrad = bool(group["amsgrad"])
        beta1, beta2 = group["betas"]
        ops.adam_step_(
            **common,
            exp_avg=flat.buffer("exp_avg")[span],
            exp_avg_sq=flat.buffer("exp_avg_sq")[span],
            max_exp_avg_sq=flat.buffer("max_exp_avg_sq")[span] if amsgrad else None,
            step=steps[0],
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay", type(self.base) is torch.optim.AdamW)),
            amsgrad=amsgrad,
        )
