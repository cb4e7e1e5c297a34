"""What the build of this installation compiled, from the record setup.py writes beside the
extension (``_build.json``): which kernels, against which torch, and why any are missing.

`extension_problem` is checked before ``fused_lesam._C`` is loaded: an extension compiled against
another torch than the running one is not loaded (its C++ symbols would not match, or worse, would
and mean something else), and the message says how to rebuild it.
"""

from __future__ import annotations

import json
import os

import torch

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")
# --no-cache-dir: pip would otherwise reuse the wheel it built from the same sdist before (as in setup.py)
REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir <the sdist, or . in a clone>"
# When there is no record: an installation made with FUSED_LESAM_NO_EXTENSION=1, or a source tree
# that was never built.
NO_RECORD = (
    "no build of it was made for this copy of fused_lesam: installed with FUSED_LESAM_NO_EXTENSION=1, "
    f"or a source tree that was not built; to build it: {REBUILD}"
)


def record() -> dict | None:
    """The build record, or None when there is none (see NO_RECORD)."""
    try:
        with open(RECORD) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def extension_problem() -> str:
    """ "" when the extension may be loaded, else why not (with the fix), from the record alone."""
    rec = record()
    if rec is None:
        return ""  # nothing to check against: loading it says whether it is there
    if "cpu" in rec.get("missing", {}):
        return f"it was not built: {rec['missing']['cpu']}. To get it: {rec.get('fix', REBUILD)}"
    if rec.get("torch") != torch.__version__:
        return (
            f"it was built against torch {rec.get('torch')} but torch {torch.__version__} is running; "
            f"rebuild it against this torch: {REBUILD}"
        )
    return ""


def cuda_kernels_failed() -> str:
    """Why the CUDA kernels are missing when their build was tried and failed (a CUDA toolkit and a
    CUDA build of torch were there), else ""."""
    rec = record() or {}
    if "cuda" in rec.get("failed", []) and "cpu" not in rec.get("missing", {}):
        return f"{rec['missing'].get('cuda', 'their build failed')}. To get them: {rec.get('fix', REBUILD)}"
    return ""


def summary() -> str:
    """One line: what the build compiled and against which torch."""
    rec = record()
    if rec is None:
        return f"build: {NO_RECORD}"
    return (
        f"built against torch {rec.get('torch')}: kernels {', '.join(rec.get('kernels')) or 'none'}"
        + (f", CUDA toolkit {rec['cuda_toolkit']}" if rec.get("cuda_toolkit") else "")
        + (f" (archs {rec['cuda_archs']})" if rec.get("cuda_archs") else "")
    )


def describe() -> str:
    """A few lines for people: where the package is, what was built, what runs here."""
    from .backends import available_backends

    lines = [
        f"fused_lesam from {os.path.dirname(RECORD)}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda})",
        summary(),
    ]
    for part, why in (record() or {}).get("missing", {}).items():
        lines.append(f"no {part} kernels: {why}")
    for name, why in available_backends().items():
        lines.append(f"backend {name}: {'available' if not why else why}")
    return "\n".join(lines)
