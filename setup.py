"""Build script. The package is pure Python for now; the C++/CUDA extension (csrc/) is added here
with torch.utils.cpp_extension when it lands."""

from setuptools import setup

setup()
