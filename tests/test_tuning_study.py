"""optuna_search with a storage: warm starts, a study killed with SIGKILL ends with exactly
n_trials complete trials, several processes share one study (a journal file, a PostgreSQL
server started here from its wheel), and bad storages are refused by name."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest

from adamw_jax import tuning
from adamw_jax.tuning import _population

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_study_worker.py"
KEY = jax.random.key(7)
SPACE = {"learning_rate": tuning.log_range(1e-5, 1.0), "weight_decay": tuning.log_range(1e-6, 1.0)}
KWARGS = {"batch": 4, "key": KEY, "metric": "loss", "progress": False}


def _bowl(h, key):
    lr, wd = jnp.log10(h["learning_rate"]), jnp.log10(h["weight_decay"])
    return {"loss": (lr + 2.0) ** 2 + 0.5 * (wd + 3.0) ** 2 + 0.0 * jax.random.uniform(key)}


def _complete(study) -> list:
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_a_second_call_continues_the_stored_study(tmp_path, monkeypatch):
    storage = str(tmp_path / "journal.log")
    first = tuning.optuna_search(_bowl, SPACE, n_trials=6, storage=storage, study_name="s",
                                 **KWARGS)  # fmt: skip
    evaluated = []
    real_run = _population.run
    monkeypatch.setattr(
        _population, "run", lambda *a: evaluated.append(len(a[1].seed)) or real_run(*a)
    )
    second = tuning.optuna_search(_bowl, SPACE, n_trials=10, storage=storage, study_name="s",
                                  **KWARGS)  # fmt: skip
    assert sum(evaluated) == 4  # only the missing trials
    assert second.configs[:6] == first.configs and second.evaluations == 10
    np.testing.assert_array_equal(second.metrics["loss"][:6], first.metrics["loss"])
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))  # fmt: skip
    assert len(_complete(study)) == 10
    assert [t.params for t in _complete(study)] == [
        {k: c[k] for k in SPACE} for c in second.configs
    ]
    np.testing.assert_allclose(
        [t.value for t in _complete(study)], second.mean("loss"), rtol=0, atol=0
    )
    again = tuning.optuna_search(_bowl, SPACE, n_trials=10, storage=storage, study_name="s",
                                 **KWARGS)  # fmt: skip
    assert sum(evaluated) == 4 and again.configs == second.configs  # complete: nothing run


def test_a_sqlite_url_uses_optunas_database_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    tuning.optuna_search(_bowl, SPACE, n_trials=4, storage=url, study_name="db", **KWARGS)
    study = optuna.load_study(study_name="db", storage=url)
    assert len(_complete(study)) == 4


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"space": {**SPACE, "weight_decay": tuning.log_range(1e-6, 0.1)}},
         r"space\['weight_decay'\]\[2\]: stored 1.0, now 0.1"),
        ({"metric": "other"}, "metric: stored \"loss\", now \"other\""),
        ({"fixed": {"b1": 0.8}}, r"fixed\['b1'\]"),
        ({"train": lambda h, k: {**_bowl(h, k), "other": 2 * _bowl(h, k)["loss"]}},
         "train: stored"),
    ],
)  # fmt: skip
def test_a_stored_study_of_another_search_is_refused_by_name(tmp_path, change, named):
    storage = str(tmp_path / "journal.log")
    tuning.optuna_search(_bowl, SPACE, n_trials=2, storage=storage, study_name="s", **KWARGS)
    before = Path(storage).read_bytes()

    def other(h, k):
        return {"loss": _bowl(h, k)["loss"], "other": _bowl(h, k)["loss"] * 0.0}

    args = {"train": _bowl, "space": SPACE, "metric": "loss", **change}
    if "fixed" in change:
        args["train"] = lambda h, k: _bowl(h, k)
    if "metric" in change:
        args["train"] = other
    kwargs = {**KWARGS, "metric": args.pop("metric")}
    with pytest.raises(ValueError, match=r"holds a study 's' of another search: .*" + named):
        tuning.optuna_search(args.pop("train"), args.pop("space"), n_trials=4, storage=storage,
                             study_name="s", **args, **kwargs)  # fmt: skip
    assert Path(storage).read_bytes().startswith(before)  # nothing rewritten
    study = optuna.load_study(study_name="s", storage=_journal(storage))
    assert len(study.trials) == 2 and len(_complete(study)) == 2  # the study is untouched


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"storage": "postgresql://nobody@127.0.0.1:9/none", "study_name": "s"}, ValueError,
         r"storage 'postgresql://nobody@127.0.0.1:9/none' cannot be opened or reached"),
        ({"storage": "nosuchdb://x", "study_name": "s"}, ValueError,
         r"storage 'nosuchdb://x' cannot be opened"),
        ({"storage": 3, "study_name": "s"}, TypeError, "storage must be a file path"),
        ({"storage": "j.log"}, ValueError, "study_name must be a non-empty str"),
        ({"heartbeat_interval": 0}, ValueError, "heartbeat_interval must be in"),
    ],
)  # fmt: skip
def test_bad_storages_are_refused_by_name(kwargs, error, match):
    start = time.monotonic()
    with pytest.raises(error, match=match):
        tuning.optuna_search(_bowl, SPACE, n_trials=2, **KWARGS, **kwargs)
    assert time.monotonic() - start < 60  # not a timing test: a guard against a hang


def test_optunas_log_stays_quiet_within_the_call_and_is_restored(capsys, caplog):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    with caplog.at_level(logging.INFO):
        tuning.optuna_search(_bowl, SPACE, n_trials=4, **KWARGS)
        out, err = capsys.readouterr()
        assert "A new study created" not in out + err + caplog.text
        assert "Trial 0 finished" not in out + err + caplog.text
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        optuna.create_study()  # outside the call, Optuna logs as the user set it
        assert "A new study created in memory" in caplog.text


# ---------------------------------------------------------------------- processes
def _start(
    storage: str, n_trials: int, log: Path, barrier: Path | None = None, hold: int | None = None
) -> subprocess.Popen:
    """The worker; with ``hold``, it stops after training that many members (inside their
    batch, its trials running) until it is killed."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), storage, "shared", str(n_trials), str(log)],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            **({"WORKERS_BARRIER": str(barrier)} if barrier else {}),
            **({"WORKER_HOLD_AFTER": str(hold)} if hold else {}),
        },
    )


def _trained(log: Path) -> list[tuple[float, float]]:
    if not log.exists():
        return []
    return [tuple(float(x) for x in line.split()[:2]) for line in log.read_text().splitlines()]


def _as_f32(trial) -> tuple[float, float]:
    return tuple(float(np.float32(trial.params[k])) for k in ("learning_rate", "weight_decay"))


def _journal(path: str):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


@pytest.mark.slow
def test_a_study_killed_with_sigkill_ends_with_exactly_n_trials(tmp_path):
    path = str(tmp_path / "journal.log")
    log = tmp_path / "trained.log"
    proc = _start(path, 12, log, hold=5)  # held, then killed, in the third batch
    deadline = time.monotonic() + 240
    try:
        while len(_trained(log)) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    study = optuna.load_study(study_name="shared", storage=_journal(path))
    left_running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert left_running  # the kill left a batch running
    final = _start(path, 12, tmp_path / "resumed.log")
    output, _ = final.communicate(timeout=300)
    assert final.returncode == 0, output
    study = optuna.load_study(study_name="shared", storage=_journal(path))
    complete = _complete(study)
    assert len(complete) == 12
    assert len({_as_f32(t) for t in complete}) == 12  # none evaluated twice
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert {t.number for t in failed} == {t.number for t in left_running}  # failed, then
    assert {_as_f32(t) for t in left_running} <= {_as_f32(t) for t in complete}  # retried
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def _two_workers(tmp_path: Path, storage: str, load) -> None:
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_start(storage, 10, log, barrier) for log in logs]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = load()
    complete = _complete(study)
    assert len(complete) == 10  # n_trials counts the study's total
    trained = [_trained(log) for log in logs]
    assert min(len(t) for t in trained) > 0  # both worked
    assert not set(trained[0]) & set(trained[1])  # no configuration trained twice
    assert sorted(trained[0] + trained[1]) == sorted(_as_f32(t) for t in complete)


@pytest.mark.slow
def test_two_processes_share_one_study_in_a_journal_file(tmp_path):
    path = str(tmp_path / "journal.log")
    _two_workers(tmp_path, path, lambda: optuna.load_study(study_name="shared",
                                                           storage=_journal(path)))  # fmt: skip


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server from the pgserver wheel (it runs the server as an unprivileged
    user when the tests run as root), stopped at the end."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.mark.slow
def test_two_processes_share_one_study_in_postgresql(tmp_path, postgres):
    _two_workers(tmp_path, postgres, lambda: optuna.load_study(study_name="shared",
                                                               storage=postgres))  # fmt: skip
