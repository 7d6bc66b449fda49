"""docs/parity.md against ``benchmarks/parity.py``: every figure of the page, measured again.

The page's table is parsed; each of its rows is the comparison of the same name in the
script, run again here. A figure of the page is a bound within a factor of 10 both ways:
the comparison fails if it measures more than 10 times the page's figure (adamw_jax moved
away from what it reproduces) or less than a tenth of it (the page went stale). A float64
figure at or below the row's floor (rounding) may shrink but not grow past 10 times the
floor; a ``0`` (bitwise equal) must stay exactly 0. With ``ADAMW_JAX_REQUIRE_PARITY=1`` a
missing torch or keras fails these tests instead of skipping them, as in ``test_compat.py``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
from _helpers import least_squares

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "parity.md"
HEADER = "| Reproduces | adamw_jax call | float64 | float32 | float64 floor |"
FACTOR = 10.0
REQUIRE_PARITY = os.environ.get("ADAMW_JAX_REQUIRE_PARITY") == "1"


def page_rows() -> dict[str, tuple[str, list[float]]]:
    """The page's table: per implementation, its call and its three figures."""
    lines = PAGE.read_text().splitlines()
    start = lines.index(HEADER) + 2  # past the header and its rule
    rows = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        reproduces, call, *figures = (cell.strip() for cell in line.strip("| ").split(" | "))
        rows[reproduces] = (call, [float(x) for x in figures])
    return rows


def _parity_script():
    """``benchmarks/parity.py`` as a module; skips (or fails) without torch or keras."""
    for name in ("torch", "keras"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            if REQUIRE_PARITY:
                pytest.fail(f"ADAMW_JAX_REQUIRE_PARITY=1 but {name} cannot be imported: {err}")
            pytest.skip(f"{name} is not installed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("parity")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


os.environ.setdefault("KERAS_BACKEND", "jax")
ROWS = page_rows()


@pytest.fixture(scope="module")
def comparisons():
    """The script's comparisons, built once: those making the same adamw_jax call share its
    compiled runs (as in one run of the script)."""
    return _parity_script().comparisons()


def test_the_page_has_every_comparison_of_the_script(comparisons):
    names = [c.reproduces for c in comparisons]
    assert names == list(ROWS)
    for comparison in comparisons:
        assert ROWS[comparison.reproduces][0] == comparison.call


@pytest.mark.parametrize("reproduces", list(ROWS))
def test_each_figure_is_measured_within_a_factor_of_10(reproduces, comparisons):
    parity = _parity_script()
    comparison = next(c for c in comparisons if c.reproduces == reproduces)
    row = parity.measure_one(comparison, least_squares())
    measured, page = [row.float64, row.float32, row.floor], ROWS[reproduces][1]
    print(f"\n{reproduces}: measured {measured}, page {page}")
    floor = page[2]
    for column, got, stated in zip(("float64", "float32", "floor"), measured, page, strict=True):
        if stated == 0:
            assert got == 0, f"{column}: the page says bitwise equal, measured {got:.1e}"
        elif column == "float64" and stated <= floor:  # rounding: it may shrink, not grow
            assert got <= FACTOR * floor, f"{column}: {got:.1e} vs the floor {floor}"
        else:
            assert stated / FACTOR <= got <= FACTOR * stated, f"{column}: {got:.1e} vs {stated}"
