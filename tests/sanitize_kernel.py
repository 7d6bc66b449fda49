"""Builds the fused kernel under AddressSanitizer and UndefinedBehaviorSanitizer and runs
the fused tests against it.

The kernel writes params and moments in place, so a bug there corrupts memory silently.
This command compiles ``adamw_jax/csrc/fused_adamw.cc`` with setup.py's flags plus
``-O1 -fsanitize=address,undefined`` into a copy of the package in a temporary directory, puts
that copy first on ``PYTHONPATH`` and runs ``tests/test_fused.py`` (every storage and layout,
odd leaf sizes, empty and one-element leaves, 64 and 65 leaves) with the sanitizer's
runtime preloaded; any report fails the run::

    python tests/sanitize_kernel.py            # extra arguments go to pytest

It needs g++ and its libasan/libubsan (GCC's own). Exit status: pytest's, or 1 when the
sanitized kernel does not build or is not the one the tests load.
"""

from __future__ import annotations

import importlib.machinery
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# -O1 after setup.py's -O3 (the last -O counts): AddressSanitizer's own recommendation, and
# it builds in about half the time of -O3 with the sanitizers (52 s against 86 s of CPU).
SANITIZE = [
    "-O1",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
]


def build(package_dir: Path) -> Path:
    """Copies the package's Python files to ``package_dir`` and builds the sanitized kernel
    there; returns the extension's path."""
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    include = setup["_ffi_include_dir"]()
    if include is None:
        raise RuntimeError("jaxlib's XLA FFI headers were not found")
    shutil.copytree(
        ROOT / "adamw_jax", package_dir, ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    output = package_dir / f"_fused_adamw_kernel{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    command = ["g++", *setup["COMPILE_ARGS"], *SANITIZE, "-shared", "-fPIC", f"-I{include}"]
    command += [str(ROOT / "adamw_jax/csrc/fused_adamw.cc"), "-o", str(output)]
    subprocess.run(command, check=True)
    return output


def sanitizer_env(site: Path) -> dict[str, str]:
    """The environment of a run against the sanitized package in ``site``."""
    # The C++ runtime is preloaded after the sanitizer's, so that the sanitizer finds the
    # exception functions it intercepts (Python itself is C and does not load them).
    runtimes = [
        subprocess.run(
            ["g++", f"-print-file-name={library}"], check=True, capture_output=True, text=True
        ).stdout.strip()
        for library in ("libasan.so", "libstdc++.so")
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "tests")])
    env["LD_PRELOAD"] = " ".join(runtimes)
    # Python's own allocations are not the kernel's: leak reports off; any error aborts.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


CHECK = (
    "import adamw_jax, sys; from adamw_jax import fused; "
    "assert adamw_jax.__file__.startswith(sys.argv[1]), adamw_jax.__file__; "
    "assert fused.kernel_available(), 'the sanitized kernel does not load'; "
    "print('sanitized kernel:', fused._extension()._name)"
)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="adamw_jax_sanitize_") as tmp:
        site = Path(tmp)
        try:
            build(site / "adamw_jax")
        except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
            print(f"the sanitized kernel did not build: {err}", file=sys.stderr)
            return 1
        env = sanitizer_env(site)
        check = subprocess.run([sys.executable, "-c", CHECK, str(site)], env=env, cwd=tmp)
        if check.returncode:
            return 1
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        pytest += ["--rootdir", str(ROOT), str(ROOT / "tests" / "test_fused.py"), *argv]
        return subprocess.run(pytest, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
