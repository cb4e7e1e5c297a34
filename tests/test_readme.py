"""Every Python code block of the README runs (issue 15: its usage example did not run as written).

The blocks are read from README.md and executed in order of appearance, each in a namespace that
holds what its text assumes already exists (a model, a loader, a criterion, a batch x, y, a
scaler, ...). On a machine without a GPU they run on the CPU: `.cuda()` and the device type "cuda"
are replaced by the CPU in the block's text, and nothing else is changed. The CUDA-graph block needs
a GPU (capture is CUDA's) and runs in the `cuda`-marked test, with the warm-up its comment asks for.
After each block the test checks that the optimizer stepped and the parameters moved, finitely.
"""

import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.models import SmallConvNet, make_batches

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
    return [textwrap.dedent(body) for _, body in blocks]


def on_device(block: str, device: torch.device) -> str:
    if device.type == "cuda":
        return block
    return block.replace(".cuda()", ".to(DEVICE)").replace('"cuda"', "DEVICE_TYPE")


def namespace(device: torch.device) -> dict:
    model = SmallConvNet().to(device)
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(3)]
    from fused_lesam import FusedLESAM

    opt = FusedLESAM(model.parameters(), lr=0.05, momentum=0.9)
    x, y = batches[0]

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    from fused_lesam import frozen_bn_stats  # imported by the first block, used by later ones

    return dict(
        torch=torch,
        frozen_bn_stats=frozen_bn_stats,
        DEVICE=device,
        DEVICE_TYPE=device.type,
        make_model=lambda: SmallConvNet(),
        model=model,
        opt=opt,
        loader=batches,
        criterion=F.cross_entropy,
        x=x,
        y=y,
        k=2,
        closure=closure,
        scaler=torch.amp.GradScaler(device.type, init_scale=2.0**8),
        steps=10,
    )


def snapshot(ns: dict) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ns["model"].parameters()]


def assert_stepped(ns: dict, before: list[torch.Tensor], steps: int) -> None:
    opt = ns["opt"]
    assert opt._progress.count >= steps, f"the block took {opt._progress.count} steps, expected {steps}"
    params = list(ns["model"].parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, before)), "the block did not change the parameters"


def test_the_readme_has_the_blocks_this_test_knows():
    blocks = python_blocks()
    assert len(blocks) == 8, "a README code block was added or removed: run it here"
    assert "make_model()" in blocks[0] and "FusedXSAM" in blocks[1] and "needs_perturbed_pass" in blocks[2]
    assert "momentum_sam=True" in blocks[3] and "grad_scaler=scaler" in blocks[4] and "CUDAGraph" in blocks[5]
    assert "accumulate" in blocks[6] and "local_first_pass" in blocks[7]


@pytest.mark.parametrize(
    "index, steps",
    [(0, 3), (1, 3), (2, 3), (3, 3), (4, 1), (6, 1)],
    ids=["usage", "xsam", "throughput-modes", "momentum-sam", "grad-scaler", "accumulation"],
)
def test_readme_block_runs(index, steps):
    device = torch.device("cpu")
    ns = namespace(device)
    block = on_device(python_blocks()[index], device)
    if index in (0, 1, 2, 3):  # these blocks build their own optimizer: step counts and parameters from it
        set_up, loop = re.split(r"^(?=for )", block, maxsplit=1, flags=re.M)
        exec(compile(set_up, f"README block {index + 1}", "exec"), ns)
        before = snapshot(ns)
        exec(compile(loop, f"README block {index + 1}", "exec"), ns)
    else:
        before = snapshot(ns)
        exec(compile(block, f"README block {index + 1}", "exec"), ns)
    assert_stepped(ns, before, steps)


def test_readme_ddp_block_runs():
    """The local-perturbation block under a one-process gloo group (DDP's no_sync around the first
    backward; tests/test_distributed.py checks the maths with two processes)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fused_lesam import FusedLESAM

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ns = namespace(torch.device("cpu"))
        ddp_model = DistributedDataParallel(ns["model"])
        ns["opt"] = FusedLESAM(ddp_model.parameters(), lr=0.05, momentum=0.9)
        ns["ddp_model"] = ddp_model
        x, y = ns["x"], ns["y"]
        ns["closure"] = lambda: F.cross_entropy(ddp_model(x), y).backward()
        before = snapshot(ns)
        exec(compile(python_blocks()[7], "README block 8", "exec"), ns)
        assert_stepped(ns, before, 1)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_readme_cuda_graph_block_runs():
    device = torch.device("cuda")
    ns = namespace(device)
    ns["static_x"], ns["static_y"] = ns["x"].clone(), ns["y"].clone()
    block = python_blocks()[5]
    set_up, capture = block.split("# warm up", 1)
    exec(compile(set_up, "README block 6", "exec"), ns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            ns["train_step"]()
    torch.cuda.current_stream().wait_stream(side)
    before = snapshot(ns)
    exec(compile(capture.split("\n", 1)[1], "README block 6", "exec"), ns)
    torch.cuda.synchronize()
    assert_stepped(ns, before, 3)
    assert int(ns["opt"]._device_count) == 6  # 3 eager steps and 3 replays
