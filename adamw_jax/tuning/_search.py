"""The separable search: the learning rate's line, then the weight decay's."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from adamw_jax import _validate
from adamw_jax.tuning._population import Train
from adamw_jax.tuning._results import Results
from adamw_jax.tuning._space import check_values
from adamw_jax.tuning._sweep import Evaluator, check_fixed


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
        check_values(f"start[{name!r}]", [value])


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
    progress: bool | None = None,
    storage: str | os.PathLike | None = None,
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
      progress: a bar per sweep, as for :func:`sweep`.
      storage: a file path recording every member as it finishes, as for :func:`sweep`:
        the same call again trains only what is missing and returns the same results;
        several processes given one storage share the search's lines.

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
    lrs = check_values("learning_rate", learning_rate)
    wds = check_values("weight_decay", weight_decay)
    if min(lrs) <= 0:
        raise ValueError(f"learning_rate must hold numbers in (0, inf); got {lrs}.")
    if min(wds) < 0:
        raise ValueError(f"weight_decay must hold numbers in [0, inf); got {wds}.")
    _validate.check_int("rounds", rounds, low=1)
    _validate.check_choice("mode", mode, ("min", "max"))
    _check_start(start, ("learning_rate", "weight_decay"))
    fixed = check_fixed(fixed, ("learning_rate", "weight_decay"))
    evaluate = Evaluator(
        train,
        key=key,
        seeds=seeds,
        members_per_call=members_per_call,
        mesh=mesh,
        progress=progress,
        storage=storage,
        search={
            "function": "separable_search",
            "learning_rate": lrs,
            "weight_decay": wds,
            "metric": metric,
            "mode": mode,
            "rounds": int(rounds),
            "start": dict(start or {}),
            "fixed": fixed,
        },
        metric=metric,
    )
    current = {"learning_rate": _middle(lrs), "weight_decay": _middle(wds), **(start or {})}
    try:
        for _ in range(int(rounds)):
            for name, values in (("learning_rate", lrs), ("weight_decay", wds)):
                new = evaluate.unseen([{**fixed, **current, name: v} for v in values])
                if new:
                    evaluate(new)
                best, _ = evaluate.results().best(metric, mode)
                current = {
                    "learning_rate": best["learning_rate"],
                    "weight_decay": best["weight_decay"],
                }
    finally:
        evaluate.close()
    return evaluate.results()
