"""Smoke test of an installed fused-lesam (./dev package-check runs it after installing the sdist
into a fresh venv): run it from outside the source tree, with that venv's python.

    python .ci/smoke.py --expect cpp,cuda,triton

Fails unless: fused_lesam comes from this interpreter's site-packages (not a source tree) and
imports without a warning (or with the one --import-warns names); its build record names the running
torch; every expected part is there (cpp: the CPU kernels; cuda: the CUDA kernels compiled in, a GPU
or not; triton: the Triton kernels, through Triton's interpreter without a GPU); and three LE-SAM
training steps on each usable CPU backend lower the loss and agree with the torch backend's.
"""

import argparse
import os
import sysconfig
import warnings

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--expect", default="", help="comma-separated: cpp, cuda, triton")
parser.add_argument(
    "--import-warns",
    default="",
    metavar="TEXT",
    help="the import must warn, once, with TEXT (a build that left kernels out), instead of not at all",
)
args = parser.parse_args()
expect = {part for part in args.expect.split(",") if part}

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as tests/conftest.py does

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fused_lesam
    from fused_lesam import FusedLESAM, available_backends, build_info
    from fused_lesam.backends import compiled
ours = [str(w.message) for w in caught if "fused_lesam" in str(w.message)]
if args.import_warns:
    assert len(ours) == 1 and args.import_warns in ours[0], f"import should warn with {args.import_warns!r}: {ours}"
    print(f"import warned: {ours[0]}")
else:
    assert not ours, f"import warned: {ours}"

site = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
where = os.path.realpath(os.path.dirname(fused_lesam.__file__))
assert os.path.dirname(where) in site, f"fused_lesam imported from {where}, not from this environment's {site}"

record = build_info.record()
assert record is not None, "no build record: the extension was not built"
assert record["torch"] == torch.__version__, f"built against torch {record['torch']}, running {torch.__version__}"
backends = available_backends()
print(build_info.describe())
if "cpp" in expect:
    assert backends["cpp"] == "", backends["cpp"]
if "cuda" in expect:
    assert "cuda" in record["kernels"] and compiled.has_kernels("CUDA"), f"no CUDA kernels: {record['missing']}"
if "triton" in expect:
    assert backends["triton"] == "", backends["triton"]


def train(backend, steps=3):
    """Losses and final weights of `steps` LE-SAM steps (momentum SGD) on a fixed regression."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = FusedLESAM(model.parameters(), lr=0.1, momentum=0.9, sigma=0.05, backend=backend)
    assert opt.backend_names == {"cpu": backend}, opt.backend_names
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y).backward())
        opt.zero_grad()
        losses.append(loss.item())
    losses.append(torch.nn.functional.mse_loss(model(x), y).item())
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


reference_losses, reference_weights = train("torch")
assert all(map(torch.isfinite, torch.tensor(reference_losses))) and reference_losses[-1] < reference_losses[0], (
    reference_losses
)
for backend in sorted(expect & {"cpp", "triton"}):
    losses, weights = train(backend)
    torch.testing.assert_close(weights, reference_weights, rtol=1e-5, atol=1e-6, msg=f"{backend} vs torch")
    print(f"{backend}: 3 steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, weights equal to the torch backend's")
print(f"smoke test passed: fused_lesam {fused_lesam.__version__} from {where} on torch {torch.__version__}")
