"""The tolerances per dtype (the one place they are stated) and the assertions built on them."""

from __future__ import annotations

import itertools
import math

import torch

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
    assert error <= bound, (
        f"{msg + ': ' if msg else ''}sum {got.item()!r} is {error:.3g} from the exact {exact!r}, "
        f"over the bound {bound:.3g} (depth {depth})"
    )


_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def assert_bits_equal(actual, expected, msg=""):
    """Bit-for-bit equality (NaN payloads included), for what must be exact copies."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    as_int = _SAME_WIDTH_INT[actual.dtype]
    assert torch.equal(actual.view(as_int), expected.view(as_int)), msg
