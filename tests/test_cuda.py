"""GPU tests (marked ``cuda``; skipped on machines without a CUDA GPU, run them with ``./dev test -m cuda``).

CPU/GPU parity: the same training run on the CPU with every CPU backend and on the GPU with every
backend available there gives the same parameters within the dtype's tolerance. And the fused
path never synchronises with the host, checked with torch's own sync-debug mode. The ops
themselves are tested on the GPU by tests/test_ops.py (its ``cuda`` cases).
"""

import copy

import pytest
import torch
from helpers.asserts import assert_close
from helpers.models import SmallConvNet, loss_fn, make_batches, sam_step

from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM, available_backends

pytestmark = pytest.mark.cuda

CUDA_BACKENDS = ["auto"] + [
    n for n, why in available_backends().items() if not why and n in ("torch", "cuda", "triton")
]
CPU_BACKENDS = [n for n, why in available_backends().items() if not why and n in ("torch", "cpp")]
CASES = {
    "lesam": (FusedLESAM, dict(sigma=0.35, rho_max=0.4, alpha=0.5, total_steps=8, anneal_steps=4)),
    "lesam-adaptive": (FusedLESAM, dict(sigma=0.5, rho_max=2.0, adaptive=True)),
    "sam": (FusedSAM, dict(rho=0.05)),
    "xsam": (FusedXSAM, dict(rho=0.15, alpha=0.5)),
}


def to_cuda(batches):
    return [(x.cuda(), y.cuda()) for x, y in batches]


def gpu_kernel_backends_and_buckets(dtype, seed):
    """The cuda and triton backends, and three random GPU buckets of 2^20 + 3 elements."""
    from fused_lesam.backends import resolve

    gen = torch.Generator().manual_seed(seed)
    buckets = tuple(torch.randn((1 << 20) + 3, generator=gen).to(dtype).cuda() for _ in range(3))
    return resolve("cuda", torch.device("cuda")), resolve("triton", torch.device("cuda")), buckets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_gpu_parity(case, backend, cpu_backend, dtype):
    cls, kwargs = CASES[case]
    torch.manual_seed(0)
    cpu_model = SmallConvNet(dtype)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    base = dict(lr=0.05, momentum=0.9, weight_decay=5e-3)
    cpu_opt = cls(cpu_model.parameters(), backend=cpu_backend, **kwargs, **base)
    gpu_opt = cls(gpu_model.parameters(), backend=backend, **kwargs, **base)
    batches = make_batches(8, dtype)
    for (x, y), (xc, yc) in zip(batches, to_cuda(batches)):
        sam_step(cpu_model, cpu_opt, x, y)
        sam_step(gpu_model, gpu_opt, xc, yc)
    for (name, p), q in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        # Conv/GEMM kernels differ between CPU and GPU, so compare with the looser bf16 bounds for fp32 too.
        assert_close(q.cpu(), p, dtype=torch.bfloat16, msg=f"{name} ({cpu_backend} on CPU, {backend} on GPU)")
    torch.testing.assert_close(gpu_opt.last_rho.cpu(), cpu_opt.last_rho, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_no_host_sync_on_the_gpu(backend):
    torch.manual_seed(0)
    model = SmallConvNet().cuda()
    opt = FusedLESAM(model.parameters(), lr=0.05, momentum=0.9, alpha=0.3, fused=True, backend=backend)
    x, y = to_cuda(make_batches(1))[0]
    sam_step(model, opt, x, y)  # warm-up: lazy allocations
    loss_fn(model, x, y).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step(zero_grad=True)
        loss_fn(model, x, y).backward()
        opt.second_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(opt.last_rho).all()


def test_non_finite_gradient_is_skipped_on_the_gpu():
    model = SmallConvNet().cuda()
    opt = FusedLESAM(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    x, y = to_cuda(make_batches(1))[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, x, y).backward()
    model.conv1.weight.grad[0, 0, 0, 0] = float("nan")
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert int(opt.skipped_steps) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adaptive", [False, True])
def test_triton_equals_cuda_extension(dtype, adaptive):
    """The two GPU kernel backends on the same inputs: norm, perturbation and LE-SAM+ restore."""
    cuda_ops, triton_ops, (w, g, ghat) = gpu_kernel_backends_and_buckets(dtype, seed=0)
    results = []
    for ops in (cuda_ops, triton_ops):
        sq = ops.sq_norm([g], [w if adaptive else None])
        param, backup, center, grad = w.clone(), torch.empty_like(w), torch.empty_like(w), ghat.clone()
        rho = ops.perturb_(param, g, backup, sq, 0.35, 0.4, 1e-12, adaptive, center)
        perturbed = param.clone()
        ops.restore_(param, backup, grad, center, 1.5, 0.5)
        assert torch.equal(param, w) and torch.equal(center, g)
        results.append((sq, rho, perturbed, grad))
    for name, a, b in zip(("sq", "rho", "perturbed", "combined grad"), *results):
        assert_close(a, b, msg=f"{name}: cuda and triton differ")


CAPTURABLE = dict(
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-3,
    fused=True,
    sigma=0.3,
    rho_max=0.4,
    alpha=0.5,
    total_steps=10,
    anneal_steps=6,
    capturable=True,
)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_replay_equals_eager(backend):
    """A whole LE-SAM training step (both forward/backward passes and the optimizer) captured once
    in a CUDA graph and replayed through the annealing gives the eager run's parameters and sigma_t."""
    torch.manual_seed(0)
    model = SmallConvNet().cuda()
    eager_model = copy.deepcopy(model)
    opt = FusedLESAM(model.parameters(), backend=backend, **CAPTURABLE)
    eager = FusedLESAM(eager_model.parameters(), backend=backend, **CAPTURABLE)
    batches = to_cuda(make_batches(10))
    static_x, static_y = torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1])

    def train_step():
        opt.zero_grad()  # in place: the gradients stay views of the flat buffer the graph writes
        loss_fn(model, static_x, static_y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model, static_x, static_y).backward()
        opt.second_step()

    side = torch.cuda.Stream()  # warm-up on a side stream (torch's recipe): state and buffers exist
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:2]:
            static_x.copy_(x)
            static_y.copy_(y)
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step()
    sigmas = []
    for x, y in batches[2:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        sigmas.append(opt.last_sigma[0].item())

    eager_sigmas = []
    for x, y in batches:
        sam_step(eager_model, eager, x, y)
        eager_sigmas.append(eager.last_sigma[0].item())
    assert sigmas == eager_sigmas[2:] and sigmas[-1] == 0.0  # sigma_t advanced inside the graph
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert_close(p, q, msg=name)
    assert opt.state_dict()["fused_lesam"]["step"] == 10


def test_capturing_a_non_capturable_optimizer_is_an_error():
    model = SmallConvNet().cuda()
    opt = FusedLESAM(model.parameters(), lr=0.05, fused=True)
    x, y = to_cuda(make_batches(1))[0]
    sam_step(model, opt, x, y)
    loss_fn(model, x, y).backward()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=False"):
        with torch.cuda.graph(graph):
            opt.first_step()
    assert not opt._progress.perturbed


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_compiled_step_equals_eager_on_the_gpu(backend):
    """first_step as one inductor graph (fullgraph=True) through the backend's ops (the Triton ops
    can be traced only on the GPU), second_step compiled around torch's base step."""
    torch.manual_seed(0)
    model = SmallConvNet().cuda()
    eager_model = copy.deepcopy(model)
    opt = FusedLESAM(model.parameters(), backend=backend, **CAPTURABLE)
    eager = FusedLESAM(eager_model.parameters(), backend=backend, **CAPTURABLE)
    first = torch.compile(opt.first_step, fullgraph=True)
    second = torch.compile(opt.second_step)
    for x, y in to_cuda(make_batches(6)):
        sam_step(model, opt, x, y, first_step=first, second_step=second)
        sam_step(eager_model, eager, x, y)
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert_close(p, q, msg=name)
    torch.testing.assert_close(opt.last_sigma, eager.last_sigma)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_xsam_step_with_search_never_syncs(backend):
    """XSAM with three ascent steps and the dynamic alpha search, under torch's sync-debug mode."""
    torch.manual_seed(0)
    model = SmallConvNet().cuda()
    opt = FusedXSAM(
        model.parameters(), lr=0.05, momentum=0.9, fused=True, rho=0.15, steps=3, dynamic=True, backend=backend
    )
    x, y = to_cuda(make_batches(1))[0]

    def step():
        loss_fn(model, x, y).backward()
        opt.step(lambda: loss_fn(model, x, y).backward(), search_alpha=lambda: loss_fn(model, x, y))
        opt.zero_grad()

    step()  # warm-up: lazy allocations, the base optimizer's state
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(opt.last_theta) and 0.0 <= opt.alpha.item() <= 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_equals_cuda_extension_for_xsam(dtype):
    from fused_lesam import maths

    cuda_ops, triton_ops, (w_k, w_0, ghat) = gpu_kernel_backends_and_buckets(dtype, seed=1)
    results = []
    for ops in (cuda_ops, triton_ops):
        dots = ops.xsam_dots([w_k], [w_0], [ghat])
        coefs, _ = maths.slerp_coefficients(dots, 0.5, 0.3, 1e-12)
        probe, delta = w_k.clone(), torch.empty_like(w_k)
        ops.xsam_probe_(probe, w_0, ghat, delta, coefs, True)
        param, grad = w_k.clone(), ghat.clone()
        ops.xsam_restore_(param, w_0, grad, None, coefs)
        assert torch.equal(param, w_0)
        results.append((dots, probe, delta, grad))
    for name, a, b in zip(("dots", "probe", "delta", "update gradient"), *results):
        assert_close(a, b, msg=f"{name}: cuda and triton differ")
