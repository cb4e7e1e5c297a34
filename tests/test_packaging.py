"""The package as pip builds it: a complete sdist, a build that stops at once where torch is
missing (pip's default isolated build), falls back to the pure-Python backends without a working
C++ compiler, and records what it built; an import that refuses an extension built for another
torch and says how to get the kernels. (The full builds and installs, on the pinned and the newest
torch, are ./dev package-check's, which CI runs.)"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "csrc", "fused_lesam"]


def _env(**extra):
    """The environment of a build or import: no build switches from ./dev, nothing from this tree on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_LESAM_") and k != "PYTHONPATH"}
    env.update(PYTHONSAFEPATH="1", **extra)
    return env


@pytest.fixture
def sources(tmp_path):
    """A copy of what setup.py builds from (no earlier build's extension or record)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    for stale in [*src.glob("fused_lesam/_C.*"), src / "fused_lesam" / "_build.json"]:
        stale.unlink(missing_ok=True)
    return src


def _build(src, **env):
    """`setup.py build` of src (the package and what build_ext makes of the extension) into src/out."""
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", "out"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(**env),
    )


def _import(lib, code="import fused_lesam"):
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=lib.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(PYTHONPATH=str(lib)),
    )


def test_test_extra_is_what_dev_installs():
    """pyproject.toml's test extra names what ./dev installs for the tests (numpy too: the Triton
    tests run through its interpreter), so `pip install .[test]` can run the suite."""
    extra = re.search(r"^test = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    dev_packages = re.search(r'^PACKAGES="(.*)"', (ROOT / "dev").read_text(), re.M).group(1).split()
    assert sorted(re.findall(r'"([^"]+)"', extra)) == sorted(set(dev_packages) - {"ninja", "build"})


def test_sdist_holds_every_source_header_and_test_file(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
        env=_env(),
    )
    (sdist,) = tmp_path.glob("fused_lesam-*.tar.gz")
    with tarfile.open(sdist) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {
        str(p.relative_to(ROOT))
        for pattern in ("csrc/**/*.*", "tests/**/*.py", "bench/*.py", "examples/*.py", "fused_lesam/**/*.py")
        for p in ROOT.glob(pattern)
        if "__pycache__" not in p.parts
    }
    wanted |= {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", ".ci/run", ".ci/smoke.py", "dev"}
    assert {
        "csrc/cuda/bucket_ops.cu",
        "csrc/bucket_args.h",
        "tests/conftest.py",
        "tests/reference/lesam_loop.py",
    } <= wanted
    assert wanted - held == set()
    assert not [name for name in held if name.endswith((".so", ".pyc")) or name.endswith("_build.json")]


def test_without_torch_at_build_time_the_build_stops_with_the_advice(sources):
    """What pip's default isolated build meets: no torch. It stops at once and says what to run."""
    code = (
        "import runpy, sys\nsys.modules['torch'] = None\nsys.argv = ['setup.py', '-q', 'build_ext']\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=sources, capture_output=True, text=True, timeout=120, env=_env()
    )
    assert run.returncode != 0
    assert "torch is not importable in the build environment" in run.stderr
    assert "pip install --no-build-isolation" in run.stderr
    assert not list(sources.glob("build*/**/*.so"))


@pytest.mark.parametrize("cxx", ["/bin/false", "no-such-c++-compiler"])
def test_without_a_working_compiler_the_package_installs_pure_python_and_says_how_to_get_the_kernels(sources, cxx):
    build = _build(sources, CXX=cxx)
    assert build.returncode == 0, build.stderr
    lib = next((sources / "out").glob("lib*"))
    record = json.loads((lib / "fused_lesam" / "_build.json").read_text())
    assert record["kernels"] == [] and record["failed"] == ["cpu"] and record["torch"] == torch.__version__
    assert cxx in record["missing"]["cpu"]
    assert not list(lib.glob("fused_lesam/_C.*"))

    run = _import(
        lib,
        "import fused_lesam, torch\n"
        "m = torch.nn.Linear(3, 1); opt = fused_lesam.FusedLESAM(m.parameters(), lr=0.1)\n"
        "m(torch.ones(2, 3)).sum().backward(); opt.step(lambda: m(torch.ones(2, 3)).sum().backward())\n"
        "print(opt.backend_names)",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{'cpu': 'torch'}"
    warning = [line for line in run.stderr.splitlines() if "fused_lesam runs without its C++/CUDA kernels" in line]
    assert len(warning) == 1, run.stderr
    assert cxx in warning[0]
    assert "To get it: install a C++ compiler" in warning[0] and "pip install --no-build-isolation" in warning[0]


def test_an_extension_built_against_another_torch_is_not_loaded(sources):
    """The record is checked before fused_lesam._C is loaded: here the "extension" is not even a
    library, so any attempt to load it would fail with another message than ours."""
    build = _build(sources, CXX="/bin/false")  # the package without an extension, quickly
    assert build.returncode == 0, build.stderr
    package = next((sources / "out").glob("lib*")) / "fused_lesam"
    (package / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_text("not a library")
    (package / "_build.json").write_text(
        json.dumps({"kernels": ["cpu"], "torch": "2.0.0", "torch_cuda": None, "missing": {}, "failed": []})
    )
    run = _import(package.parent, "import fused_lesam\nprint(fused_lesam.available_backends()['cpp'])")
    assert run.returncode == 0, run.stderr
    expected = (
        f"it was built against torch 2.0.0 but torch {torch.__version__} is running; rebuild it against this torch"
    )
    assert expected in run.stdout
    assert expected in run.stderr and "pip install --no-build-isolation" in run.stderr
    assert "invalid ELF header" not in run.stdout + run.stderr
