"""pytest's set-up for the test suite: Triton's interpreter on machines without a GPU, --installed
(which fused_lesam is tested), and the cuda mark. The helpers the tests share are in tests/helpers/."""

from __future__ import annotations

import importlib.machinery
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Run the Triton kernels through Triton's interpreter on CPU tensors. It must be set before
    # Triton is first imported, which nothing does before this file (torch imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------- which fused_lesam is tested
def pytest_addoption(parser):
    parser.addoption(
        "--installed",
        action="store_true",
        help="test the fused_lesam installed in this interpreter, not the source tree's (which "
        "`python -m pytest` would otherwise import first); fails when there is none",
    )


def _in_tree(path, root):
    return os.path.realpath(path or os.getcwd()) == root


def pytest_configure(config):
    """Before any test module imports fused_lesam: with --installed, the source tree leaves sys.path
    (and PYTHONSAFEPATH=1 keeps it out of the tests' own `python -c` subprocesses)."""
    root = os.path.realpath(config.rootpath)
    if config.getoption("installed"):
        sys.path[:] = [p for p in sys.path if not _in_tree(p, root)]
        os.environ["PYTHONSAFEPATH"] = "1"
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _in_tree(p, root)
        )
    try:
        import fused_lesam
    except ModuleNotFoundError as err:
        if err.name != "fused_lesam":
            raise
        pytest.exit(
            f"--installed: fused_lesam is not installed in {sys.executable}'s environment; install it "
            "first: pip install --no-build-isolation .",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )

    where = os.path.realpath(os.path.dirname(fused_lesam.__file__))
    in_tree = os.path.dirname(where) == root
    if config.getoption("installed") and in_tree:  # e.g. an editable install: it is the source tree
        pytest.exit(
            f"--installed: the fused_lesam installed in {sys.executable}'s environment is the source tree "
            f"{where}; install a copy: pip install --no-build-isolation .",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    shadowed = None
    if in_tree:  # an installed copy the source tree hides: say so, --installed tests that one
        spec = importlib.machinery.PathFinder.find_spec("fused_lesam", [p for p in sys.path if not _in_tree(p, root)])
        shadowed = spec and spec.origin
    config.fused_lesam_header = [
        f"fused_lesam: {where} ({'the source tree' if in_tree else 'installed'})"
        + (
            f"; an installed copy at {os.path.dirname(shadowed)} is not tested (--installed tests it)"
            if shadowed
            else ""
        ),
        f"fused_lesam {fused_lesam.build_info.summary()}",
    ]


def pytest_report_header(config):
    return getattr(config, "fused_lesam_header", [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
