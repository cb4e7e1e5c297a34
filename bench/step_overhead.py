"""Optimizer cost of one sharpness-aware step, no forward/backward (DESIGN.md §3).

For a parameter set shaped like a real model it times, in one process:
  copy      a plain copy_ of all parameters: the memory-bandwidth yardstick (8 B per parameter);
  ops       the three fused bucket ops of each backend, sq_norm + perturb_ + restore_ (28 B per
            parameter), as a fraction of that bandwidth;
  step      a whole step (first_step + second_step) of FusedLESAM on each backend and of the
            per-tensor SAM loop users copy (bench/baselines.py), with SGD (momentum, weight
            decay) as the base, once with SGD's default implementation and once with fused=True;
  overhead  step minus the base SGD step alone: what sharpness-awareness costs on top of SGD.
It prints pass/short against the targets: ops >= 70% of copy bandwidth, and the fused
optimizer >= 1.5x the per-tensor loop (overhead, and whole step).

    .venv/bin/python bench/step_overhead.py [--set resnet18] [--device cpu] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from baselines import PerTensorSAM
from param_sets import PARAM_SETS, numel

import fused_lesam
from fused_lesam import FusedLESAM
from fused_lesam.backends import resolve

OPS_BYTES_PER_PARAM = 28  # norm: read g (4); perturb: read w, g, write w, backup (16); restore: read backup, write w (8)
COPY_BYTES_PER_PARAM = 8
TARGET_BANDWIDTH = 0.70
TARGET_SPEEDUP = 1.5
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def timed(fn, device, reps, warmup=3):
    """Median seconds per call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_params(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-2).to(device)
        params.append(p)
    return params


def bucket_ops_time(backend, n, device, reps):
    ops = resolve(backend, device)
    w, g, backup = (torch.randn(n, device=device) for _ in range(3))

    def run():
        sq = ops.sq_norm([g], [None])
        ops.perturb_(w, g, backup, sq, 0.35, 0.4, 1e-12, False, None)
        ops.restore_(w, backup, g, None, 1.0, 0.0)

    return timed(run, device, reps)


def step_time(make_opt, shapes, device, reps):
    opt = make_opt(make_params(shapes, device))

    def run():
        opt.first_step()
        opt.second_step()

    return timed(run, device, reps)


def base_step_time(shapes, device, reps, **sgd):
    opt = torch.optim.SGD(make_params(shapes, device), **SGD, **sgd)
    return timed(opt.step, device, reps)


def verdict(ok):
    return "pass" if ok else "SHORT"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="resnet18", choices=list(PARAM_SETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = PARAM_SETS[args.set]()
    n = numel(shapes)
    backends = [name for name, why in fused_lesam.available_backends().items()
                if not why and (device.type == "cuda" or name in ("torch", "cpp"))]

    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    t_copy = timed(lambda: dst.copy_(src), device, args.reps)
    bandwidth = COPY_BYTES_PER_PARAM * n / t_copy
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    print(f"{args.set}: {len(shapes)} tensors, {n:,} fp32 parameters on {device}{threads}, torch {torch.__version__}")
    print(f"copy_ of the parameters: {t_copy * 1e3:.2f} ms = {bandwidth / 1e9:.1f} GB/s")
    print()
    print("| backend | sq_norm + perturb_ + restore_ ms | % of copy bandwidth |")
    print("| --- | ---: | ---: |")
    for backend in backends:
        t_ops = bucket_ops_time(backend, n, device, args.reps)
        fraction = OPS_BYTES_PER_PARAM * n / bandwidth / t_ops
        print(f"| {backend} | {t_ops * 1e3:.2f} | {fraction:.0%} {verdict(fraction >= TARGET_BANDWIDTH)} |")

    print()
    print("| base | optimizer | step ms | overhead ms | step vs loop | overhead vs loop |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for base_name, sgd in (("SGD", {}), ("SGD fused", dict(fused=True))):
        t_base = base_step_time(shapes, device, args.reps, **sgd)
        print(f"| {base_name} | (base step alone) | {t_base * 1e3:.2f} | | | |")
        t_loop = step_time(lambda ps: PerTensorSAM(ps, torch.optim.SGD, rho=0.05, **SGD, **sgd), shapes, device, args.reps)
        print(f"| {base_name} | per-tensor SAM loop | {t_loop * 1e3:.2f} | {(t_loop - t_base) * 1e3:.2f} | 1.00x | 1.00x |")
        for backend in backends:
            t_step = step_time(lambda ps: FusedLESAM(ps, torch.optim.SGD, backend=backend, **SGD, **sgd),
                               shapes, device, args.reps)
            speedup, overhead_speedup = t_loop / t_step, (t_loop - t_base) / (t_step - t_base)
            print(f"| {base_name} | FusedLESAM {backend} | {t_step * 1e3:.2f} | {(t_step - t_base) * 1e3:.2f} "
                  f"| {speedup:.2f}x {verdict(speedup >= TARGET_SPEEDUP)} "
                  f"| {overhead_speedup:.2f}x {verdict(overhead_speedup >= TARGET_SPEEDUP)} |")
    print()
    print(f"targets: ops >= {TARGET_BANDWIDTH:.0%} of copy bandwidth ({OPS_BYTES_PER_PARAM} B per parameter); "
          f"FusedLESAM >= {TARGET_SPEEDUP}x the per-tensor loop")


if __name__ == "__main__":
    main()
