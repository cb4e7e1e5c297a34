"""Checks for the mistakes users make with a sharpness-aware optimizer, each refused with a message
that names the problem and the fix (issue 15: never a silently wrong step).

Everything here runs at construction, or once per step and param group (never per parameter), or
in a hook that fires only when a model's parameter is replaced. Nothing reads a device value.
"""

from __future__ import annotations

import inspect
import math
import numbers
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "check_value",
    "is_real",
    "plain_numbers",
    "check_max_grad_norm",
    "check_schedule",
    "make_base",
    "check_base_hypers",
    "watch_params",
    "replaced_params_error",
    "refuse_foreign_kwargs",
    "refuse_sparse_base",
]


# ---------------------------------------------------------------------- our own hyperparameters
def check_value(name: str, value: Any, ok: bool, need: str) -> None:
    """ValueError saying that ``name`` must be ``need`` unless ``ok``."""
    if not ok:
        if isinstance(value, Tensor):  # the usual cause, worth naming: the value itself may be fine
            raise ValueError(
                f"{name} must be {need} as a Python number, got a Tensor {value!r}: pass float({name}) "
                f"(our hyperparameters are read on the host at every step)"
            )
        raise ValueError(f"{name} must be {need}, got {value!r}")


def is_real(value: Any) -> bool:
    """A Python int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plain_numbers(group: dict[str, Any], names: tuple[str, ...]) -> None:
    """numpy scalars (np.float32(0.3)) among our hyperparameters become Python floats: they mean
    the same number, and the ops take Python floats."""
    for name in names:
        value = group.get(name)
        if (
            isinstance(value, numbers.Real)
            and not isinstance(value, (bool, int, float))
            and not isinstance(value, Tensor)
        ):
            group[name] = float(value)


def check_max_grad_norm(value: float | None) -> None:
    if value is not None and not torch.compiler.is_compiling():
        check_value(
            "max_grad_norm", value, is_real(value) and math.isfinite(value) and value > 0, "a finite number > 0"
        )


def check_schedule(total: int | None, anneal: int, warmup: int = 0, *, suffix: str = "") -> None:
    """ValueError naming the argument when a schedule's lengths do not fit together. The arguments
    are named total, anneal and warmup, the first two with ``suffix`` (FusedLESAM's are *_steps)."""
    total_name, anneal_name = f"total{suffix}", f"anneal{suffix}"
    if not isinstance(anneal, int) or anneal < 0:
        raise ValueError(f"{anneal_name} must be an int >= 0, got {anneal!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if anneal == 0 and warmup == 0:
        return
    if not isinstance(total, int) or total <= 0:
        raise ValueError(f"{total_name} must be a positive int when {anneal_name} > 0, got {total!r}")
    if anneal > total:
        raise ValueError(f"{anneal_name}={anneal} is longer than {total_name}={total}")
    if warmup > total - anneal:
        raise ValueError(f"warmup={warmup} overlaps the annealing, which starts at {total - anneal}")


# ---------------------------------------------------------------------- the base optimizer
def make_base(base: Any, base_optimizer: Any, param_groups: list[dict], base_kwargs: dict) -> torch.optim.Optimizer:
    """The base optimizer instance from ``base`` or its davda54/sam name ``base_optimizer``: an
    Optimizer class, or any callable that builds one from (param_groups, **kwargs), such as a
    functools.partial of one (as davda54/sam accepts)."""
    if base is not None and base_optimizer is not None:
        raise TypeError(
            "give the base optimizer once: base= and base_optimizer= (davda54/sam's name for it) are aliases"
        )
    base = base_optimizer if base is None else base
    if base is None:
        base = torch.optim.SGD
    if (
        isinstance(base, torch.optim.Optimizer)
        or (isinstance(base, type) and not issubclass(base, torch.optim.Optimizer))
        or not callable(base)
    ):
        raise TypeError(
            f"base must be a torch.optim.Optimizer class such as torch.optim.SGD (or a functools.partial "
            f"of one), got {base!r}"
        )
    _refuse_closure_only(base)
    instance = base(param_groups, **base_kwargs)
    if not isinstance(instance, torch.optim.Optimizer):
        raise TypeError(f"base must build a torch.optim.Optimizer, but {base!r} returned {type(instance).__name__}")
    refuse_sparse_base(instance)
    return instance


def refuse_sparse_base(base: torch.optim.Optimizer) -> None:
    """SparseAdam steps on sparse gradients only, and the flat grad buffer holds dense ones: refused
    at construction rather than at the first step."""
    if isinstance(base, torch.optim.SparseAdam):
        raise TypeError(
            "SparseAdam cannot be the base optimizer: it needs sparse gradients, and the optimizer keeps "
            "every gradient in a dense flat buffer; use torch.optim.Adam (and nn.Embedding(sparse=False))"
        )


def _step_needs_closure(cls: type) -> bool:
    closure = inspect.signature(cls.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def _refuse_closure_only(base: Any) -> None:
    """A base whose step() needs a closure (LBFGS) cannot be the base: the base steps once, on the
    final gradient, without re-evaluating the loss. Refused here rather than at the first step."""
    cls = base.func if hasattr(base, "func") else base  # a functools.partial
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and _step_needs_closure(cls):
        raise TypeError(
            f"{cls.__name__} cannot be the base optimizer: its step() needs a closure that re-evaluates "
            f"the loss (line search), and the base steps once on the final gradient; use a first-order "
            f"optimizer such as torch.optim.SGD or AdamW"
        )


def refuse_foreign_kwargs(kind: str, base: Any, base_kwargs: dict, foreign: dict[str, str]) -> None:
    """TypeError for a keyword that means something else in this optimizer (``foreign``: name -> what
    to use instead), unless the base optimizer takes it itself (Adadelta's rho)."""
    if base is None:
        base = base_kwargs.get("base_optimizer") or torch.optim.SGD
    try:
        accepted = inspect.signature(base).parameters
    except (TypeError, ValueError):  # no signature to read: let the base decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    for name, instead in foreign.items():
        if name in base_kwargs and name not in accepted:
            raise TypeError(f"{kind} has no argument {name!r}: {instead}")


# ---------------------------------------------------------------------- hyperparameters
def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return any(_non_finite(v) for v in value)
    return False


def check_base_hypers(group: dict[str, Any], ours: tuple[str, ...], on_device: list[Tensor] | None = None) -> None:
    """ValueError naming a non-finite number among the base optimizer's values of a param group
    (``lr=nan`` or ``inf`` would turn every parameter into NaN in one step; torch's optimizers take
    them). Our own hyperparameters (``ours``) have their own checks. A tensor value on the CPU is
    checked here; one on another device is appended to ``on_device``, to be folded into the step's
    skip flag there (reading it here would be a host sync)."""
    for name, value in group.items():
        if name == "params" or name in ours:
            continue
        if isinstance(value, Tensor):
            if value.device.type == "cpu" or on_device is None:
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(_non_finite_message(name, value))
            elif value.is_floating_point():
                on_device.append(value)
        elif _non_finite(value):
            raise ValueError(_non_finite_message(name, value))


def _non_finite_message(name: str, value: Any) -> str:
    return (
        f"param group value {name}={value!r} is not finite: the base optimizer's step would make every parameter "
        f"NaN; set a finite {name} (check the LR scheduler or whatever wrote it)"
    )


# ---------------------------------------------------------------------- replaced parameters
# Every parameter a live optimizer flattened, mapped to that optimizer (weakly: neither is kept alive).
_owners: WeakIdKeyDictionary = WeakIdKeyDictionary()
_hook_handle = None


def watch_params(optimizer: Any, params: list[Tensor]) -> None:
    """Note these parameters as ``optimizer``'s, and install (once) torch's global parameter
    registration hook, which tells the optimizer when a module replaces one of them by a new
    Parameter: ``model.load_state_dict(sd, assign=True)``, ``module.weight = nn.Parameter(...)``.
    The model then trains the new one while the optimizer would step the old one; nothing in the
    optimizer's own memory changes, so only this hook can see it."""
    global _hook_handle
    ref = weakref.ref(optimizer)
    for p in params:
        previous = _owners.get(p)
        earlier = previous() if previous is not None else None
        if earlier is not None and earlier is not optimizer:
            # The new optimizer re-flattened these parameters into its own buckets: the earlier one
            # must not step them again (its own check would blame a model.to() otherwise).
            earlier._superseded_by = type(optimizer).__name__
        _owners[p] = ref
    if _hook_handle is None:
        _hook_handle = torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)


def _on_parameter_registered(module: torch.nn.Module, name: str, param: Any) -> None:
    old = module._parameters.get(name)  # the hook runs before the module stores the new one
    if old is None or old is param:
        return
    ref = _owners.get(old)
    optimizer = ref() if ref is not None else None
    if optimizer is not None:
        optimizer._replaced_params.append((weakref.ref(module), name, old))


def replaced_params_error(replaced: list) -> str | None:
    """The error for parameters replaced in their modules (see `watch_params`), or None when every
    one was put back since (``replaced`` is pruned of those)."""
    still = [(m, name, old) for m, name, old in replaced if m() is not None and m()._parameters.get(name) is not old]
    replaced[:] = still
    if not still:
        return None
    module, name, _ = still[0]
    return (
        f"{type(module()).__name__}.{name} (and {len(still) - 1} more) was replaced by a new Parameter after the "
        f"optimizer was built (model.load_state_dict(..., assign=True), or module.{name} = nn.Parameter(...)): the "
        f"model's new parameters get the gradients while the optimizer holds the old ones, so the model would "
        f"never train. Build the optimizer after loading, or load with assign=False (the default, which copies "
        f"into the existing parameters)"
    )
