"""The fused kernel under AddressSanitizer and UndefinedBehaviorSanitizer (slow tier)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fused_tests_run_clean_against_the_sanitized_kernel():
    """tests/sanitize_kernel.py: builds the kernel with -fsanitize=address,undefined and
    runs tests/test_fused.py against it; a sanitizer report aborts the run."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sanitize_kernel.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "sanitized kernel:" in result.stdout, output[-6000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, output[-6000:]
    assert "ERROR: AddressSanitizer" not in output and "runtime error:" not in output
