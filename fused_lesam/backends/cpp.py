"""The "cpp" backend: the C++ CPU kernels of the compiled extension (csrc/cpu/)."""

from .compiled import perturb_, require_kernels, restore_, sq_norm

NAME = "cpp"
require_kernels("CPU")

__all__ = ["NAME", "sq_norm", "perturb_", "restore_"]
