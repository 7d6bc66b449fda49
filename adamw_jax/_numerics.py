"""Numerical helpers shared by the library: dtype rules, schedules, rounding.

The bottom of the library's imports: modules at every level use these, and this module
imports none of them.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# 2**32 / golden ratio: the odd multiplier of the hash whose bits drive stochastic rounding.
HASH_MULTIPLIER = 0x9E3779B1
# An odd multiplier that spreads a salt (the step count) over all 32 bits before it is mixed
# into the hashed bits.
SALT_MULTIPLIER = 0x85EBCA6B


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype arithmetic runs in: float32, or the widest of ``dtypes`` when wider.

    Complex when any input is complex. Independent of JAX's dtype-promotion mode.
    """
    bits = max([32, *(jnp.finfo(d).bits for d in dtypes)])
    if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
        return jnp.dtype(jnp.complex128 if bits > 32 else jnp.complex64)
    return jnp.dtype(jnp.float64 if bits > 32 else jnp.float32)


def wider(a: Any, b: Any) -> jnp.dtype:
    """The wider of two inexact dtypes (complex when either is).

    float16 and bfloat16 are not ordered: between the two, ``a`` is kept.
    """
    bits = max(jnp.finfo(a).bits, jnp.finfo(b).bits)
    if jnp.issubdtype(a, jnp.complexfloating) or jnp.issubdtype(b, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if bits > 32 else jnp.complex64)
    if bits == 16:
        return jnp.dtype(a) if jnp.finfo(a).bits == 16 else jnp.dtype(b)
    return jnp.dtype(a) if jnp.finfo(a).bits >= jnp.finfo(b).bits else jnp.dtype(b)


def signs_agree(a: jax.Array, b: jax.Array, *, ties: bool) -> jax.Array:
    """Where ``a`` and ``b`` point the same way: their signs agree (bool, elementwise).

    ``ties``: whether a zero in either counts as agreeing. Signs are compared, not the
    product's sign, so tiny values do not underflow to a tie. For complex leaves,
    ``Re(a conj(b))`` is compared with zero. NaN agrees with nothing.
    """
    if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
        product = jnp.real(a * jnp.conj(b))
    else:
        product = jnp.sign(a) * jnp.sign(b)
    return product >= 0 if ties else product > 0


def is_schedule(value: Any) -> bool:
    """Whether ``value`` is a schedule (a callable step -> value) rather than a number."""
    return callable(value) and not isinstance(value, (jax.Array, np.ndarray))


def value_at(value: Any, count: jax.Array) -> Any:
    """A hyperparameter's value at step ``count``: calls it if it is a schedule."""
    return value(count) if is_schedule(value) else value


def hash_bits(bits: jax.Array, salt: jax.Array | None = None) -> jax.Array:
    """Pseudo-random 32-bit words from the 32-bit pattern ``bits`` (uint32 or int32).

    A multiplicative hash: the product wraps around, and each bit of the input changes all
    the bits above it, so the top bits are the well-mixed ones: take them with a right
    shift. No key: the same input gives the same bits. ``salt`` (an integer scalar, such as
    the step count) is mixed in first, so that a value that repeats from one step to the
    next draws new bits each time.
    """
    if salt is not None:
        spread = jnp.asarray(salt).astype(jnp.uint32) * jnp.uint32(SALT_MULTIPLIER)
        bits = bits ^ spread.astype(bits.dtype)
    return bits * jnp.asarray(HASH_MULTIPLIER, jnp.uint32).astype(bits.dtype)


def shift_right_stochastically(
    fixed: jax.Array, seed_bits: jax.Array, shift: int, salt: jax.Array | None = None
) -> jax.Array:
    """``fixed >> shift``, rounded up with probability (its dropped bits) / ``2**shift``.

    The one stochastic rounding of the stored moments: ``fixed`` (uint32, or int32 >= 0) is a
    fixed-point number whose lowest ``shift`` bits are the fraction of the way to the next
    representable value; ``shift`` pseudo-random bits, the top bits of
    :func:`hash_bits` of ``seed_bits``, are added to it before the shift, which carries into
    the kept bits with exactly that probability. The rounded value is then unbiased.
    ``salt`` is mixed into the hash (:func:`hash_bits`).
    """
    noise = jax.lax.shift_right_logical(
        hash_bits(seed_bits, salt), jnp.asarray(32 - shift, seed_bits.dtype)
    )
    return jax.lax.shift_right_logical(fixed + noise, jnp.asarray(shift, fixed.dtype))


def round_to_bfloat16_stochastically(x: jax.Array, salt: jax.Array | None = None) -> jax.Array:
    """``x`` (float32) in bfloat16, rounded stochastically with bits hashed from ``x``.

    The upper of the two bfloat16 neighbours of ``x`` is chosen with probability equal to
    the fraction of the way from the lower one to ``x`` (towards larger magnitudes), so the
    stored value is unbiased. NaN stays NaN. ``salt`` (the step count, for a moment that is
    rounded every step) is mixed into the hash: without it a value that rounds back to its
    old bfloat16 value, as a decaying moment under zero gradients does, would meet the same
    bits, and the same decision, at every later step and never decay.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # bfloat16 is float32's top 16 bits: the float32 bits are a fixed-point number whose
    # lowest 16 bits are the fraction of the way to the next bfloat16.
    top = shift_right_stochastically(bits, bits, 16, salt).astype(jnp.uint16)
    rounded = jax.lax.bitcast_convert_type(top, jnp.bfloat16)
    return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), rounded)


def round_to_dtype_stochastically(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """``x`` (float32) in the narrower floating ``dtype``, rounded stochastically with ``key``.

    Of the two neighbours of ``x`` in ``dtype`` the one farther from ``x`` is chosen with
    probability equal to the fraction of the gap between them that separates ``x`` from the
    nearer one, so the rounding is unbiased. Unlike :func:`round_to_bfloat16_stochastically`
    the randomness comes from ``key`` (``jax.random.uniform``), not from ``x``: the same
    value rounds independently under different keys. A value that is exact in ``dtype``,
    NaN, or beyond its range (no finite neighbour) rounds to nearest.
    """
    nearest = x.astype(dtype)
    near32 = nearest.astype(jnp.float32)
    direction = jnp.where(near32 < x, jnp.inf, -jnp.inf).astype(dtype)
    other = jnp.nextafter(nearest, direction)
    gap = other.astype(jnp.float32) - near32
    safe_gap = jnp.where(gap != 0, gap, 1.0)
    p_other = jnp.where((gap != 0) & jnp.isfinite(gap), (x - near32) / safe_gap, 0.0)
    return jnp.where(jax.random.uniform(key, x.shape) < p_other, other, nearest)


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """``x``'s sharding when its type carries one (explicit mesh axes), else None.

    Under a mesh whose axes are ``jax.sharding.AxisType.Explicit`` a sharded array's
    sharding is part of its type (``float32[4,16@x]``); arrays made for it (a state's
    zeros, a reshaped buffer) must carry the same type as the step's outputs.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(entry is None for entry in spec):
        return None
    return sharding


def replicated(sharding: NamedSharding) -> NamedSharding:
    """The fully replicated sharding on ``sharding``'s mesh."""
    return NamedSharding(sharding.mesh, PartitionSpec())


def last_axis_shards(x: jax.Array) -> int:
    """How many ways an explicit sharding splits ``x``'s last axis (1 when it does not)."""
    sharding = explicit_sharding(x)
    if sharding is None or not jnp.ndim(x):
        return 1
    spec = tuple(sharding.spec) + (None,) * (jnp.ndim(x) - len(sharding.spec))
    entry = spec[jnp.ndim(x) - 1]
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sharding.mesh.shape[name] for name in names)


def split_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """The blocks of ``x`` (at least 1-D): its last axis zero-padded to whole blocks, split.

    Returns ``x`` reshaped to ``(*x.shape[:-1], ceil(x.shape[-1] / block_size), block_size)``.
    """
    n = x.shape[-1]
    n_blocks = math.ceil(n / block_size)
    pad = n_blocks * block_size - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], n_blocks, block_size)


def unblock(xb: jax.Array, n: int) -> jax.Array:
    """The inverse of :func:`split_blocks` for a last-axis length ``n``."""
    return xb.reshape(*xb.shape[:-2], -1)[..., :n]


def block_max_min(xb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The largest and smallest value along the last axis of ``xb``, in one reduction.

    A two-output reduction: XLA on CPU computes it in one pass fused with whatever
    elementwise computation produces ``xb``, where a plain ``max`` of ``|xb|`` would first
    write ``|xb|`` out in full. NaN propagates to both results.
    """
    if jnp.issubdtype(xb.dtype, jnp.floating):
        low, high = -jnp.inf, jnp.inf
    else:
        low, high = jnp.iinfo(xb.dtype).min, jnp.iinfo(xb.dtype).max
    init = (jnp.array(low, xb.dtype), jnp.array(high, xb.dtype))

    def combine(a, b):
        return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])

    largest, smallest = jax.lax.reduce((xb, xb), init, combine, (xb.ndim - 1,))
    return largest, smallest
