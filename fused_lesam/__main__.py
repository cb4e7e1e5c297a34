"""`python -m fused_lesam`: what this installation was built with and which backends run here."""

from .build_info import describe

print(describe())
