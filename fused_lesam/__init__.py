"""fused-lesam: Loss-Equated Sharpness-Aware Minimization (LE-SAM) and SAM on fused kernels.

    from fused_lesam import FusedLESAM
    opt = FusedLESAM(model.parameters(), base=torch.optim.SGD, lr=0.05, momentum=0.9, sigma=0.35, rho_max=0.4)
"""

from .backends import available_backends
from .batchnorm import frozen_bn_stats
from .optimizer import FusedLESAM, FusedSAM, SharpnessAware
from .schedule import SigmaAnnealing, sigma_at

__all__ = ["FusedLESAM", "FusedSAM", "SharpnessAware", "SigmaAnnealing", "sigma_at", "frozen_bn_stats", "available_backends"]
__version__ = "0.1.0"
