"""fused-lesam: Loss-Equated Sharpness-Aware Minimization (LE-SAM), SAM and XSAM on fused kernels.

Usage::

    from fused_lesam import FusedLESAM
    opt = FusedLESAM(model.parameters(), base=torch.optim.SGD, lr=0.05, momentum=0.9, sigma=0.35, rho_max=0.4)
"""

import warnings

from . import build_info
from .backends import available_backends, extension_error
from .batchnorm import frozen_bn_stats
from .optimizer import FusedLESAM, FusedSAM, SharpnessAware
from .schedule import SigmaAnnealing, sigma_at
from .xsam import FusedXSAM

__all__ = [
    "FusedLESAM",
    "FusedSAM",
    "FusedXSAM",
    "SharpnessAware",
    "SigmaAnnealing",
    "sigma_at",
    "frozen_bn_stats",
    "available_backends",
]
__version__ = "0.1.0"

# Said once, at import, since pip shows nothing of a build that left kernels out: the package still
# works, on the torch (and triton) backends.
_no_kernels = extension_error()
if _no_kernels:
    warnings.warn(
        f"fused_lesam runs without its C++/CUDA kernels: {_no_kernels}. "
        f"Usable backends: {', '.join(n for n, why in available_backends().items() if not why)}.",
        RuntimeWarning,
        stacklevel=2,
    )
elif build_info.cuda_kernels_failed():  # a toolkit was there, so they were expected
    warnings.warn(
        f"fused_lesam was built without its CUDA kernels (CUDA tensors run on the triton or torch "
        f"backends): {build_info.cuda_kernels_failed()}",
        RuntimeWarning,
        stacklevel=2,
    )
del _no_kernels
