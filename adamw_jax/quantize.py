r"""Blockwise 8-bit storage of moment states, and the byte count of an optimizer state.

A float32 array is cut into blocks of ``block_size`` consecutive elements along its last
axis (the last block of each row may be shorter). Each block keeps one float32 scale, its
largest magnitude divided by the code book's largest value, and one byte per element: the
code of the nearest code-book value to ``x / scale``. :func:`quantize` finds the largest
magnitudes itself (:func:`block_absmax`); :func:`quantize_with_absmax` takes them, or an
upper bound of them, from the caller, and is then purely elementwise.

The code books are small floating-point formats with subnormals, so their steps grow with
the magnitude, as a moment's values spread over orders of magnitude:

* signed (first moment), ``int8`` codes: 1 sign, 3 exponent and 4 mantissa bits. Codes
  :math:`-127 \dots 127`; magnitudes from :math:`2^{-10}` to :math:`1.9375`: a block
  resolves values down to about :math:`5 \cdot 10^{-4}` of its largest one (smaller ones
  are stored as 0), with a relative rounding error of at most :math:`2^{-5}` above
  :math:`2^{-6}`.
* unsigned (second moment, stored as its square root), ``uint8`` codes: 4 exponent and 4
  mantissa bits. Codes :math:`0 \dots 255`; values from :math:`2^{-18}` to :math:`1.9375`
  (down to :math:`2 \cdot 10^{-6}` of the block's largest), relative rounding error at most
  :math:`2^{-5}` above :math:`2^{-14}`.

Both maps are monotone in the code and map code 0 to exactly 0. Values are rounded to the
nearest code, or stochastically (``rounding="stochastic"``: unbiased, for quantities such as
a moving average whose per-step changes are smaller than half a step of the code book).
Encoding and decoding are integer operations on the float32 bit pattern (no table
look-up), so they fuse into the optimizer step.

Blocks run along the last axis only, so a leaf sharded along any of its leading axes keeps
every block inside one shard; a leaf sharded along its last axis does too when each shard's
length there is a multiple of ``block_size``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _numerics, _validate


class QuantizedArray(NamedTuple):
    """A float32 array stored as one byte per element plus one float32 scale per block.

    Attributes:
      codes: ``int8`` (signed code book) or ``uint8`` (unsigned), with the shape of the
        stored array.
      scales: float32, shape ``(*shape[:-1], ceil(shape[-1] / block_size))`` (for a scalar,
        shape ``()``): the largest magnitude of each block divided by the code book's
        largest value.
    """

    codes: jax.Array
    scales: jax.Array


# (exponent bits, mantissa bits) of the two code books; the exponent bias puts the top
# binade at [1, 2).
_SIGNED_FORMAT = (3, 4)
_UNSIGNED_FORMAT = (4, 4)


def _format(signed: bool) -> tuple[int, int, int]:
    e_bits, m_bits = _SIGNED_FORMAT if signed else _UNSIGNED_FORMAT
    return e_bits, m_bits, 2**e_bits - 1


def code_book_max(signed: bool) -> float:
    """The largest value of the signed or unsigned code book (both 1.9375)."""
    _, m_bits, _ = _format(signed)
    return 2.0 - 2.0**-m_bits


def _encode(
    y: jax.Array, signed: bool, stochastic: bool = False, salt: jax.Array | None = None
) -> jax.Array:
    """Code (int32, >= 0) of magnitudes ``0 <= y`` (float32) in the code book.

    The nearest code, or with ``stochastic`` one of the two codes around ``y``: the upper
    one with probability equal to the fraction of the way from the lower one to ``y``.
    """
    e_bits, m_bits, bias = _format(signed)
    shift = 23 - m_bits
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    # y as a fixed-point number whose bits above the lowest `shift` are its code and whose
    # lowest `shift` bits are its fraction of the way to the next code. Normal codes: the
    # float32's own bits with the exponent rebased (the code's exponent and leading
    # mantissa bits, then the dropped mantissa bits). Subnormal codes: y * 2**(bias - 1 +
    # m_bits) in [0, 2**m_bits), times 2**shift, rounded to an integer by adding 2**23
    # (below 2**23, so the integer is the low bits of the sum).
    normal = bits - jnp.int32((127 - bias) << 23)
    z = y * jnp.float32(2.0 ** (bias - 1 + m_bits + shift)) + jnp.float32(2.0**23)
    subnormal = jax.lax.bitcast_convert_type(z, jnp.int32) - jnp.int32(150 << 23)
    fixed = jnp.where(y < jnp.float32(2.0 ** (1 - bias)), subnormal, normal)
    # A carry out of the fraction moves to the next code up, from the top normal code too.
    if stochastic:  # up with probability fraction / 2**shift, bits hashed from y's
        code = _numerics.shift_right_stochastically(fixed, bits, shift, salt)
    else:  # adding half a code rounds to nearest (ties up)
        code = (fixed + jnp.int32(1 << (shift - 1))) >> shift
    return jnp.minimum(code, 2 ** (e_bits + m_bits) - 1)  # >= 0 already


def _decode(k: jax.Array, signed: bool) -> jax.Array:
    """The code-book value (float32) of codes ``0 <= k`` (int32)."""
    e_bits, m_bits, bias = _format(signed)
    k = jnp.minimum(k, 2 ** (e_bits + m_bits) - 1)
    # The code's bits as a float32's exponent and leading mantissa bits: exact for normal
    # codes; a subnormal code (exponent 0) reads as 2**-bias * (1 + mantissa / 2**m_bits),
    # whose value is recovered exactly as twice that minus 2**(1 - bias).
    x = jax.lax.bitcast_convert_type((k << (23 - m_bits)) + ((127 - bias) << 23), jnp.float32)
    subnormal = 2.0 * x - jnp.float32(2.0 ** (1 - bias))
    return jnp.where(k < 2**m_bits, subnormal, x)


def code_book(signed: bool) -> np.ndarray:
    """All values of a code book, indexed by code, as float32 NumPy array.

    Args:
      signed: the signed book (index ``i`` holds code ``i - 127``, 255 values) or the
        unsigned one (index ``i`` holds code ``i``, 256 values).

    Returns:
      The values in increasing order of the code.

    Example:
      >>> from adamw_jax import quantize
      >>> book = quantize.code_book(signed=False)
      >>> float(book[0]), float(book[-1]), len(book)
      (0.0, 1.9375, 256)
    """
    if signed:
        k = jnp.arange(128, dtype=jnp.int32)
        positive = np.asarray(_decode(k, True))
        return np.concatenate([-positive[:0:-1], positive])
    return np.asarray(_decode(jnp.arange(256, dtype=jnp.int32), False))


def check_block_size(block_size: Any) -> None:
    """Raises unless ``block_size`` is an int (a Python or NumPy integer) in [1, inf).

    Raises:
      TypeError: for anything but an integer (a bool included).
      ValueError: for an integer below 1.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be an int in [1, inf); got {block_size!r}.")
    if block_size < 1:
        raise ValueError(f"block_size must be in [1, inf); got {block_size!r}.")


_ROUNDINGS = ("nearest", "stochastic")


def scales_shape(shape: tuple[int, ...], block_size: int = 256) -> tuple[int, ...]:
    """The shape of the per-block scales of an array of ``shape``."""
    if not shape:
        return ()
    return (*shape[:-1], math.ceil(shape[-1] / block_size))


def split_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """The blocks of ``x``: its last axis zero-padded to whole blocks and split.

    Args:
      x: an array with at least one axis.
      block_size: elements per block along the last axis, in [1, inf).

    Returns:
      ``x`` reshaped to ``(*x.shape[:-1], ceil(x.shape[-1] / block_size), block_size)``.
    """
    n = x.shape[-1]
    n_blocks = math.ceil(n / block_size)
    pad = n_blocks * block_size - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], n_blocks, block_size)


def _unblock(xb: jax.Array, n: int) -> jax.Array:
    return xb.reshape(*xb.shape[:-2], -1)[..., :n]


def quantize(
    x: jax.Array,
    *,
    signed: bool,
    block_size: int = 256,
    keep_nonzero: bool = False,
    rounding: str = "nearest",
    salt: jax.Array | int | None = None,
) -> QuantizedArray:
    r"""Stores a float array as blockwise 8-bit codes and float32 scales.

    .. math::

      s_b = \max_{i \in b} |x_i| / q_{\max}, \qquad
      c_i = \operatorname{argmin}_c |q_c - x_i / s_b|

    where :math:`q` is the signed or unsigned code book (see the module docstring). The
    result decodes to :math:`q_{c_i} s_b`, with an error of at most
    :math:`2^{-5}|x_i| + 2^{-11} s_b` (signed) or :math:`2^{-5}|x_i| + 2^{-19} s_b`
    (unsigned). Zeros stay exactly zero, and each block's largest magnitude comes back to
    float32 rounding; a block holding a NaN or an infinity decodes to non-finite values.

    ``rounding="stochastic"`` instead picks, between the two codes around :math:`x_i / s_b`,
    the upper one with probability equal to the fraction of the way from the lower one to
    it, so that the stored value is unbiased, and the error is below one step of the book:
    :math:`2^{-4}|x_i| + 2^{-10} s_b` (signed) or :math:`2^{-4}|x_i| + 2^{-18} s_b`
    (unsigned). A quantity updated by steps smaller than half the book's step (an
    exponential moving average with a decay close to 1) does not move under round to
    nearest, since each step rounds back to the old code; stochastic rounding moves it by
    the right amount on average. The random bits are a hash of :math:`x_i / s_b`'s float32
    bit pattern and of ``salt``: no key, and the same inputs always give the same codes.
    Pass a ``salt`` that changes between calls (the step count) when the same value may be
    quantized again: otherwise it meets the same bits, and the same decision, every time.

    Args:
      x: a real floating array of any shape (computed in float32).
      signed: use the signed code book (``int8`` codes); otherwise the unsigned one
        (``uint8`` codes), which requires ``x >= 0`` (negative values are stored as 0).
      block_size: elements per block along the last axis, in [1, inf).
      keep_nonzero: store positive values too small for the smallest nonzero code as that
        code rather than 0 (used for the second moment, which divides the update).
      rounding: ``"nearest"`` (the nearest code) or ``"stochastic"`` (unbiased; see above).
      salt: with ``"stochastic"``, None or an integer scalar (array or Python int, taken
        modulo ``2**32``) mixed into the random bits.

    Returns:
      A :class:`QuantizedArray` with ``codes.shape == x.shape``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import quantize
      >>> q = quantize.quantize(jnp.array([0.0, -1.0, 0.25, 3.0]), signed=True)
      >>> q.codes.dtype, q.scales.shape
      (dtype('int8'), (1,))
      >>> q.codes
      Array([   0, -101,   69,  127], dtype=int8)
      >>> quantize.dequantize(q).round(2)  # nearest code-book values times the scale
      Array([ 0.  , -1.02,  0.25,  3.  ], dtype=float32)

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
      Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015
      (stochastic rounding).
    """
    check_block_size(block_size)
    _validate.check_choice("rounding", rounding, _ROUNDINGS)
    absmax = block_absmax(x, signed=signed, block_size=block_size)
    return quantize_with_absmax(
        x,
        absmax,
        signed=signed,
        block_size=block_size,
        keep_nonzero=keep_nonzero,
        rounding=rounding,
        salt=salt,
    )


def _check_floating(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a real floating array; got dtype {x.dtype}.")
    return x


def _magnitude_blocks(x: jax.Array, signed: bool, block_size: int) -> jax.Array:
    """``|x|`` (signed) or ``max(x, 0)`` in float32, split to (..., blocks, block)."""
    xb = split_blocks(x.astype(jnp.float32).reshape(x.shape or (1,)), block_size)
    return jnp.abs(xb) if signed else jnp.maximum(xb, 0.0)


def block_absmax(x: jax.Array, *, signed: bool, block_size: int = 256) -> jax.Array:
    """The largest magnitude of each block of ``x``, shaped like the scales.

    The first half of :func:`quantize`, for callers that find the maxima another way (for
    instance chunk by chunk) and encode with :func:`quantize_with_absmax`.

    Args:
      x: a real floating array of any shape (computed in float32).
      signed: take ``|x|``; otherwise ``max(x, 0)`` (the unsigned code book's magnitudes).
      block_size: elements per block along the last axis, in [1, inf).

    Returns:
      A float32 array of shape ``scales_shape(x.shape, block_size)``; NaN where a block
      holds a NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import quantize
      >>> quantize.block_absmax(jnp.array([1.0, -3.0, 2.0]), signed=True, block_size=2)
      Array([3., 2.], dtype=float32)
    """
    check_block_size(block_size)
    x = _check_floating(x)
    xb = split_blocks(x.astype(jnp.float32).reshape(x.shape or (1,)), block_size)
    largest, smallest = block_max_min(xb)
    # Both results are used (the unsigned book's min(-smallest, 0) <= 0 changes nothing),
    # which keeps this one fused two-output reduction (see block_max_min).
    absmax = jnp.maximum(largest, -smallest if signed else jnp.minimum(-smallest, 0.0))
    return jnp.maximum(absmax, 0.0).reshape(scales_shape(x.shape, block_size))


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


def quantize_with_absmax(
    x: jax.Array,
    absmax: jax.Array,
    *,
    signed: bool,
    block_size: int = 256,
    keep_nonzero: bool = False,
    rounding: str = "nearest",
    salt: jax.Array | int | None = None,
) -> QuantizedArray:
    """:func:`quantize` given the blocks' largest magnitudes (:func:`block_absmax`).

    With ``absmax == block_absmax(x, ...)`` the result equals ``quantize(x, ...)``; the
    encoding itself is elementwise, so it fuses with whatever computes ``x``.

    Args:
      x: a real floating array of any shape (computed in float32).
      absmax: float32, shape ``scales_shape(x.shape, block_size)``: each block's largest
        magnitude (values above it are stored as the largest code).
      signed: use the signed code book (``int8`` codes); otherwise the unsigned one.
      block_size: elements per block along the last axis, in [1, inf).
      keep_nonzero: as for :func:`quantize`.
      rounding: ``"nearest"`` or ``"stochastic"``, as for :func:`quantize`.
      salt: as for :func:`quantize`.

    Returns:
      A :class:`QuantizedArray` with ``codes.shape == x.shape``.
    """
    check_block_size(block_size)
    _validate.check_choice("rounding", rounding, _ROUNDINGS)
    x = _check_floating(x)
    shape = x.shape
    expected = scales_shape(shape, block_size)
    absmax = jnp.asarray(absmax, jnp.float32)
    if absmax.shape != expected:
        raise ValueError(f"absmax must have shape {expected}; got {absmax.shape}.")
    magnitude = _magnitude_blocks(x, signed, block_size)
    absmax = absmax.reshape(magnitude.shape[:-1])
    top = jnp.float32(code_book_max(signed))
    scales = absmax / top
    # top / absmax, or 0 for an all-zero block. A division last, so that XLA computes it
    # once per block rather than again for every element. (A NaN or infinite absmax gives
    # a NaN or infinite scale, so the block decodes to non-finite values whatever its codes.)
    positive = absmax > 0
    inverse = jnp.where(positive, top, 0.0) / jnp.where(positive, absmax, 1.0)
    code = _encode(magnitude * inverse[..., None], signed, rounding == "stochastic", salt)
    if keep_nonzero:  # a positive magnitude (positive bit pattern) gets at least code 1
        positive = jnp.minimum(jax.lax.bitcast_convert_type(magnitude, jnp.int32), 1)
        code = jnp.maximum(code, positive)
    if signed:  # -code where x's sign bit is set: (code ^ s) - s with s = 0 or -1
        xb = split_blocks(x.astype(jnp.float32).reshape(shape or (1,)), block_size)
        sign = jax.lax.bitcast_convert_type(xb, jnp.int32) >> 31
        codes = ((code ^ sign) - sign).astype(jnp.int8)
    else:
        codes = code.astype(jnp.uint8)
    codes = _unblock(codes, (shape or (1,))[-1]).reshape(shape)
    return QuantizedArray(codes, scales.reshape(expected))


def dequantize(q: QuantizedArray, block_size: int = 256) -> jax.Array:
    r"""The float32 array a :class:`QuantizedArray` stores.

    .. math::

      x_i = q_{c_i} s_b

    Args:
      q: the codes and scales, as made by :func:`quantize`.
      block_size: the block size it was made with, in [1, inf).

    Returns:
      A float32 array of ``q.codes.shape``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import quantize
      >>> q = quantize.quantize(jnp.array([4.0, 1.0, 0.0]), signed=False, block_size=2)
      >>> q.scales.shape
      (2,)
      >>> quantize.dequantize(q, block_size=2)
      Array([4., 1., 0.], dtype=float32)
    """
    check_block_size(block_size)
    codes, scales = q
    signed = codes.dtype == jnp.int8
    if not signed and codes.dtype != jnp.uint8:
        raise TypeError(f"codes must be int8 or uint8; got {codes.dtype}.")
    shape = codes.shape
    k = codes.astype(jnp.int32).reshape(shape or (1,))
    values = _decode(jnp.abs(k), signed)
    if signed:  # copy the code's sign bit onto the (non-negative) value
        sign = k & jnp.int32(-(2**31))
        values = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(values, jnp.int32) | sign, jnp.float32
        )
    n = k.shape[-1]
    s = scales.astype(jnp.float32).reshape(scales_shape(k.shape, block_size))
    out = split_blocks(values, block_size) * s[..., None]
    return _unblock(out, n).reshape(shape)


def stored_absmax(q: QuantizedArray, block_size: int = 256) -> jax.Array:
    """The largest magnitude each block of ``q`` decodes to, from its codes and scales.

    The code-book value of the block's largest code (in magnitude) times its scale: each
    block's largest magnitude of ``dequantize(q, block_size)``, found without decoding
    every element.

    Args:
      q: the codes and scales, as made by :func:`quantize`.
      block_size: the block size it was made with, in [1, inf).

    Returns:
      A float32 array shaped like ``q.scales``.
    """
    check_block_size(block_size)
    codes, scales = q
    blocks = split_blocks(codes.reshape(codes.shape or (1,)), block_size)
    largest, smallest = block_max_min(blocks)
    top = jnp.maximum(largest.astype(jnp.int32), -smallest.astype(jnp.int32))
    value = _decode(top, signed=codes.dtype == jnp.int8)
    return value.reshape(scales.shape) * scales.astype(jnp.float32)


def zeros(shape: tuple[int, ...], *, signed: bool, block_size: int = 256) -> QuantizedArray:
    """A :class:`QuantizedArray` of zeros: zero codes and zero scales.

    Args:
      shape: the shape of the stored array.
      signed: ``int8`` codes (signed code book) or ``uint8`` (unsigned).
      block_size: elements per block along the last axis, in [1, inf).

    Returns:
      A :class:`QuantizedArray` that dequantizes to ``jnp.zeros(shape)``.
    """
    check_block_size(block_size)
    codes = jnp.zeros(shape, jnp.int8 if signed else jnp.uint8)
    return QuantizedArray(codes, jnp.zeros(scales_shape(tuple(shape), block_size), jnp.float32))


def zeros_like(x: jax.Array, *, signed: bool, block_size: int = 256) -> QuantizedArray:
    """A :class:`QuantizedArray` of zeros shaped, and sharded, like ``x``.

    Under a mesh with explicit axes (``jax.sharding.AxisType.Explicit``) the codes carry
    ``x``'s sharding in their type and the scales the sharding that quantizing ``x`` gives
    them, so a state made here has the same types as one that an optimizer step returns.

    Args:
      x: the array (or tracer) whose shape and sharding the zeros take.
      signed: ``int8`` codes (signed code book) or ``uint8`` (unsigned).
      block_size: elements per block along the last axis, in [1, inf).

    Returns:
      A :class:`QuantizedArray` that dequantizes to ``jnp.zeros_like(x, jnp.float32)``.
    """
    check_block_size(block_size)
    codes = jnp.zeros_like(x, dtype=jnp.int8 if signed else jnp.uint8)
    absmax = block_absmax(
        jnp.zeros_like(x, dtype=jnp.float32), signed=signed, block_size=block_size
    )
    return QuantizedArray(codes, jnp.zeros_like(absmax))
