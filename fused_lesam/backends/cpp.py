"""The "cpp" backend: the C++ CPU kernels of the compiled extension (csrc/cpu/)."""

from .compiled import (adam_step_, perturb_, require_kernels, restore_, sgd_step_, sq_norm, xsam_dots, xsam_probe_,
                       xsam_restore_)

NAME = "cpp"
require_kernels("CPU")

__all__ = ["NAME", "sq_norm", "perturb_", "restore_", "xsam_dots", "xsam_restore_", "xsam_probe_", "sgd_step_",
           "adam_step_"]
