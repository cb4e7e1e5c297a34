"""Every op of one kernel backend once on small buckets: the program `./dev gpu-check` runs under
compute-sanitizer (memcheck, racecheck, initcheck) to check the CUDA kernels' memory accesses.

The buckets cover what the kernels treat apart: empty, one element, around the 16-byte vector
width, more than one reduction chunk, views 3 elements into their storage (not 16-byte aligned),
every dtype, a NaN gradient, several buckets in one norm (of one dtype and of two), the adaptive
form, sigma_t read from the device and the optional outputs (center, delta) present and absent. The
multi-tensor forms run on a list of three buckets: the case's, an empty one and an unaligned one.
Inputs are made on the CPU and copied over, so the sanitizer sees few kernels besides ours. Each
restore is checked to be bit-exact, as a smoke test that the ops ran; the numbers themselves are
tested by tests/test_ops*.py.

    python bench/sanitize_ops.py [--backend cuda|cpp|torch|triton]

Prints one line per op with its number of calls, and exits non-zero when an op of the backend has
no runner here (a new op must be added) or a check fails.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable

import torch

from fused_lesam import maths
from fused_lesam.backends import resolve

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [0, 1, 15, 17, 4095, 16384 + 3]  # 16384: the CUDA norm's chunk (csrc/lesam_math.h kReduceChunk)
OFFSETS = [0, 3]
LESAM = (0.35, 0.4, 1e-12)  # sigma, rho_max, varrho


def on_device(values: torch.Tensor, device: torch.device, offset: int) -> torch.Tensor:
    """``values`` on ``device`` as a view ``offset`` elements into its storage (copied, not filled
    there: no kernel of torch's own runs for it)."""
    storage = torch.zeros(offset + values.numel(), dtype=values.dtype)
    storage[offset:] = values
    return storage.to(device)[offset:]


class Case:
    """The buckets of one (dtype, size, offset): weights, two gradients and scratch outputs."""

    def __init__(self, dtype, size, offset, device, seed, nan=False):
        gen = torch.Generator().manual_seed(seed)
        make = lambda: torch.randn(size, generator=gen).to(dtype)  # noqa: E731
        self.w, self.g, self.ghat = make(), make(), make()
        if nan and size:
            self.g[size // 2] = float("nan")
        self.dtype, self.size, self.offset, self.device = dtype, size, offset, device

    def put(self, values: torch.Tensor) -> torch.Tensor:
        return on_device(values, self.device, self.offset)

    def scratch(self) -> torch.Tensor:
        return self.put(torch.full_like(self.w, 7.0))  # initialised: initcheck reports only the ops' own reads

    def scalar(self, value: float) -> torch.Tensor:
        """A 0-d float32 device tensor (found_inf, Adam's step)."""
        return torch.tensor(value, dtype=torch.float32).to(self.device)


def run_norm(ops, case: Case) -> None:
    ops.sq_norm([case.put(case.g)], [None])
    ops.sq_norm([case.put(case.g), case.put(case.ghat)], [case.put(case.w), None])  # adaptive + two buckets
    other = torch.float64 if case.dtype == torch.float32 else torch.float32  # a list of two dtypes
    ops.sq_norm([case.put(case.g), case.put(case.ghat.to(other))], [None, None])


def run_perturb(ops, case: Case) -> None:
    for adaptive, with_center, sigma_on_device in ((False, True, False), (True, False, True)):
        param, grad = case.put(case.w), case.put(case.g)
        sq = ops.sq_norm([grad], [param if adaptive else None])
        center = case.scratch() if with_center else None
        sigma_t = torch.tensor(LESAM[0], dtype=torch.float64).to(case.device) if sigma_on_device else None
        ops.perturb_(param, grad, case.scratch(), sq, *LESAM, adaptive, center, sigma_t)


def run_restore(ops, case: Case) -> None:
    for with_center in (False, True):
        param, backup = case.put(case.g), case.put(case.w)  # param holds anything, backup the weights
        center = case.put(case.g) if with_center else None
        ops.restore_(param, backup, case.put(case.ghat), center, 1.5, 0.5)
        check_restored(param, case.w, "restore_")


def xsam_coefs(ops, case: Case) -> torch.Tensor:
    dots = ops.xsam_dots([case.put(case.ghat)], [case.put(case.w)], [case.put(case.g)])
    return maths.slerp_coefficients(dots, 0.5, 0.3, 1e-12)[0]


def run_xsam_dots(ops, case: Case) -> None:
    xsam_coefs(ops, case)


def run_xsam_probe(ops, case: Case) -> None:
    coefs = xsam_coefs(ops, case)
    delta = case.scratch()
    for save_delta in (True, False):  # the second call reads the delta the first one saved
        ops.xsam_probe_(case.put(case.ghat), case.put(case.w), case.put(case.g), delta, coefs, save_delta)


def run_xsam_restore(ops, case: Case) -> None:
    coefs = xsam_coefs(ops, case)
    for delta in (None, case.put(case.ghat - case.w)):
        param = case.put(case.ghat)
        ops.xsam_restore_(param, case.put(case.w), case.put(case.g), delta, coefs)
        check_restored(param, case.w, "xsam_restore_")


def look_coef(ops, case: Case) -> torch.Tensor:
    dots = ops.look_dots([case.put(case.ghat)], [case.put(case.g)])
    return maths.look_projection(dots)


def run_look_dots(ops, case: Case) -> None:
    ops.look_dots([case.put(case.ghat), case.put(case.w)], [case.put(case.g), case.put(case.ghat)])  # two buckets


def run_look_store(ops, case: Case) -> None:
    coef = look_coef(ops, case)
    for skip in (0.0, 1.0):
        look_dir = case.put(case.w)
        ops.look_store_(look_dir, case.put(case.ghat), case.put(case.g), coef, case.scalar(skip))
        if skip:
            check_restored(look_dir, case.w, "look_store_ (skipped)")


def run_look_add(ops, case: Case) -> None:
    ops.look_add_(case.put(case.g), case.put(case.ghat), look_coef(ops, case))


def listed(case: Case) -> list[Case]:
    """The case and two more buckets of its dtype, for the multi-tensor forms: empty, and 33
    elements 3 into their storage (unaligned, a vector and a tail)."""
    return [case, Case(case.dtype, 0, 0, case.device, seed=1), Case(case.dtype, 33, 3, case.device, seed=2)]


def run_multi_perturb(ops, case: Case) -> None:
    cases = listed(case)
    for adaptive, with_center, sigma_on_device in ((False, True, False), (True, False, True)):
        params, grads = [c.put(c.w) for c in cases], [c.put(c.g) for c in cases]
        sq = ops.sq_norm(grads, [p if adaptive else None for p in params])
        centers = [c.scratch() for c in cases] if with_center else None
        sigma_t = torch.tensor(LESAM[0], dtype=torch.float64).to(case.device) if sigma_on_device else None
        ops.multi_perturb_(params, grads, [c.scratch() for c in cases], sq, *LESAM, adaptive, centers, sigma_t)


def run_multi_restore(ops, case: Case) -> None:
    cases = listed(case)
    for with_center in (False, True):
        params = [c.put(c.g) for c in cases]
        centers = [c.put(c.g) for c in cases] if with_center else None
        ops.multi_restore_(params, [c.put(c.w) for c in cases], [c.put(c.ghat) for c in cases], centers, 1.5, 0.5)
        for param, c in zip(params, cases):
            check_restored(param, c.w, "multi_restore_")


def run_multi_xsam_probe(ops, case: Case) -> None:
    cases = listed(case)
    coefs = xsam_coefs(ops, case)
    deltas = [c.scratch() for c in cases]
    for save_delta in (True, False):  # the second call reads the deltas the first one saved
        params = [c.put(c.ghat) for c in cases]
        ops.multi_xsam_probe_(
            params, [c.put(c.w) for c in cases], [c.put(c.g) for c in cases], deltas, coefs, save_delta
        )


def run_multi_xsam_restore(ops, case: Case) -> None:
    cases = listed(case)
    coefs = xsam_coefs(ops, case)
    for deltas in (None, [c.put(c.ghat - c.w) for c in cases]):
        params = [c.put(c.ghat) for c in cases]
        ops.multi_xsam_restore_(params, [c.put(c.w) for c in cases], [c.put(c.g) for c in cases], deltas, coefs)
        for param, c in zip(params, cases):
            check_restored(param, c.w, "multi_xsam_restore_")


def run_multi_look_store(ops, case: Case) -> None:
    cases = listed(case)
    coef = look_coef(ops, case)
    for skip in (0.0, 1.0):
        look_dirs = [c.put(c.w) for c in cases]
        grads, centers = [c.put(c.ghat) for c in cases], [c.put(c.g) for c in cases]
        ops.multi_look_store_(look_dirs, grads, centers, coef, case.scalar(skip))
        if skip:
            for look_dir, c in zip(look_dirs, cases):
                check_restored(look_dir, c.w, "multi_look_store_ (skipped)")


def run_multi_look_add(ops, case: Case) -> None:
    cases = listed(case)
    ops.multi_look_add_([c.put(c.g) for c in cases], [c.put(c.ghat) for c in cases], look_coef(ops, case))


# (momentum or amsgrad, center, found_inf, backup): the last rows step from param itself (no backup).
SGD_ROWS = ((0.9, True, 0.0, True), (0.0, False, 0.0, True), (0.9, False, 1.0, True), (0.9, False, 0.0, False))
SGD_ROWS += ((0.0, False, 1.0, False),)
ADAM_ROWS = ((True, True, 0.0, True), (False, False, 0.0, True), (False, False, 1.0, True), (True, False, 0.0, False))
ADAM_ROWS += ((False, False, 1.0, False),)


def run_sgd_step(ops, case: Case) -> None:
    for momentum, with_center, skip, with_backup in SGD_ROWS:
        buffer = case.put(case.ghat) if momentum else None
        center = case.put(case.ghat) if with_center else None
        param = case.put(case.g if with_backup else case.w)
        ops.sgd_step_(
            param=param,
            backup=case.put(case.w) if with_backup else None,
            grad=case.put(case.g),
            momentum_buffer=buffer,
            center=center,
            found_inf=case.scalar(skip),
            lr=0.1,
            momentum=momentum,
            dampening=0.0,
            weight_decay=1e-3,
            nesterov=bool(momentum),
            maximize=False,
            init_buffer=False,
            ghat_coef=1.5,
            center_coef=0.5,
        )
        if skip:
            check_restored(param, case.w, "sgd_step_ (skipped)")


def run_adam_step(ops, case: Case) -> None:
    for amsgrad, with_center, skip, with_backup in ADAM_ROWS:
        param = case.put(case.g if with_backup else case.w)
        ops.adam_step_(
            param=param,
            backup=case.put(case.w) if with_backup else None,
            grad=case.put(case.g),
            exp_avg=case.put(case.ghat),
            exp_avg_sq=case.put(case.ghat.abs()),
            max_exp_avg_sq=case.put(case.ghat.abs()) if amsgrad else None,
            center=case.put(case.ghat) if with_center else None,
            step=case.scalar(3.0),
            found_inf=case.scalar(skip),
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            decoupled_weight_decay=amsgrad,
            amsgrad=amsgrad,
            maximize=False,
            ghat_coef=1.5,
            center_coef=0.5,
        )
        if skip:
            check_restored(param, case.w, "adam_step_ (skipped)")


# op name -> its runner. Every op of the compiled extension must be here (checked at start).
RUNNERS: dict[str, Callable[[object, Case], None]] = {
    "sq_norm": run_norm,
    "perturb_": run_perturb,
    "restore_": run_restore,
    "xsam_dots": run_xsam_dots,
    "xsam_probe_": run_xsam_probe,
    "xsam_restore_": run_xsam_restore,
    "look_dots": run_look_dots,
    "look_store_": run_look_store,
    "look_add_": run_look_add,
    "sgd_step_": run_sgd_step,
    "adam_step_": run_adam_step,
    "multi_perturb_": run_multi_perturb,
    "multi_restore_": run_multi_restore,
    "multi_xsam_probe_": run_multi_xsam_probe,
    "multi_xsam_restore_": run_multi_xsam_restore,
    "multi_look_store_": run_multi_look_store,
    "multi_look_add_": run_multi_look_add,
}


def check_restored(param: torch.Tensor, weights: torch.Tensor, op: str) -> None:
    if not torch.equal(param.cpu().view(torch.uint8), weights.view(torch.uint8)):
        raise AssertionError(f"{op} did not restore the weights bit-exactly ({param.dtype}, {param.numel()} elements)")


def ops_to_cover(backend: str) -> list[str]:
    """The ops that must have a runner here: every op of the compiled extension for cpp/cuda (a new
    kernel op fails the check until it gets one); the Python backends are held to the runners' list."""
    if backend in ("cpp", "cuda"):
        from fused_lesam.backends import compiled

        return list(compiled._OPS)
    return list(RUNNERS)


def default_device(backend: str) -> torch.device:
    return torch.device("cpu" if backend in ("cpp", "torch") else "cuda")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", help="cuda (default), cpp, torch or triton")
    args = parser.parse_args(argv)
    device = default_device(args.backend)
    ops = resolve(args.backend, device)
    required = ops_to_cover(args.backend)
    missing = [name for name in required if name not in RUNNERS]
    absent = [name for name in RUNNERS if not hasattr(ops, name)]
    calls: Counter = Counter()
    seed = 0
    for dtype in DTYPES:
        cases = [(size, offset, False) for size in SIZES for offset in OFFSETS] + [(17, 3, True)]
        for size, offset, nan in cases:
            seed += 1
            case = Case(dtype, size, offset, device, seed, nan)
            for name, runner in RUNNERS.items():
                if name not in absent:
                    runner(ops, case)
                    calls[name] += 1
    if device.type == "cuda":
        torch.cuda.synchronize()  # a kernel's fault surfaces here at the latest
    cases_per_op = max(calls.values(), default=0)
    print(
        f"sanitize_ops: backend {args.backend} on {device}, {cases_per_op} bucket cases per op "
        f"(dtypes {', '.join(str(d).removeprefix('torch.') for d in DTYPES)}; sizes {SIZES}; offsets {OFFSETS}; "
        f"one NaN case per dtype)"
    )
    print("SANITIZE_OPS_COVERED " + ",".join(sorted(calls)))
    if absent:
        print("not in this backend (skipped): " + ", ".join(absent))
    if missing:
        print("NOT COVERED (add a runner to bench/sanitize_ops.py): " + ", ".join(missing))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
