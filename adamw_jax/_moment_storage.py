"""How :func:`adamw_jax.scale_by_adam` stores its moments, and loads them back in float32.

The storage keywords (``mu_dtype``, ``nu_dtype``, ``block_size``, ``min_quantize_size``,
``moment_layout``) travel as one checked value, a :class:`MomentStorage` made by
:func:`moment_storage`. Three formats, chosen per leaf:

* a floating dtype (float32, bfloat16, ...): the moment itself, cast; a bfloat16 second
  moment rounded stochastically (:func:`store_second`);
* float16 for the second moment: its square root, so that :math:`g^2` does not underflow
  (float16's smallest positive value is about 6e-8: ``(1e-4)**2 = 1e-8`` would be stored
  as 0, and the update would divide by ``eps`` alone). A positive value too small even for
  the square root is stored as the smallest positive float16 rather than 0;
* ``"int8"`` and ``"int4"``: blockwise 8-bit codes, or 4-bit codes two per byte
  (:mod:`adamw_jax.quantize`); the second moment is
  quantized as its square root with the unsigned code book, the first with the signed one.
  The second moment is rounded stochastically: with ``b2`` close to 1 its per-step change,
  :math:`(1 - b_2)(g^2 - v)`, is far below half a code step (3-6% of the value), so
  under round to nearest an entry whose gradients shrink rounds back to its old code
  every step and never decays (only the block's scale moves); its update is then too
  small, by a factor that grows as training goes on. Stochastic rounding keeps the stored
  value unbiased. (The 8-bit first moment, with ``b1 = 0.9``, moves by whole code steps
  and is rounded to nearest; the 4-bit one, whose steps are 8 times coarser, is rounded
  stochastically too.) Leaves with fewer than ``min_quantize_size`` elements stay
  float32. The 4-bit second moment's code book has no code for 0 (see
  :mod:`adamw_jax.quantize`). In the optimizer step each block's scale comes from a tight
  bound of its new largest magnitude, found from the gradient and the old codes
  (:func:`update_leaf`), so that the new values are encoded in the same elementwise pass
  that computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _numerics, _validate, quantize
from adamw_jax._base import MomentDtype
from adamw_jax.quantize import QuantizedArray, QuantizedArray4

INT8 = "int8"
INT4 = "int4"
QUANTIZED_DTYPES = (INT8, INT4)
DEFAULT_BLOCK_SIZE = 256
DEFAULT_INT4_BLOCK_SIZE = quantize.INT4_DEFAULT_BLOCK_SIZE
# The 4-bit first moment is rounded stochastically too: its code steps (a third to a half
# of the value near the top, everything below 1/24 of the block's largest stored as 0) are
# far above the per-step change of a slowly varying first moment, (1 - b1)(g - m), which
# rounded to nearest sticks to its old code or to 0 (on a least-squares problem AdamW then
# needs about twice the steps; benchmarks/lowbit_quality.py). Salted with the step count,
# like the second moment.
INT4_FIRST_MOMENT_ROUNDING = "stochastic"
DEFAULT_MIN_QUANTIZE_SIZE = 4096
MOMENT_LAYOUTS = ("tree", "packed")


class MomentStorage(NamedTuple):
    """How :func:`adamw_jax.scale_by_adam` stores its moments: its five storage keywords.

    Made, and checked, by :func:`moment_storage`; see :func:`adamw_jax.scale_by_adam` for
    what each means.

    Attributes:
      mu_dtype: the first moment's: None (the params' dtype), a floating dtype, ``"int8"``
        or ``"int4"``.
      nu_dtype: the second moment's: None (the params' real dtype), a floating dtype,
        ``"int8"`` or ``"int4"``.
      block_size: with ``"int8"``/``"int4"``, elements per quantization block (an int >= 1;
        even with ``"int4"``).
      min_quantize_size: with ``"int8"``/``"int4"``, leaves with fewer elements stay
        float32 (an int >= 0).
      layout: ``"tree"`` or ``"packed"`` (``moment_layout``).
    """

    mu_dtype: MomentDtype
    nu_dtype: MomentDtype
    block_size: int
    min_quantize_size: int
    layout: str


def moment_storage(
    *,
    mu_dtype: MomentDtype = None,
    nu_dtype: MomentDtype = None,
    block_size: int | None = None,
    min_quantize_size: int | None = None,
    moment_layout: str = "tree",
) -> MomentStorage:
    """The checked :class:`MomentStorage` of :func:`adamw_jax.scale_by_adam`'s keywords.

    ``block_size`` and ``min_quantize_size`` None become their defaults (``block_size``:
    128 when either moment is ``"int4"``, else 256); a concrete integer 0-d array (what
    ``optax.inject_hyperparams`` makes of an int) becomes its int.

    Raises:
      TypeError, ValueError: naming the first keyword that is not accepted.
    """
    _check_moment_dtype("mu_dtype", mu_dtype)
    _check_moment_dtype("nu_dtype", nu_dtype)
    # Traced integers are refused with a pointer to static_args.
    block_size = _validate.check_static_int("block_size", block_size)
    min_quantize_size = _validate.check_static_int("min_quantize_size", min_quantize_size)
    any_int4 = is_int4(mu_dtype) or is_int4(nu_dtype)
    if block_size is None:
        block_size = DEFAULT_INT4_BLOCK_SIZE if any_int4 else DEFAULT_BLOCK_SIZE
    min_quantize_size = (
        DEFAULT_MIN_QUANTIZE_SIZE if min_quantize_size is None else min_quantize_size
    )
    quantize.check_block_size(block_size)
    if any_int4:
        quantize.check_int4_block_size(block_size)
    _check_min_quantize_size(min_quantize_size)
    _validate.check_choice("moment_layout", moment_layout, MOMENT_LAYOUTS)
    if moment_layout == "packed" and (is_lowbit(mu_dtype) or is_lowbit(nu_dtype)):
        raise ValueError(
            'moment_layout="packed" stores floating-point moments; mu_dtype or nu_dtype '
            f'"int8" or "int4" needs moment_layout="tree" (got mu_dtype={mu_dtype!r}, '
            f"nu_dtype={nu_dtype!r})."
        )
    return MomentStorage(mu_dtype, nu_dtype, block_size, min_quantize_size, moment_layout)


_ACCEPTED = 'None, a floating dtype or "int8"/"int4"'


def _check_moment_dtype(name: str, dtype: MomentDtype) -> None:
    if dtype is None:
        return
    if isinstance(dtype, (jax.Array, np.ndarray, jax.core.Tracer)):
        # What optax.inject_hyperparams makes of a dtype class: it takes jnp.bfloat16 (a
        # callable) for a schedule and passes its value at the step count.
        raise TypeError(
            f"{name} must be {_ACCEPTED}; got an array {dtype!r}. Under "
            "optax.inject_hyperparams a dtype class such as jnp.bfloat16 is callable and taken "
            f"for a schedule: pass static_args=({name!r},), or the dtype's name as a string "
            '(e.g. "bfloat16").'
        )
    if is_lowbit(dtype):
        return
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name} must be {_ACCEPTED}; got {dtype!r}.") from err
    if not jnp.issubdtype(resolved, jnp.inexact):
        raise ValueError(f"{name} must be {_ACCEPTED}; got {dtype!r}.")


def _check_min_quantize_size(min_quantize_size: Any) -> None:
    _validate.check_int("min_quantize_size", min_quantize_size, low=0, static=True)


def is_int8(requested: Any) -> bool:
    """Whether a ``mu_dtype``/``nu_dtype`` asks for blockwise 8-bit storage."""
    return isinstance(requested, str) and requested == INT8


def is_int4(requested: Any) -> bool:
    """Whether a ``mu_dtype``/``nu_dtype`` asks for blockwise 4-bit storage."""
    return isinstance(requested, str) and requested == INT4


def is_lowbit(requested: Any) -> bool:
    """Whether a ``mu_dtype``/``nu_dtype`` asks for blockwise codes (``"int8"``/``"int4"``)."""
    return isinstance(requested, str) and requested in QUANTIZED_DTYPES


def is_quantized(x: Any) -> bool:
    """Whether a state node is quantized: a :class:`~adamw_jax.quantize.QuantizedArray` or
    a :class:`~adamw_jax.quantize.QuantizedArray4`."""
    return isinstance(x, (QuantizedArray, QuantizedArray4))


def zeros(param: jax.Array, storage: MomentStorage) -> Any:
    """The zero first moment of ``param``, as ``storage`` keeps it."""
    return _zeros("mu_dtype", storage.mu_dtype, param, storage, real=False)


def zeros_second(param: jax.Array, storage: MomentStorage) -> Any:
    """The zero second moment of ``param`` (real, like its square), as ``storage`` keeps it."""
    return _zeros("nu_dtype", storage.nu_dtype, param, storage, real=True)


def floating_dtypes(param: jax.Array, storage: MomentStorage) -> tuple[jnp.dtype, jnp.dtype]:
    """The dtypes the first and second moment of ``param`` are stored in (floating only)."""
    return (
        _floating_dtype("mu_dtype", storage.mu_dtype, param, real=False),
        _floating_dtype("nu_dtype", storage.nu_dtype, param, real=True),
    )


def _zeros(
    name: str, requested: MomentDtype, param: jax.Array, storage: MomentStorage, *, real: bool
) -> Any:
    if is_lowbit(requested):
        return _quantized_zeros(
            name,
            requested,
            param,
            real=real,
            block_size=storage.block_size,
            min_quantize_size=storage.min_quantize_size,
        )
    # zeros_like, not zeros: under explicit sharding the moment's type carries the param's
    # sharding, as the step's output will.
    return jnp.zeros_like(param, dtype=_floating_dtype(name, requested, param, real))


def _floating_dtype(name: str, requested: MomentDtype, param: jax.Array, real: bool) -> jnp.dtype:
    """The dtype a moment of ``param`` is stored in, for a requested floating dtype or None."""
    param_dtype = jnp.result_type(param)
    is_complex = jnp.issubdtype(param_dtype, jnp.complexfloating)
    if requested is None:
        base = jnp.finfo(param_dtype).dtype if (real and is_complex) else param_dtype
        return jnp.dtype(base)
    requested = jnp.dtype(requested)
    if is_complex and not real and not jnp.issubdtype(requested, jnp.complexfloating):
        raise ValueError(
            f"{name}={requested} is real, but a parameter is complex ({param_dtype}); "
            "use None or a complex dtype for the first moment of complex parameters."
        )
    return requested


def _quantized_zeros(
    name: str,
    requested: str,
    param: jax.Array,
    *,
    real: bool,
    block_size: int,
    min_quantize_size: int,
) -> Any:
    """The zero ``"int8"``/``"int4"`` moment of ``param``: quantized, or float32 if small."""
    shape = jnp.shape(param)
    dtype = jnp.result_type(param)
    is_complex = jnp.issubdtype(dtype, jnp.complexfloating)
    if int(np.prod(shape)) < min_quantize_size:
        keep = _numerics.compute_dtype(dtype)  # float32, or the param's wider (complex) dtype
        return jnp.zeros_like(param, dtype=jnp.finfo(keep).dtype if real else keep)
    if is_complex and not real:
        raise ValueError(
            f"{name}={requested!r} cannot store the first moment of a complex parameter "
            f"({dtype}, shape {shape}); use None or a complex dtype."
        )
    _check_blocks_within_shards(name, requested, param, block_size)
    if is_int4(requested):
        return quantize.zeros_like_int4(param, signed=not real, block_size=block_size)
    return quantize.zeros_like(param, signed=not real, block_size=block_size)


def _check_blocks_within_shards(
    name: str, requested: str, param: jax.Array, block_size: int
) -> None:
    """Raises ValueError if an explicit sharding would cut a quantization block or byte.

    Blocks run along the last axis; a leaf split ``k`` ways along it keeps every block in
    one shard when each shard's length is a multiple of ``block_size`` (or the whole axis
    fits in one block). ``"int4"`` codes are packed two per byte along the last axis, so
    each shard's length must moreover be even (a byte would otherwise span two shards).
    Under explicit mesh axes the step's block reshape is then typed; otherwise it cannot
    be, so the leaf is refused here rather than at the first step.
    """
    shards = _numerics.last_axis_shards(param)
    length = jnp.shape(param)[-1] if jnp.ndim(param) else 1
    if is_int4(requested) and shards > 1 and (length // shards) % 2:
        raise ValueError(
            f'{name}="int4": a leaf of shape {jnp.shape(param)} is split {shards} ways along '
            f"its last axis under an explicit mesh, into shards of odd length "
            f"{length // shards}: its 4-bit codes, two per byte along that axis, cannot be "
            f"split the same way. Use a min_quantize_size above "
            f"{int(np.prod(jnp.shape(param)))} (the leaf then stays float32), shard another "
            'axis, or "int8".'
        )
    if shards == 1 or length <= block_size or (length // shards) % block_size == 0:
        return
    raise ValueError(
        f"{name}={requested!r}: a leaf of shape {jnp.shape(param)} is split {shards} ways "
        f"along its last axis under an explicit mesh, into shards of {length // shards}, not "
        f"a multiple of block_size={block_size}, so a quantization block would span shards. "
        f"Choose a block_size that divides {length // shards}, a min_quantize_size above "
        f"{int(np.prod(jnp.shape(param)))} (the leaf then stays float32), or shard another axis."
    )


class _Bounded(NamedTuple):
    """A quantized moment, and a bound of each block's new largest magnitude.

    What :func:`update_leaf` hands the step instead of a quantized moment: loading it
    loads ``stored``; storing a new value encodes it with ``absmax`` as the blocks'
    largest magnitudes (see :func:`update_leaf`).
    """

    stored: QuantizedArray | QuantizedArray4
    absmax: jax.Array


def _unwrap(stored: Any) -> Any:
    return stored.stored if isinstance(stored, _Bounded) else stored


def _quantize(
    value: jax.Array, like: Any, block_size: int, signed: bool, salt: jax.Array | None = None
) -> QuantizedArray | QuantizedArray4:
    """``value`` (float32) blockwise quantized like ``like`` (8 or 4 bits).

    The second moment, and the 4-bit first moment, are rounded stochastically, their random
    bits salted with ``salt``; the 8-bit second moment's root keeps tiny values nonzero
    (the 4-bit book has no 0 to avoid).
    """
    if isinstance(like, _Bounded):
        absmax = like.absmax
    else:
        absmax = quantize.block_absmax(value, signed=signed, block_size=block_size)
    if isinstance(_unwrap(like), QuantizedArray4):
        return quantize.quantize_int4_with_absmax(
            value,
            absmax,
            signed=signed,
            block_size=block_size,
            rounding=INT4_FIRST_MOMENT_ROUNDING if signed else "stochastic",
            salt=salt,
        )
    return quantize.quantize_with_absmax(
        value,
        absmax,
        signed=signed,
        block_size=block_size,
        keep_nonzero=not signed,
        rounding="nearest" if signed else "stochastic",
        salt=None if signed else salt,
    )


def dtype_of(stored: Any) -> jnp.dtype:
    """The dtype a stored moment holds its values in (float32 for quantized ones)."""
    stored = _unwrap(stored)
    return jnp.dtype(jnp.float32) if is_quantized(stored) else stored.dtype


def _dequantize(stored: Any, block_size: int) -> jax.Array:
    """What a quantized moment (or a :class:`_Bounded` one) holds, in float32."""
    stored = _unwrap(stored)
    if isinstance(stored, QuantizedArray4):
        return quantize.dequantize_int4(stored)
    return quantize.dequantize(stored, block_size)


def load(stored: Any, dtype: Any, block_size: int) -> jax.Array:
    """The first moment in ``dtype``."""
    if is_quantized(_unwrap(stored)):
        return _dequantize(stored, block_size).astype(dtype)
    return stored.astype(dtype)


def store(value: jax.Array, like: Any, block_size: int, *, salt: jax.Array | None = None) -> Any:
    """The first moment ``value`` in the format of ``like``."""
    if is_quantized(_unwrap(like)):
        return _quantize(value.astype(jnp.float32), like, block_size, signed=True, salt=salt)
    return value.astype(like.dtype)


def load_second(stored: Any, dtype: Any, block_size: int) -> jax.Array:
    """The second moment (or its running maximum) in real ``dtype``."""
    if is_quantized(_unwrap(stored)):
        return jnp.square(_dequantize(stored, block_size).astype(dtype))
    if stored.dtype == jnp.float16:
        return jnp.square(stored.astype(dtype))
    return stored.astype(dtype)


def store_second(
    value: jax.Array,
    like: Any,
    block_size: int,
    *,
    average: bool = True,
    salt: jax.Array | None = None,
) -> Any:
    """The second moment ``value >= 0`` in the format of ``like``.

    A bfloat16 second moment is rounded stochastically: with ``b2`` close to 1 its per-step
    change is below half a bfloat16 step (0.2-0.4% of the value), so rounded to nearest an
    entry whose gradients shrink rounds back to its old value every step and never decays,
    and its updates come out too small. (float16, with 3 more mantissa bits and the square
    root stored, resolves the change and is rounded to nearest.) ``average=False``
    (AMSGrad's running maximum, which needs no unbiased rounding) rounds to nearest.
    ``salt`` (the step count) is mixed into stochastic rounding's random bits, so that a
    value that repeats from step to step (a moment decaying under zero gradients) draws new
    bits each time instead of repeating one rounding decision forever.
    """
    if is_quantized(_unwrap(like)):
        root = jnp.sqrt(value.astype(jnp.float32))
        return _quantize(root, like, block_size, signed=False, salt=salt)
    if like.dtype == jnp.float16:
        root = jnp.sqrt(value).astype(jnp.float16)
        tiny = jnp.asarray(jnp.finfo(jnp.float16).smallest_subnormal, jnp.float16)
        return jnp.where((value > 0) & (root == 0), tiny, root)
    if like.dtype == jnp.bfloat16 and average:
        return _numerics.round_to_bfloat16_stochastically(value.astype(jnp.float32), salt)
    return value.astype(like.dtype)


def per_param(
    updates: Any,
    moments: Any,
    block_size: int,
    *,
    requested: MomentDtype = None,
    second: bool = False,
) -> list[Any]:
    """The stored moment of each leaf of ``updates``, in ``jax.tree.leaves`` order.

    ``moments`` must have the tree structure of ``updates`` down to each leaf, where it
    holds an array of the leaf's shape or a quantized moment of it. A quantized moment is
    accepted as a :class:`QuantizedArray` (:class:`QuantizedArray4`) or as any container
    of its codes and scales, in that order: what it becomes when a framework rebuilds the
    state's containers (Flax NNX's ``nnx.Optimizer`` turns every named tuple of the state,
    and under ``nnx.jit`` every dataclass, into a ``State``); it is handed back as a
    :class:`QuantizedArray`, or, when ``requested`` is ``"int4"``, as a
    :class:`QuantizedArray4` of ``block_size`` on the unsigned book if ``second`` (the
    second moment or its maximum), else the signed one.

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
    fitted = []
    for index, (grad, moment) in enumerate(zip(jax.tree.leaves(updates), stored, strict=True)):
        if is_int4(requested) and not _is_array(moment) and not is_quantized(moment):
            moment = _as_int4(np.shape(grad), moment, block_size, signed=not second)
        as_stored = _as_stored(np.shape(grad), moment, block_size)
        if as_stored is None:  # the leaf's path is looked up only for the message
            path = jax.tree_util.tree_flatten_with_path(updates)[0][index][0]
            raise _misfit(jax.tree_util.keystr(path), np.shape(grad), moment)
        fitted.append(as_stored)
    return fitted


def _as_int4(shape: tuple[int, ...], moment: Any, block_size: int, signed: bool) -> Any:
    """A container of 4-bit codes and scales as a :class:`QuantizedArray4` of ``shape``.

    Returned unchanged (to be refused by :func:`_as_stored`) unless it holds two arrays.
    """
    parts = jax.tree.leaves(moment)
    if len(parts) != 2:
        return moment
    return QuantizedArray4(*parts, (shape or (1,))[-1], signed, block_size)


def _is_array(moment: Any) -> bool:
    return not is_quantized(moment) and hasattr(moment, "shape") and hasattr(moment, "dtype")


def _as_stored(shape: tuple[int, ...], moment: Any, block_size: int) -> Any:
    """``moment`` as an array or a :class:`QuantizedArray` of ``shape``; None if it is not."""
    if _is_array(moment):
        return moment if np.shape(moment) == shape else None
    if isinstance(moment, QuantizedArray4):
        fits = (
            moment.shape == shape
            and jnp.dtype(moment.codes.dtype) == jnp.dtype(jnp.uint8)
            and np.shape(moment.scales) == quantize.scales_shape(shape, moment.block_size)
        )
        return moment if fits else None
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
    return None


def _misfit(path: str, shape: tuple[int, ...], moment: Any) -> ValueError:
    """The error for a state moment at ``path`` that does not fit the update's ``shape``."""
    if _is_array(moment):
        return ValueError(
            f"updates at {path} have shape {shape}, but the state's moment there has "
            f"shape {np.shape(moment)}."
        )
    return ValueError(
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
    if isinstance(stored, QuantizedArray4):
        return quantize.stored_absmax_int4(stored)
    if is_quantized(stored):
        return quantize.stored_absmax(stored, block_size)
    real = jnp.abs(stored) if jnp.iscomplexobj(stored) else stored
    blocks = quantize.split_blocks(real.reshape(real.shape or (1,)), block_size)
    axis = (blocks.ndim - 1,)  # two plain reductions of the input: no |x| written out
    top = jnp.maximum(jax.lax.reduce_max(blocks, axis), -jax.lax.reduce_min(blocks, axis))
    return top.reshape(quantize.scales_shape(real.shape, block_size))


def update_leaf(
    step: Callable[..., tuple[Any, ...]],
    grad: jax.Array,
    mu: Any,
    nu: Any,
    nu_max: Any,
    block_size: int,
) -> tuple[Any, ...]:
    """``step(grad, mu, nu, nu_max)``, encoding the new quantized moments in one pass each.

    ``step`` is the per-parameter step of :func:`adamw_jax.scale_by_adam`: it returns the
    direction and the new ``mu, nu, nu_max`` (``nu_max`` None without AMSGrad), loading
    and storing them with this module's functions.

    Quantizing a new moment needs each block's largest magnitude. Reduced from the new
    values themselves, XLA on CPU first writes them out in full (4 bytes per element,
    once per moment) and reads them back. Instead, each block is encoded with a bound of
    its largest new magnitude found from the inputs alone: ``step`` applied to the
    blocks' largest magnitudes of the gradient and of the stored moments (read from the
    largest code). Every stored moment of Adam is a non-decreasing function of ``|g|``
    and of the old moments' magnitudes with non-negative weights, so the result bounds
    each new value of the block. It exceeds the block's largest new first moment by at
    most ``2 (1 - b1) max|g|``, and the largest new second moment by at most
    ``(1 - b2) max g**2``; the new values are then encoded elementwise, in the pass that
    computes them (:func:`adamw_jax.quantize.quantize_with_absmax`).
    """
    moments = (mu, nu, nu_max)
    quantized = [i for i, moment in enumerate(moments) if is_quantized(moment)]
    if not quantized:
        return step(grad, mu, nu, nu_max)
    # Quantized moments enter as plain float32 arrays of what they hold (the second
    # moment's root squared); the step then hands back plain bounds, the second moment's
    # (not its root's) included.
    maxima = []
    for i, moment in enumerate(moments):
        top = None if moment is None else _block_max(moment, block_size)
        maxima.append(jnp.square(top) if i > 0 and is_quantized(moment) else top)
    bounds = step(_block_max(grad, block_size), *maxima)
    staged = list(moments)
    for i in quantized:
        bound = bounds[1 + i].astype(jnp.float32)
        staged[i] = _Bounded(moments[i], jnp.abs(bound) if i == 0 else jnp.sqrt(bound))
    return step(grad, *staged)
