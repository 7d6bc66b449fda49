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
  float32 (an empty leaf too). The 4-bit second moment's code book has no code for 0 (see
  :mod:`adamw_jax.quantize`). In the optimizer step each block's scale comes from a tight
  bound of its new largest magnitude, found from the gradient and the old codes
  (:func:`update_leaf`), so that the new values are encoded in the same elementwise pass
  that computes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _numerics, _packing, _validate, quantize
from adamw_jax._base import MomentDtype
from adamw_jax._packing import PackedMoments
from adamw_jax.quantize import QuantizedArray, QuantizedStorage

INT8 = "int8"
INT4 = "int4"
QUANTIZED_DTYPES = (INT8, INT4)
DEFAULT_BLOCK_SIZE = quantize.INT8_DEFAULT_BLOCK_SIZE
DEFAULT_INT4_BLOCK_SIZE = quantize.INT4_DEFAULT_BLOCK_SIZE
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
    quantize.check_block_size(block_size, bits=4 if any_int4 else 8)
    _check_min_quantize_size(min_quantize_size)
    _validate.check_choice("moment_layout", moment_layout, MOMENT_LAYOUTS)
    if moment_layout == "packed" and (is_lowbit(mu_dtype) or is_lowbit(nu_dtype)):
        raise ValueError(
            'moment_layout="packed" stores floating-point moments; mu_dtype or nu_dtype '
            f'"int8" or "int4" needs moment_layout="tree" (got mu_dtype={mu_dtype!r}, '
            f"nu_dtype={nu_dtype!r})."
        )
    return MomentStorage(mu_dtype, nu_dtype, block_size, min_quantize_size, moment_layout)


_ACCEPTED = 'None, a floating dtype or "int8"/"int4" (or a quantize.QuantizedStorage)'


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
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool):
        raise ValueError(
            f"{name} must be {_ACCEPTED}; got the number {dtype!r}. (In "
            "Optax's positional order mu_dtype comes sixth, before weight_decay: pass "
            "weight_decay by name.)"
        )
    if isinstance(dtype, QuantizedStorage):
        _check_quantized_storage(name, dtype)
        return
    if is_lowbit(dtype):
        return
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name} must be {_ACCEPTED}; got {dtype!r}.") from err
    if resolved in (jnp.dtype(jnp.int8), jnp.dtype(jnp.int4)):
        bits = 8 if resolved == jnp.int8 else 4
        raise ValueError(
            f"{name} must be {_ACCEPTED}; got the integer dtype {resolved}. For blockwise "
            f"{bits}-bit codes write the string {name}={str(resolved)!r}."
        )
    if not jnp.issubdtype(resolved, jnp.inexact):
        raise ValueError(f"{name} must be {_ACCEPTED}; got {dtype!r}.")


def _check_quantized_storage(name: str, spec: QuantizedStorage) -> None:
    quantize.check_bits(spec.bits, f"{name}.bits")
    if spec.rounding is not None:
        _validate.check_choice(f"{name}.rounding", spec.rounding, ("nearest", "stochastic"))
    if spec.code_format is not None:
        signed = name == "mu_dtype"  # the first moment's book is signed, the second's not
        quantize.check_code_format(spec.code_format, spec.bits, signed, f"{name}.code_format")


def _check_min_quantize_size(min_quantize_size: Any) -> None:
    _validate.check_int("min_quantize_size", min_quantize_size, low=0, static=True)


def lowbit(requested: Any) -> QuantizedStorage | None:
    """A ``mu_dtype``/``nu_dtype`` as its :class:`~adamw_jax.quantize.QuantizedStorage`
    (``"int8"``, ``"int4"`` spelled out); None for a floating dtype or None."""
    if isinstance(requested, QuantizedStorage):
        return requested
    if isinstance(requested, str) and requested in QUANTIZED_DTYPES:
        return QuantizedStorage(8 if requested == INT8 else 4)
    return None


def is_int8(requested: Any) -> bool:
    """Whether a ``mu_dtype``/``nu_dtype`` asks for blockwise 8-bit storage."""
    spec = lowbit(requested)
    return spec is not None and spec.bits == 8


def is_int4(requested: Any) -> bool:
    """Whether a ``mu_dtype``/``nu_dtype`` asks for blockwise 4-bit storage."""
    spec = lowbit(requested)
    return spec is not None and spec.bits == 4


def is_lowbit(requested: Any) -> bool:
    """Whether a ``mu_dtype``/``nu_dtype`` asks for blockwise codes."""
    return lowbit(requested) is not None


def is_default_lowbit(requested: Any) -> bool:
    """Whether a low-bit ``mu_dtype``/``nu_dtype`` keeps the default code book and rounding
    (what ``"int8"``/``"int4"`` choose)."""
    spec = lowbit(requested)
    return spec is not None and spec.rounding is None and spec.code_format is None


def rounding(spec: QuantizedStorage, second: bool) -> str:
    """How a low-bit moment is rounded: the spec's choice, else the default.

    The second moment is rounded stochastically: with ``b2`` close to 1 its per-step change
    is far below half a code step, so rounded to nearest it would stick to its old code.
    The 8-bit first moment, with ``b1 = 0.9``, moves by whole code steps and is rounded to
    nearest. The 4-bit first moment is rounded stochastically too: its code steps (a third
    to a half of the value near the top, everything below 1/24 of the block's largest
    stored as 0) are far above the per-step change of a slowly varying first moment,
    ``(1 - b1)(g - m)``, which rounded to nearest sticks to its old code or to 0 (on a
    least-squares problem AdamW then needs about twice the steps;
    ``benchmarks/lowbit_quality.py``).
    """
    if spec.rounding is not None:
        return spec.rounding
    return "nearest" if spec.bits == 8 and not second else "stochastic"


def is_quantized(x: Any) -> bool:
    """Whether a state node is a :class:`~adamw_jax.quantize.QuantizedArray`."""
    return isinstance(x, QuantizedArray)


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
    if int(np.prod(shape)) < max(min_quantize_size, 1):  # empty leaves too: nothing to code
        keep = _numerics.compute_dtype(dtype)  # float32, or the param's wider (complex) dtype
        return jnp.zeros_like(param, dtype=jnp.finfo(keep).dtype if real else keep)
    if is_complex and not real:
        raise ValueError(
            f"{name}={requested!r} cannot store the first moment of a complex parameter "
            f"({dtype}, shape {shape}); use None or a complex dtype."
        )
    _check_blocks_within_shards(name, requested, param, block_size)
    spec = lowbit(requested)
    return quantize.zeros_like(
        param, signed=not real, bits=spec.bits, block_size=block_size, code_format=spec.code_format
    )


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
    """A quantized moment, a bound of each block's new largest magnitude, and its rounding.

    What :func:`update_leaf` hands the step instead of a quantized moment: loading it
    loads ``stored``; storing a new value encodes it in ``stored``'s format with ``absmax``
    as the blocks' largest magnitudes and the storage's ``rounding`` (see
    :func:`update_leaf`).
    """

    stored: QuantizedArray
    absmax: jax.Array
    rounding: str


def _unwrap(stored: Any) -> Any:
    return stored.stored if isinstance(stored, _Bounded) else stored


def _quantize(value: jax.Array, like: Any, salt: jax.Array | None = None) -> QuantizedArray:
    """``value`` (float32) blockwise quantized in the format of ``like``.

    ``like`` is a :class:`QuantizedArray` (its blocks' maxima found here, its rounding the
    default of :func:`rounding`) or a :class:`_Bounded` one. Stochastic rounding's bits are
    salted with ``salt``; an 8-bit unsigned book with a 0 (the second moment's root) keeps
    tiny values nonzero (the default 4-bit one has no 0 to avoid).
    """
    q = _unwrap(like)
    if isinstance(like, _Bounded):
        absmax, how = like.absmax, like.rounding
    else:
        absmax = quantize.block_absmax(value, signed=q.signed, block_size=q.block_size)
        how = rounding(QuantizedStorage(q.bits), second=not q.signed)
    return quantize.quantize_with_absmax(
        value,
        absmax,
        signed=q.signed,
        bits=q.bits,
        block_size=q.block_size,
        code_format=q.code_format,
        keep_nonzero=not q.signed and q.code_format.subnormals,
        rounding=how,
        salt=salt if how == "stochastic" else None,
    )


def dtype_of(stored: Any) -> jnp.dtype:
    """The dtype a stored moment holds its values in (float32 for quantized ones)."""
    stored = _unwrap(stored)
    return jnp.dtype(jnp.float32) if is_quantized(stored) else stored.dtype


def load(stored: Any, dtype: Any) -> jax.Array:
    """The first moment in ``dtype``."""
    if is_quantized(_unwrap(stored)):
        return quantize.dequantize(_unwrap(stored)).astype(dtype)
    return stored.astype(dtype)


def store(value: jax.Array, like: Any, *, salt: jax.Array | None = None) -> Any:
    """The first moment ``value`` in the format of ``like``."""
    if is_quantized(_unwrap(like)):
        return _quantize(value.astype(jnp.float32), like, salt=salt)
    return value.astype(like.dtype)


def load_second(stored: Any, dtype: Any) -> jax.Array:
    """The second moment (or its running maximum) in real ``dtype``."""
    if is_quantized(_unwrap(stored)):
        return jnp.square(quantize.dequantize(_unwrap(stored)).astype(dtype))
    if stored.dtype == jnp.float16:
        return jnp.square(stored.astype(dtype))
    return stored.astype(dtype)


def store_second(
    value: jax.Array,
    like: Any,
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
        return _quantize(root, like, salt=salt)
    if like.dtype == jnp.float16:
        root = jnp.sqrt(value).astype(jnp.float16)
        tiny = jnp.asarray(jnp.finfo(jnp.float16).smallest_subnormal, jnp.float16)
        return jnp.where((value > 0) & (root == 0), tiny, root)
    if like.dtype == jnp.bfloat16 and average:
        return _numerics.round_to_bfloat16_stochastically(value.astype(jnp.float32), salt)
    return value.astype(like.dtype)


def per_param(
    updates: Any, moments: Any, storage: MomentStorage, *, second: bool = False
) -> list[Any]:
    """The stored moment of each leaf of ``updates``, in ``jax.tree.leaves`` order.

    ``moments`` must have the tree structure of ``updates`` down to each leaf, where it
    holds a moment of the leaf's shape in the format ``storage`` configures for it (the
    first moment's, or with ``second`` the second moment's or its maximum's). A quantized
    moment is accepted as a :class:`QuantizedArray` or as any container of its codes and
    scales, in that order: what it becomes when a framework rebuilds the state's containers
    (Flax NNX's ``nnx.Optimizer`` turns every dataclass of the state into a ``State``); it
    is handed back as a :class:`QuantizedArray` of the configured format.

    Raises:
      ValueError: naming the first leaf whose moment does not fit: another shape, or
        another storage than the configured one (the message names both). The check is
        on shapes, dtypes and static metadata only: no value is read.
    """
    treedef = jax.tree.structure(updates)
    if isinstance(moments, PackedMoments):
        raise ValueError(
            'the state\'s moments are in moment_layout="packed" (a PackedMoments), but the '
            'optimizer is configured with moment_layout="tree": build it with the layout '
            "the state was made with, or start a new state."
        )
    try:
        stored = treedef.flatten_up_to(moments)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "updates have a different tree structure from the state's moments: "
            f"{treedef} vs {jax.tree.structure(moments, is_leaf=is_quantized)}."
        ) from err
    requested = storage.nu_dtype if second else storage.mu_dtype
    fitted = []
    for index, (grad, moment) in enumerate(zip(jax.tree.leaves(updates), stored, strict=True)):
        expected = _expected(grad, requested, storage, second)
        as_stored = _as_stored(np.shape(grad), moment, expected)
        if as_stored is None:  # the leaf's path is looked up only for the message
            path = jax.tree_util.tree_flatten_with_path(updates)[0][index][0]
            name = f"nu_dtype={storage.nu_dtype!r}" if second else f"mu_dtype={storage.mu_dtype!r}"
            raise _misfit(jax.tree_util.keystr(path), np.shape(grad), moment, name, expected)
        fitted.append(as_stored)
    return fitted


def _expected(
    grad: Any, requested: Any, storage: MomentStorage, second: bool
) -> QuantizedArray | jnp.dtype | None:
    """The storage configured for the moment of a leaf whose update is ``grad``: a
    :class:`QuantizedArray` (an empty one: its format), a floating dtype, or None (an array
    of float32 or wider, a low-bit moment's small leaf).

    With ``requested`` None the moment has the params' dtype, which ``update`` does not
    see (the updates may come in another dtype): any floating array of the shape fits.
    """
    shape = np.shape(grad)
    spec = lowbit(requested)
    if spec is None and requested is None:
        return None
    if spec is None:
        return jnp.dtype(requested)
    if int(np.prod(shape)) < max(storage.min_quantize_size, 1):
        return None  # kept as an array, in float32 (or the param's wider dtype)
    fmt = spec.code_format or quantize.default_format(spec.bits, not second)
    length = (shape or (1,))[-1]
    return QuantizedArray(None, None, spec.bits, not second, storage.block_size, length, fmt)


def _is_array(moment: Any) -> bool:
    return not is_quantized(moment) and hasattr(moment, "shape") and hasattr(moment, "dtype")


def _as_stored(shape: tuple[int, ...], moment: Any, expected: Any) -> Any:
    """``moment`` as the ``expected`` storage of a leaf of ``shape``; None if it is not."""
    if not isinstance(expected, QuantizedArray):
        if not _is_array(moment) or np.shape(moment) != shape:
            return None
        return moment if expected is None or jnp.dtype(moment.dtype) == expected else None
    if _is_array(moment):
        return None
    if is_quantized(moment):
        same = (moment.bits, moment.signed, moment.block_size, moment.code_format) == (
            expected.bits,
            expected.signed,
            expected.block_size,
            expected.code_format,
        )
        parts = [moment.codes, moment.scales] if same and moment.shape == shape else []
    else:
        parts = jax.tree.leaves(moment)
    if len(parts) != 2:
        return None
    q = dataclasses.replace(expected, codes=parts[0], scales=parts[1])
    codes_dtype = (jnp.int8 if q.signed else jnp.uint8) if q.bits == 8 else jnp.uint8
    codes_shape = shape if q.bits == 8 else quantize.packed_shape(shape)
    fits = (
        np.shape(q.codes) == codes_shape
        and jnp.dtype(q.codes.dtype) == jnp.dtype(codes_dtype)
        and np.shape(q.scales) == quantize.scales_shape(shape, q.block_size)
    )
    return q if fits else None


def describe(moment: Any) -> str:
    """How a stored moment is kept, in words: its width, code book and block, or dtype."""
    if is_quantized(moment):
        fmt = moment.code_format
        return (
            f"{moment.bits}-bit codes (QuantizedArray, block_size={moment.block_size}, "
            f"{'signed' if moment.signed else 'unsigned'} code book E{fmt.exponent_bits}"
            f"M{fmt.mantissa_bits})" + ("" if moment.codes is None else f" of shape {moment.shape}")
        )
    if _is_array(moment):
        return f"an array of dtype {moment.dtype} and shape {np.shape(moment)}"
    leaves = jax.tree.leaves(moment)
    parts = ", ".join(f"{np.shape(x)} {getattr(x, 'dtype', type(x).__name__)}" for x in leaves)
    return f"a {type(moment).__name__} of {parts or 'nothing'}"


def _misfit(path: str, shape: tuple[int, ...], moment: Any, name: str, expected: Any) -> ValueError:
    """The error for a state moment at ``path`` that does not fit the configured storage."""
    stored_shape = getattr(moment, "shape", None)
    if stored_shape is not None and tuple(stored_shape) != tuple(shape):
        return ValueError(
            f"updates at {path} have shape {tuple(shape)}, but the state's moment there is "
            f"of a leaf of shape {tuple(stored_shape)}: the updates must have the params' "
            "shapes."
        )
    if expected is None:
        configured = "an array (floating, not quantized)"
    elif isinstance(expected, QuantizedArray):
        configured = describe(expected)
    else:
        configured = f"an array of dtype {expected}"
    return ValueError(
        f"the state's moment at {path} is stored as {describe(moment)}, but the optimizer "
        f"({name}) stores the moment of a leaf of shape {shape} as {configured}. A "
        "state is updated only in the storage it was made with: build the optimizer with "
        "the settings the state was made with, or convert the state "
        "(adamw_jax.convert_state)."
    )


def check_packed(
    updates: Any, moments: Any, storage: MomentStorage, *, second: bool = False
) -> None:
    """Raises ValueError unless ``moments`` is a ``"packed"`` moment that fits ``updates``
    and ``storage``: a :class:`PackedMoments` of their leaves and shapes, each buffer in
    the configured dtype (the updates' with None, the real one for the second moment).

    Only shapes and dtypes are read: a static check.
    """
    name = "nu_dtype" if second else "mu_dtype"
    if not isinstance(moments, PackedMoments):
        raise ValueError(
            'the optimizer is configured with moment_layout="packed", but the state\'s '
            f'moments are {type(moments).__name__} (the "tree" layout?): build it with the '
            "layout the state was made with, or start a new state."
        )
    _packing.check_matches(updates, moments)
    leaves = jax.tree.leaves(updates)
    requested = storage.nu_dtype if second else storage.mu_dtype
    for group, buffer in zip(moments.groups, moments.buffers, strict=True):
        expected = _expected(leaves[group[0]], requested, storage, second)
        if expected is not None and jnp.dtype(buffer.dtype) != expected:
            raise ValueError(
                f"the state's packed buffer of leaves {list(group)} is stored as "
                f"{jnp.dtype(buffer.dtype)}, but the optimizer ({name}={requested!r}) stores "
                f"them as {expected}: build it with the settings the state was made with, or "
                "convert the state (adamw_jax.convert_state)."
            )


def convert(stored: Any, like: Any, *, second: bool = False) -> Any:
    """The moment ``stored`` re-stored in the format of ``like`` (a moment, or an abstract
    one from ``jax.eval_shape``), rounded to nearest.

    The value is decoded (a quantized or float16 second moment squared back) in the wider
    of both formats' dtypes, then stored as ``like`` keeps it: quantized with the format's
    own block size and code book (to nearest, so each value moves by at most half a step
    of the new book), or cast (a bfloat16 second moment to nearest too).
    """
    dtype = _numerics.wider(dtype_of(stored), dtype_of(like))
    if second:
        dtype = jnp.finfo(dtype).dtype
        value = load_second(stored, dtype)
    else:
        value = load(stored, dtype)
    if is_quantized(like):
        x = jnp.sqrt(value) if second else value
        return quantize.quantize(
            x.astype(jnp.float32),
            signed=like.signed,
            bits=like.bits,
            block_size=like.block_size,
            code_format=like.code_format,
            keep_nonzero=second and like.code_format.subnormals,
        )
    if second:
        return store_second(value, like, average=False)
    return store(value, like)


def _block_max(stored: Any, block_size: int) -> jax.Array:
    """Each block's largest magnitude of what ``stored`` holds, from the stored data alone.

    For a quantized moment, the value of its largest code times the scale (the largest
    magnitude it decodes to); for any other array, its blocks' largest magnitude, in its
    own (real) dtype.
    """
    if is_quantized(stored):
        return quantize.stored_absmax(stored)
    real = jnp.abs(stored) if jnp.iscomplexobj(stored) else stored
    blocks = _numerics.split_blocks(real.reshape(real.shape or (1,)), block_size)
    axis = (blocks.ndim - 1,)  # two plain reductions of the input: no |x| written out
    top = jnp.maximum(jax.lax.reduce_max(blocks, axis), -jax.lax.reduce_min(blocks, axis))
    return top.reshape(quantize.scales_shape(real.shape, block_size))


def update_leaf(
    step: Callable[..., tuple[Any, ...]],
    grad: jax.Array,
    mu: Any,
    nu: Any,
    nu_max: Any,
    storage: MomentStorage,
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
    block_size = storage.block_size
    maxima = []
    for i, moment in enumerate(moments):
        top = None if moment is None else _block_max(moment, block_size)
        maxima.append(jnp.square(top) if i > 0 and is_quantized(moment) else top)
    bounds = step(_block_max(grad, block_size), *maxima)
    staged = list(moments)
    specs = (lowbit(storage.mu_dtype), lowbit(storage.nu_dtype), lowbit(storage.nu_dtype))
    for i in quantized:
        bound = bounds[1 + i].astype(jnp.float32)
        how = rounding(specs[i], second=i > 0)
        staged[i] = _Bounded(moments[i], jnp.abs(bound) if i == 0 else jnp.sqrt(bound), how)
    return step(grad, *staged)
