"""The compiled parts of jaxquant, built at install (the rest is in pyproject.toml).

- ``jaxquant.entropy._loops`` (C): the host loops of the entropy coder.
- ``jaxquant.kernels._cpu`` (C++17): the CPU lookup matmul, an XLA FFI handler compiled
  against the FFI headers that jaxlib ships (``jaxlib/include``; jaxlib is a build
  requirement for that reason). Optional: where it does not compile, jaxquant installs
  without it and ``backend="auto"`` says so once and uses the XLA loop.
"""

import importlib.util
import os

from setuptools import Extension, setup


def _jaxlib_include() -> str:
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("building jaxquant needs jaxlib (its XLA FFI headers)")
  return os.path.join(list(spec.submodule_search_locations)[0], "include")


setup(ext_modules=[
    Extension("jaxquant.entropy._loops", sources=["jaxquant/entropy/_loops.c"],
              extra_compile_args=["-O3"]),
    Extension("jaxquant.kernels._cpu", sources=["jaxquant/kernels/_cpu.cc"],
              include_dirs=[_jaxlib_include()], language="c++", optional=True,
              extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-tree-slp-vectorize"]),
])
