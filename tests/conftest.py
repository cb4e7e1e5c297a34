"""Shared test helpers: tolerances per dtype (the one place they are stated), small models, data."""

from __future__ import annotations

import importlib.machinery
import io
import itertools
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    # Run the Triton kernels through Triton's interpreter on CPU tensors. It must be set before
    # Triton is first imported, which nothing does before this file (torch imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances for comparing two implementations of the same maths, per dtype of the buckets.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def assert_close(actual, expected, dtype=None, msg=""):
    tol = TOLERANCES[dtype or expected.dtype]
    wide = torch.float64 if torch.float64 in (actual.dtype, expected.dtype) else torch.float32
    torch.testing.assert_close(actual.to(wide), expected.to(wide), **tol, msg=msg or None)


# ---------------------------------------------------------------------- reductions against fp64
# Standard deviations of the probabilistic bound below: it fails a correct sum with probability
# at most 2 exp(-SUM_LAMBDA^2 / 2) = 3e-8 per check.
SUM_LAMBDA = 6.0


def unit_roundoff(dtype):
    """u of ``dtype``: the largest relative error of one rounding to nearest (2^-24 for fp32)."""
    return torch.finfo(dtype).eps / 2


def sum_error_bound(terms, depth, accumulate_in):
    """How far a floating-point sum of ``terms`` (exact, fp64) may be from their exact sum.

    The sum rounds at every node of its summation tree (the products making the terms, each
    addition, a final conversion), each time by a relative error delta with |delta| <= u, the unit
    roundoff of ``accumulate_in``. To first order its error is sum over nodes of delta * T, T the
    exact value at the node (Higham, Accuracy and Stability of Numerical Algorithms, §4.2). No term
    lies under more than ``depth`` nodes (the longest chain of roundings from a term to the result:
    about n for a loop, a lane's length plus the partials' count for our two-stage sums), so
    sum |T| <= depth * sum |t_i|, and:

    - whatever the rounding errors, |error| <= gamma_depth * sum |t_i|, gamma_k = k u / (1 - k u)
      (Higham eq. 4.4; this holds for every order of summation of that depth);
    - when they are independent and of mean zero (the model of Higham & Mary, "A new approach to
      probabilistic rounding error analysis", SISC 2019), Azuma's inequality gives
      |error| <= lambda u sqrt(sum T^2) <= lambda sqrt(depth) u * sum |t_i| but with probability
      2 exp(-lambda^2 / 2), since sum T^2 <= max |T| * sum |T| <= depth * (sum |t_i|)^2.

    The bound is the smaller of the two (the second from depth 37 on), plus 2 u64 * sum |t_i|
    for the fp64 truth's own roundings, plus an absolute floor for underflow: a term or a partial sum
    below the smallest normal number may be flushed to zero, losing less than it each time.
    """
    u = unit_roundoff(accumulate_in)
    gamma = min(depth * u / (1 - depth * u), SUM_LAMBDA * math.sqrt(depth) * u) + 2 * unit_roundoff(torch.float64)
    return gamma * terms.abs().sum().item() + 2 * terms.numel() * torch.finfo(accumulate_in).tiny


def assert_sum_close(got, parts, depth, msg=""):
    """``got`` (0-d) is the sum of every term of ``parts``, [(terms, accumulate_in)], within the
    bound of `sum_error_bound` around their exact sum: ``terms`` are fp64 tensors of the exact terms
    (g^2, (w g)^2, D g, from the buckets' values), ``accumulate_in`` the dtype they are summed in."""
    exact = math.fsum(itertools.chain.from_iterable(terms.tolist() for terms, _ in parts))  # correctly rounded
    bound = sum(sum_error_bound(terms, depth, accumulate_in) for terms, accumulate_in in parts)
    error = abs(got.item() - exact)
    assert error <= bound, (f"{msg + ': ' if msg else ''}sum {got.item()!r} is {error:.3g} from the exact {exact!r}, "
                            f"over the bound {bound:.3g} (depth {depth})")


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(actual, expected, msg=""):
    """Bit-for-bit equality (NaN payloads included), for what must be exact copies."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    as_int = _SAME_WIDTH_INT[actual.dtype]
    assert torch.equal(actual.view(as_int), expected.view(as_int)), msg


# ---------------------------------------------------------------------- which fused_lesam is tested
def pytest_addoption(parser):
    parser.addoption("--installed", action="store_true",
                     help="test the fused_lesam installed in this interpreter, not the source tree's (which "
                          "`python -m pytest` would otherwise import first); fails when there is none")


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
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _in_tree(p, root))
    try:
        import fused_lesam
    except ModuleNotFoundError as err:
        if err.name != "fused_lesam":
            raise
        pytest.exit(f"--installed: fused_lesam is not installed in {sys.executable}'s environment; install it "
                    "first: pip install --no-build-isolation .", returncode=pytest.ExitCode.USAGE_ERROR)

    where = os.path.realpath(os.path.dirname(fused_lesam.__file__))
    in_tree = os.path.dirname(where) == root
    if config.getoption("installed") and in_tree:  # e.g. an editable install: it is the source tree
        pytest.exit(f"--installed: the fused_lesam installed in {sys.executable}'s environment is the source tree "
                    f"{where}; install a copy: pip install --no-build-isolation .",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    shadowed = None
    if in_tree:  # an installed copy the source tree hides: say so, --installed tests that one
        spec = importlib.machinery.PathFinder.find_spec("fused_lesam", [p for p in sys.path if not _in_tree(p, root)])
        shadowed = spec and spec.origin
    config.fused_lesam_header = [
        f"fused_lesam: {where} ({'the source tree' if in_tree else 'installed'})"
        + (f"; an installed copy at {os.path.dirname(shadowed)} is not tested (--installed tests it)"
           if shadowed else ""),
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


class SmallConvNet(nn.Module):
    """Conv + BatchNorm + two heads; ``unused`` never takes part in forward (its grad stays None)."""

    def __init__(self, dtype=torch.float32, head_dtype=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(8, dtype=dtype)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, dtype=dtype)
        self.head = nn.Linear(8, 5, dtype=head_dtype or dtype)
        self.unused = nn.Linear(4, 4, dtype=dtype)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x.to(self.head.weight.dtype))


def make_batches(n, dtype=torch.float32, seed=0, batch=8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 6, 6, generator=gen).to(dtype), torch.randint(0, 5, (batch,), generator=gen)) for _ in range(n)]


def groups_of(model, split):
    """One group, or two groups with their own lr / hyperparameters (the head apart)."""
    if not split:
        return list(model.parameters())
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    return [{"params": rest}, {"params": head, "lr": 0.02, **split}]


def through_bytes(checkpoint):
    """``checkpoint`` saved with torch.save and loaded back (weights_only), as a resumed run sees it."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def loss_fn(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def sam_step(model, opt, x, y, loss=loss_fn, first_step=None, second_step=None):
    """One SAM-style step through the manual two-step API (works for the reference loop too);
    ``first_step``/``second_step`` replace the optimizer's halves (e.g. compiled ones)."""
    loss(model, x, y).backward()
    (first_step or opt.first_step)(zero_grad=True)
    loss(model, x, y).backward()
    (second_step or opt.second_step)(zero_grad=True)
