"""The "cuda" backend: the CUDA kernels of the compiled extension (csrc/cuda/)."""

import torch

from .compiled import (adam_step_, perturb_, require_kernels, restore_, sgd_step_, sq_norm, xsam_dots, xsam_probe_,
                       xsam_restore_)

NAME = "cuda"
require_kernels("CUDA")
if not torch.cuda.is_available():
    raise ImportError("the CUDA kernels are built, but no CUDA device is visible")

__all__ = ["NAME", "sq_norm", "perturb_", "restore_", "xsam_dots", "xsam_restore_", "xsam_probe_", "sgd_step_",
           "adam_step_"]
