"""``python benchmarks/step_time.py --quick`` runs and reports every column for every tree."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

JAX_ROWS = (
    "bandwidth probe",
    "adamw_jax.adamw (Optax protocol)",
    "adamw_jax.adamw packed (Optax protocol)",
    "adamw_jax.fused_adamw",
    "adamw_jax.fused_adamw (Optax protocol)",
    "optax.adamw",
)
TORCH_ROWS = ("torch AdamW foreach=False", "torch AdamW foreach=True", "torch AdamW fused=True")
FIELDS = (
    "median_ms",
    "min_ms",
    "max_ms",
    "ratio_to_optax",
    "percent_of_limit",
    "compile_s",
    "peak_mb",
    "note",
    "times_ms",
)


@pytest.fixture
def benchmark(monkeypatch):
    """``benchmarks/step_time.py``, imported with its folder on ``sys.path`` (as it runs)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("step_time")


def test_quick_run_prints_and_writes_every_column(benchmark, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert benchmark.main(["--quick", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| contender") == len(benchmark.TREES)
    for line in printed.splitlines():
        if line.startswith("| contender"):
            assert [c.strip() for c in line.strip("|").split("|")] == list(benchmark.COLUMNS)
    record = json.loads(path.read_text())
    assert [t["tree"] for t in record["trees"]] == list(benchmark.TREES)
    for tree in record["trees"]:
        assert tree["params"] > 0 and tree["leaves"] >= 1 and tree["probe_gb_per_s"] > 0
        assert tree["title"] in printed
        if tree["tree"] == "gpt":  # labelled from the tree run, not the full-size one
            assert tree["title"] == f"GPT-like, {tree['leaves']} leaves" != "GPT-like, 196 leaves"
        names = [r["contender"] for r in tree["rows"]]
        has_torch = importlib.util.find_spec("torch") is not None
        assert names == [*JAX_ROWS, *(TORCH_ROWS if has_torch else ())]
        for row in tree["rows"]:
            assert set(FIELDS) <= set(row)
            assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            assert len(row["times_ms"]) == record["setup"]["rounds"]
            assert row["ratio_to_optax"] > 0 and row["percent_of_limit"] > 0
            assert row["contender"] in printed
        for row in tree["rows"][: len(JAX_ROWS)]:
            assert row["compile_s"] > 0 and row["peak_mb"] >= 0
        optax_row = tree["rows"][JAX_ROWS.index("optax.adamw")]
        assert optax_row["ratio_to_optax"] == 1.0
        # the probe is built from the kernel's source and flags: both run in C++, or neither
        notes = {row["contender"]: row["note"] for row in tree["rows"]}
        native_probe = notes["bandwidth probe"] == "C++ same-pattern probe"
        assert native_probe == (notes["adamw_jax.fused_adamw"] == "C++ kernel")


def test_bad_arguments_are_refused(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--scale", "0"])
    assert "--scale" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_as_a_script():
    """From the command line, where the contenders come from the script's own folder."""
    root = str(BENCHMARKS.parent)  # adamw_jax importable even when not installed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_time.py"), "--scale", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert "usage: python benchmarks/step_time.py" in done.stderr
    assert "--scale must be > 0" in done.stderr
