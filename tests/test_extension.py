"""The compiled extension is built, loaded and picked as the build promised; without it the
package still works on the torch backend and says so once at import."""

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from fused_lesam import FusedLESAM, available_backends, backends
from fused_lesam.backends import compiled, resolve


def test_cpu_kernels_are_built_and_auto_picks_them():
    # ./dev and CI build the extension; FUSED_LESAM_NO_EXTENSION=1 is how a build opts out.
    assert os.environ.get("FUSED_LESAM_NO_EXTENSION", "") in ("", "0"), "run the tests on a build with the extension"
    assert available_backends()["cpp"] == ""
    assert compiled.has_kernels("CPU")
    assert resolve("auto", torch.device("cpu")).NAME == "cpp"


def test_cuda_kernels_are_built_when_required():
    """./dev sets FUSED_LESAM_REQUIRE_CUDA when a CUDA toolkit is present (CI has one): then every
    op must have a CUDA kernel in the extension, compiled and linked without a GPU."""
    if os.environ.get("FUSED_LESAM_REQUIRE_CUDA", "") in ("", "0"):
        pytest.skip("this build was not asked for CUDA kernels (no CUDA toolkit where ./dev ran)")
    assert torch.version.cuda is not None
    assert compiled.has_kernels("CUDA")
    if not torch.cuda.is_available():
        assert "no CUDA device is visible" in available_backends()["cuda"]


def test_without_the_extension_the_torch_backend_runs_and_import_says_so():
    script = (
        "import sys, torch\n"
        "sys.modules['fused_lesam._C'] = None  # as if built without a compiler\n"
        "import fused_lesam\n"
        "model = torch.nn.Linear(4, 2)\n"
        "opt = fused_lesam.FusedLESAM(model.parameters(), lr=0.1)\n"
        "model(torch.ones(3, 4)).sum().backward()\n"
        "opt.step(lambda: model(torch.ones(3, 4)).sum().backward())\n"
        "print(opt.backend_names)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no Triton on the CPU either
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{'cpu': 'torch'}"
    assert run.stderr.count("fused_lesam runs without its C++/CUDA kernels") == 1
    assert "Usable backends: torch." in run.stderr


def test_explicit_cpp_backend_without_the_extension_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fused_lesam._C", None)
    monkeypatch.delitem(sys.modules, "fused_lesam.backends.compiled")
    with pytest.raises(RuntimeError, match="the compiled extension fused_lesam._C is not installed"):
        FusedLESAM(torch.nn.Linear(2, 2).parameters(), lr=0.1, backend="cpp")


def test_triton_kernels_run_here():
    """The Triton tests must not be skipped silently: here the kernels run, compiled on a GPU or
    through the interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""
    assert available_backends()["triton"] == ""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("triton", device).NAME == "triton"


def _kernels_that_do_not_run(backend, device):
    # What a build without machine code for the GPU's architecture raises at its first launch.
    raise torch.AcceleratorError("CUDA error: no kernel image is available for execution on the device")


def test_auto_passes_over_kernels_that_do_not_run_here_and_says_why_once(monkeypatch):
    """`auto` takes a kernel backend only after its probe op ran on the device; otherwise the next
    backend, with one warning that names the cause and the fix. The same logic guards the GPU
    backends (a wheel built for other archs): here it is driven on the CPU through the cpp backend."""
    monkeypatch.setattr(backends, "_PROBED", {})
    monkeypatch.setattr(backends, "_probe_op", _kernels_that_do_not_run)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match=r"passes over 'cpp'.*no kernel image.*TORCH_CUDA_ARCH_LIST"):
        assert resolve("auto", cpu).NAME == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device: no second warning, no second probe
        opt = FusedLESAM(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert opt.backend_names == {"cpu": "torch"}
    refused = r"backend 'cpp' is loaded but its kernels do not run on cpu: .*no kernel image"
    with pytest.raises(RuntimeError, match=refused):
        FusedLESAM(torch.nn.Linear(2, 2).parameters(), lr=0.1, backend="cpp")


def test_the_probe_runs_the_real_kernels(monkeypatch):
    monkeypatch.setattr(backends, "_PROBED", {})
    cpu = torch.device("cpu")
    assert backends.probe("cpp", resolve("cpp", cpu), cpu) == ""
    assert backends._PROBED == {("cpp", cpu): ""}
    wrong = types.SimpleNamespace(sq_norm=lambda grads, weights: torch.zeros(()))  # kernels that compute nonsense
    assert backends.probe("broken", wrong, cpu) == "RuntimeError: its sq_norm of 16 ones gave 0.0"
