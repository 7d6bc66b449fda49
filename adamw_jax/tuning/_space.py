"""Search spaces: configurations, grids of values, and the ranges a Bayesian search samples.

A configuration is one point of a search: a dict hyperparameter name -> number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from adamw_jax import _validate

Config = dict[str, float]


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
        check_values(name, values)
    names = list(axes)
    return [
        dict(zip(names, (float(v) for v in combo), strict=True))
        for combo in itertools.product(*axes.values())
    ]


def check_values(name: str, values: Any) -> list[float]:
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


def check_configs(configs: Any) -> list[Config]:
    """``configs`` as a list of dicts name -> float, checked: non-empty, the same names in
    each, finite numbers."""
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
            check_values(f"configs[{i}][{name!r}]", [value])
    return [{k: float(v) for k, v in c.items()} for c in configs]
