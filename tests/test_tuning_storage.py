"""adamw_jax.tuning's storages: a killed sweep resumes bitwise, several processes share
one, another call's storage is refused by name; Results load back what they save; the
heatmap draws the seed means; train's names are checked before anything compiles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import elementwise_train

from adamw_jax import tuning
from adamw_jax.tuning import _population

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_storage_worker.py"
KEY = jax.random.key(7)
sys.path.insert(0, str(TESTS))
import _storage_worker  # noqa: E402


def _records(path: Path) -> list[dict]:
    """The storage's whole member lines (a torn one left out)."""
    lines = path.read_bytes().split(b"\n")[1:-1]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in out if "member" in r]


def _grid():
    return tuning.grid(learning_rate=[0.01, 0.1, 0.3], weight_decay=[0.0, 0.5])


# ------------------------------------------------------------------ resuming in process
def test_rerun_on_a_torn_storage_trains_only_the_missing_members(tmp_path, monkeypatch):
    train = elementwise_train(20)
    plain = tuning.sweep(train, _grid(), key=KEY, seeds=2, progress=False)
    full = tmp_path / "full.jsonl"
    tuning.sweep(train, _grid(), key=KEY, seeds=2, progress=False, storage=full)
    lines = full.read_bytes().split(b"\n")
    assert len(lines) == 1 + 12 + 1  # header, 12 members, the final newline's empty tail
    # A process killed after 4 members, in the middle of the 5th one's line.
    storage = tmp_path / "killed.jsonl"
    storage.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:40])
    before = storage.read_bytes()
    calls = []
    real_run = _population.run
    monkeypatch.setattr(_population, "run", lambda *a: calls.append(len(a[1].seed)) or real_run(*a))
    resumed = tuning.sweep(train, _grid(), key=KEY, seeds=2, progress=False, storage=storage)
    monkeypatch.undo()
    assert calls == [1] * 8  # the 8 missing members, one compiled member each
    after = storage.read_bytes()
    assert after.startswith(before)  # nothing written is rewritten
    assert after[len(before) : len(before) + 1] == b"\n"  # the torn line is closed, ignored
    assert len(_records(storage)) == 12
    assert _records(storage) == _records(full)  # the 5th member recorded again, whole
    assert resumed.configs == plain.configs
    for name in plain.metrics:
        np.testing.assert_array_equal(resumed.metrics[name], plain.metrics[name])
    again = tuning.sweep(train, _grid(), key=KEY, seeds=2, progress=False, storage=storage)
    assert storage.read_bytes() == after  # complete: nothing trained or written again
    np.testing.assert_array_equal(again.metrics["loss"], plain.metrics["loss"])


def test_vmapped_chunks_resume_bitwise(tmp_path):
    """A restart trains whole chunks with the uninterrupted run's boundaries and padding."""
    train = _storage_worker.logged(elementwise_train(20), tmp_path / "log")
    kwargs = {"key": KEY, "seeds": 2, "members_per_call": 4, "progress": False}
    plain = tuning.sweep(train, _grid(), **kwargs)
    storage = tmp_path / "s.jsonl"
    tuning.sweep(train, _grid(), storage=storage, **kwargs)
    lines = storage.read_bytes().split(b"\n")
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(lines[:7]) + b"\n")  # header, the first chunk, 2 of the next
    resumed = tuning.sweep(train, _grid(), storage=cut, **kwargs)
    np.testing.assert_array_equal(resumed.metrics["loss"], plain.metrics["loss"])
    assert len(_records(cut)) == 12


@pytest.fixture(scope="module")
def written_storage(tmp_path_factory):
    """A sweep's arguments and the storage it wrote, made once: each refusal test below
    offers its own changed call a copy of it."""
    storage = tmp_path_factory.mktemp("written") / "s.jsonl"
    args = {"train": elementwise_train(20), "configs": _grid(), "key": KEY, "seeds": 2}
    tuning.sweep(**args, progress=False, storage=storage)
    return args, storage.read_bytes()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"configs": _grid()[:5]}, r"configs.*stored 6 entries, now 5"),
        ({"configs": _grid()[::-1]}, r"search\['configs'\]\[0\]"),
        ({"train": elementwise_train(21)}, "train .its computation"),
        ({"seeds": 3}, "seeds differ"),
        ({"key": jax.random.key(8)}, "key differ"),
        ({"members_per_call": 2}, "members_per_call differ"),
    ],
)
def test_a_storage_of_another_call_is_refused_by_name(tmp_path, written_storage, change, named):
    args, before = written_storage
    storage = tmp_path / "s.jsonl"
    storage.write_bytes(before)
    with pytest.raises(ValueError, match=r"storage .* was written by another call: .*" + named):
        tuning.sweep(**{**args, **change}, progress=False, storage=storage)
    assert storage.read_bytes() == before


def test_a_separable_search_storage_refuses_a_sweep_and_other_lines(tmp_path):
    storage = tmp_path / "s.jsonl"
    train = elementwise_train(10)
    kwargs = {"key": KEY, "metric": "loss", "progress": False, "storage": storage}
    a = tuning.separable_search(train, [0.01, 0.1, 0.3], [0.0, 0.5], **kwargs)
    b = tuning.separable_search(train, [0.01, 0.1, 0.3], [0.0, 0.5], **kwargs)
    np.testing.assert_array_equal(a.metrics["loss"], b.metrics["loss"])
    assert len(_records(storage)) == a.evaluations
    with pytest.raises(ValueError, match=r"search\['weight_decay'\]"):
        tuning.separable_search(train, [0.01, 0.1, 0.3], [0.0, 0.4], **kwargs)
    with pytest.raises(ValueError, match=r"search\['function'\]: stored \"separable_search\""):
        tuning.sweep(train, _grid(), key=KEY, progress=False, storage=storage)


@pytest.mark.parametrize(
    ("storage", "error", "match"),
    [
        ("postgresql://localhost/db", ValueError, "storage must be a file path here"),
        (3, TypeError, "storage must be a file path"),
    ],
)
def test_sweep_storage_must_be_a_path(storage, error, match):
    with pytest.raises(error, match=match):
        tuning.sweep(elementwise_train(5), _grid(), key=KEY, storage=storage)


def test_a_file_that_is_no_storage_is_refused(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("lr 0.1 was good\n")
    with pytest.raises(ValueError, match="is not a tuning storage"):
        tuning.sweep(elementwise_train(5), _grid(), key=KEY, progress=False, storage=other)
    assert other.read_text() == "lr 0.1 was good\n"


# ---------------------------------------------------------------- processes: kill, share
def _start(
    mode: str, storage: Path, out: Path, log: Path, barrier: Path | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(storage), str(out), str(log)],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            **({"WORKERS_BARRIER": str(barrier)} if barrier else {}),
        },
    )


def _logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _plain(tmp_path: Path, mode: str):
    train = _storage_worker.logged(elementwise_train(400), tmp_path / "plain.log")
    common = {"key": _storage_worker.KEY, "seeds": 2, "members_per_call": 1, "progress": False}
    if mode == "sweep":
        configs = tuning.grid(learning_rate=_storage_worker.LRS, weight_decay=_storage_worker.WDS)
        return tuning.sweep(train, configs, **common)
    return tuning.separable_search(
        train, _storage_worker.LRS, _storage_worker.WDS, metric="loss", rounds=2, **common
    )


def _assert_matches(out: Path, plain) -> None:
    got = np.load(out)
    np.testing.assert_array_equal(got["lr"], [c["learning_rate"] for c in plain.configs])
    np.testing.assert_array_equal(got["wd"], [c["weight_decay"] for c in plain.configs])
    for name in plain.metrics:
        np.testing.assert_array_equal(got[name], plain.metrics[name])


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_bitwise_training_only_the_missing(tmp_path):
    storage, log = tmp_path / "s.jsonl", tmp_path / "trained.log"
    proc = _start("sweep", storage, tmp_path / "killed.npz", log)
    deadline = time.monotonic() + 240
    try:
        while (len(_records(storage)) if storage.exists() else 0) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    recorded = {(r["member"]["config"]["learning_rate"], r["member"]["config"]["weight_decay"],
                 r["member"]["seed"]) for r in _records(storage)}  # fmt: skip
    assert 5 <= len(recorded) < 24
    before = storage.read_bytes()
    log.unlink()
    final = _start("sweep", storage, tmp_path / "resumed.npz", log)
    output, _ = final.communicate(timeout=240)
    assert final.returncode == 0, output
    assert storage.read_bytes().startswith(before)
    assert len(_logged(log)) == 24 - len(recorded)  # only the missing members trained
    assert len(_records(storage)) == 24
    _assert_matches(tmp_path / "resumed.npz", _plain(tmp_path, "sweep"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sweep", "separable"])
def test_two_processes_share_one_storage_and_train_each_member_once(tmp_path, mode):
    storage = tmp_path / "s.jsonl"
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_start(mode, storage, tmp_path / f"w{i}.npz", logs[i], barrier) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = [_logged(log) for log in logs]
    plain = _plain(tmp_path, mode)
    assert len(trained[0]) + len(trained[1]) == plain.evaluations  # none trained twice
    assert not set(trained[0]) & set(trained[1])
    assert min(len(t) for t in trained) > 0  # both did a share
    for i in range(2):
        _assert_matches(tmp_path / f"w{i}.npz", plain)


# --------------------------------------------------------------------------- load, save
@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_results_load_reads_back_what_save_wrote(tmp_path, suffix):
    def train(h, key):
        loss = h["learning_rate"] * jax.random.uniform(key) + h["weight_decay"] / 3
        return {"loss": jnp.where(h["learning_rate"] > 0.2, jnp.nan, loss), "one": loss * 0 + 1}

    with pytest.warns(RuntimeWarning, match="non-finite"):
        results = tuning.sweep(train, _grid(), key=KEY, seeds=3, progress=False)
    loaded = tuning.Results.load(results.save(tmp_path / f"r{suffix}"))
    assert loaded.configs == results.configs
    assert sorted(loaded.metrics) == sorted(results.metrics)
    for name, values in results.metrics.items():
        assert loaded.metrics[name].tobytes() == values.tobytes() or np.array_equal(
            loaded.metrics[name], values, equal_nan=True
        )
        finite = np.isfinite(values)
        assert loaded.metrics[name][finite].tobytes() == values[finite].tobytes()
    assert [f[:3] for f in loaded.failures] == [f[:3] for f in results.failures]
    assert len(loaded.failures) == 6
    assert loaded.best("loss") == results.best("loss")


def test_results_load_refuses_other_files(tmp_path):
    (tmp_path / "r.txt").write_text("")
    with pytest.raises(ValueError, match=r"path must end in \.csv or \.json"):
        tuning.Results.load(tmp_path / "r.txt")
    (tmp_path / "r.json").write_text("[]")
    with pytest.raises(ValueError, match=r"holds no records written by Results\.save"):
        tuning.Results.load(tmp_path / "r.json")


# ------------------------------------------------------------------------------ heatmap
def _landscape(h, key):
    lr, wd = jnp.log10(h["learning_rate"]), jnp.log10(h["weight_decay"] + 1e-5)
    loss = (lr + 2.0) ** 2 + 0.5 * (wd + 3.0) ** 2 + 0.1 * jax.random.uniform(key)
    return {"loss": jnp.where(h["learning_rate"] > 0.5, jnp.nan, loss)}


def test_heatmap_cells_are_the_seed_means_with_blanks_failures_and_the_best(tmp_path):
    lrs, wds = tuning.log_values(1e-4, 1.0, 5), [0.0, 1e-4, 1e-3, 1e-2]
    configs = tuning.grid(learning_rate=lrs, weight_decay=wds)
    configs = [c for c in configs if not (c["learning_rate"] == 1e-4 and c["weight_decay"] > 0)]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        results = tuning.sweep(_landscape, configs, key=KEY, seeds=2, progress=False)
    ax = results.heatmap("learning_rate", "weight_decay", "loss", path=tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (mesh,) = ax.collections[:1]
    cells = np.ma.filled(mesh.get_array(), np.nan).reshape(len(wds), len(lrs))
    expected = np.full((len(wds), len(lrs)), np.nan)
    for c, config in enumerate(configs):
        i, j = wds.index(config["weight_decay"]), lrs.index(config["learning_rate"])
        expected[i, j] = results.metrics["loss"][c].mean()
    expected[:, -1] = np.nan  # lr 1 failed
    np.testing.assert_allclose(cells, expected, rtol=1e-12)
    assert np.isnan(cells[1:, 0]).all()  # never evaluated: blank
    markers = {c.get_label(): c.get_offsets() for c in ax.collections[1:]}
    best, _ = results.best("loss")
    np.testing.assert_allclose(markers["best"], [[best["learning_rate"], best["weight_decay"]]])
    assert best == {"learning_rate": 1e-2, "weight_decay": 1e-3}
    np.testing.assert_allclose(markers["failed (non-finite)"], [[1.0, w] for w in wds])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "symlog"
    assert ax.get_xlabel() == "learning_rate" and ax.get_ylabel() == "weight_decay"


def test_heatmap_refuses_bad_names_and_shared_cells_and_names_the_extra(monkeypatch):
    configs = [{"learning_rate": 0.1, "weight_decay": 0.0, "b1": b} for b in (0.9, 0.95)]
    results = tuning.sweep(_landscape, configs, key=KEY, progress=False)
    with pytest.raises(KeyError, match=r"y must be one of the hyperparameters \['b1', 'learn"):
        results.heatmap("learning_rate", "wd", "loss")
    with pytest.raises(KeyError, match="metric must be one of"):
        results.heatmap("learning_rate", "weight_decay", "accuracy")
    with pytest.raises(ValueError, match="configurations share the cell"):
        results.heatmap("learning_rate", "weight_decay", "loss")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'adamw_jax\[tune\]'"):
        results.heatmap("learning_rate", "b1", "loss")


# ------------------------------------------------------- checked before anything compiles
def _never_compiled(monkeypatch):
    def refuse(*args):
        raise AssertionError("compiled before the names were checked")

    monkeypatch.setattr(_population, "compile_runner", refuse)


@pytest.mark.parametrize(
    ("search", "match"),
    [
        (lambda t: tuning.sweep(t, [{"learning_rate": 0.1}], key=KEY, progress=False),
         r"hyperparameter 'weight_decay', which no configuration gives; the configurations "
         r"give \['learning_rate'\]"),
        (lambda t: tuning.separable_search(t, [0.1], [0.0], key=KEY, metric="accuracy",
                                           progress=False),
         r"metric must be one of train's metrics \['loss'\]; got 'accuracy'"),
        (lambda t: tuning.separable_search(t, [0.1], [0.0], key=KEY, metric="loss",
                                           fixed={"b2": 0.9}, progress=False),
         r"hyperparameter 'b1', which no configuration gives; the configurations give "
         r"\['b2', 'learning_rate', 'weight_decay'\]"),
        (lambda t: tuning.optuna_search(t, {"learning_rate": tuning.log_range(1e-3, 1.0)},
                                        n_trials=2, batch=2, key=KEY, metric="acc",
                                        fixed={"weight_decay": 0.0}, progress=False),
         r"metric must be one of train's metrics \['loss'\]; got 'acc'"),
    ],
)  # fmt: skip
def test_unknown_names_are_errors_before_compilation(monkeypatch, search, match):
    def train(h, key):
        b1 = h["b1"] if "b2" in h else 0.0
        return {"loss": h["learning_rate"] * h["weight_decay"] + b1}

    _never_compiled(monkeypatch)
    with pytest.raises(KeyError, match=match):
        search(train)


def test_the_bar_shows_compiling_then_the_members(monkeypatch):
    seen = []

    class Bar:
        def __init__(self, total, desc, **kwargs):
            seen.append(("start", desc, total))

        def set_description(self, desc):
            seen.append(("desc", desc))

        def update(self, n):
            seen.append(("update", n))

        def close(self):
            seen.append(("close",))

    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=Bar))
    tuning.sweep(elementwise_train(5), _grid()[:2], key=KEY, progress=True)
    assert seen == [("start", "compiling", 2), ("desc", "sweep"), ("update", 1), ("update", 1),
                    ("close",)]  # fmt: skip
