"""Builds the optional C++ kernel of :mod:`adamw_jax.fused` (an XLA FFI custom call).

All metadata lives in pyproject.toml. The kernel needs only a C++17 compiler and the
header-only XLA FFI API that ships inside jaxlib (a build requirement); when it cannot be
built, the install still succeeds and :func:`adamw_jax.fused_adamw` runs its XLA code.
Set ADAMW_JAX_NO_KERNEL=1 to skip it.
"""

import importlib.util
import os

from setuptools import Extension, setup


def _ffi_include_dir():
    """jaxlib's include directory, if it holds the XLA FFI headers."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        include = os.path.join(location, "include")
        if os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
            return include
    return None


# Portable flags only: the AVX2/FMA loop is chosen at run time by CPU detection. The
# benchmarks' probe and the sanitizer build (tests/sanitize_kernel.py) read them from here.
COMPILE_ARGS = ["-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]


def _extensions():
    include = _ffi_include_dir()
    if include is None or os.environ.get("ADAMW_JAX_NO_KERNEL") == "1":
        return []
    return [
        Extension(
            "adamw_jax._fused_adamw_kernel",
            sources=["adamw_jax/csrc/fused_adamw.cc"],
            include_dirs=[include],
            language="c++",
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
    ]


if __name__ == "__main__":  # as setuptools runs it; tools read COMPILE_ARGS without building
    setup(ext_modules=_extensions())
