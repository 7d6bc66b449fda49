"""Bayesian optimization with Optuna (an optional extra), each batch of trials one population."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from adamw_jax import _validate
from adamw_jax.tuning import _population, _storage, _study
from adamw_jax.tuning._population import Train
from adamw_jax.tuning._results import Results
from adamw_jax.tuning._space import LinearRange, LogRange
from adamw_jax.tuning._sweep import Evaluator, check_fixed, identify


def _import_optuna() -> Any:
    try:
        import optuna  # an optional extra
    except ImportError as err:
        raise ImportError(
            "optuna_search needs Optuna, an optional extra: pip install 'adamw_jax[tune]' "
            "(or pip install optuna)."
        ) from err
    return optuna


def _sampler(optuna: Any, sampler: Any, key: jax.Array) -> Any:
    """The sampler asked for, seeded from ``key`` when the name of one is given."""
    seed = int(jax.random.randint(jax.random.fold_in(key, 1), (), 0, 2**31 - 1))
    if sampler is None or sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if isinstance(sampler, str) or not isinstance(sampler, optuna.samplers.BaseSampler):
        raise ValueError(
            f"sampler must be None, 'tpe', 'gp' or an optuna.samplers.BaseSampler; got {sampler!r}."
        )
    return sampler


def _distributions(optuna: Any, space: Any) -> dict[str, Any]:
    if not isinstance(space, Mapping) or not space:
        raise TypeError(
            "space must be a non-empty dict name -> tuning.log_range(...) or "
            f"tuning.linear_range(...); got {space!r}."
        )
    out = {}
    for name, bounds in space.items():
        if not isinstance(bounds, (LogRange, LinearRange)):
            raise TypeError(
                f"space[{name!r}] must be tuning.log_range(low, high) or "
                f"tuning.linear_range(low, high); got {bounds!r}."
            )
        out[name] = optuna.distributions.FloatDistribution(
            bounds.low, bounds.high, log=isinstance(bounds, LogRange)
        )
    return out


def optuna_search(
    train: Train,
    space: Mapping[str, LogRange | LinearRange],
    *,
    n_trials: int,
    batch: int,
    key: jax.Array,
    metric: str,
    mode: str = "min",
    sampler: Any = None,
    fixed: Mapping[str, float] | None = None,
    seeds: int = 1,
    members_per_call: int | None = None,
    mesh: Mesh | None = None,
    progress: bool | None = None,
    storage: str | os.PathLike | None = None,
    study_name: str | None = None,
    heartbeat_interval: int = 30,
    grace_period: int | None = None,
) -> Results:
    r"""Bayesian optimization with Optuna, each batch of trials trained as one population.

    Optuna's ask-and-tell interface proposes ``batch`` trials, :func:`sweep` trains them
    together, and their seed-averaged ``metric`` is told back (a failed member — a NaN or
    infinite metric — is told as a failed trial); repeated until the study holds
    ``n_trials``. Larger batches use the population better and the sampler's model less
    often.

    **A study in a storage.** With ``storage`` the study (``study_name``) lives in Optuna's
    own storage: a file path is a journal file (no server), a database URL
    (``postgresql://...``, ``sqlite:///...``) a database. Calling again continues the
    study (a warm start: the sampler sees every stored trial), and ``n_trials`` counts the
    study's trials, so a search killed half-way ends, once called again, with exactly
    ``n_trials``. Trials a dead process left running are failed once their heartbeat is
    ``grace_period`` seconds old and their parameters are tried again. Several processes
    (on several machines, each with its own devices) given the same storage and
    ``study_name`` share the budget: each asks only what is left, and none trains a
    trial another holds. The study opens in ``optuna-dashboard <storage>`` and in
    ``optuna.load_study(study_name=..., storage=...)``.

    Args:
      train: as for :func:`sweep`; ``hparams`` holds the names of ``space`` and ``fixed``.
      space: name -> :func:`log_range` or :func:`linear_range`.
      n_trials: the study's trials, an int in [1, inf): this call asks only those missing.
      batch: trials proposed and trained together, an int in [1, inf).
      key: as for :func:`sweep`; it also seeds the sampler (when one is named), so a
        search in memory is reproducible (a stored one adds the process's own entropy,
        so that processes sharing or continuing a study propose different trials).
      metric: the metric to optimize, one of ``train``'s.
      mode: ``"min"`` (default) or ``"max"``.
      sampler: ``None`` or ``"tpe"`` (Optuna's TPE), ``"gp"`` (Optuna's Gaussian-process
        sampler, which needs PyTorch and SciPy), or any ``optuna.samplers.BaseSampler``.
      fixed: other hyperparameters, the same for every trial.
      seeds: seeds per trial, an int in [1, inf).
      members_per_call: as for :func:`sweep`.
      mesh: as for :func:`sweep`.
      progress: a bar per batch, as for :func:`sweep`.
      storage: None (the study lives in memory), a journal file's path, or a database
        URL (the database's driver installed: ``pip install 'adamw_jax[tune]'`` has
        PostgreSQL's). An unreachable database fails fast, naming ``storage``.
      study_name: the study's name in ``storage``, a non-empty str (needed with one).
      heartbeat_interval: seconds between a running trial's heartbeats, an int in
        [1, inf).
      grace_period: seconds without a heartbeat after which a running trial is taken for
        dead, an int in [1, inf), or None: twice ``heartbeat_interval``.

    Returns:
      :class:`Results` of every trial of the study evaluated so far, by any process, in
      the order the trials were asked (each trial's metrics for every seed).

    Raises:
      ImportError: when Optuna is not installed (``pip install 'adamw_jax[tune]'``).
    """
    optuna = _import_optuna()
    distributions = _distributions(optuna, space)
    _validate.check_int("n_trials", n_trials, low=1)
    _validate.check_int("batch", batch, low=1)
    _validate.check_choice("mode", mode, ("min", "max"))
    _validate.check_int("heartbeat_interval", heartbeat_interval, low=1)
    grace = 2 * int(heartbeat_interval) if grace_period is None else grace_period
    _validate.check_int("grace_period", grace, low=1)
    fixed = check_fixed(fixed, tuple(space))
    if storage is not None and (not isinstance(study_name, str) or not study_name):
        raise ValueError(f"study_name must be a non-empty str with a storage; got {study_name!r}.")
    evaluate = Evaluator(
        train,
        key=key,
        seeds=seeds,
        members_per_call=members_per_call,
        mesh=mesh,
        progress=progress,
        storage=None,
        search=None,
        metric=metric,
    )
    identity = _identity(train, space, fixed, metric, mode, evaluate)
    with _quiet(optuna):
        study = _open_study(
            optuna, storage, study_name, mode, sampler, key, identity, grace, heartbeat_interval
        )
        while True:
            trials = _ask(optuna, study, distributions, n_trials, batch, grace)
            if trials is None:
                break
            if trials:
                _evaluate(optuna, study, trials, fixed, metric, evaluate, heartbeat_interval)
    results = _study_results(optuna, study, fixed)
    return dataclasses.replace(results, wall_time=sum(p.wall_time for p in evaluate.parts))


def _identity(train, space, fixed, metric, mode, evaluate) -> dict[str, Any]:
    """What a stored study must have been searching: checked by name before anything runs.

    Tracing ``train`` here (at the low end of every range) also checks its names."""
    config = {**fixed, **{name: bounds.low for name, bounds in space.items()}}
    pop = _population.population([config], evaluate.key, evaluate.seeds)
    fingerprint, _ = identify(train, pop, (metric,))
    return {
        "space": {k: [type(v).__name__, v.low, v.high] for k, v in space.items()},
        "fixed": fixed,
        "metric": metric,
        "mode": mode,
        "seeds": evaluate.seeds,
        "key": np.asarray(pop.key_data).tolist(),
        "train": fingerprint,
    }


@contextlib.contextmanager
def _quiet(optuna: Any) -> Iterator[None]:
    """Optuna's info log (a line per study and trial) off within the call, then restored."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            # The heartbeat and the retry of dead trials are Optuna's "experimental"
            # features, and meant for Study.optimize, which an ask-and-tell loop is not.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _open_study(optuna, storage, study_name, mode, sampler, key, identity, grace, interval):
    opened = _study.open_storage(optuna, storage, interval, grace)
    direction = "minimize" if mode == "min" else "maximize"
    if storage is not None:
        # Processes sharing a study, or continuing it, must not draw the same proposals:
        # a stored study's sampler is seeded from the key and this process's own entropy.
        key = jax.random.fold_in(key, int.from_bytes(os.urandom(4), "little") >> 1)
    study = optuna.create_study(
        storage=opened,
        study_name=study_name,
        direction=direction,
        sampler=_sampler(optuna, sampler, key),
        load_if_exists=storage is not None,
    )
    stored = study.user_attrs.get(_study.SEARCH)
    if stored is None:
        study.set_user_attr(_study.SEARCH, identity)
    elif stored != json.loads(json.dumps(identity)):
        differ = [k for k in identity if stored.get(k) != json.loads(json.dumps(identity[k]))]
        raise ValueError(
            f"storage {os.fspath(storage)!r} holds a study {study_name!r} of another search: "
            + "; ".join(_storage.difference(k, stored.get(k), identity[k]) for k in differ)
            + ". Pass another study_name for a new search."
        )
    return study


def _ask(optuna, study, distributions, n_trials, batch, grace) -> list[Any] | None:
    """This process's next trials ([] to wait for other processes), or None when the
    study holds ``n_trials`` and none is running.

    Trial numbers are given out by the storage one by one: a trial is within the budget
    when fewer than ``n_trials`` counted trials have a lower number, which no other
    process can change afterwards; one beyond it is told failed untrained."""
    _study.fail_stale(optuna, study, grace)
    counted = [t for t in study.get_trials(deepcopy=False) if _study.counts(optuna, t)]
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in counted)
    room = n_trials - len(counted) + waiting
    if room <= 0:
        if any(t.state == optuna.trial.TrialState.RUNNING for t in counted):
            time.sleep(1.0)  # another process (or a dead one's stale trial) is running
            return []
        return None
    asked = [study.ask(distributions) for _ in range(min(batch, room))]
    numbers = sorted(t.number for t in study.get_trials(deepcopy=False) if _study.counts(optuna, t))
    keep = []
    for trial in asked:
        if sum(n < trial.number for n in numbers) < n_trials:
            keep.append(trial)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return keep


def _evaluate(optuna, study, trials, fixed, metric, evaluate, interval) -> None:
    """Trains the trials as one population and tells each its seed-averaged metric."""
    configs = [{**fixed, **trial.params} for trial in trials]
    with _study.heartbeats(optuna, study, trials, interval):
        part = evaluate(configs)
    scores = part.mean(metric)
    for c, (trial, score) in enumerate(zip(trials, scores, strict=True)):
        values = {k: v[c].tolist() for k, v in part.metrics.items()}
        trial.set_user_attr(_study.METRICS, values)
        if np.isfinite(score):
            study.tell(trial, float(score))
        else:
            trial.set_user_attr(_study.NON_FINITE, True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _study_results(optuna, study, fixed) -> Results:
    """Every evaluated trial of the study, by number, as Results."""
    evaluated = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=evaluated)
        if _study.METRICS in t.user_attrs
        and (t.state == optuna.trial.TrialState.COMPLETE or _study.NON_FINITE in t.user_attrs)
    ]
    done.sort(key=lambda t: t.number)
    names = list(done[0].user_attrs[_study.METRICS]) if done else []
    return Results(
        configs=[{**fixed, **t.params} for t in done],
        metrics={
            k: np.asarray([t.user_attrs[_study.METRICS][k] for t in done], np.float64)
            for k in names
        },
    )
