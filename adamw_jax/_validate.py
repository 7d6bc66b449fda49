"""Construction-time checks of hyperparameters.

Only concrete values are checked. Tracers (under ``jax.jit``, ``jax.vmap`` or
``optax.inject_hyperparams`` inside a jitted step) and schedules pass through:
their values are not known when the transformation is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def _concrete_scalar(name: str, value: Any) -> float | None:
    """Returns ``value`` as a Python float, or None when it cannot be known yet."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(
            f"{name} must be a real number, a scalar array or a schedule; "
            f"got {value!r} of type {type(value).__name__}."
        )
    if isinstance(value, jax.core.Tracer):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar; got shape {np.shape(value)}.")
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            return math.inf
    if isinstance(value, (np.ndarray, jax.Array)):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar; got shape {value.shape}.")
        if not (
            np.issubdtype(value.dtype, np.floating)
            or np.issubdtype(value.dtype, np.integer)
            or value.dtype == jax.numpy.bfloat16
        ):
            raise TypeError(f"{name} must be a real number; got an array of dtype {value.dtype}.")
        return float(value)
    raise TypeError(
        f"{name} must be a real number, a scalar array or a schedule; "
        f"got {value!r} of type {type(value).__name__}."
    )


def check_scalar(
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None = None,
    high_inclusive: bool = False,
    low_inclusive: bool = True,
    allow_schedule: bool = False,
) -> None:
    """Raises if a concrete ``value`` is not a finite number in the stated range.

    Args:
      name: the argument's name, quoted in the message.
      value: the value to check.
      low: the smallest accepted value.
      high: the largest accepted value, or None for no upper bound.
      high_inclusive: whether ``high`` itself is accepted.
      low_inclusive: whether ``low`` itself is accepted.
      allow_schedule: whether a callable (a schedule ``step -> value``) is accepted.
    """
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
        if allow_schedule:
            return
        raise TypeError(f"{name} must be a number, not a callable; got {value!r}.")
    x = _concrete_scalar(name, value)
    if x is None:
        return
    lo_bracket = "[" if low_inclusive else "("
    if high is None:
        accepted = f"{lo_bracket}{low}, inf)"
    else:
        accepted = f"{lo_bracket}{low}, {high}{']' if high_inclusive else ')'}"
    ok = math.isfinite(x)
    ok = ok and (x >= low if low_inclusive else x > low)
    if high is not None:
        ok = ok and (x <= high if high_inclusive else x < high)
    if not ok:
        raise ValueError(f"{name} must be in {accepted}; got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raises ValueError if ``value`` is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raises TypeError if ``value`` is not a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {value!r} of type {type(value).__name__}.")


def check_mask(name: str, value: Any) -> None:
    """Raises TypeError if ``value`` is not None, a callable or a pytree of bools.

    A single boolean (Python or 0-d array) is refused: it is what a callable mask turns into
    when ``optax.inject_hyperparams`` mistakes it for a schedule and calls it on the step
    count, and it would then silently decay every leaf (or none).
    """
    if isinstance(value, (str, bytes, int, float, complex)) and not isinstance(value, bool):
        raise TypeError(
            f"{name} must be None, a pytree of bools like the params, or a callable "
            f"params -> such a pytree; got {value!r}."
        )
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0
    ):
        raise TypeError(
            f"{name} must be None, a pytree of bools like the params, or a callable "
            f"params -> such a pytree; got a single boolean {value!r}. (For all leaves use "
            f"{name}=None; for none, weight_decay=0. Under optax.inject_hyperparams pass "
            f"static_args=({name!r},) so that a callable {name} is not taken for a schedule.)"
        )


def is_schedule(value: Any) -> bool:
    """Whether ``value`` is a schedule (a callable step -> value) rather than a number."""
    return callable(value) and not isinstance(value, (jax.Array, np.ndarray))


def evaluate(value: float | jax.Array | Callable[[jax.Array], jax.Array], count: jax.Array):
    """A hyperparameter's value at step ``count``: calls it if it is a schedule."""
    return value(count) if is_schedule(value) else value


def check_params_given(name: str, params: Any) -> None:
    """Raises ValueError if a transformation that needs the params was updated without them."""
    if params is None:
        raise ValueError(f"{name} needs the params: call update(updates, state, params).")


def check_same_structure(what: str, tree: Any, reference: Any, reference_name: str) -> None:
    """Raises ValueError if ``tree``'s structure or leaf shapes differ from ``reference``'s."""
    treedef, ref_treedef = jax.tree.structure(tree), jax.tree.structure(reference)
    if treedef != ref_treedef:
        raise ValueError(
            f"{what} have a different tree structure from {reference_name}: "
            f"{treedef} vs {ref_treedef}."
        )
    paths = jax.tree_util.tree_leaves_with_path(tree)
    for (path, leaf), ref in zip(paths, jax.tree.leaves(reference), strict=True):
        if np.shape(leaf) != np.shape(ref):
            raise ValueError(
                f"{what} at {jax.tree_util.keystr(path)} have shape {np.shape(leaf)}, "
                f"but {reference_name} there have shape {np.shape(ref)}."
            )


def check_inexact_leaves(what: str, tree: Any) -> None:
    """Raises TypeError naming the first leaf of ``tree`` that is not floating or complex."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jax.numpy.result_type(leaf)
        if not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            raise TypeError(
                f"{what} at {jax.tree_util.keystr(path)} has dtype {dtype}; only floating "
                "and complex leaves can be optimized. Exclude it with optax.masked or keep "
                "it out of the optimized tree."
            )
