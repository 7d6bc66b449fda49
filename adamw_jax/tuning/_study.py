"""Optuna studies kept in a storage: opening one, keeping its running trials' heartbeats,
failing and retrying the trials of a process that died, and counting a study's budget.

A file path opens Optuna's journal storage (an append-only file, no server); a database
URL (``postgresql://``, ``mysql://``, ``sqlite:///``) its RDB storage. A running trial's
heartbeat is written every ``heartbeat_interval`` seconds (the RDB storage's own
heartbeat, a user attribute in a journal); one silent for ``grace_period`` seconds belongs
to a dead process: it is failed and its parameters are asked again (Optuna's
``RetryHeartbeatStaleTrialCallback``), so they are trained once more, by a live process.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

HEARTBEAT = "adamw_jax.heartbeat"  # a journal trial's last heartbeat, seconds since epoch
METRICS = "adamw_jax.metrics"  # a trial's metrics: name -> one value per seed
SEARCH = "adamw_jax.search"  # the study's search: space, fixed, seeds, key, train
NON_FINITE = "adamw_jax.non_finite"  # set on a trial told FAIL for a non-finite metric
CONNECT_TIMEOUT_S = 10
OPEN_ATTEMPTS = 5


def _is_url(storage: Any) -> bool:
    return isinstance(storage, str) and "://" in storage


def open_storage(optuna: Any, storage: Any, heartbeat_interval: int, grace_period: int) -> Any:
    """An Optuna storage for a file path or a database URL; a ValueError naming
    ``storage`` when it cannot be opened or reached."""
    if storage is None:
        return None
    if not isinstance(storage, (str, os.PathLike)):
        raise TypeError(f"storage must be a file path, a database URL or None; got {storage!r}.")
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return _open(optuna, storage, heartbeat_interval, grace_period)
        except Exception as err:  # the driver's or SQLAlchemy's errors, of every kind
            # Processes creating a database's tables at once race (a duplicate type or
            # table): the loser finds them made when it tries again. Nothing else retries.
            racing = type(err).__name__ in ("IntegrityError", "ProgrammingError")
            if racing and attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise ValueError(
                f"storage {os.fspath(storage)!r} cannot be opened or reached (connect "
                f"timeout {CONNECT_TIMEOUT_S} s): {type(err).__name__}: {err}"
            ) from err
    raise AssertionError("unreachable")


def _open(optuna: Any, storage: Any, heartbeat_interval: int, grace_period: int) -> Any:
    if not _is_url(storage):
        backend = optuna.storages.journal.JournalFileBackend(os.fspath(storage))
        return optuna.storages.JournalStorage(backend)
    timeout = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return optuna.storages.RDBStorage(
        storage,
        engine_kwargs=timeout if storage.startswith(("postgresql", "mysql")) else None,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=None
        ),
    )


def fail_stale(optuna: Any, study: Any, grace_period: int) -> None:
    """Fails the running trials whose heartbeat stopped, and asks their parameters again."""
    storage = study._storage
    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
        return
    now = time.time()
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # A retried trial carries its predecessor's attributes: its own start counts too.
        beat = max(trial.user_attrs.get(HEARTBEAT, 0.0), trial.datetime_start.timestamp())
        if now - beat > grace_period:
            try:
                failed = storage.set_trial_state_values(
                    trial._trial_id, state=optuna.trial.TrialState.FAIL
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process failed it first
            if failed:
                retry(study, storage.get_trial(trial._trial_id))


@contextlib.contextmanager
def heartbeats(optuna: Any, study: Any, trials: list[Any], interval: int) -> Iterator[None]:
    """Writes the trials' heartbeats every ``interval`` seconds while the block runs."""
    storage = study._storage
    if storage is None or isinstance(storage, optuna.storages.InMemoryStorage):
        yield
        return
    rdb = isinstance(storage, optuna.storages.RDBStorage)
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                if rdb:
                    storage.record_heartbeat(trial._trial_id)
                else:
                    storage.set_trial_user_attr(trial._trial_id, HEARTBEAT, time.time())
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="adamw_jax heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def counts(optuna: Any, trial: Any) -> bool:
    """Whether a trial counts toward ``n_trials``: evaluated (complete, or failed with a
    non-finite metric), being evaluated, or waiting to be. A trial failed because its
    process died, or asked beyond the budget, does not count."""
    state = trial.state
    if state == optuna.trial.TrialState.FAIL:
        return NON_FINITE in trial.user_attrs
    return state in (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.RUNNING,
        optuna.trial.TrialState.WAITING,
    )
