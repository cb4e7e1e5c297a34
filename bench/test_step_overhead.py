"""Optimizer-step microbenchmarks (pytest-benchmark): what one sharpness-aware step costs on top of
the two forward/backward passes, on parameter sets shaped like ResNet-18, WideResNet-28-10 and a
ViT (bench/models.py), with no forward/backward at all (DESIGN.md §3).

Per parameter set, in one run:
  copy        a plain copy_ of all parameters: the bandwidth yardstick (8 B per parameter)
  ops-<b>     the three bucket ops of backend b, sq_norm + perturb_ + restore_ (28 B per parameter)
  sgd         the base SGD step alone (momentum, weight decay)
  loop        a whole step of the per-tensor SAM loop users copy (bench/baselines.py)
  fused-<b>   a whole FusedLESAM step (first_step + second_step, SGD base) on backend b
  xsam-loop   a whole step of XSAM written as the same kind of per-tensor loop (one ascent step)
  xsam-<b>    a whole FusedXSAM step (one ascent step, fixed alpha) on backend b
bench/conftest.py then prints, per set and backend, the ops as a fraction of copy bandwidth, the
fused steps against their loops (whole step, and overhead = step - SGD step), and the ops
dispatched (CPU) or kernels launched (GPU) per step, with pass/short against the targets; and
writes bench/results/step_overhead.json.

    .venv/bin/python -m pytest bench/test_step_overhead.py [--device cuda] [--sets resnet18,wrn28_10,vit]
                                                           [--rounds 10] [--fused-sgd]
"""

from __future__ import annotations

import pytest
import torch

from baselines import PerTensorSAM, PerTensorXSAM
from common import sync
from models import param_shapes

import fused_lesam
from fused_lesam import FusedLESAM, FusedXSAM
from fused_lesam.backends import resolve

def make_params(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-2).to(device)
        params.append(p)
    return params


def kernel_backends(device):
    # Triton on CPU tensors is its interpreter: a test tool, not something to time.
    return [name for name, why in fused_lesam.available_backends().items()
            if not why and (device.type == "cuda" or name in ("torch", "cpp"))]


def pytest_generate_tests(metafunc):
    config = metafunc.config
    sets = config.getoption("--sets").split(",")
    device = torch.device(config.getoption("--device"))
    if "param_set" in metafunc.fixturenames:
        metafunc.parametrize("param_set", sets)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", kernel_backends(device))


def run(benchmark, record, fn, device, param_set, impl, rounds):
    def call():
        fn()
        sync(device)

    benchmark.group = param_set
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=1)
    record(param_set, impl, benchmark.stats.stats.median, fn)


def test_copy(benchmark, record, device, rounds, param_set):
    n = sum(torch.Size(s).numel() for s in param_shapes(param_set))
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    run(benchmark, record, lambda: dst.copy_(src), device, param_set, "copy", rounds)


def test_bucket_ops(benchmark, record, device, rounds, param_set, backend):
    n = sum(torch.Size(s).numel() for s in param_shapes(param_set))
    ops = resolve(backend, device)
    w, g, backup = (torch.randn(n, device=device) for _ in range(3))

    def step_ops():
        sq = ops.sq_norm([g], [None])
        ops.perturb_(w, g, backup, sq, 0.35, 0.4, 1e-12, False, None)
        ops.restore_(w, backup, g, None, 1.0, 0.0)

    run(benchmark, record, step_ops, device, param_set, f"ops-{backend}", rounds)


def test_sgd_step(benchmark, record, device, rounds, param_set, sgd):
    opt = torch.optim.SGD(make_params(param_shapes(param_set), device), **sgd)
    run(benchmark, record, opt.step, device, param_set, "sgd", rounds)


def two_steps(opt):
    def step():
        opt.first_step()
        opt.second_step()

    return step


def test_loop_step(benchmark, record, device, rounds, param_set, sgd):
    opt = PerTensorSAM(make_params(param_shapes(param_set), device), torch.optim.SGD, rho=0.05, **sgd)
    run(benchmark, record, two_steps(opt), device, param_set, "loop", rounds)


def test_fused_step(benchmark, record, device, rounds, param_set, backend, sgd):
    opt = FusedLESAM(make_params(param_shapes(param_set), device), torch.optim.SGD, backend=backend, **sgd)
    run(benchmark, record, two_steps(opt), device, param_set, f"fused-{backend}", rounds)


def test_xsam_loop_step(benchmark, record, device, rounds, param_set, sgd):
    opt = PerTensorXSAM(make_params(param_shapes(param_set), device), torch.optim.SGD, rho=0.15, alpha=0.5, **sgd)
    run(benchmark, record, two_steps(opt), device, param_set, "xsam-loop", rounds)


def test_fused_xsam_step(benchmark, record, device, rounds, param_set, backend, sgd):
    opt = FusedXSAM(make_params(param_shapes(param_set), device), torch.optim.SGD, rho=0.15, alpha=0.5,
                    backend=backend, **sgd)
    run(benchmark, record, two_steps(opt), device, param_set, f"xsam-{backend}", rounds)
