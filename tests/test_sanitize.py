"""The fused kernel under AddressSanitizer and UndefinedBehaviorSanitizer (slow tier)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fused_tests_run_clean_against_the_sanitized_kernel():
    """tests/sanitize_kernel.py: builds the kernel with -fsanitize=address,undefined and
    runs the kernel's tests of tests/test_fused.py against it (every storage, odd, empty
    and one-element leaves, 64 and 65 leaves, bad buffers, the NumPy reference); a
    sanitizer report aborts the run. Under the sanitizer the whole file takes over ten
    minutes here: ``python tests/sanitize_kernel.py`` alone runs all of it."""
    kernel_tests = "edge_leaf_sizes or kernel_refuses_bad_buffers or kernel_matches_numpy"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sanitize_kernel.py"), "-k", kernel_tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "sanitized kernel:" in result.stdout, output[-6000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, output[-6000:]
    assert "ERROR: AddressSanitizer" not in output and "runtime error:" not in output
