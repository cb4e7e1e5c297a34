"""Backends: who runs the bucket ops (``sq_norm``, ``perturb_``, ``restore_``, XSAM's
``xsam_dots``, ``xsam_restore_``, ``xsam_probe_``, LookSAM's ``look_dots``, ``look_store_``,
``look_add_``, and the fused base update's ``sgd_step_``, ``adam_step_``).

Every backend is a module (or, for the compiled extension's "cpp" and "cuda", a namespace made by
``compiled.backend``) exposing ``NAME`` and those functions with the signatures of
``fused_lesam.backends.spec`` (the "torch" backend, the specification). A backend knows
nothing of optimizers; the optimizer knows nothing of kernels. ``backend="auto"`` tries, in order,
cuda -> triton -> torch on CUDA tensors and cpp -> torch on CPU tensors (docs/design.md §2), and
takes a kernel backend only after one tiny op of it ran on that device (`probe`).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import torch

from .. import build_info

# name -> (module that implements the ops, device types it runs on; None: any device). The compiled
# module serves two backends: it makes each with `backend(name)`.
_MODULES: dict[str, tuple[str, frozenset[str] | None]] = {
    "torch": ("fused_lesam.backends.spec", None),
    "cpp": ("fused_lesam.backends.compiled", frozenset({"cpu"})),
    "cuda": ("fused_lesam.backends.compiled", frozenset({"cuda"})),
    "triton": ("fused_lesam.backends.triton", frozenset({"cuda"})),
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

NAMES = tuple(_MODULES)

EXTENSION = "fused_lesam._C"
_COMPILED = "fused_lesam.backends.compiled"


def _load(name: str) -> tuple[Any | None, str]:
    """(backend, "") when the backend can be used, else (None, why not)."""
    module_name, _ = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
        return (module.backend(name) if module_name == _COMPILED else module), ""
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None, f"{module_name} is not part of this build of fused_lesam"
        if err.name == EXTENSION:
            return None, f"the compiled extension {EXTENSION} is not installed ({build_info.NO_RECORD})"
        return None, f"{module_name} could not be imported: {err}"
    except ImportError as err:
        if err.name == EXTENSION:  # compiled.py's checks: say why and how to fix it
            return None, str(err)
        return None, f"{module_name} could not be loaded: {err}"
    except (OSError, RuntimeError) as err:
        return None, f"{module_name} could not be loaded: {err}"


def extension_error() -> str:
    """ "" when the compiled extension (C++/CUDA kernels) loads, else why it does not."""
    problem = build_info.extension_problem()
    if problem:
        return f"{EXTENSION} is not usable: {problem}"
    try:
        importlib.import_module(EXTENSION)
    except ModuleNotFoundError as err:
        if err.name != EXTENSION:
            raise
        return f"{EXTENSION} is not installed ({build_info.NO_RECORD})"
    except (ImportError, OSError) as err:
        return f"{EXTENSION} could not be loaded: {err}"
    return ""


def _device_types(name: str) -> frozenset[str] | None:
    devices = _MODULES[name][1]
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return devices | {"cpu"}  # Triton's interpreter runs the kernels on CPU tensors (the tests do)
    return devices


# (backend name, device) -> "" when the backend's probe op ran there, else why it did not. Once per
# process and device: the probe reads its result on the host.
_PROBED: dict[tuple[str, torch.device], str] = {}


def _probe_op(backend: Any, device: torch.device) -> None:
    """One tiny op of ``backend`` on ``device``, checked: an extension built without machine code
    for this GPU's architecture (and no PTX it can take) loads and registers its ops, and fails
    only at its first launch ("no kernel image is available for execution on the device")."""
    ones = torch.ones(16, device=device)
    got = float(backend.sq_norm([ones], [None]))
    if got != 16.0:
        raise RuntimeError(f"its sq_norm of 16 ones gave {got}")


def probe(name: str, backend: Any, device: torch.device) -> str:
    """ "" when ``backend`` (loaded as ``name``) runs on ``device``, else why not; tried once per
    process and device. The torch backend is torch's own ops and is not probed."""
    if name == "torch":
        return ""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device)
    if key not in _PROBED:
        try:
            _probe_op(backend, device)
            _PROBED[key] = ""
        except RuntimeError as err:  # torch.AcceleratorError is one
            _PROBED[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    return _PROBED[key]


def available_backends() -> dict[str, str]:
    """Every backend name mapped to "" when it is usable here, else the reason it is not."""
    return {name: _load(name)[1] for name in NAMES}


def resolve(name: str, device: torch.device) -> Any:
    """The backend (its ops as attributes) for ``name`` ("auto" or one of `NAMES`) on ``device``; a
    clear error if unusable."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            module, _ = _load(candidate)
            if module is None:
                continue
            first_time = (candidate, device) not in _PROBED
            why = probe(candidate, module, device)
            if not why:
                return module
            if first_time:
                warnings.warn(
                    f"fused_lesam: backend 'auto' passes over {candidate!r} on {device}: its kernels do not run "
                    f"there ({why}); the next backend is used. A build for this GPU's architecture "
                    f"(TORCH_CUDA_ARCH_LIST, see README 'Install') brings them back.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        raise RuntimeError("no backend could be loaded, not even the torch one")
    if name not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
    devices = _device_types(name)
    if devices is not None and device.type not in devices:
        raise ValueError(f"backend {name!r} runs on {sorted(devices)} tensors, but parameters are on {device}")
    module, why = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    why = probe(name, module, device)
    if why:
        raise RuntimeError(
            f"backend {name!r} is loaded but its kernels do not run on {device}: {why}. Rebuild with "
            f"TORCH_CUDA_ARCH_LIST naming this GPU's architecture (README 'Install'), or use backend='auto'"
        )
    return module
