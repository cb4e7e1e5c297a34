"""Build script: the Python package, plus the compiled extension ``fused_lesam._C`` (csrc/).

The extension holds the C++ CPU kernels, and the CUDA kernels when the installed torch is a CUDA
build and a CUDA toolkit is found; no GPU is needed to build them. Without a compiler or torch at
build time the package installs without it and runs on the "torch" (and "triton") backends.

Environment switches (set to 1):
  FUSED_LESAM_NO_EXTENSION  build no extension at all
  FUSED_LESAM_NO_CUDA       build the CPU kernels only
  FUSED_LESAM_REQUIRE_CUDA  fail instead of skipping when the CUDA kernels cannot be built
and the usual ones of torch.utils.cpp_extension: TORCH_CUDA_ARCH_LIST (default here, when no GPU
is visible: 8.0;9.0+PTX), MAX_JOBS, CUDA_HOME, CXX.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100, and PTX that newer GPUs compile at load time


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _say(message):
    print(f"fused-lesam setup: {message}", file=sys.stderr)


def _cuda_library_headers():
    """Include dirs of the nvidia-* wheels installed with a CUDA build of torch (cusparse.h,
    cublas_v2.h, ...). ATen's CUDA headers include them; a bare nvcc toolkit may not have them."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = set()
    for root in spec.submodule_search_locations:
        for header in glob.glob(os.path.join(root, "**", "include", "cusparse.h"), recursive=True):
            found.add(os.path.dirname(header))
    return sorted(found)


def _has_cudart(cuda_home):
    """True when the toolkit at cuda_home has the libcudart.so the extension links against (torch
    guesses CUDA_HOME from where nvcc is, and a wrapper script in /usr/local/bin misleads it)."""
    return any(os.path.exists(os.path.join(cuda_home, d, "libcudart.so")) for d in ("lib64", "lib"))


def _extension():
    """(ext_modules, cmdclass) for setup(): empty when the extension is switched off or cannot be built."""
    if _flag("FUSED_LESAM_NO_EXTENSION"):
        _say("FUSED_LESAM_NO_EXTENSION is set: no compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        _say(f"torch is not importable at build time ({err}): no compiled extension; "
             "install torch first and build with --no-build-isolation")
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _say(f"no C++ compiler ({compiler!r} not found): no compiled extension")
        return [], {}

    sources = ["csrc/fused_lesam.cpp", "csrc/bucket_checks.cpp", "csrc/cpu/bucket_ops.cpp"]
    # at::parallel_for is OpenMP in torch's builds (AT_PARALLEL_OPENMP): without -fopenmp its pragma
    # is ignored and the CPU kernels run on one thread. libgomp.so.1 is the one torch has loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -fno-math-errno: sqrt need not set errno, so the loops that take one (Adam's) vectorise.
    cxx_flags = ["-O3", "-fno-math-errno"] + openmp
    why_no_cuda = None
    if _flag("FUSED_LESAM_NO_CUDA"):
        why_no_cuda = "FUSED_LESAM_NO_CUDA is set"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        why_no_cuda = "no CUDA toolkit found (set CUDA_HOME to the toolkit root, the directory holding bin/nvcc)"
    elif not _has_cudart(cpp_extension.CUDA_HOME):
        why_no_cuda = (f"CUDA_HOME={cpp_extension.CUDA_HOME} has no lib64/libcudart.so "
                       "(set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda)")
    if why_no_cuda is not None:
        if _flag("FUSED_LESAM_REQUIRE_CUDA"):
            raise RuntimeError(f"FUSED_LESAM_REQUIRE_CUDA is set but the CUDA kernels cannot be built: {why_no_cuda}")
        _say(f"building the CPU kernels only: {why_no_cuda}")
        ext = cpp_extension.CppExtension("fused_lesam._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=openmp)
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a GPU to ask, torch would build for every arch nvcc knows: far too slow.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        _say(f"building the CPU and CUDA kernels (CUDA {torch.version.cuda}, "
             f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})")
        ext = cpp_extension.CUDAExtension(
            "fused_lesam._C",
            sources + ["csrc/cuda/bucket_ops.cu"],
            include_dirs=_cuda_library_headers(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
