r"""Updates that survive bfloat16 and float16 parameters.

``optax.apply_updates`` adds an update to a parameter in the parameter's dtype. In bfloat16
(8 significant bits) a change smaller than half a unit in the last place is rounded away:
with ``lr=1e-3`` and ``weight_decay=1e-2`` AdamW's per-step decay factor ``1e-5`` is far
below bfloat16's resolution (about ``4e-3`` relative), so the decay, and every small
update, silently vanishes. :func:`low_precision_update`, last in a chain, rewrites each
update of a low-precision leaf into ``new - w``, where ``new`` is the parameter the step
should land on, rounded one of two ways:

* ``"compensated"``: Kahan summation. The part of the step lost to rounding is kept in a
  buffer (in the parameter's dtype, so bfloat16 params plus buffer take 4 bytes) and added
  to the next step.
* ``"stochastic_rounding"``: rounds up or down with probabilities that make the rounding
  unbiased, using a key derived from a seed and the step count (no extra buffer).

``new - w`` is exactly representable whenever ``new`` and ``w`` are within a factor of 2
of each other (Sterbenz), so ``optax.apply_updates`` then lands exactly on ``new``; the
compensated buffer also records any rare remainder. Leaves of float32 or wider pass
through unchanged.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamw_jax import _numerics, _trees, _validate

__all__ = ["LowPrecisionUpdateState", "low_precision_update"]

METHODS = ("compensated", "stochastic_rounding")


class LowPrecisionUpdateState(NamedTuple):
    """State of :func:`low_precision_update`.

    Attributes:
      count: number of updates taken, int32 (the stochastic rounding key's step).
      compensation: with ``"compensated"``, the rounding remainder per leaf, like the
        params for low-precision leaves and a scalar zero for the others; otherwise
        ``optax.EmptyState()``.
    """

    count: jax.Array
    compensation: Any


def _is_low_precision(dtype: Any) -> bool:
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _zero_compensation(p: jax.Array) -> jax.Array:
    """A leaf's empty Kahan buffer: zeros like a low-precision ``p``, else a scalar zero."""
    dtype = jnp.result_type(p)
    if _is_low_precision(dtype):
        return jnp.zeros_like(p)  # keeps an explicit sharding in the type
    return jnp.zeros((), dtype)


def _compensated_leaf(u: jax.Array, p: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A leaf's update and new Kahan buffer: ``w + u + c`` rounded to nearest, the rest kept.

    Leaves of float32 or wider pass through: ``(u, c)``.
    """
    if not _is_low_precision(p.dtype):
        return u, c
    p32 = p.astype(jnp.float32)
    y = u.astype(jnp.float32) + c.astype(jnp.float32)
    target = (p32 + y).astype(p.dtype)
    step = (target.astype(jnp.float32) - p32).astype(p.dtype)
    landed = (p + step).astype(p.dtype)  # what optax.apply_updates computes
    return step.astype(u.dtype), (y - (landed.astype(jnp.float32) - p32)).astype(c.dtype)


def _stochastically_rounded_leaf(
    u: jax.Array, p: jax.Array, step_key: jax.Array, index: int
) -> jax.Array:
    """A leaf's update landing on ``w + u`` rounded stochastically.

    The key is ``step_key`` folded with the leaf's ``index``. Leaves of float32 or wider
    pass through: ``u``.
    """
    if not _is_low_precision(p.dtype):
        return u
    key = jax.random.fold_in(step_key, index)
    p32 = p.astype(jnp.float32)
    y = u.astype(jnp.float32) + 0.0  # kept: outside jit it turns -0.0 into +0.0
    target = _numerics.round_to_dtype_stochastically(p32 + y, p.dtype, key)
    step = (target.astype(jnp.float32) - p32).astype(p.dtype)
    return step.astype(u.dtype)


def low_precision_update(
    method: str = "compensated", *, seed: int = 0
) -> optax.GradientTransformation:
    r"""Makes small updates land on bfloat16/float16 parameters.

    For a low-precision leaf :math:`w` with incoming update :math:`u`:

    .. math::

      \text{compensated:}\quad y = u + c, \quad w' = \operatorname{round}(w + y),
      \quad c \leftarrow y - (w' - w), \\
      \text{stochastic rounding:}\quad w' = \operatorname{round}_{\text{stoch}}(w + u),

    computed in float32; the emitted update is :math:`w' - w`, so that
    ``optax.apply_updates(params, updates)`` gives :math:`w'`.

    Args:
      method: ``"compensated"`` (Kahan buffer in the state) or ``"stochastic_rounding"``
        (random key from ``seed`` and the step count).
      seed: an int, the stochastic rounding's base key.

    Returns:
      An ``optax.GradientTransformation``; place it last in a chain. Its ``update``
      requires ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adamw_jax
      >>> params = {"w": jnp.ones(3, jnp.bfloat16)}
      >>> tx = adamw_jax.low_precision_update("compensated")
      >>> state = tx.init(params)
      >>> for _ in range(1000):  # 1000 steps of -1e-4: plain bfloat16 would stay at 1
      ...     updates, state = tx.update({"w": jnp.full(3, -1e-4, jnp.bfloat16)}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"]
      Array([0.902344, 0.902344, 0.902344], dtype=bfloat16)

    References:
      Kahan, "Further remarks on reducing truncation errors", CACM 1965.
      Zamirai et al., "Revisiting BFloat16 Training", arXiv:2010.06192, 2020.
      Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015.
    """
    _validate.check_choice("method", method, METHODS)
    _validate.check_int("seed", seed, low=None, static=True)

    def init_fn(params):
        _validate.check_inexact_leaves("params", params)
        if method == "compensated":
            compensation = jax.tree.map(_zero_compensation, params)
        else:
            compensation = optax.EmptyState()
        return LowPrecisionUpdateState(jnp.zeros([], jnp.int32), compensation)

    def update_fn(updates, state, params=None):
        _validate.check_update_call("low_precision_update", updates, params)
        treedef = jax.tree.structure(params)
        u_leaves, p_leaves = treedef.flatten_up_to(updates), jax.tree.leaves(params)
        # The step's key (unused, and dropped under jit, when compensated).
        key = jax.random.fold_in(jax.random.key(seed), state.count)
        if method == "compensated":
            c_leaves = treedef.flatten_up_to(state.compensation)
            rows = [
                _compensated_leaf(u, p, c)
                for u, p, c in zip(u_leaves, p_leaves, c_leaves, strict=True)
            ]
            new_updates, compensation = _trees.unzip(treedef, rows, 2)
        else:
            new_u = [
                _stochastically_rounded_leaf(u, p, key, i)
                for i, (u, p) in enumerate(zip(u_leaves, p_leaves, strict=True))
            ]
            new_updates, compensation = jax.tree.unflatten(treedef, new_u), optax.EmptyState()
        count = optax.safe_increment(state.count)
        return new_updates, LowPrecisionUpdateState(count, compensation)

    return optax.GradientTransformation(init_fn, update_fn)
