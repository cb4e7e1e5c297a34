"""GPU tests that need more than test_cuda.py's (marked ``cuda``; skipped without a GPU):

- DDP and FSDP2 on CUDA tensors with the NCCL backend, in a one-process group (what one GPU
  allows): every collective of the step runs through NCCL, and the step equals the same run
  without DDP/FSDP2 on the same GPU. What several ranks compute is tested on the CPU with gloo
  (tests/test_distributed.py); this checks the same code paths on NCCL and CUDA tensors.
- The bucket ops of the GPU kernel backends on buckets over 2^31 bytes (fp32) and over 2^31
  elements (bf16), where 32-bit offsets would wrap, when the GPU has the memory.
"""

import contextlib
import copy
import gc

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.asserts import assert_close
from helpers.ddp_cases import HYPER, XSAM_HYPER, batches, mlp
from torch.nn.parallel import DistributedDataParallel

from fused_lesam import FusedLESAM, FusedXSAM, available_backends
from fused_lesam.backends import resolve

pytestmark = pytest.mark.cuda

CUDA_BACKENDS = ["auto"] + [
    n for n, why in available_backends().items() if not why and n in ("torch", "cuda", "triton")
]
KERNEL_BACKENDS = [n for n in CUDA_BACKENDS if n in ("cuda", "triton")]


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    if not dist.is_nccl_available():
        pytest.fail("this torch has no NCCL backend")  # a CUDA build of torch on Linux always has it
    torch.cuda.set_device(0)
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    assert dist.get_backend() == "nccl"
    yield
    dist.destroy_process_group()


def cuda_batches():
    return [(x.cuda(), y.cuda()) for x, y in batches()]


def train(model, opt, data, local=False, snapshot=lambda p: p.detach().clone()):
    """``snapshot`` of every parameter after each step (as in test_distributed.train, on the GPU)."""
    history = []
    for x, y in data:
        with opt.local_first_pass(model) if local else contextlib.nullcontext():
            F.cross_entropy(model(x), y).backward()
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
        opt.zero_grad()
        history.append([snapshot(p) for p in model.parameters()])
    return history


def assert_same_run(got, want, opt, ref):
    for step, (a, b) in enumerate(zip(got, want)):
        for p, q in zip(a, b):
            assert_close(p, q, msg=f"step {step}")
    torch.testing.assert_close(opt.last_grad_norm, ref.last_grad_norm, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("local", [False, True], ids=["synchronized", "local_first_pass"])
@pytest.mark.parametrize("bucket_view", [False, True], ids=["grad-copies", "gradient_as_bucket_view"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_ddp_on_nccl_equals_the_plain_run(nccl_group, backend, bucket_view, local):
    plain = mlp().cuda()
    ddp = DistributedDataParallel(copy.deepcopy(plain), device_ids=[0], gradient_as_bucket_view=bucket_view)
    opt = FusedLESAM(ddp.parameters(), torch.optim.SGD, backend=backend, **HYPER)
    ref = FusedLESAM(plain.parameters(), torch.optim.SGD, backend=backend, **HYPER)
    assert opt.backend_names == ref.backend_names and "cuda:0" in opt.backend_names
    got = train(ddp, opt, cuda_batches(), local=local)
    assert_same_run(got, train(plain, ref, cuda_batches()), opt, ref)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_xsam_with_alpha_search_under_ddp_on_nccl(nccl_group, backend):
    """The search's losses are all-reduced (summed over the one rank): the same alpha and steps."""
    plain = mlp().cuda()
    ddp = DistributedDataParallel(copy.deepcopy(plain), device_ids=[0])
    runs = []
    for model in (ddp, plain):
        opt = FusedXSAM(model.parameters(), backend=backend, **XSAM_HYPER)
        history = []
        for i, (x, y) in enumerate(cuda_batches()):
            F.cross_entropy(model(x), y).backward()
            opt.step(
                lambda: F.cross_entropy(model(x), y).backward(),
                search_alpha=(lambda: F.cross_entropy(model(x), y)) if i == 0 else None,
            )
            opt.zero_grad()
            history.append((opt.alpha.item(), [p.detach().clone() for p in model.parameters()]))
        runs.append(history)
    for step, ((alpha, params), (want_alpha, want)) in enumerate(zip(*runs)):
        assert alpha == want_alpha, f"another alpha at step {step}"
        for p, q in zip(params, want):
            assert_close(p, q, msg=f"step {step}")


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_fsdp2_on_nccl_equals_the_plain_run(nccl_group, backend):
    """fully_shard on a one-GPU mesh: the parameters are DTensors, the optimizer works on the local
    shards in place, and the norm's all-reduce goes through NCCL."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain = mlp().cuda()
    sharded = copy.deepcopy(plain)
    fully_shard(sharded, mesh=init_device_mesh("cuda", (1,)))
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    opt = FusedLESAM(sharded.parameters(), torch.optim.SGD, backend=backend, **HYPER)
    ref = FusedLESAM(plain.parameters(), torch.optim.SGD, backend=backend, **HYPER)
    # On a one-rank mesh full_tensor() is a view of the local shard, not a copy: clone the snapshot.
    got = train(sharded, opt, cuda_batches(), snapshot=lambda p: p.full_tensor().detach().clone())
    assert_same_run(got, train(plain, ref, cuda_batches()), opt, ref)


# (dtype, elements): fp32 just over 2^31 bytes (byte offsets past int32), bf16 just over 2^31
# elements (element indices past int32). The tail of 2^20 + 3 elements lies beyond the boundary.
LARGE = {
    "fp32-over-2GiB": (torch.float32, (1 << 29) + (1 << 20) + 3),
    "bf16-over-2^31-elements": (torch.bfloat16, (1 << 31) + (1 << 20) + 3),
}
# Gradient and weights before / after the boundary: an offset that wraps reads or writes the head's
# values for the tail's. The weights are small so that the perturbation shows in every element.
G, W = (1.0, 3.0), (1e-5, -2e-5)
RELATIVE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # one rounding to the dtype, relative


@pytest.fixture
def release_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()  # 10-20 GiB: give it back to the tests that follow in this process


@pytest.mark.parametrize("case", list(LARGE))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_on_a_bucket_past_32_bit_offsets(backend, case, release_gpu_memory):
    """sq_norm, perturb_ and restore_ on one bucket whose tail lies past the 32-bit boundary. The
    values are constant on each side, so the exact norm is known, and an offset that wraps or a
    tail left out changes the norm by over 1% and the tail's perturbed weights by far more."""
    dtype, n = LARGE[case]
    size = torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * n * size:  # weights, gradient, backup, perturbed and expected weights, margin
        pytest.skip(f"needs {6 * n * size / 2**30:.0f} GiB of free GPU memory, has {free / 2**30:.0f} GiB")
    ops = resolve(backend, torch.device("cuda"))
    boundary = (1 << 31) // size if dtype == torch.float32 else 1 << 31

    def two_sided(values):
        t = torch.full((n,), values[0], dtype=dtype, device="cuda")
        t[boundary:] = values[1]
        return t

    g, w = two_sided(G), two_sided(W)
    sq = ops.sq_norm([g], [None])
    exact = boundary * G[0] ** 2 + (n - boundary) * G[1] ** 2
    assert sq.item() == pytest.approx(exact, rel=1e-6), "the norm of the whole bucket"

    param, backup = w.clone(), torch.full_like(w, 7.0)
    rho_max = 0.4  # sigma is large, so rho_t = rho_max
    rho = ops.perturb_(param, g, backup, sq, 1e3, rho_max, 1e-12, False, None)
    assert rho.item() == pytest.approx(rho_max, rel=1e-6)
    assert torch.equal(backup, w), "the backup must be the weights, bit for bit, to the last element"
    expected = torch.add(w, g, alpha=rho_max / (exact**0.5 + 1e-12))  # w + rho * g / ||g||
    for start in range(0, n, 1 << 28):  # in slices: fp32 copies of the whole bf16 bucket would take 16 GiB
        part = slice(start, start + (1 << 28))
        torch.testing.assert_close(
            param[part].float(),
            expected[part].float(),
            rtol=RELATIVE[dtype],
            atol=0,
            msg=lambda m: f"elements {start}..: {m}",
        )
    del expected

    ops.restore_(param, backup, g, None, 1.0, 0.0)
    assert torch.equal(param, w), "restore_ must give the weights back bit for bit past the boundary too"
