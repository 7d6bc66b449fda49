r"""Choosing the learning rate and weight decay.

AdamW's result depends above all on two numbers, the learning rate :math:`\eta` and the
weight decay :math:`\lambda`. This module trains many configurations as one population and
offers three ways to choose which:

* :func:`sweep` trains a list of configurations (:func:`grid` builds a full grid), each with
  one or more seeds, in vmapped chunks or one compiled member at a time, optionally with the
  member axis split over the devices of a mesh;
* :func:`separable_search` uses the decoupling paper's observation that with decoupled weight
  decay the best :math:`\lambda` hardly moves with :math:`\eta`: it searches the learning
  rate at a fixed decay, then the decay at the best learning rate — two lines instead of a
  plane;
* :func:`optuna_search` runs Bayesian optimization (Optuna's TPE, or GP) with each batch of
  trials evaluated as one population;

and :func:`suggest_weight_decay` gives a starting :math:`\lambda` from the EMA view of weight
decay, with no training at all.

The training run is the user's: ``train(hparams, key)`` takes a dict of float32 scalars
(traced: every hyperparameter of :func:`adamw_jax.adamw` that can be an array — learning
rate or a schedule's peak, weight decay, ``b1``, ``b2``, ``eps`` — can vary between
members) and a PRNG key, runs a whole training (``lax.scan`` or ``fori_loop``), and returns
a dict of scalar metrics. Optax's schedules refuse a traced peak;
:func:`scale_schedule` and :func:`warmup_cosine` build one.

Example:
  >>> import jax, jax.numpy as jnp, optax, adamw_jax
  >>> from adamw_jax import tuning
  >>> def train(hparams, key):
  ...     tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=hparams["weight_decay"])
  ...     w = jax.random.normal(key, (4,))
  ...     def step(carry, _):
  ...         w, state = carry
  ...         g = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2))(w)
  ...         u, state = tx.update(g, state, w)
  ...         return (optax.apply_updates(w, u), state), None
  ...     (w, _), _ = jax.lax.scan(step, (w, tx.init(w)), None, length=50)
  ...     return {"loss": jnp.sum((w - 1.0) ** 2)}
  >>> configs = tuning.grid(learning_rate=tuning.log_values(1e-3, 1e-1, 3),
  ...                       weight_decay=[0.0, 0.1])
  >>> results = tuning.sweep(train, configs, key=jax.random.key(0), progress=False)
  >>> best_config, best_metrics = results.best("loss")
  >>> best_config["learning_rate"]
  0.1

References:
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset size",
  ICML 2025 (arXiv:2405.13698).
  Bergsma et al., "Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
  Pre-training", 2025 (arXiv:2505.13738).
  Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD 2019.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import pathlib
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from adamw_jax import _population, _validate, schedules

__all__ = [
    "Failure",
    "LinearRange",
    "LogRange",
    "Results",
    "as_hparams",
    "grid",
    "linear_range",
    "linear_values",
    "log_range",
    "log_values",
    "optuna_search",
    "scale_schedule",
    "seed_keys",
    "separable_search",
    "suggest_weight_decay",
    "sweep",
    "warmup_cosine",
]

Train = _population.Train
Config = dict[str, float]


# ------------------------------------------------------------------------ search spaces
class LogRange(NamedTuple):
    """A continuous range searched on a log scale: ``low <= x <= high``, ``0 < low``."""

    low: float
    high: float


class LinearRange(NamedTuple):
    """A continuous range searched on a linear scale: ``low <= x <= high``."""

    low: float
    high: float


def _check_bounds(low: Any, high: Any, *, positive: bool) -> tuple[float, float]:
    floor = 0.0 if positive else -math.inf
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a real number; got {value!r}.")
        if not math.isfinite(value) or value <= floor:
            accepted = "(0, inf)" if positive else "(-inf, inf)"
            raise ValueError(f"{name} must be a finite number in {accepted}; got {value!r}.")
    if not low < high:
        raise ValueError(f"low must be smaller than high; got low={low!r}, high={high!r}.")
    return float(low), float(high)


def log_range(low: float, high: float) -> LogRange:
    """A log-scale range for :func:`optuna_search`.

    Args:
      low: the smallest value, in (0, inf).
      high: the largest value, in (low, inf).
    """
    return LogRange(*_check_bounds(low, high, positive=True))


def linear_range(low: float, high: float) -> LinearRange:
    """A linear-scale range for :func:`optuna_search`.

    Args:
      low: the smallest value, a finite real.
      high: the largest value, in (low, inf).
    """
    return LinearRange(*_check_bounds(low, high, positive=False))


def log_values(low: float, high: float, num: int) -> list[float]:
    """``num`` values evenly spaced on a log scale from ``low`` to ``high``, both included.

    Args:
      low: the first value, in (0, inf).
      high: the last value, in (low, inf).
      num: how many values, an int in [2, inf).

    Example:
      >>> from adamw_jax import tuning
      >>> [f"{x:.0e}" for x in tuning.log_values(1e-4, 1e-1, 4)]
      ['1e-04', '1e-03', '1e-02', '1e-01']
    """
    low, high = _check_bounds(low, high, positive=True)
    _validate.check_int("num", num, low=2)
    return [float(x) for x in np.geomspace(low, high, int(num))]


def linear_values(low: float, high: float, num: int) -> list[float]:
    """``num`` evenly spaced values from ``low`` to ``high``, both included.

    Args:
      low: the first value, a finite real.
      high: the last value, in (low, inf).
      num: how many values, an int in [2, inf).
    """
    low, high = _check_bounds(low, high, positive=False)
    _validate.check_int("num", num, low=2)
    return [float(x) for x in np.linspace(low, high, int(num))]


def grid(**axes: Sequence[float]) -> list[Config]:
    """Every combination of the given values, as a list of configurations.

    The last axis varies fastest: ``grid(a=[1, 2], b=[3, 4])`` is
    ``[{a: 1, b: 3}, {a: 1, b: 4}, {a: 2, b: 3}, {a: 2, b: 4}]``.

    Args:
      **axes: each hyperparameter's name and a non-empty sequence of finite values.

    Returns:
      A list of dicts name -> float.
    """
    if not axes:
        raise ValueError("grid needs at least one axis, e.g. grid(learning_rate=[1e-3, 1e-2]).")
    for name, values in axes.items():
        _check_values(name, values)
    names = list(axes)
    return [
        dict(zip(names, (float(v) for v in combo), strict=True))
        for combo in itertools.product(*axes.values())
    ]


def _check_values(name: str, values: Any) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a sequence of numbers; got {values!r}.")
    if len(values) == 0:
        raise ValueError(f"{name} must hold at least one value; got an empty sequence.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must hold real numbers; got {v!r}.")
        if not math.isfinite(v):
            raise ValueError(f"{name} must hold finite numbers; got {v!r}.")
    return [float(v) for v in values]


# ------------------------------------------------------------------ schedules for sweeps
def scale_schedule(schedule: Callable[[Any], Any], peak: Any) -> Callable[[Any], jax.Array]:
    r"""A schedule with a traced peak: ``step -> peak * schedule(step)``.

    Optax's schedules check their arguments with Python comparisons, so they refuse a
    traced peak (a member-varying learning rate). Build the schedule's shape with peak 1
    and scale it here.

    Args:
      schedule: a schedule with peak 1, e.g.
        ``optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps)``.
      peak: the peak value: a number or a traced scalar.

    Returns:
      A schedule whose values are ``peak`` times ``schedule``'s, in ``peak``'s dtype.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamw_jax import tuning
      >>> lr = tuning.scale_schedule(optax.linear_schedule(1.0, 0.0, 10), jnp.float32(0.5))
      >>> float(lr(5))
      0.25
    """
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable step -> value; got {schedule!r}.")
    peak = jnp.asarray(peak)
    if peak.ndim != 0 or not jnp.issubdtype(peak.dtype, jnp.floating):
        raise TypeError(f"peak must be a real float scalar; got {peak.dtype}{peak.shape}.")

    def scaled(step):
        return peak * jnp.asarray(schedule(step), peak.dtype)

    return scaled


def warmup_cosine(
    peak: Any, *, warmup_steps: int, decay_steps: int, end_fraction: float = 0.0
) -> Callable[[Any], jax.Array]:
    r"""Linear warm-up from 0 to a (traced) ``peak``, then cosine decay to
    ``end_fraction * peak``.

    .. math::

      \eta_t = \text{peak} \cdot \begin{cases} t / T_w & t < T_w \\
      f + (1 - f)\,\tfrac12\bigl(1 + \cos(\pi\,\tfrac{t - T_w}{T - T_w})\bigr) & t \ge T_w
      \end{cases}

    Args:
      peak: the peak learning rate: a number or a traced scalar.
      warmup_steps: :math:`T_w`, an int in [0, decay_steps).
      decay_steps: :math:`T`, the step at which the decay ends, an int in [1, inf).
      end_fraction: :math:`f`, the final value as a fraction of the peak, in [0, 1].
    """
    _validate.check_int("decay_steps", decay_steps, low=1)
    _validate.check_int("warmup_steps", warmup_steps, low=0)
    if warmup_steps >= decay_steps:
        raise ValueError(
            f"warmup_steps must be in [0, decay_steps={decay_steps}); got {warmup_steps}."
        )
    _validate.check_scalar("end_fraction", end_fraction, low=0.0, high=1.0, high_inclusive=True)
    warmup, total, end = int(warmup_steps), int(decay_steps), float(end_fraction)

    def shape(step):
        t = jnp.asarray(step, jnp.float32)
        rising = t / jnp.float32(max(warmup, 1))
        progress = jnp.clip((t - warmup) / jnp.float32(total - warmup), 0.0, 1.0)
        falling = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * progress))
        return jnp.where(t < warmup, rising, falling)

    return scale_schedule(shape, jnp.asarray(peak, jnp.float32))


# ------------------------------------------------------------------------------ results
class Failure(NamedTuple):
    """A member whose metric was not finite."""

    config: int  # index into Results.configs
    seed: int
    metric: str
    value: float


@dataclasses.dataclass(frozen=True)
class Results:
    """The outcome of a sweep or search.

    Attributes:
      configs: the configurations, in the order they were evaluated.
      metrics: metric name -> NumPy array of shape ``(len(configs), seeds)``.
      wall_time: seconds the runs took, compilation included.
    """

    configs: list[Config]
    metrics: dict[str, np.ndarray]
    wall_time: float = 0.0

    @property
    def seeds(self) -> int:
        """Seeds per configuration."""
        return next(iter(self.metrics.values())).shape[1]

    @property
    def evaluations(self) -> int:
        """Training runs: configurations times seeds."""
        return len(self.configs) * self.seeds

    @property
    def failures(self) -> list[Failure]:
        """Every (configuration, seed, metric) whose value is NaN or infinite."""
        return [
            Failure(int(c), int(s), name, float(values[c, s]))
            for name, values in self.metrics.items()
            for c, s in zip(*np.nonzero(~np.isfinite(values)), strict=True)
        ]

    def mean(self, metric: str) -> np.ndarray:
        """``metric`` averaged over seeds, per configuration (NaN where any seed failed)."""
        if metric not in self.metrics:
            raise KeyError(f"metric must be one of {sorted(self.metrics)}; got {metric!r}.")
        values = self.metrics[metric]
        return np.where(np.isfinite(values).all(axis=1), values.mean(axis=1), np.nan)

    def best(self, metric: str, mode: str = "min") -> tuple[Config, dict[str, float]]:
        """The configuration with the best seed-averaged ``metric``, and its metrics.

        Args:
          metric: the name of one of ``train``'s metrics.
          mode: ``"min"`` or ``"max"``. Configurations with a failed seed are left out.

        Returns:
          ``(config, metrics)``: the configuration's dict, and every metric averaged over
          its seeds. Ties go to the configuration evaluated first.
        """
        _validate.check_choice("mode", mode, ("min", "max"))
        means = self.mean(metric)
        if not np.isfinite(means).any():
            raise ValueError(f"every configuration failed (non-finite {metric!r}).")
        score = np.where(np.isfinite(means), means if mode == "min" else -means, np.inf)
        index = int(np.argmin(score))
        return dict(self.configs[index]), {k: float(self.mean(k)[index]) for k in self.metrics}

    def to_records(self) -> list[dict[str, Any]]:
        """One row per training run: the configuration, ``config`` and ``seed`` indices and
        every metric (for ``pandas.DataFrame`` or CSV)."""
        return [
            {
                "config": c,
                "seed": s,
                **config,
                **{k: float(v[c, s]) for k, v in self.metrics.items()},
            }
            for c, config in enumerate(self.configs)
            for s in range(self.seeds)
        ]

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes :meth:`to_records` as CSV (``.csv``) or JSON (``.json``); returns the path."""
        path = pathlib.Path(path)
        records = self.to_records()
        if path.suffix == ".csv":
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
        elif path.suffix == ".json":
            path.write_text(json.dumps(records, indent=1, allow_nan=True))
        else:
            raise ValueError(f"path must end in .csv or .json; got {str(path)!r}.")
        return path


def _concatenate(parts: Sequence[Results]) -> Results:
    """The results of several sweeps, one after the other."""
    parts = [p for p in parts if p.configs]
    return Results(
        configs=[c for p in parts for c in p.configs],
        metrics={k: np.concatenate([p.metrics[k] for p in parts]) for k in parts[0].metrics},
        wall_time=sum(p.wall_time for p in parts),
    )


# -------------------------------------------------------------------------------- sweep
def as_hparams(config: Mapping[str, float]) -> dict[str, jax.Array]:
    """A configuration as ``train`` receives it in a sweep: a dict of float32 scalars.

    ``jax.jit(train)(tuning.as_hparams(config), tuning.seed_keys(key, seeds)[s])`` is the
    sweep's member for ``config`` and seed ``s``, trained alone.
    """
    return {k: jnp.asarray(v, jnp.float32) for k, v in config.items()}


seed_keys = _population.seed_keys


def _check_configs(configs: Any) -> list[Config]:
    if isinstance(configs, Mapping) or not isinstance(configs, Sequence):
        raise TypeError(f"configs must be a list of dicts name -> number; got {configs!r}.")
    if not configs:
        raise ValueError("configs must hold at least one configuration; got an empty list.")
    names = None
    for i, config in enumerate(configs):
        if not isinstance(config, Mapping) or not config:
            raise TypeError(
                f"configs[{i}] must be a non-empty dict name -> number; got {config!r}."
            )
        if names is None:
            names = set(config)
        elif set(config) != names:
            raise ValueError(
                f"configs must all have the same names: configs[0] has {sorted(names)}, "
                f"configs[{i}] has {sorted(config)}."
            )
        for name, value in config.items():
            _check_values(f"configs[{i}][{name!r}]", [value])
    return [{k: float(v) for k, v in c.items()} for c in configs]


def _check_members_per_call(members_per_call: Any, mesh: Mesh | None) -> None:
    if members_per_call is None:
        return
    _validate.check_int("members_per_call", members_per_call, low=1, static=True)
    if mesh is not None and members_per_call % mesh.size:
        raise ValueError(
            f"members_per_call must be a multiple of the mesh's {mesh.size} devices; got "
            f"{members_per_call}."
        )


def _check_key(key: Any) -> None:
    typed = _population.is_typed_key(key)
    raw = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    if not ((typed and np.ndim(key) == 0) or raw):
        raise TypeError(f"key must be one PRNG key (jax.random.key(seed)); got {key!r}.")


def _progress_bar(total: int, enabled: bool, description: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # only for the bar

    return tqdm(total=total, unit="member", desc=description, leave=False)


def sweep(
    train: Train,
    configs: Sequence[Mapping[str, float]],
    *,
    key: jax.Array,
    seeds: int = 1,
    members_per_call: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> Results:
    r"""Trains every configuration, ``seeds`` times each, as one population.

    Member ``(c, s)`` is ``train(as_hparams(configs[c]), seed_keys(key, seeds)[s])``: every
    configuration sees the same seed keys, so configurations differ only in their
    hyperparameters. Members run in calls of ``members_per_call``: one compiled member in a
    loop when it is 1 (without a mesh), else ``jax.vmap(train)`` over a chunk, one compiled
    program for every chunk (the last one is padded).

    **Reproducing a member.** With ``members_per_call=1`` (the default on CPU) a member is
    bitwise equal to ``jax.jit(train)`` run alone on its inputs. A vmapped member runs the
    same optimizer arithmetic (adamw_jax's update is bitwise equal under batched
    hyperparameters), but XLA computes a model's batched matrix products with other kernels
    than unbatched ones, so a member with matrix products differs from its solo run by a
    few ulps per step, which a chaotic training run can amplify; a member run alone on a
    device of the mesh (one member per device) is again bitwise equal.

    Args:
      train: ``train(hparams, key) -> {name: scalar}``, a whole training run, traceable by
        ``jax.jit`` and ``jax.vmap``: ``hparams`` maps each configuration's names to
        float32 scalars.
      configs: a non-empty list of dicts name -> finite number, all with the same names.
      key: a PRNG key; the seed keys are ``jax.random.split(key, seeds)``.
      seeds: seeds per configuration, an int in [1, inf).
      members_per_call: members per compiled call, an int in [1, inf) (with a mesh, a
        multiple of its size), or None: one member per device on CPU (where a vmapped
        population is no faster than the loop), up to 64 per device on GPU and TPU. Larger
        chunks use more memory; the chunk bounds it.
      mesh: a ``jax.sharding.Mesh`` to split the member axis over (all its axes, so every
        device runs its share of each chunk, across hosts with ``jax.distributed``), or
        None.
      progress: show a tqdm bar over members.

    Returns:
      :class:`Results`. A member whose metric is NaN or infinite does not stop the sweep:
      it is listed in ``Results.failures`` (and a warning says how many), and
      :meth:`Results.best` leaves its configuration out.
    """
    configs = _check_configs(configs)
    evaluate = _Evaluator(
        train,
        key=key,
        seeds=seeds,
        members_per_call=members_per_call,
        mesh=mesh,
        progress=progress,
    )
    return evaluate(configs)


def _run(runner, pop, configs, chunk, mesh, progress, start) -> Results:
    """Runs a population with a compiled runner; the metrics as Results, timed from
    ``start``."""
    bar = _progress_bar(len(pop.seed), progress, "sweep")
    on_chunk_done = (lambda n: None) if bar is None else bar.update
    try:
        flat = _population.run(runner, pop, chunk, mesh, on_chunk_done)
    finally:
        if bar is not None:
            bar.close()
    seeds = len(pop.seed) // len(configs)
    results = Results(
        configs=configs,
        metrics={k: v.reshape(len(configs), seeds) for k, v in flat.items()},
        wall_time=time.perf_counter() - start,
    )
    if results.failures:
        failed = sorted({(f.config, f.seed) for f in results.failures})
        warnings.warn(
            f"{len(failed)} of {results.evaluations} members returned a non-finite metric "
            f"(configuration, seed): {failed[:10]}; see Results.failures.",
            RuntimeWarning,
            stacklevel=4,  # the caller of sweep or of a search
        )
    return results


class _Evaluator:
    """Sweeps that share one compiled runner, and the record of what they evaluated."""

    def __init__(self, train, *, key, seeds, members_per_call, mesh, progress):
        _validate.check_int("seeds", seeds, low=1)
        _check_members_per_call(members_per_call, mesh)
        _check_key(key)
        self.train, self.key, self.seeds = train, key, int(seeds)
        self.members_per_call, self.mesh, self.progress = members_per_call, mesh, progress
        self.runner = None
        self.chunk = None
        self.parts: list[Results] = []

    def __call__(self, configs: list[Config]) -> Results:
        """Trains ``configs``; returns their results (and keeps them)."""
        pop = _population.population(configs, self.key, self.seeds)
        start = time.perf_counter()
        if self.runner is None:
            self.chunk = self.members_per_call or _population.default_members_per_call(
                len(pop.seed), self.mesh
            )
            self.runner = _population.compile_runner(self.train, self.chunk, self.mesh, pop)
        part = _run(self.runner, pop, configs, self.chunk, self.mesh, self.progress, start)
        self.parts.append(part)
        return part

    def unseen(self, configs: list[Config]) -> list[Config]:
        """The configurations not trained yet, in order, without repeats."""
        seen = {_identity(c) for part in self.parts for c in part.configs}
        new = []
        for c in configs:
            if _identity(c) not in seen:
                seen.add(_identity(c))
                new.append(c)
        return new

    def results(self) -> Results:
        """Everything trained so far, in order."""
        return _concatenate(self.parts)


def _identity(config: Config) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(config.items()))


# ----------------------------------------------------------------------------- searches
def _middle(values: list[float]) -> float:
    """The middle value of a sorted list (the lower middle for an even length): the
    geometric centre of a log-spaced line."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def _check_start(start: Any, names: tuple[str, ...]) -> None:
    if start is None:
        return
    if not isinstance(start, Mapping) or set(start) - set(names):
        raise ValueError(f"start must be None or a dict with keys among {names}; got {start!r}.")
    for name, value in start.items():
        _check_values(f"start[{name!r}]", [value])


def separable_search(
    train: Train,
    learning_rate: Sequence[float],
    weight_decay: Sequence[float],
    *,
    key: jax.Array,
    metric: str,
    mode: str = "min",
    rounds: int = 1,
    start: Mapping[str, float] | None = None,
    fixed: Mapping[str, float] | None = None,
    seeds: int = 1,
    members_per_call: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> Results:
    r"""Searches the learning rate and the weight decay one at a time.

    With decoupled weight decay the best :math:`\lambda` hardly moves with the learning
    rate (Loshchilov & Hutter's separability claim, for the paper's :math:`\lambda`:
    ``decay_coupling="schedule"``), so instead of the full grid of
    :math:`n_\eta \times n_\lambda` runs this sweeps one line, then the other:

    1. the learning rates at the starting decay (one sweep);
    2. the decays at the best learning rate found (one sweep);
    3. with ``rounds=2``, both lines again from there; and so on.

    A configuration is trained once even when two lines cross it, so one round costs
    :math:`n_\eta + n_\lambda - 1` configurations. Every run uses the same seed keys as
    :func:`sweep` with this ``key``, so its results are those of the same cells of a grid.

    Args:
      train: as for :func:`sweep`; ``hparams`` holds ``"learning_rate"``,
        ``"weight_decay"`` and the ``fixed`` names.
      learning_rate: the learning rates to try, a non-empty sequence of positive numbers.
      weight_decay: the decays to try, a non-empty sequence of numbers in [0, inf).
      key: as for :func:`sweep`.
      metric: the metric to optimize, one of ``train``'s.
      mode: ``"min"`` (default) or ``"max"``.
      rounds: line pairs to sweep, an int in [1, inf).
      start: the starting ``{"learning_rate": ..., "weight_decay": ...}`` (either may be
        left out); by default the middle value of each list.
      fixed: other hyperparameters, the same for every run (e.g. ``{"b2": 0.95}``).
      seeds: seeds per configuration, an int in [1, inf).
      members_per_call: as for :func:`sweep`.
      mesh: as for :func:`sweep`.
      progress: show a bar per sweep.

    Returns:
      :class:`Results` of every configuration evaluated, in order; ``evaluations`` counts
      them (times seeds).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adamw_jax import tuning
      >>> def train(h, key):  # a separable bowl, best at lr=1e-2, wd=1e-3
      ...     lr, wd = jnp.log10(h["learning_rate"]), jnp.log10(h["weight_decay"])
      ...     return {"loss": (lr + 2) ** 2 + (wd + 3) ** 2}
      >>> results = tuning.separable_search(
      ...     train, tuning.log_values(1e-4, 1, 5), tuning.log_values(1e-5, 1e-1, 5),
      ...     key=jax.random.key(0), metric="loss", progress=False)
      >>> results.best("loss")[0], results.evaluations
      ({'learning_rate': 0.01, 'weight_decay': 0.001}, 9)
    """
    lrs = _check_values("learning_rate", learning_rate)
    wds = _check_values("weight_decay", weight_decay)
    if min(lrs) <= 0:
        raise ValueError(f"learning_rate must hold numbers in (0, inf); got {lrs}.")
    if min(wds) < 0:
        raise ValueError(f"weight_decay must hold numbers in [0, inf); got {wds}.")
    _validate.check_int("rounds", rounds, low=1)
    _validate.check_choice("mode", mode, ("min", "max"))
    _check_start(start, ("learning_rate", "weight_decay"))
    fixed = _check_fixed(fixed, ("learning_rate", "weight_decay"))
    evaluate = _Evaluator(
        train,
        key=key,
        seeds=seeds,
        members_per_call=members_per_call,
        mesh=mesh,
        progress=progress,
    )
    current = {"learning_rate": _middle(lrs), "weight_decay": _middle(wds), **(start or {})}
    for _ in range(int(rounds)):
        for name, values in (("learning_rate", lrs), ("weight_decay", wds)):
            new = evaluate.unseen([{**fixed, **current, name: v} for v in values])
            if new:
                evaluate(new)
            best, _ = evaluate.results().best(metric, mode)
            current = {"learning_rate": best["learning_rate"], "weight_decay": best["weight_decay"]}
    return evaluate.results()


def _check_fixed(fixed: Any, searched: Sequence[str]) -> dict[str, float]:
    if fixed is None:
        return {}
    if not isinstance(fixed, Mapping):
        raise TypeError(f"fixed must be a dict name -> number or None; got {fixed!r}.")
    clash = set(fixed) & set(searched)
    if clash:
        raise ValueError(f"fixed must not name a searched hyperparameter; got {sorted(clash)}.")
    return {k: _check_values(f"fixed[{k!r}]", [v])[0] for k, v in fixed.items()}


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
    progress: bool = True,
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
      progress: show a bar per batch.

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
    fixed = _check_fixed(fixed, tuple(space))
    evaluate = _Evaluator(
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


# ----------------------------------------------------------------------------- the rule
def suggest_weight_decay(
    learning_rate: float,
    *,
    steps: int | None = None,
    dataset_size: float | None = None,
    batch_size: float | None = None,
    timescale: float = 0.25,
    decay_coupling: str = "lr",
) -> float:
    r"""A starting weight decay from the EMA view of weight decay.

    With decoupled decay each step shrinks the weights by the factor :math:`1 - d_t`, so
    they are an exponential moving average of recent updates over
    :math:`\tau_{iter} = 1/d` steps. Wang & Aitchison find that the best :math:`\tau` is a
    roughly fixed fraction of training whatever the model and data size; Bergsma et al.
    write it per epoch of the training set, :math:`\tau = B/(\eta\lambda D)` (batch size
    :math:`B`, :math:`D` examples or tokens trained on), and fit how its best value moves
    with the tokens per parameter. This returns the :math:`\lambda` that makes
    :math:`\tau_{iter}` the fraction ``timescale`` of the run's :math:`T` steps:

    .. math::

      \lambda = \frac{1}{\eta \cdot \text{timescale} \cdot T}\ \ (\texttt{"lr"}), \qquad
      \lambda = \frac{1}{\text{timescale} \cdot T}\ \ (\texttt{"schedule"}, \texttt{"none"})

    (with ``decay_coupling="lr"`` the per-step decay is :math:`d = \eta\lambda`; with
    ``"schedule"`` it is :math:`\lambda` at the peak and ``"none"`` always
    :math:`\lambda`), where :math:`T` is ``steps``, or ``dataset_size / batch_size``.
    It is a starting point for a search, not its result: the best fraction depends on the
    task (:func:`separable_search` refines it).

    Args:
      learning_rate: the (peak) learning rate :math:`\eta`, in (0, inf).
      steps: the run's length :math:`T` in steps, an int in [1, inf); or give
        ``dataset_size`` and ``batch_size`` instead.
      dataset_size: :math:`D`, the examples (or tokens) the whole run trains on, in
        (0, inf).
      batch_size: :math:`B`, examples (or tokens) per step, in (0, inf).
      timescale: the wanted :math:`\tau_{iter}/T`, in (0, inf). The default 0.25 lies in
        the range both papers report for their tasks; it is not universal.
      decay_coupling: the convention of the optimizer the value is for: ``"lr"``
        (``adamw``'s default), ``"schedule"`` (the paper's :math:`\lambda`) or ``"none"``.

    Returns:
      :math:`\lambda`, a Python float.

    Example:
      >>> from adamw_jax import tuning
      >>> tuning.suggest_weight_decay(1e-3, steps=10_000, timescale=0.1)  # 1/(1e-3 * 1000)
      1.0

    References:
      Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset
      size", ICML 2025 (arXiv:2405.13698).
      Bergsma et al., "Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
      Pre-training", 2025 (arXiv:2505.13738).
    """
    _validate.check_choice("decay_coupling", decay_coupling, ("lr", "schedule", "none"))
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, low_inclusive=False)
    _validate.check_scalar("timescale", timescale, low=0.0, low_inclusive=False)
    total_steps = _run_length(steps, dataset_size, batch_size)
    tau = float(timescale) * total_steps
    if decay_coupling == "lr":
        return schedules.weight_decay_for_timescale(float(learning_rate), tau)
    return 1.0 / tau


def _run_length(steps: Any, dataset_size: Any, batch_size: Any) -> float:
    """The run's length in steps, from ``steps`` or from ``dataset_size / batch_size``."""
    if steps is not None:
        if dataset_size is not None or batch_size is not None:
            raise ValueError("give either steps, or dataset_size and batch_size, not both.")
        _validate.check_int("steps", steps, low=1)
        return float(steps)
    if dataset_size is None or batch_size is None:
        raise ValueError("give steps, or both dataset_size and batch_size.")
    _validate.check_scalar("dataset_size", dataset_size, low=0.0, low_inclusive=False)
    _validate.check_scalar("batch_size", batch_size, low=0.0, low_inclusive=False)
    return float(dataset_size) / float(batch_size)
