"""The paper-reproduction notebooks: each runs without error in small mode, and the committed
copies hold complete full-size outputs."""

from __future__ import annotations

import pathlib

import pytest

pytestmark = pytest.mark.slow  # the notebooks executed end to end

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = [
    "01_decoupled_vs_l2.ipynb",
    "02_decay_coupling_and_schedules.ipynb",
    "03_why_l2_is_not_weight_decay.ipynb",
    "04_pytorch_parity.ipynb",
    "05_oscillation_and_nonconvergence.ipynb",
    "06_weight_decay_across_scale.ipynb",
]


def _code_outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_holds_full_size_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("execution_count") is not None, f"{name}: code cell {i} was not run"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: code cell {i} holds an error: {errors[0].get('evalue')}"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}: cells not run top to bottom once"
    n_plots = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert n_plots >= 1, f"{name} holds no plot"
    text = _code_outputs_text(nb)
    assert "small mode" not in text, f"{name} was committed with small-mode outputs"
    assert "PLACEHOLDER" not in "".join(c.source for c in nb.cells)


@pytest.fixture(scope="module")
def notebook_compilation_cache(tmp_path_factory):
    """A directory for JAX's persistent compilation cache, shared by the notebooks' kernels."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_small_mode(name, monkeypatch, notebook_compilation_cache):
    if name == "04_pytorch_parity.ipynb":
        pytest.importorskip("torch")  # the [torch] extra; installed by [all] and in CI
    monkeypatch.setenv("ADAMW_JAX_NOTEBOOK_SMALL", "1")
    # A program the kernel builds again (a new closure over the same computation, one an
    # earlier notebook compiled) is loaded from JAX's persistent cache, not compiled again.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(notebook_compilation_cache))
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    text = _code_outputs_text(nb)
    assert "small mode" in text, f"{name} did not switch to small mode"
