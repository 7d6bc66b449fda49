"""Construction-time checks of hyperparameters.

Only concrete values are checked. Tracers (under ``jax.jit``, ``jax.vmap`` or
``optax.inject_hyperparams`` inside a jitted step) and schedules pass through:
their values are not known when the transformation is built.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np


def _concrete_scalar(name: str, value: Any, expected: str) -> float | None:
    """Returns ``value`` as a Python float, or None when it cannot be known yet.

    ``expected`` says what is accepted, for the messages.
    """
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be {expected}; got {value!r} of type {type(value).__name__}.")
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
            raise TypeError(f"{name} must be {expected}; got an array of dtype {value.dtype}.")
        return float(value)
    raise TypeError(f"{name} must be {expected}; got {value!r} of type {type(value).__name__}.")


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
      allow_schedule: whether a schedule (a callable ``step -> value`` that can be called
        with one positional argument) is accepted. Dtypes, classes and callables that
        cannot be called with one argument are refused either way.
    """
    lo_bracket = "[" if low_inclusive else "("
    if high is None:
        accepted = f"{lo_bracket}{low}, inf)"
    else:
        accepted = f"{lo_bracket}{low}, {high}{']' if high_inclusive else ')'}"
    _check_not_a_dtype_or_class(name, value, accepted, allow_schedule)
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
        if allow_schedule:
            _check_schedule_signature(name, value, accepted)
            return
        raise TypeError(f"{name} must be a number, not a callable; got {value!r}.")
    x = _concrete_scalar(name, value, _expected(accepted, allow_schedule))
    if x is None:
        return
    ok = math.isfinite(x)
    ok = ok and (x >= low if low_inclusive else x > low)
    if high is not None:
        ok = ok and (x <= high if high_inclusive else x < high)
    if not ok:
        raise ValueError(f"{name} must be in {accepted}; got {value!r}.")


def _expected(accepted: str, allow_schedule: bool) -> str:
    """What a scalar hyperparameter accepts, for messages."""
    if allow_schedule:
        return (
            f"a real number in {accepted}, a scalar array or a schedule (a callable step -> value)"
        )
    return f"a real number in {accepted} or a scalar array"


def _check_not_a_dtype_or_class(name: str, value: Any, accepted: str, allow_schedule: bool) -> None:
    """Refuses dtypes (``jnp.bfloat16``, ``np.dtype("float32")``) and other classes.

    ``jnp.bfloat16`` is a class that can be called with one argument, so it would pass for
    a schedule; it is what ends up in ``weight_decay`` when ``mu_dtype`` is passed in the
    wrong position.
    """
    is_dtype = isinstance(value, np.dtype) or (
        isinstance(value, type)
        and (issubclass(value, np.generic) or isinstance(getattr(value, "dtype", None), np.dtype))
    )
    if is_dtype:
        raise TypeError(
            f"{name} must be {_expected(accepted, allow_schedule)}, not a dtype; got "
            f"{value!r}. (A moment dtype goes in mu_dtype or nu_dtype.)"
        )
    if isinstance(value, type):
        raise TypeError(
            f"{name} must be {_expected(accepted, allow_schedule)}, not a class; got {value!r}."
        )


def _check_schedule_signature(name: str, value: Callable, accepted: str) -> None:
    """Refuses a callable that cannot be called as ``value(step)``.

    Callables whose signature Python cannot tell (some builtins) are let through.
    """
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(0)
    except TypeError as err:
        raise TypeError(
            f"{name} must be {_expected(accepted, True)} that can be called with one "
            f"positional argument, the step count; got {value!r} with signature "
            f"{signature} ({err})."
        ) from None


def check_static_int(name: str, value: Any) -> Any:
    """``value`` as a Python int when it is a concrete integer 0-d array, else unchanged.

    For arguments that set shapes (block sizes): ``optax.inject_hyperparams`` turns an int
    argument into a 0-d array, which is accepted here when its value is known. A traced one
    (the transformation built inside ``jax.jit``) is refused with a pointer to
    ``static_args``. Anything else is returned unchanged, for the caller's own range check.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete int: it sets the shapes of the optimizer state; got "
            f"a traced value {value!r}. Under optax.inject_hyperparams pass "
            f"static_args=({name!r},) so that it is not made a traced hyperparameter."
        )
    if (
        isinstance(value, (jax.Array, np.ndarray))
        and value.ndim == 0
        and np.issubdtype(value.dtype, np.integer)
    ):
        return int(value)
    return value


def check_int(
    name: str, value: Any, *, low: int | None, high: int | None = None, static: bool = False
) -> None:
    """Raises if a concrete ``value`` is not an int (bools refused) in [low, high].

    Args:
      name: the argument's name, quoted in the message.
      value: the value to check.
      low: the smallest accepted value, or None for no lower bound.
      high: the largest accepted value, or None for no upper bound.
      static: the value sets shapes or a Python-level count, so only a Python or NumPy
        integer is accepted. Otherwise an integer 0-d array is accepted too, and a traced
        integer scalar (a hyperparameter under ``optax.inject_hyperparams``) passes.
    """
    bounds = f"[{'-inf' if low is None else low}, {'inf)' if high is None else f'{high}]'}"
    accepted = "an int" if low is None and high is None else f"an int in {bounds}"
    if not static and isinstance(value, jax.core.Tracer):
        if np.ndim(value) != 0 or not np.issubdtype(value.dtype, np.integer):
            raise TypeError(f"{name} must be {accepted}; got a traced {value.dtype}{value.shape}.")
        return
    if not static and isinstance(value, (jax.Array, np.ndarray)):
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
            raise TypeError(f"{name} must be {accepted}; got an array {value!r}.")
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be {accepted}; got {value!r} of type {type(value).__name__}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in {bounds}; got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raises ValueError if ``value`` is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raises TypeError if ``value`` is not a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {value!r} of type {type(value).__name__}.")


def check_mask(name: str, value: Any, *, allow_single_bool: bool = False) -> None:
    """Raises TypeError if ``value`` is not None, a callable or a pytree of bools.

    A single boolean (Python or 0-d array) is refused unless ``allow_single_bool`` (where
    Optax's own callers pass one, ``add_decayed_weights``): it is what a callable mask turns
    into when ``optax.inject_hyperparams`` mistakes it for a schedule and calls it on the
    step count, and it would then silently decay every leaf (or none).
    """
    if isinstance(value, (str, bytes, int, float, complex)) and not isinstance(value, bool):
        raise TypeError(
            f"{name} must be None, a pytree of bools like the params, or a callable "
            f"params -> such a pytree; got {value!r}."
        )
    if isinstance(value, (type, np.dtype)):  # e.g. jnp.bfloat16: callable, but not a mask
        raise TypeError(
            f"{name} must be None, a pytree of bools like the params, or a callable "
            f"params -> such a pytree; got the class or dtype {value!r}."
        )
    if isinstance(value, (bool, np.bool_)) and allow_single_bool:
        return
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0
    ):
        raise TypeError(
            f"{name} must be None, a pytree of bools like the params, or a callable "
            f"params -> such a pytree; got a single boolean {value!r}. (For all leaves use "
            f"{name}=None; for none, weight_decay=0. Under optax.inject_hyperparams pass "
            f"static_args=({name!r},) so that a callable {name} is not taken for a schedule.)"
        )


def check_params_given(name: str, params: Any) -> None:
    """Raises ValueError if a transformation that needs the params was updated without them."""
    if params is None:
        raise ValueError(f"{name} needs the params: call update(updates, state, params).")


def check_updates_given(name: str, updates: Any) -> None:
    """Raises ValueError if ``update`` was called with ``None`` in place of the updates."""
    if updates is None:
        raise ValueError(
            f"{name} got updates=None: pass the gradients (or the previous "
            "transformation's updates), a pytree with the params' structure."
        )


def check_update_call(name: str, updates: Any, params: Any) -> None:
    """Refuses an ``update`` call without updates, without params, or with mismatched trees.

    For transformations whose step needs the params: ``updates`` and ``params`` must both be
    given, with the same tree structure and leaf shapes.
    """
    check_updates_given(name, updates)
    check_params_given(name, params)
    check_same_structure("updates", updates, params, "the params")


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


# torch.optim.AdamW's keywords that adamw_jax's optimizers do not take, each with its hint.
_PYTORCH_KEYWORDS = {
    "lr": "the learning rate is learning_rate (the first positional argument)",
    "betas": "the moments' decays are b1 and b2 (two arguments, not a tuple)",
    "maximize": "negate the loss instead",
    "foreach": "it picks one of PyTorch's implementations; XLA compiles the step here",
    "fused": "the fused step is adamw_jax.fused_adamw",
    "capturable": "it concerns CUDA graphs; every step here is a jitted function",
    "differentiable": "it concerns autograd through the step; use jax.grad on the update",
}
_Factory = TypeVar("_Factory", bound=Callable)


def refuses_pytorch_keywords(factory: _Factory) -> _Factory:
    """``factory``, refusing torch.optim.AdamW's keywords it does not take by name.

    A call with ``lr=``, ``betas=`` and the like raises a TypeError saying how this library
    spells it and pointing to :func:`adamw_jax.compat.torch_adamw`, instead of Python's
    bare "unexpected keyword argument". The signature stays ``factory``'s (``inspect`` and
    ``help`` follow ``__wrapped__``); the check runs before any argument is bound, so that
    ``lr=`` alone is refused as PyTorch's keyword, not as a missing ``learning_rate``.
    """
    own = set(inspect.signature(factory).parameters)
    refused = {k: v for k, v in _PYTORCH_KEYWORDS.items() if k not in own}

    @functools.wraps(factory)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name in kwargs:
            if name in refused:
                raise TypeError(
                    f"{factory.__name__}() got {name}=, a keyword of torch.optim.AdamW: "
                    f"{refused[name]}. For PyTorch's keywords and defaults use "
                    "adamw_jax.compat.torch_adamw(lr=..., betas=..., weight_decay=..., "
                    "amsgrad=..., maximize=...)."
                )
        return factory(*args, **kwargs)

    return checked
