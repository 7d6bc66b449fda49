r"""Blockwise 8-bit and 4-bit storage of moment states.

A float32 array is cut into blocks of ``block_size`` consecutive elements along its last
axis (the last block of each row may be shorter). Each block keeps one float32 scale, its
largest magnitude divided by the code book's largest value, and one code per element: the
code of the nearest code-book value to ``x / scale``. :func:`quantize` finds the largest
magnitudes itself (:func:`block_absmax`); :func:`quantize_with_absmax` takes them, or an
upper bound of them, from the caller, and is then purely elementwise.

The code books are small floating-point formats (:class:`CodeFormat`), so their steps
grow with the magnitude, as a moment's values spread over orders of magnitude:

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

**4-bit codes** (:func:`quantize_int4`, :class:`QuantizedArray4`) are stored two per byte
(``uint8``, the last axis halved, rounded up), with the same float32 scale per block
(``block_size`` even, 128 by default):

* signed (first moment), :data:`INT4_SIGNED_FORMAT`: sign and magnitude, the magnitude 2
  exponent and 1 mantissa bits with subnormals (FP4 E2M1): 0, 0.125, 0.25, 0.375, 0.5,
  0.75, 1, 1.5 (:data:`INT4_SIGNED_CODE_BOOK`). Exact 0; a block resolves values down to
  1/12 of its largest one.
* unsigned (second moment's square root), :data:`INT4_UNSIGNED_FORMAT`: 2 exponent and
  2 mantissa bits and no subnormals, so **no code for 0**: 0.125 ... 1.75
  (:data:`INT4_UNSIGNED_CODE_BOOK`), 1/14 of the largest to the largest, relative steps
  of 1/8 to 1/4. A second moment stored as 0 would make :math:`1/\sqrt{v}` a huge step
  for an entry whose first moment is not 0 (Li et al.'s zero-point problem); here an
  entry below the block's smallest code is stored as that code, which can only shrink
  its step.

**Encoding, bit for bit** (:func:`encode_magnitudes`; the same for 8 and 4 bits). For a
format with :math:`e` exponent and :math:`m` mantissa bits, bias :math:`b = 2^e - 1`,
top value :math:`q_{\max} = 2 - 2^{-m}` and ``shift`` :math:`= 23 - m`, all in float32
and 32-bit two's-complement integers:

1. per block: ``absmax`` (largest ``|x|``, or ``max(x, 0)`` for unsigned books),
   ``scale = absmax / q_max`` (stored), ``inv = q_max / absmax`` (0 if ``absmax == 0``);
2. per element: ``y = |x| * inv`` (unsigned books: ``max(x, 0) * inv``), one float32
   multiply; ``bits`` = ``y``'s bit pattern as int32;
3. ``normal = bits - ((127 - b) << 23)``. With subnormals: ``z = y * 2^(b - 1 + m +
   shift) + 2^23`` (two float32 operations, round to nearest even), ``sub = bits(z) -
   (150 << 23)``, ``fixed = sub if y < 2^(1 - b) else normal``. Without subnormals:
   ``fixed = 0 if y < 2^(-b) else normal``;
4. to nearest: ``code = (fixed + 2^(shift - 1)) >> shift`` (ties up). Stochastically:
   ``h = ((bits ^ (salt * 0x85EBCA6B)) * 0x9E3779B1) mod 2^32`` (the salt term only when
   a salt is given; uint32 arithmetic, :func:`adamw_jax._numerics.hash_bits`), then
   ``code = (fixed + (h >> (32 - shift))) >> shift``, as unsigned 32-bit integers;
5. ``code = min(code, 2^(e + m) - 1)``;
6. signed 8-bit: ``-code`` where ``x``'s sign bit is set. Signed 4-bit: ``code | 8``
   where ``x``'s sign bit is set and ``code != 0``. The 8-bit unsigned book with
   ``keep_nonzero`` raises code 0 to 1 for ``y > 0``;
7. 4-bit: :func:`pack_int4`, element ``2j`` of a row in the low nibble of byte ``j``.

Decoding is the table look-up ``book[code] * scale``. For the second moment the optimizer
stores :math:`\sqrt{v}` with the unsigned book, rounded stochastically with the step
count (uint32) as ``salt``. The 8-bit first moment is rounded to nearest (no salt); the
4-bit first moment stochastically, with the step count as ``salt`` too. In the optimizer
step ``absmax`` is not the new values' largest magnitude but a bound of it found from the
gradient and the old codes (``adamw_jax._moment_storage.update_leaf``).

Blocks run along the last axis only, so a leaf sharded along any of its leading axes keeps
every block inside one shard; a leaf sharded along its last axis does too when each shard's
length there is a multiple of ``block_size``.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _numerics, _validate

__all__ = [
    "INT4_DEFAULT_BLOCK_SIZE",
    "INT4_SIGNED_CODE_BOOK",
    "INT4_SIGNED_FORMAT",
    "INT4_UNSIGNED_CODE_BOOK",
    "INT4_UNSIGNED_FORMAT",
    "CodeFormat",
    "QuantizedArray",
    "QuantizedArray4",
    "block_absmax",
    "check_block_size",
    "check_int4_block_size",
    "code_book",
    "code_book_max",
    "decode_magnitudes",
    "dequantize",
    "dequantize_int4",
    "encode_magnitudes",
    "int4_format",
    "pack_int4",
    "packed_shape",
    "quantize",
    "quantize_int4",
    "quantize_int4_with_absmax",
    "quantize_with_absmax",
    "scales_shape",
    "stored_absmax",
    "stored_absmax_int4",
    "unpack_int4",
    "zeros",
    "zeros_int4",
    "zeros_like",
    "zeros_like_int4",
]


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


class CodeFormat(NamedTuple):
    r"""A code book as a small floating-point format: its codes' bits read as a float.

    A code :math:`k` in :math:`[0, 2^{e+m})` has exponent field :math:`E = k \gg m` and
    mantissa field :math:`M = k \bmod 2^m`; with bias :math:`b = 2^e - 1` (the top binade
    is :math:`[1, 2)`) its value is

    .. math::

      q_k = 2^{E - b} (1 + M / 2^m) \quad (E > 0, \text{ or every } E \text{ without
      subnormals}), \qquad q_k = 2^{1 - b} M / 2^m \quad (E = 0, \text{ with subnormals}).

    With subnormals, code 0 is exactly 0; without, there is no code for 0, and code 0 is
    the smallest value :math:`2^{-b}`.

    Attributes:
      exponent_bits: :math:`e`, in [1, 8).
      mantissa_bits: :math:`m`, in [0, 23).
      subnormals: whether exponent field 0 holds the subnormals (and 0).
    """

    exponent_bits: int
    mantissa_bits: int
    subnormals: bool

    @property
    def bias(self) -> int:
        """The exponent bias, :math:`2^e - 1`: the top binade is [1, 2)."""
        return 2**self.exponent_bits - 1

    @property
    def max_code(self) -> int:
        """The largest code, :math:`2^{e+m} - 1`."""
        return 2 ** (self.exponent_bits + self.mantissa_bits) - 1

    @property
    def top(self) -> float:
        """The largest value, :math:`2 - 2^{-m}`."""
        return 2.0 - 2.0**-self.mantissa_bits


# (exponent bits, mantissa bits) of the two 8-bit code books; the exponent bias puts the top
# binade at [1, 2).
_SIGNED_FORMAT = (3, 4)
_UNSIGNED_FORMAT = (4, 4)


def _int8_format(signed: bool) -> CodeFormat:
    return CodeFormat(*(_SIGNED_FORMAT if signed else _UNSIGNED_FORMAT), True)


def code_book_max(signed: bool) -> float:
    """The largest value of the signed or unsigned 8-bit code book (both 1.9375)."""
    return _int8_format(signed).top


def _encode(
    y: jax.Array, signed: bool, stochastic: bool = False, salt: jax.Array | None = None
) -> jax.Array:
    """Code (int32, >= 0) of magnitudes ``0 <= y`` (float32) in the 8-bit code book.

    The nearest code, or with ``stochastic`` one of the two codes around ``y``: the upper
    one with probability equal to the fraction of the way from the lower one to ``y``.
    """
    return encode_magnitudes(y, _int8_format(signed), stochastic, salt)


def encode_magnitudes(
    y: jax.Array, fmt: CodeFormat, stochastic: bool = False, salt: jax.Array | None = None
) -> jax.Array:
    """Code (int32, >= 0) of magnitudes ``0 <= y`` (float32) in the code book ``fmt``.

    The nearest code (ties up), or with ``stochastic`` one of the two codes around ``y``:
    the upper one with probability equal to the fraction of the way from the lower one to
    ``y``, the random bits hashed from ``y``'s bits and ``salt``. Values beyond the largest
    code get the largest code; without subnormals, values below the smallest get code 0.
    The exact integer procedure is spelled out in the module docstring ("Encoding, bit for
    bit").
    """
    e_bits, m_bits, bias = fmt.exponent_bits, fmt.mantissa_bits, fmt.bias
    shift = 23 - m_bits
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    # y as a fixed-point number whose bits above the lowest `shift` are its code and whose
    # lowest `shift` bits are its fraction of the way to the next code. Normal codes: the
    # float32's own bits with the exponent rebased (the code's exponent and leading
    # mantissa bits, then the dropped mantissa bits). Subnormal codes: y * 2**(bias - 1 +
    # m_bits) in [0, 2**m_bits), times 2**shift, rounded to an integer by adding 2**23
    # (below 2**23, so the integer is the low bits of the sum).
    normal = bits - jnp.int32((127 - bias) << 23)
    if fmt.subnormals:
        z = y * jnp.float32(2.0 ** (bias - 1 + m_bits + shift)) + jnp.float32(2.0**23)
        subnormal = jax.lax.bitcast_convert_type(z, jnp.int32) - jnp.int32(150 << 23)
        fixed = jnp.where(y < jnp.float32(2.0 ** (1 - bias)), subnormal, normal)
    else:  # below the smallest value 2**-bias: code 0, that value
        fixed = jnp.where(y < jnp.float32(2.0**-bias), jnp.int32(0), normal)
    # A carry out of the fraction moves to the next code up, from the top normal code too.
    if stochastic:  # up with probability fraction / 2**shift, bits hashed from y's
        code = _numerics.shift_right_stochastically(fixed, bits, shift, salt)
    else:  # adding half a code rounds to nearest (ties up)
        code = (fixed + jnp.int32(1 << (shift - 1))) >> shift
    return jnp.minimum(code, 2 ** (e_bits + m_bits) - 1)  # >= 0 already


def _decode(k: jax.Array, signed: bool) -> jax.Array:
    """The 8-bit code-book value (float32) of codes ``0 <= k`` (int32)."""
    return decode_magnitudes(k, _int8_format(signed))


def decode_magnitudes(k: jax.Array, fmt: CodeFormat) -> jax.Array:
    """The value (float32) of codes ``0 <= k`` (int32) in the code book ``fmt``."""
    e_bits, m_bits, bias = fmt.exponent_bits, fmt.mantissa_bits, fmt.bias
    k = jnp.minimum(k, 2 ** (e_bits + m_bits) - 1)
    # The code's bits as a float32's exponent and leading mantissa bits: exact for normal
    # codes; a subnormal code (exponent 0) reads as 2**-bias * (1 + mantissa / 2**m_bits),
    # whose value is recovered exactly as twice that minus 2**(1 - bias).
    x = jax.lax.bitcast_convert_type((k << (23 - m_bits)) + ((127 - bias) << 23), jnp.float32)
    if not fmt.subnormals:
        return x
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
    _validate.check_int("block_size", block_size, low=1, static=True)


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
    fmt = _int8_format(signed)
    magnitude, code, scales = _block_codes(x, absmax, fmt, signed, block_size, rounding, salt)
    if keep_nonzero:  # a positive magnitude (positive bit pattern) gets at least code 1
        positive = jnp.minimum(jax.lax.bitcast_convert_type(magnitude, jnp.int32), 1)
        code = jnp.maximum(code, positive)
    if signed:  # -code where x's sign bit is set: (code ^ s) - s with s = 0 or -1
        sign = _sign_blocks(x, block_size)
        codes = ((code ^ sign) - sign).astype(jnp.int8)
    else:
        codes = code.astype(jnp.uint8)
    codes = _unblock(codes, (shape or (1,))[-1]).reshape(shape)
    return QuantizedArray(codes, scales)


def _sign_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """-1 where ``x``'s sign bit is set, else 0 (int32), split into blocks."""
    xb = split_blocks(x.astype(jnp.float32).reshape(x.shape or (1,)), block_size)
    return jax.lax.bitcast_convert_type(xb, jnp.int32) >> 31


def _block_codes(
    x: jax.Array,
    absmax: Any,
    fmt: CodeFormat,
    signed: bool,
    block_size: int,
    rounding: str,
    salt: jax.Array | int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The magnitudes of ``x`` in blocks, their codes in ``fmt`` (int32) and the scales.

    Each block's scale is ``absmax / fmt.top``; its elements are encoded as
    ``|x| * (fmt.top / absmax)`` (``max(x, 0)`` for an unsigned book; 0 for an all-zero
    block). Returns the magnitudes and codes shaped ``(..., blocks, block_size)`` and the
    scales shaped ``scales_shape(x.shape, block_size)``.
    """
    expected = scales_shape(x.shape, block_size)
    absmax = jnp.asarray(absmax, jnp.float32)
    if absmax.shape != expected:
        raise ValueError(f"absmax must have shape {expected}; got {absmax.shape}.")
    magnitude = _magnitude_blocks(x, signed, block_size)
    absmax = absmax.reshape(magnitude.shape[:-1])
    top = jnp.float32(fmt.top)
    scales = absmax / top
    # top / absmax, or 0 for an all-zero block. A division last, so that XLA computes it
    # once per block rather than again for every element. (A NaN or infinite absmax gives
    # a NaN or infinite scale, so the block decodes to non-finite values whatever its codes.)
    positive = absmax > 0
    inverse = jnp.where(positive, top, 0.0) / jnp.where(positive, absmax, 1.0)
    y = magnitude * inverse[..., None]
    code = encode_magnitudes(y, fmt, rounding == "stochastic", salt)
    return magnitude, code, scales.reshape(expected)


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


# ---------------------------------------------------------------------------------------
# 4-bit codes, two per byte.

#: The signed 4-bit code book's format: 2 exponent and 1 mantissa bits with subnormals
#: (FP4 "E2M1", halved): magnitudes 0, 0.125, 0.25, 0.375, 0.5, 0.75, 1, 1.5.
INT4_SIGNED_FORMAT = CodeFormat(2, 1, True)
#: The unsigned 4-bit code book's format: 2 exponent and 2 mantissa bits, no subnormals, so
#: no code for 0: values from 0.125 to 1.75.
INT4_UNSIGNED_FORMAT = CodeFormat(2, 2, False)
#: The signed 4-bit code book, indexed by the stored 4-bit value (the nibble): bit 3 is the
#: sign, bits 0-2 the magnitude's code. Nibble 8 (a negative zero) is never written.
INT4_SIGNED_CODE_BOOK = np.array(
    [
        *(0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5),
        *(-0.0, -0.125, -0.25, -0.375, -0.5, -0.75, -1.0, -1.5),
    ],
    np.float32,
)
#: The unsigned 4-bit code book (the second moment's square root), indexed by the nibble.
INT4_UNSIGNED_CODE_BOOK = np.array(
    [
        *(0.125, 0.15625, 0.1875, 0.21875, 0.25, 0.3125, 0.375, 0.4375),
        *(0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 1.75),
    ],
    np.float32,
)
#: The block size of the 4-bit functions when none is given.
INT4_DEFAULT_BLOCK_SIZE = 128
_SIGN_NIBBLE = 8


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["length", "signed", "block_size"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray4:
    """A float32 array stored as 4-bit codes, two per byte, plus one float32 scale per block.

    The codes and scales are the pytree's children (they jit, donate, shard and checkpoint
    like any array); the rest is static metadata, part of the tree's structure.

    Attributes:
      codes: ``uint8``, shape ``(*shape[:-1], ceil(shape[-1] / 2))`` (``()`` for a 0-d
        array): element ``2j`` of a row in the low 4 bits of byte ``j``, element
        ``2j + 1`` in the high 4 bits (0 past an odd row's end). See :func:`pack_int4`.
      scales: float32, ``scales_shape(shape, block_size)``: each block's largest magnitude
        divided by the code book's largest value.
      length: static; the stored array's last-axis length (1 for a 0-d array).
      signed: static; the signed code book (:data:`INT4_SIGNED_CODE_BOOK`) or the unsigned
        one (:data:`INT4_UNSIGNED_CODE_BOOK`).
      block_size: static; elements per block along the last axis (even).
    """

    codes: jax.Array
    scales: jax.Array
    length: int
    signed: bool
    block_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the stored (unpacked) array."""
        codes_shape = tuple(self.codes.shape)
        return (*codes_shape[:-1], self.length) if codes_shape else ()


def int4_format(signed: bool) -> CodeFormat:
    """The format of the signed (first moment) or unsigned (second moment) 4-bit book."""
    return INT4_SIGNED_FORMAT if signed else INT4_UNSIGNED_FORMAT


def check_int4_block_size(block_size: Any, name: str = "block_size") -> None:
    """Raises unless ``block_size`` is an even int in [2, inf): a 4-bit block is whole bytes.

    Raises:
      TypeError: for anything but an integer (a bool included).
      ValueError: for an odd integer or one below 2.
    """
    _validate.check_int(name, block_size, low=None, static=True)
    if block_size < 2 or block_size % 2:
        raise ValueError(
            f"{name} must be an even int in [2, inf) for 4-bit codes (two per byte, a block "
            f"is whole bytes); got {block_size!r}."
        )


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the packed 4-bit codes of an array of ``shape``: last axis halved, up."""
    if not shape:
        return ()
    return (*shape[:-1], -(-shape[-1] // 2))


def pack_int4(nibbles: jax.Array) -> jax.Array:
    """4-bit values (0..15, any integer dtype) packed two per byte along the last axis.

    Byte ``j`` of a row holds element ``2j`` in its low 4 bits and element ``2j + 1`` in
    its high 4 bits; a row of odd length ends with a byte whose high 4 bits are 0. A 0-d
    array becomes a 0-d byte holding its value.

    Args:
      nibbles: an integer array with values in [0, 16).

    Returns:
      ``uint8``, shape :func:`packed_shape` of ``nibbles.shape``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import quantize
      >>> quantize.pack_int4(jnp.array([1, 2, 15]))
      Array([33, 15], dtype=uint8)
    """
    shape = jnp.shape(nibbles)
    x = jnp.asarray(nibbles).astype(jnp.int32).reshape(shape or (1,))
    if x.shape[-1] % 2:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
    return _pack_pairs(x).reshape(packed_shape(shape))


def _pack_pairs(codes: jax.Array) -> jax.Array:
    """Codes (int32, last axis even) as bytes: each odd element shifted up 4 bits and added
    to the even one before it (a sum over pairs, which XLA fuses with the codes' producer)."""
    odd = jax.lax.broadcasted_iota(jnp.int32, codes.shape, codes.ndim - 1) & 1
    pairs = (codes << (4 * odd)).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return jnp.sum(pairs, axis=-1).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, length: int) -> jax.Array:
    """The 4-bit values (``uint8``, 0..15) of :func:`pack_int4`'s bytes.

    Args:
      packed: ``uint8`` bytes, as :func:`pack_int4` makes them.
      length: the unpacked last-axis length: ``2 * packed.shape[-1]`` or one less (for a
        0-d ``packed``, 1).

    Returns:
      ``uint8``, shape ``(*packed.shape[:-1], length)`` (``()`` for a 0-d ``packed``).
    """
    shape = jnp.shape(packed)
    if shape and length not in (2 * shape[-1], 2 * shape[-1] - 1):
        raise ValueError(
            f"length must be {2 * shape[-1]} or {2 * shape[-1] - 1} for packed codes of "
            f"shape {shape}; got {length!r}."
        )
    nibbles = _unpack_bytes(jnp.asarray(packed).reshape(shape or (1,)), length if shape else 1)
    return nibbles.astype(jnp.uint8).reshape((*shape[:-1], length) if shape else ())


def _unpack_bytes(packed: jax.Array, length: int) -> jax.Array:
    """The nibbles (int32) of bytes (at least 1-D): each byte repeated, shifted, masked.

    A broadcast and elementwise operations, no interleaving copy: XLA fuses them into
    whatever consumes the nibbles.
    """
    c = packed.astype(jnp.int32)
    both = jnp.broadcast_to(c[..., None], (*c.shape, 2))
    both = both.reshape(*c.shape[:-1], 2 * c.shape[-1])[..., :length]
    odd = jax.lax.broadcasted_iota(jnp.int32, both.shape, both.ndim - 1) & 1
    return (both >> (4 * odd)) & 15


def quantize_int4(
    x: jax.Array,
    *,
    signed: bool,
    block_size: int = INT4_DEFAULT_BLOCK_SIZE,
    rounding: str = "nearest",
    salt: jax.Array | int | None = None,
) -> QuantizedArray4:
    r"""Stores a float array as blockwise 4-bit codes, two per byte, and float32 scales.

    .. math::

      s_b = \max_{i \in b} |x_i| / q_{\max}, \qquad
      c_i = \operatorname{argmin}_c |q_c - x_i / s_b|

    with the signed book :data:`INT4_SIGNED_CODE_BOOK` (:math:`q_{\max} = 1.5`; exact 0)
    or the unsigned :data:`INT4_UNSIGNED_CODE_BOOK` (:math:`q_{\max} = 1.75`; no 0, its
    smallest value :math:`0.125` stands for everything below it). The result decodes to
    :math:`q_{c_i} s_b`. To nearest (ties up), the error is at most half a step of the
    book: :math:`|x_i|/6 + s_b / 16` (signed), :math:`|x_i| / 10` above the unsigned
    book's smallest value (and :math:`s_b / 8` below it); ``rounding="stochastic"`` picks
    one of the two codes around :math:`x_i / s_b`, the upper one with probability equal to
    the fraction of the way to it (unbiased between them), with an error below one step.
    Each block's largest magnitude comes back to float32 rounding, an all-zero block
    decodes to exact zeros, and a block holding a NaN or an infinity to non-finite values.

    The encoding is the 8-bit one's (:func:`encode_magnitudes`) with another format, then
    :func:`pack_int4`; the module docstring spells it out bit for bit.

    Args:
      x: a real floating array of any shape (computed in float32).
      signed: the signed book (sign and magnitude: bit 3 of a code is the sign);
        otherwise the unsigned one, which requires ``x >= 0`` (negatives are stored as
        the smallest value times the scale).
      block_size: elements per block along the last axis, an even int in [2, inf).
      rounding: ``"nearest"`` or ``"stochastic"``.
      salt: with ``"stochastic"``, None or an integer scalar (taken modulo ``2**32``) mixed
        into the random bits (see :func:`quantize`).

    Returns:
      A :class:`QuantizedArray4`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import quantize
      >>> q = quantize.quantize_int4(jnp.array([0.0, -1.0, 0.25, 3.0]), signed=True)
      >>> q.codes, q.scales  # nibbles 0, 8 + 4 (-0.5); 1 (0.125), 7 (1.5), low first
      (Array([192, 113], dtype=uint8), Array([2.], dtype=float32))
      >>> quantize.dequantize_int4(q)
      Array([ 0.  , -1.  ,  0.25,  3.  ], dtype=float32)

    References:
      Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
    """
    check_int4_block_size(block_size)
    _validate.check_choice("rounding", rounding, _ROUNDINGS)
    absmax = block_absmax(x, signed=signed, block_size=block_size)
    return quantize_int4_with_absmax(
        x, absmax, signed=signed, block_size=block_size, rounding=rounding, salt=salt
    )


def quantize_int4_with_absmax(
    x: jax.Array,
    absmax: jax.Array,
    *,
    signed: bool,
    block_size: int = INT4_DEFAULT_BLOCK_SIZE,
    rounding: str = "nearest",
    salt: jax.Array | int | None = None,
) -> QuantizedArray4:
    """:func:`quantize_int4` given the blocks' largest magnitudes (:func:`block_absmax`).

    Elementwise given ``absmax``, so it fuses with whatever computes ``x``.

    Args:
      x: a real floating array of any shape (computed in float32).
      absmax: float32, shape ``scales_shape(x.shape, block_size)``: each block's largest
        magnitude, or an upper bound of it (values above it get the largest code).
      signed, block_size, rounding, salt: as for :func:`quantize_int4`.

    Returns:
      A :class:`QuantizedArray4`.
    """
    x = _check_floating(x)
    fmt = int4_format(signed)
    _, code, scales = _block_codes(x, absmax, fmt, signed, block_size, rounding, salt)
    if signed:  # the sign bit where x's is set and the code is not 0 (no negative zero)
        sign = _sign_blocks(x, block_size) & jnp.int32(_SIGN_NIBBLE)
        code = code | jnp.where(code > 0, sign, 0)
    # Blocks are whole bytes (block_size is even): pack each block's codes, then drop the
    # padding bytes past ceil(n / 2) (the padding elements are 0: code 0).
    n = (x.shape or (1,))[-1]
    codes = _unblock(_pack_pairs(code), -(-n // 2)).reshape(packed_shape(x.shape))
    return QuantizedArray4(codes, scales, n, bool(signed), int(block_size))


def _decode_nibbles(nibbles: jax.Array, signed: bool) -> jax.Array:
    """The code-book values (float32) of 4-bit codes (int32)."""
    fmt = int4_format(signed)
    if not signed:
        return decode_magnitudes(nibbles, fmt)
    # The magnitude's value, the nibble's sign bit moved to the float's sign bit.
    values = decode_magnitudes(nibbles & (_SIGN_NIBBLE - 1), fmt)
    sign = (nibbles & _SIGN_NIBBLE) << 28
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(values, jnp.int32) | sign, jnp.float32
    )


def _check_int4(q: Any) -> None:
    if not isinstance(q, QuantizedArray4):
        raise TypeError(f"q must be a QuantizedArray4; got {type(q).__name__}.")
    if q.codes.dtype != jnp.uint8:
        raise TypeError(f"codes must be uint8 (two 4-bit codes per byte); got {q.codes.dtype}.")


def dequantize_int4(q: QuantizedArray4) -> jax.Array:
    r"""The float32 array a :class:`QuantizedArray4` stores: :math:`x_i = q_{c_i} s_b`.

    Args:
      q: the codes, scales and metadata, as made by :func:`quantize_int4`.

    Returns:
      A float32 array of ``q.shape``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import quantize
      >>> q = quantize.quantize_int4(jnp.array([1.75, 0.5, 0.0]), signed=False, block_size=4)
      >>> quantize.dequantize_int4(q)  # no code for 0: the smallest value times the scale
      Array([1.75 , 0.5  , 0.125], dtype=float32)
    """
    _check_int4(q)
    _check_int4(q)
    shape = q.shape
    n = (shape or (1,))[-1]
    nibbles = _unpack_bytes(q.codes.reshape(q.codes.shape or (1,)), n)
    values = split_blocks(_decode_nibbles(nibbles, q.signed), q.block_size)
    s = q.scales.astype(jnp.float32).reshape(values.shape[:-1])
    return _unblock(values * s[..., None], n).reshape(shape)


def stored_absmax_int4(q: QuantizedArray4) -> jax.Array:
    """The largest magnitude each block of ``q`` decodes to, from its largest code.

    Args:
      q: a :class:`QuantizedArray4`.

    Returns:
      A float32 array shaped like ``q.scales``.
    """
    _check_int4(q)
    # The two nibbles' larger magnitude, per byte (as bytes), then per block.
    data = split_blocks(q.codes.reshape(q.codes.shape or (1,)), q.block_size // 2)
    low, high = data & jnp.uint8(15), data >> jnp.uint8(4)
    if q.signed:
        low, high = low & jnp.uint8(_SIGN_NIBBLE - 1), high & jnp.uint8(_SIGN_NIBBLE - 1)
    # Padding bytes are 0: never above. One two-output reduction (see block_max_min).
    zero = jnp.zeros([], jnp.uint8)
    top_low, top_high = jax.lax.reduce(
        (low, high),
        (zero, zero),
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.maximum(a[1], b[1])),
        (low.ndim - 1,),
    )
    top = jnp.maximum(top_low, top_high)
    value = decode_magnitudes(top.astype(jnp.int32), int4_format(q.signed))
    return value.reshape(q.scales.shape) * q.scales.astype(jnp.float32)


def zeros_int4(
    shape: tuple[int, ...], *, signed: bool, block_size: int = INT4_DEFAULT_BLOCK_SIZE
) -> QuantizedArray4:
    """A :class:`QuantizedArray4` of zeros: zero codes and zero scales.

    Args:
      shape: the shape of the stored array.
      signed: the signed or the unsigned 4-bit book.
      block_size: elements per block along the last axis, an even int in [2, inf).

    Returns:
      A :class:`QuantizedArray4` that dequantizes to ``jnp.zeros(shape)`` (a zero scale
      makes every code 0, the unsigned book's too).
    """
    check_int4_block_size(block_size)
    shape = tuple(shape)
    codes = jnp.zeros(packed_shape(shape), jnp.uint8)
    scales = jnp.zeros(scales_shape(shape, block_size), jnp.float32)
    return QuantizedArray4(codes, scales, (shape or (1,))[-1], bool(signed), int(block_size))


def zeros_like_int4(
    x: jax.Array, *, signed: bool, block_size: int = INT4_DEFAULT_BLOCK_SIZE
) -> QuantizedArray4:
    """A :class:`QuantizedArray4` of zeros shaped, and sharded, like ``x``.

    Under a mesh with explicit axes the codes and scales carry the types that quantizing
    ``x`` gives them (codes split like ``x``, their last axis halved), as
    :func:`zeros_like` does for 8-bit codes.

    Args:
      x: the array (or tracer) whose shape and sharding the zeros take.
      signed: the signed or the unsigned 4-bit book.
      block_size: elements per block along the last axis, an even int in [2, inf).

    Returns:
      A :class:`QuantizedArray4` that dequantizes to ``jnp.zeros_like(x, jnp.float32)``.
    """
    check_int4_block_size(block_size)
    if _numerics.explicit_sharding(x) is None:  # no sharding in the types: plain zeros
        return zeros_int4(jnp.shape(x), signed=signed, block_size=block_size)
    zero = jnp.zeros_like(x, dtype=jnp.float32)
    q = quantize_int4(zero, signed=signed, block_size=block_size)
    return QuantizedArray4(
        jnp.zeros_like(q.codes), jnp.zeros_like(q.scales), q.length, q.signed, q.block_size
    )
