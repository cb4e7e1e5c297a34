"""Build script: the Python package, plus the compiled extension ``fused_lesam._C`` (csrc/).

The extension holds the C++ CPU kernels, and the CUDA kernels when the installed torch is a CUDA
build and a CUDA toolkit is found; no GPU is needed to build them. It is compiled against the torch
of the environment that builds it, so it is built with ``--no-build-isolation`` (README: Install):
in pip's isolated build environment there is no torch, and the build stops at once and says so.

What cannot be built is left out rather than failing the install, and recorded: when the CUDA
kernels fail, the CPU kernels are built alone; with no working C++ compiler the package installs
without the extension and runs on its pure-Python backends. pip shows nothing of a build that
succeeds, so the build writes what it compiled, against which torch, and why anything is missing
to ``fused_lesam/_build.json`` beside the extension; ``import fused_lesam`` reads it, refuses an
extension built for another torch, and warns with the reason and the fix when kernels are missing.
``python -m fused_lesam`` prints it.

Environment switches (set to 1):
  FUSED_LESAM_NO_EXTENSION       build no extension at all (a pure-Python package; no torch needed)
  FUSED_LESAM_NO_CUDA            build the CPU kernels only
  FUSED_LESAM_REQUIRE_EXTENSION  fail instead of installing without the extension
  FUSED_LESAM_REQUIRE_CUDA       fail instead of leaving the CUDA kernels out (implies the above)
and the usual ones of torch.utils.cpp_extension: TORCH_CUDA_ARCH_LIST (default here, when no GPU
is visible: every architecture users train on that the toolkit can compile for, see default_archs),
MAX_JOBS, CUDA_HOME, CXX.

The CUDA kernels are compiled with --fmad=false: each multiply and add is rounded on its own, as in
the C++ kernels and in the torch backend's separate ops, so the GPU results follow the same
rounding sequence (the kernels are memory-bound: contraction would buy no time).
"""

import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Machine code for the GPUs users train on, (arch, the first CUDA release that compiles for it):
# T4 / RTX 20xx, A100, RTX 30xx / A10, RTX 40xx / L4 / L40, H100 / H200, B200, RTX 50xx.
# CUDA 13 dropped the architectures before 7.5.
GPU_ARCHS = (
    ("7.5", (10, 0)),
    ("8.0", (11, 0)),
    ("8.6", (11, 1)),
    ("8.9", (11, 8)),
    ("9.0", (11, 8)),
    ("10.0", (12, 8)),
    ("12.0", (12, 8)),
)


def default_archs(nvcc_version):
    """TORCH_CUDA_ARCH_LIST for a build without a GPU to ask: every arch of GPU_ARCHS that this
    nvcc compiles for, and PTX of the newest, which later GPUs compile when the extension loads."""
    usable = [arch for arch, since in GPU_ARCHS if nvcc_version is None or nvcc_version >= since]
    return ";".join(usable) + "+PTX"


CPU_SOURCES = ["csrc/fused_lesam.cpp", "csrc/bucket_checks.cpp", "csrc/cpu/bucket_ops.cpp"]
CUDA_SOURCES = ["csrc/cuda/bucket_ops.cu"]
# Every source includes some of these: an edit to one rebuilds the extension.
HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True))
RECORD = "_build.json"  # beside fused_lesam._C; read by fused_lesam/build_info.py
# How to get the kernels after fixing what stopped them; --no-cache-dir: pip would otherwise reuse
# the wheel it built from an sdist before, the one without them.
# (as in fused_lesam/build_info.py)
REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir <the sdist, or . in a clone>"


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _say(message):
    # pip shows a successful build's output only with -v; the record (above) is what the user sees.
    print(f"fused-lesam setup: {message}", file=sys.stderr, flush=True)


def _cxx():
    """The C++ compiler torch's build compiles with (CXX, else c++), as a command."""
    return shlex.split(os.environ.get("CXX", "c++"))


def _compiler_problem():
    """ "" when the C++ compiler compiles a small C++17 file, else what went wrong. Checked before
    torch's own checks, which end in a traceback when the compiler is missing or broken."""
    cxx = _cxx()
    if not cxx or shutil.which(cxx[0]) is None:
        return f"no C++ compiler: {' '.join(cxx) or 'CXX'!r} is not found"
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <vector>\nint main() { std::vector<int> v{1}; return int(v.size()) - 1; }\n")
        try:
            run = subprocess.run(
                cxx + ["-std=c++17", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"the C++ compiler {' '.join(cxx)!r} cannot be run ({err})"
    if run.returncode != 0:
        last = (run.stderr or run.stdout).strip().splitlines()[-1:] or [f"exit code {run.returncode}"]
        return f"the C++ compiler {' '.join(cxx)!r} fails on a small C++ file ({last[0]})"
    return ""


def _is_toolkit(path):
    """True when path is a CUDA toolkit root: bin/nvcc and the libcudart.so the extension links."""
    return (
        bool(path)
        and os.path.exists(os.path.join(path, "bin", "nvcc"))
        and any(os.path.exists(os.path.join(path, d, "libcudart.so")) for d in ("lib64", "lib"))
    )


def _find_cuda_home():
    """(toolkit root or None, why not). CUDA_HOME / CUDA_PATH when set; else the toolkit of the
    nvcc on PATH, else /usr/local/cuda, else the newest /usr/local/cuda-*. torch's own guess takes
    the parent of the nvcc on PATH, which is wrong for a wrapper script such as /usr/local/bin/nvcc."""
    named = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if named:
        if _is_toolkit(named):
            return named, ""
        return None, f"CUDA_HOME={named} is not a CUDA toolkit root (no bin/nvcc and lib64/libcudart.so)"
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(
        glob.glob("/usr/local/cuda-*"), key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True
    )
    for path in candidates:
        if _is_toolkit(path):
            return path, ""
    return None, "no CUDA toolkit found (set CUDA_HOME to the toolkit root, the directory holding bin/nvcc)"


def _nvcc_version(cuda_home):
    out = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _library_headers_dir(cuda_home, build_temp):
    """A directory of links to the CUDA library headers (cusparse.h, cublas_v2.h, ...) that ATen's
    CUDA headers include and a bare toolkit may lack, taken from the nvidia-* wheels of a CUDA
    build of torch. Only the headers the toolkit does not have: the wheels' CUDA runtime and CCCL
    headers are of the CUDA that torch was built with (13.2 for torch 2.15), and nvcc refuses
    runtime headers of another version than its own. Links, not the wheels' include directories:
    a header found through a link includes its "quoted" neighbours from the toolkit, not from the
    wheel. None when nothing is missing."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    toolkit_include = os.path.join(cuda_home, "include")
    links = {}
    for root in spec.submodule_search_locations:
        for header in glob.glob(os.path.join(root, "**", "include", "cu*.h"), recursive=True):
            name = os.path.basename(header)
            if not os.path.exists(os.path.join(toolkit_include, name)):
                links.setdefault(name, header)
    if not links:
        return None
    out = os.path.join(build_temp, "cuda-library-headers")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, header in links.items():
        os.symlink(header, os.path.join(out, name))
    return out


class BuildKernels(build_ext):
    """Decides at build time (not when setup.py is read, so that an sdist needs no torch) what
    the extension holds, builds it with torch's BuildExtension, falls back as the docstring
    above says, and writes the record."""

    def run(self):
        # missing: part ("cpu", "cuda") -> why it is not built; failed: the parts whose build was
        # tried and failed (import warns about those; an absent toolkit is no surprise).
        self.record = {
            "kernels": [],
            "torch": None,
            "torch_cuda": None,
            "cuda_toolkit": None,
            "cuda_archs": None,
            "missing": {},
            "failed": [],
            "fix": REBUILD,
        }
        require_ext = _flag("FUSED_LESAM_REQUIRE_EXTENSION") or _flag("FUSED_LESAM_REQUIRE_CUDA")
        try:
            import torch
        except ImportError as err:
            # The default `pip install .` lands here: its isolated build environment has no torch.
            raise SystemExit(
                f"fused-lesam: torch is not importable in the build environment ({err}). The kernels are "
                "compiled against the torch they will run with: install torch first, then build with "
                "pip's --no-build-isolation: `pip install --no-build-isolation <the sdist, or . in a clone>`. "
                "Without the kernels: FUSED_LESAM_NO_EXTENSION=1 pip install ..."
            ) from None
        self.record.update(torch=torch.__version__, torch_cuda=torch.version.cuda)

        why_no_cxx = _compiler_problem()
        if why_no_cxx:
            if require_ext:
                raise SystemExit(f"fused-lesam: FUSED_LESAM_REQUIRE_EXTENSION is set but {why_no_cxx}")
            self.record["fix"] = f"install a C++ compiler (e.g. apt install g++), then {REBUILD}"
            return self._without_extension(why_no_cxx, failed=True)

        cuda_home, why_no_cuda = self._cuda_home(torch)
        if cuda_home is not None:
            os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
        from torch.utils import cpp_extension

        if cuda_home is not None:
            cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before
            self.record["cuda_toolkit"] = cuda_home
            try:
                self._build(cpp_extension.BuildExtension, self._cuda_extension(cpp_extension, cuda_home))
                self.record["kernels"] = ["cpu", "cuda"]
                self.record["cuda_archs"] = os.environ.get("TORCH_CUDA_ARCH_LIST")  # None: the visible GPUs'
                return self._write_record()
            except Exception as err:  # noqa: BLE001 (whatever stopped the CUDA part: fall back, say why)
                if _flag("FUSED_LESAM_REQUIRE_CUDA"):
                    raise
                why_no_cuda = f"building them failed ({_summary(err)}; `pip install -v` shows the compiler's output)"
                self.record["failed"].append("cuda")
        if _flag("FUSED_LESAM_REQUIRE_CUDA"):
            raise SystemExit(
                f"fused-lesam: FUSED_LESAM_REQUIRE_CUDA is set but the CUDA kernels cannot be built: {why_no_cuda}"
            )
        _say(f"building the CPU kernels only: no CUDA kernels, {why_no_cuda}")
        self.record["missing"]["cuda"] = why_no_cuda
        try:
            # Object files of their own, apart from a failed CUDA attempt's.
            self._build(cpp_extension.BuildExtension, self._cpu_extension(cpp_extension), subdir="cpu-only")
        except Exception as err:  # noqa: BLE001
            if require_ext:
                raise
            return self._without_extension(
                f"building it failed ({_summary(err)}; `pip install -v` shows the compiler's output)", failed=True
            )
        self.record["kernels"] = ["cpu"]
        return self._write_record()

    def _without_extension(self, why, failed):
        _say(f"no compiled extension: {why}")
        self.record["missing"] = {"cpu": why, "cuda": why}
        if failed:
            self.record["failed"] = ["cpu"]
        self.extensions = []
        if self.inplace:  # an extension an earlier in-place build left would otherwise be loaded
            for path in glob.glob(os.path.join(self._ext_dir(True), "_C.*.so")):
                os.remove(path)
        self._write_record()

    def _cuda_home(self, torch):
        """(toolkit root, "") when the CUDA kernels are to be built, else (None, why not)."""
        if _flag("FUSED_LESAM_NO_CUDA"):
            return None, "FUSED_LESAM_NO_CUDA is set"
        if torch.version.cuda is None:
            return None, f"torch {torch.__version__} is not a CUDA build"
        cuda_home, why = _find_cuda_home()
        if cuda_home is None:
            return None, why
        nvcc = _nvcc_version(cuda_home)
        torch_major = int(torch.version.cuda.split(".")[0])
        if nvcc is not None and nvcc[0] != torch_major:
            return None, (
                f"the CUDA toolkit at {cuda_home} is CUDA {nvcc[0]}.{nvcc[1]} and torch "
                f"{torch.__version__} was built with CUDA {torch.version.cuda}: their major versions "
                "must match (set CUDA_HOME to a matching toolkit)"
            )
        return cuda_home, ""

    def _common_args(self):
        # at::parallel_for is OpenMP in torch's builds (AT_PARALLEL_OPENMP): without -fopenmp its pragma
        # is ignored and the CPU kernels run on one thread. libgomp.so.1 is the one torch has loaded.
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        # -fno-math-errno: sqrt need not set errno, so the loops that take one (Adam's) vectorise.
        return ["-O3", "-fno-math-errno"] + openmp, openmp

    def _cpu_extension(self, cpp_extension):
        cxx_flags, link = self._common_args()
        return cpp_extension.CppExtension(
            "fused_lesam._C", CPU_SOURCES, depends=HEADERS, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link
        )

    def _cuda_extension(self, cpp_extension, cuda_home):
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a GPU to ask, torch would build for every arch nvcc knows, old ones included.
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_archs(_nvcc_version(cuda_home))
        _say(
            f"building the CPU and CUDA kernels (torch {torch.__version__} with CUDA {torch.version.cuda}, "
            f"toolkit {cuda_home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})"
        )
        os.makedirs(self.build_temp, exist_ok=True)
        headers = _library_headers_dir(cuda_home, os.path.abspath(self.build_temp))
        cxx_flags, link = self._common_args()
        return cpp_extension.CUDAExtension(
            "fused_lesam._C",
            CPU_SOURCES + CUDA_SOURCES,
            depends=HEADERS,
            include_dirs=[headers] if headers else [],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=link,
        )

    def _build(self, build_extension, extension, subdir=None):
        """Builds the extension with torch's BuildExtension command (ninja, torch's flags and
        checks), set up as this command is."""
        # setuptools prepares the distribution's extensions when the command is finalized.
        self.distribution.ext_modules = [extension]
        builder = build_extension(self.distribution)
        for option in (
            "build_lib",
            "build_temp",
            "inplace",
            "editable_mode",
            "force",
            "debug",
            "parallel",
            "compiler",
            "plat_name",
        ):
            if hasattr(self, option):
                setattr(builder, option, getattr(self, option))
        if subdir:
            builder.build_temp = os.path.join(self.build_temp, subdir)
        builder.ensure_finalized()
        builder.run()
        self.extensions = builder.extensions

    def _ext_dir(self, inplace):
        if inplace:
            return self.get_finalized_command("build_py").get_package_dir("fused_lesam")
        return os.path.join(self.build_lib, "fused_lesam")

    def _write_record(self):
        """Beside the extension: in the build directory (what the wheel holds) and, when building
        in place (editable installs, build_ext --inplace), in the sources."""
        for inplace in {False, bool(self.inplace)}:
            os.makedirs(self._ext_dir(inplace), exist_ok=True)
            with open(os.path.join(self._ext_dir(inplace), RECORD), "w") as f:
                json.dump(self.record, f, indent=1)
        missing = "; ".join(f"no {part} kernels: {why}" for part, why in self.record["missing"].items())
        _say(
            f"built kernels: {self.record['kernels'] or 'none'} against torch {self.record['torch']}"
            + (f" ({missing})" if missing else "")
        )

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs + [os.path.join(self._ext_dir(bool(self.inplace)), RECORD)]


def _summary(err):
    """One line for an exception from a build; torch raises some with printf-style arguments."""
    args = getattr(err, "args", ())
    if len(args) > 1 and isinstance(args[0], str) and "%" in args[0]:
        try:
            return " ".join((args[0] % args[1:]).split())
        except TypeError:
            pass
    return " ".join(f"{type(err).__name__}: {err}".split())[:400]


if _flag("FUSED_LESAM_NO_EXTENSION"):
    _say("FUSED_LESAM_NO_EXTENSION is set: no compiled extension")
    ext_modules, cmdclass = [], {}
else:
    # A placeholder that makes setuptools run build_ext (and tag the wheel for this platform);
    # BuildKernels replaces it with what can be built.
    ext_modules = [Extension("fused_lesam._C", CPU_SOURCES, depends=HEADERS)]
    cmdclass = {"build_ext": BuildKernels}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
