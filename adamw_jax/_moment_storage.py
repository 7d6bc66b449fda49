"""How :func:`adamw_jax.scale_by_adam` stores its moments, and loads them back in float32.

Three formats, chosen per leaf:

* a floating dtype (float32, bfloat16, ...): the moment itself, cast; a bfloat16 second
  moment rounded stochastically (:func:`store_second`);
* float16 for the second moment: its square root, so that :math:`g^2` does not underflow
  (float16's smallest positive value is about 6e-8: ``(1e-4)**2 = 1e-8`` would be stored
  as 0, and the update would divide by ``eps`` alone). A positive value too small even for
  the square root is stored as the smallest positive float16 rather than 0;
* ``"int8"``: blockwise 8-bit codes (:mod:`adamw_jax.quantize`); the second moment is
  quantized as its square root with the unsigned code book, the first with the signed one.
  The second moment is rounded stochastically: with ``b2`` close to 1 its per-step change,
  :math:`(1 - b_2)(g^2 - v)`, is far below half a code step (3-6% of the value), so
  under round to nearest an entry whose gradients shrink rounds back to its old code
  every step and never decays (only the block's scale moves); its update is then too
  small, by a factor that grows as training goes on. Stochastic rounding keeps the stored
  value unbiased. (The first moment, with ``b1 = 0.9``, moves by whole code steps and is
  rounded to nearest.) Leaves with fewer than ``min_quantize_size`` elements stay
  float32. In the optimizer step each block's scale comes from a tight bound of its new
  largest magnitude, found from the gradient and the old codes (:func:`update_leaf`), so
  that the new values are encoded in the same elementwise pass that computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _numerics, quantize
from adamw_jax.quantize import QuantizedArray

INT8 = "int8"


def is_int8(requested: Any) -> bool:
    """Whether a ``mu_dtype``/``nu_dtype`` asks for blockwise 8-bit storage."""
    return isinstance(requested, str) and requested == INT8


def is_quantized(x: Any) -> bool:
    """Whether a state node is a :class:`~adamw_jax.quantize.QuantizedArray`."""
    return isinstance(x, QuantizedArray)


def check_options(block_size: Any, min_quantize_size: Any) -> None:
    """Raises if the blockwise-storage keywords are not positive / non-negative ints."""
    quantize._check_block_size(block_size)
    if isinstance(min_quantize_size, bool) or not isinstance(min_quantize_size, (int, np.integer)):
        raise TypeError(f"min_quantize_size must be an int in [0, inf); got {min_quantize_size!r}.")
    if min_quantize_size < 0:
        raise ValueError(f"min_quantize_size must be in [0, inf); got {min_quantize_size!r}.")


def int8_zeros(
    name: str, param: jax.Array, *, real: bool, block_size: int, min_quantize_size: int
) -> Any:
    """The zero ``"int8"`` moment of ``param``: quantized, or float32 when the leaf is small."""
    shape = jnp.shape(param)
    dtype = jnp.result_type(param)
    is_complex = jnp.issubdtype(dtype, jnp.complexfloating)
    if int(np.prod(shape)) < min_quantize_size:
        keep = jnp.complex64 if (is_complex and not real) else jnp.float32
        return jnp.zeros_like(param, dtype=jnp.promote_types(keep, jnp.finfo(dtype).dtype))
    if is_complex and not real:
        raise ValueError(
            f'{name}="int8" cannot store the first moment of a complex parameter ({dtype}, '
            f"shape {shape}); use None or a complex dtype."
        )
    _check_blocks_within_shards(name, param, block_size)
    return quantize.zeros_like(param, signed=not real, block_size=block_size)


def _check_blocks_within_shards(name: str, param: jax.Array, block_size: int) -> None:
    """Raises ValueError if an explicit sharding would cut a quantization block.

    Blocks run along the last axis; a leaf split ``k`` ways along it keeps every block in
    one shard when each shard's length is a multiple of ``block_size`` (or the whole axis
    fits in one block). Under explicit mesh axes the step's block reshape is then typed;
    otherwise it cannot be, so the leaf is refused here rather than at the first step.
    """
    shards = _numerics.last_axis_shards(param)
    length = jnp.shape(param)[-1] if jnp.ndim(param) else 1
    if shards == 1 or length <= block_size or (length // shards) % block_size == 0:
        return
    raise ValueError(
        f'{name}="int8": a leaf of shape {jnp.shape(param)} is split {shards} ways along its '
        f"last axis under an explicit mesh, into shards of {length // shards}, not a multiple "
        f"of block_size={block_size}, so a quantization block would span shards. Choose a "
        f"block_size that divides {length // shards}, a min_quantize_size above "
        f"{int(np.prod(jnp.shape(param)))} (the leaf then stays float32), or shard another axis."
    )


class _Bounded(NamedTuple):
    """A quantized moment, and a bound of each block's new largest magnitude.

    What :func:`update_leaf` hands the step instead of a :class:`QuantizedArray`: loading
    it loads ``stored``; storing a new value encodes it with ``absmax`` as the blocks'
    largest magnitudes (see :func:`update_leaf`).
    """

    stored: QuantizedArray
    absmax: jax.Array


def _unwrap(stored: Any) -> Any:
    return stored.stored if isinstance(stored, _Bounded) else stored


def _quantize(value: jax.Array, like: Any, block_size: int, signed: bool) -> QuantizedArray:
    """``value`` (float32) blockwise quantized; the second moment's root keeps tiny values."""
    if isinstance(like, _Bounded):
        absmax = like.absmax
    else:
        absmax = quantize.block_absmax(value, signed=signed, block_size=block_size)
    return quantize.quantize_with_absmax(
        value,
        absmax,
        signed=signed,
        block_size=block_size,
        keep_nonzero=not signed,
        rounding="nearest" if signed else "stochastic",
    )


def dtype_of(stored: Any) -> jnp.dtype:
    """The dtype a stored moment holds its values in (float32 for quantized ones)."""
    stored = _unwrap(stored)
    return jnp.dtype(jnp.float32) if is_quantized(stored) else stored.dtype


def load(stored: Any, dtype: Any, block_size: int) -> jax.Array:
    """The first moment in ``dtype``."""
    stored = _unwrap(stored)
    if is_quantized(stored):
        return quantize.dequantize(stored, block_size).astype(dtype)
    return stored.astype(dtype)


def store(value: jax.Array, like: Any, block_size: int) -> Any:
    """The first moment ``value`` in the format of ``like``."""
    if is_quantized(_unwrap(like)):
        return _quantize(value.astype(jnp.float32), like, block_size, signed=True)
    return value.astype(like.dtype)


def load_second(stored: Any, dtype: Any, block_size: int) -> jax.Array:
    """The second moment (or its running maximum) in real ``dtype``."""
    stored = _unwrap(stored)
    if is_quantized(stored):
        return jnp.square(quantize.dequantize(stored, block_size).astype(dtype))
    if stored.dtype == jnp.float16:
        return jnp.square(stored.astype(dtype))
    return stored.astype(dtype)


def store_second(value: jax.Array, like: Any, block_size: int, *, average: bool = True) -> Any:
    """The second moment ``value >= 0`` in the format of ``like``.

    A bfloat16 second moment is rounded stochastically: with ``b2`` close to 1 its per-step
    change is below half a bfloat16 step (0.2-0.4% of the value), so rounded to nearest an
    entry whose gradients shrink rounds back to its old value every step and never decays,
    and its updates come out too small. (float16, with 3 more mantissa bits and the square
    root stored, resolves the change and is rounded to nearest.) ``average=False``
    (AMSGrad's running maximum, which needs no unbiased rounding) rounds to nearest.
    """
    if is_quantized(_unwrap(like)):
        return _quantize(jnp.sqrt(value.astype(jnp.float32)), like, block_size, signed=False)
    if like.dtype == jnp.float16:
        root = jnp.sqrt(value).astype(jnp.float16)
        tiny = jnp.asarray(jnp.finfo(jnp.float16).smallest_subnormal, jnp.float16)
        return jnp.where((value > 0) & (root == 0), tiny, root)
    if like.dtype == jnp.bfloat16 and average:
        return _numerics.round_to_bfloat16_stochastically(value.astype(jnp.float32))
    return value.astype(like.dtype)


def per_param(updates: Any, moments: Any, block_size: int) -> list[Any]:
    """The stored moment of each leaf of ``updates``, in ``jax.tree.leaves`` order.

    ``moments`` must have the tree structure of ``updates`` down to each leaf, where it
    holds an array of the leaf's shape or a quantized moment of it. A quantized moment is
    accepted as a :class:`QuantizedArray` or as any container of its codes and scales, in
    that order: what it becomes when a framework rebuilds the state's containers (Flax
    NNX's ``nnx.Optimizer`` turns every named tuple of the state into a ``State``); it is
    handed back as a :class:`QuantizedArray`.

    Raises:
      ValueError: naming the first leaf whose moment does not fit.
    """
    treedef = jax.tree.structure(updates)
    try:
        stored = treedef.flatten_up_to(moments)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "updates have a different tree structure from the state's moments: "
            f"{treedef} vs {jax.tree.structure(moments, is_leaf=is_quantized)}."
        ) from err
    paths = [
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(updates)[0]
    ]
    return [
        _as_stored(path, np.shape(g), moment, block_size)
        for path, g, moment in zip(paths, jax.tree.leaves(updates), stored, strict=True)
    ]


def _as_stored(path: str, shape: tuple[int, ...], moment: Any, block_size: int) -> Any:
    """``moment`` as an array or a :class:`QuantizedArray`, checked against ``shape``."""
    if not is_quantized(moment) and hasattr(moment, "shape") and hasattr(moment, "dtype"):
        if np.shape(moment) != shape:
            raise ValueError(
                f"updates at {path} have shape {shape}, but the state's moment there has "
                f"shape {np.shape(moment)}."
            )
        return moment
    parts = jax.tree.leaves(moment)
    if len(parts) == 2:
        codes, scales = parts
        fits = (
            np.shape(codes) == shape
            and jnp.dtype(codes.dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))
            and np.shape(scales) == quantize.scales_shape(shape, block_size)
        )
        if fits:
            return QuantizedArray(codes, scales)
    raise ValueError(
        f"updates at {path} have shape {shape}, but the state's moment there is "
        f"{jax.tree.map(lambda x: (np.shape(x), str(getattr(x, 'dtype', ''))), moment)}: "
        "neither an array of that shape nor its quantized codes and scales."
    )


def _block_max(stored: Any, block_size: int) -> jax.Array:
    """Each block's largest magnitude of what ``stored`` holds, from the stored data alone.

    For a quantized moment, the value of its largest code times the scale (the largest
    magnitude it decodes to); for any other array, its blocks' largest magnitude, in its
    own (real) dtype.
    """
    if is_quantized(stored):
        codes, scales = stored
        blocks = quantize._blocks(codes.reshape(codes.shape or (1,)), block_size)
        largest, smallest = quantize.block_max_min(blocks)
        top = jnp.maximum(largest.astype(jnp.int32), -smallest.astype(jnp.int32))
        value = quantize._decode(top, signed=codes.dtype == jnp.int8)
        return value.reshape(scales.shape) * scales.astype(jnp.float32)
    real = jnp.abs(stored) if jnp.iscomplexobj(stored) else stored
    blocks = quantize._blocks(real.reshape(real.shape or (1,)), block_size)
    axis = (blocks.ndim - 1,)  # two plain reductions of the input: no |x| written out
    top = jnp.maximum(jax.lax.reduce_max(blocks, axis), -jax.lax.reduce_min(blocks, axis))
    return top.reshape(quantize.scales_shape(real.shape, block_size))


def update_leaf(
    leaf: Callable[..., tuple[Any, ...]],
    g: jax.Array,
    mu: Any,
    nu: Any,
    nu_max: Any,
    block_size: int,
) -> tuple[Any, ...]:
    """``leaf(g, mu, nu, nu_max)``, encoding the new quantized moments in one pass each.

    ``leaf`` is the per-parameter step of :func:`adamw_jax.scale_by_adam`: it returns the
    direction and the new ``mu, nu, nu_max`` (``nu_max`` None without AMSGrad), loading
    and storing them with this module's functions.

    Quantizing a new moment needs each block's largest magnitude. Reduced from the new
    values themselves, XLA on CPU first writes them out in full (4 bytes per element,
    once per moment) and reads them back. Instead, each block is encoded with a bound of
    its largest new magnitude found from the inputs alone: ``leaf`` applied to the
    blocks' largest magnitudes of the gradient and of the stored moments (read from the
    largest code). Every stored moment of Adam is a non-decreasing function of ``|g|``
    and of the old moments' magnitudes with non-negative weights, so the result bounds
    each new value of the block. It exceeds the block's largest new first moment by at
    most ``2 (1 - b1) max|g|``, and the largest new second moment by at most
    ``(1 - b2) max g**2``; the new values are then encoded elementwise, in the pass that
    computes them (:func:`adamw_jax.quantize.quantize_with_absmax`).
    """
    states = (mu, nu, nu_max)
    which = [i for i, s in enumerate(states) if is_quantized(s)]
    if not which:
        return leaf(g, mu, nu, nu_max)
    # Quantized moments enter as plain float32 arrays of what they hold (the second
    # moment's root squared); the leaf then hands back plain bounds, the second moment's
    # (not its root's) included.
    maxima = []
    for i, s in enumerate(states):
        top = None if s is None else _block_max(s, block_size)
        maxima.append(jnp.square(top) if i > 0 and is_quantized(s) else top)
    bounds = leaf(_block_max(g, block_size), *maxima)
    staged = list(states)
    for i in which:
        bound = bounds[1 + i].astype(jnp.float32)
        staged[i] = _Bounded(states[i], jnp.abs(bound) if i == 0 else jnp.sqrt(bound))
    return leaf(g, *staged)
