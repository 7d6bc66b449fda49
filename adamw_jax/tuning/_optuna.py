"""Bayesian optimization with Optuna (an optional extra), each batch of trials one population."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from adamw_jax import _validate
from adamw_jax.tuning._population import Train
from adamw_jax.tuning._results import Results
from adamw_jax.tuning._space import LinearRange, LogRange
from adamw_jax.tuning._sweep import Evaluator, check_fixed


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
) -> Results:
    r"""Bayesian optimization with Optuna, each batch of trials trained as one population.

    Optuna's ask-and-tell interface proposes ``batch`` trials, :func:`sweep` trains them
    together, and their seed-averaged ``metric`` is told back (a failed member — a NaN or
    infinite metric — is told as a failed trial); repeated until ``n_trials`` are done.
    Larger batches use the population better and the sampler's model less often.

    Args:
      train: as for :func:`sweep`; ``hparams`` holds the names of ``space`` and ``fixed``.
      space: name -> :func:`log_range` or :func:`linear_range`.
      n_trials: configurations to evaluate, an int in [1, inf).
      batch: trials proposed and trained together, an int in [1, inf).
      key: as for :func:`sweep`; it also seeds the sampler (when one is named), so a
        search is reproducible.
      metric: the metric to optimize, one of ``train``'s.
      mode: ``"min"`` (default) or ``"max"``.
      sampler: ``None`` or ``"tpe"`` (Optuna's TPE), ``"gp"`` (Optuna's Gaussian-process
        sampler, which needs PyTorch and SciPy), or any ``optuna.samplers.BaseSampler``.
      fixed: other hyperparameters, the same for every trial.
      seeds: seeds per trial, an int in [1, inf).
      members_per_call: as for :func:`sweep`.
      mesh: as for :func:`sweep`.
      progress: a bar per batch, as for :func:`sweep`.

    Returns:
      :class:`Results` of every trial, in order.

    Raises:
      ImportError: when Optuna is not installed (``pip install 'adamw_jax[tune]'``).
    """
    optuna = _import_optuna()
    distributions = _distributions(optuna, space)
    _validate.check_int("n_trials", n_trials, low=1)
    _validate.check_int("batch", batch, low=1)
    _validate.check_choice("mode", mode, ("min", "max"))
    fixed = check_fixed(fixed, tuple(space))
    evaluate = Evaluator(
        train,
        key=key,
        seeds=seeds,
        members_per_call=members_per_call,
        mesh=mesh,
        progress=progress,
    )
    study = optuna.create_study(
        direction="minimize" if mode == "min" else "maximize",
        sampler=_sampler(optuna, sampler, key),
    )
    done = 0
    while done < n_trials:
        trials = [study.ask(distributions) for _ in range(min(batch, n_trials - done))]
        scores = evaluate([{**fixed, **trial.params} for trial in trials]).mean(metric)
        for trial, score in zip(trials, scores, strict=True):
            if np.isfinite(score):
                study.tell(trial, float(score))
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        done += len(trials)
    return evaluate.results()
