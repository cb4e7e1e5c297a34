"""The step microbenchmark (issue 14): one whole sharpness-aware optimizer step, first_step +
second_step with the gradients in place and no forward/backward, against the per-tensor loop users
copy and against the byte limit of the machine (docs/design.md §3, bench/report.py).

Per parameter set (bench/models.py) and base optimizer (momentum SGD lr 0.05 / momentum 0.9 /
wd 5e-4; AdamW lr 1e-3 / wd 0.05), in one interleaved run:
  copy          a copy_ of the parameters' bytes (8 B per parameter): the bandwidth yardstick
  loop          the per-tensor LE-SAM loop (bench/baselines.py), the base at torch's defaults
  loop-fused    the same loop with the base's fused=True, the best torch offers
  ours-<b>      FusedLESAM with default arguments on kernel backend b (its base_update recorded)
  ops-<b>       (SGD only) the three bucket ops alone, sq_norm + perturb_ + restore_
XSAM has no rows here: with the same gradient in place at both points its ascent and final gradient
are parallel, the slerp's degenerate case (the per-tensor loop divides by sin 0); bench/epoch_time.py
times it with real backward passes.
Each round times `--steps` steps of a row (the round's value is their mean); round r of every row
runs before round r+1 of any, the rows' order rotating each round; median [min..max] over `--rounds`.
Then one more step per row under the profiler: operators dispatched from Python (CPU) or kernels
launched (GPU). bench/conftest.py prints the report and writes bench/results/step_overhead.json.

    .venv/bin/python -m pytest bench/test_step_overhead.py [--device cuda] [--sets resnet18,vit_s16,many600]
                                                           [--bases sgd,adamw] [--backends all|auto|cpp,...]
                                                           [--rounds 7] [--steps 20] [--warmup 2]
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable

import pytest
import torch
from baselines import PerTensorSAM
from common import sync
from models import param_shapes

import fused_lesam
from fused_lesam import FusedLESAM
from fused_lesam.backends import resolve

BASES = {  # the issue's measurement set-up; the optimizers' own defaults otherwise
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05)),
}
LESAM = dict(sigma=0.35, rho_max=0.4)  # FusedLESAM's defaults, given to the loop so both do the same maths


def kernel_backends(device: torch.device, wanted: str = "all") -> list[str]:
    """The backends to time: "all" usable ones, or a comma list in which "auto" is the default's."""
    # Triton on CPU tensors is its interpreter: a test tool, not something to time.
    usable = [
        name
        for name, why in fused_lesam.available_backends().items()
        if not why and (device.type == "cuda" or name in ("torch", "cpp"))
    ]
    if wanted == "all":
        return usable
    names = list(dict.fromkeys(resolve("auto", device).NAME if name == "auto" else name for name in wanted.split(",")))
    if any(name not in usable for name in names):
        raise pytest.UsageError(f"--backends {wanted}: usable here are {', '.join(usable)}")
    return names


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "param_set" in metafunc.fixturenames:
        metafunc.parametrize("param_set", config.getoption("--sets").split(","))
    if "base" in metafunc.fixturenames:
        metafunc.parametrize("base", config.getoption("--bases").split(","))


def time_interleaved(
    rows: dict[str, Callable[[], object]], device: torch.device, rounds: int, steps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each row, one value per round (the mean of `steps` calls). Round r of every
    row runs before round r+1 of any, so a slow spell of a shared machine hits all rows alike; the
    order rotates each round so that no row always runs right after the same one (warm caches)."""
    names = list(rows)
    for name in names:
        for _ in range(warmup):  # first steps create the optimizer state; not timed
            rows[name]()
    sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed round would be charged to whichever row ran it
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = rows[name]
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    fn()
                sync(device)
                seconds[name].append((time.perf_counter() - start) / steps)
    finally:
        if gc_was_enabled:
            gc.enable()
    return seconds


class Params:
    """Parameters with gradients in place, shaped like a set; every row gets its own copy of the same values."""

    def __init__(self, shapes, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.values = [
            (torch.randn(s, generator=gen).to(device), torch.randn(s, generator=gen).mul_(1e-2).to(device))
            for s in shapes
        ]

    def fresh(self) -> list[torch.nn.Parameter]:
        params = []
        for w, g in self.values:
            p = torch.nn.Parameter(w.clone())
            p.grad = g.clone()
            params.append(p)
        return params


def two_steps(opt):
    def step():
        opt.first_step()
        opt.second_step()

    return step


def test_step(param_set, base, device, backends, rounds, steps, warmup, record):
    shapes = param_shapes(param_set)
    n = sum(math.prod(s) for s in shapes)
    base_cls, hyper = BASES[base]
    values = Params(shapes, device)
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    rows: dict[str, Callable[[], object]] = {"copy": lambda: dst.copy_(src)}
    optimizers = {
        "loop": PerTensorSAM(values.fresh(), base_cls, **LESAM, **hyper),
        "loop-fused": PerTensorSAM(values.fresh(), base_cls, **LESAM, fused=True, **hyper),
    }
    for backend in backends:
        optimizers[f"ours-{backend}"] = FusedLESAM(values.fresh(), base_cls, backend=backend, **hyper)
    rows.update({name: two_steps(opt) for name, opt in optimizers.items()})
    if base == "sgd":  # the ops do not depend on the base: timed once per set
        w, g, backup = (torch.randn(n, device=device) for _ in range(3))
        for backend in backends:
            rows[f"ops-{backend}"] = bucket_ops(resolve(backend, device), w, g, backup)

    seconds = time_interleaved(rows, device, rounds, steps, warmup)

    for name, opt in optimizers.items():
        # The steps moved the weights and left them finite: the rows timed real work.
        params = [p for group in opt.param_groups for p in group["params"]]
        assert all(torch.isfinite(p).all() for p in params), name
        assert any(not torch.equal(p, w0) for p, (w0, _) in zip(params, values.values)), name
    extras = {
        name: dict(buckets=len(opt._buckets), base_update=opt.base_update)
        for name, opt in optimizers.items()
        if isinstance(opt, FusedLESAM)
    }
    record(param_set, base, len(shapes), n, rows, seconds, extras)


def bucket_ops(ops, w, g, backup):
    def step_ops():
        sq = ops.sq_norm([g], [None])
        ops.perturb_(w, g, backup, sq, 0.35, 0.4, 1e-12, False, None)
        ops.restore_(w, backup, g, None, 1.0, 0.0)

    return step_ops
