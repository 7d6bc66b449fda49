r"""Blockwise 8-bit and 4-bit storage of moment states.

A float32 array is cut into blocks of ``block_size`` consecutive elements along its last
axis (the last block of each row may be shorter). Each block keeps one float32 scale, its
largest magnitude divided by the code book's largest value, and one code per element: the
code of the nearest code-book value to ``x / scale``, in 8 bits (one byte per element) or
in 4 (two per byte). :func:`quantize` finds the largest magnitudes itself
(:func:`block_absmax`); :func:`quantize_with_absmax` takes them, or an upper bound of them,
from the caller, and is then purely elementwise. Both return a :class:`QuantizedArray`,
which carries its width, code book and block size with it, so that :func:`dequantize`,
:func:`stored_absmax` and every other function here need nothing else.

The code books are small floating-point formats (:class:`CodeFormat`), so their steps grow
with the magnitude, as a moment's values spread over orders of magnitude:

* 8 bits, signed (first moment): 1 sign, 3 exponent and 4 mantissa bits, ``int8`` codes
  :math:`-127 \dots 127`; unsigned (second moment, stored as its square root): 4 exponent
  and 4 mantissa bits, ``uint8`` codes :math:`0 \dots 255`. Both exact at 0.
* 4 bits, signed: sign and magnitude, the magnitude FP4 E2M1 (0, 0.125, ..., 1.5,
  :data:`INT4_SIGNED_CODE_BOOK`); unsigned: 2 exponent and 2 mantissa bits without
  subnormals, so no code for 0 (0.125 ... 1.75, :data:`INT4_UNSIGNED_CODE_BOOK`): an entry
  below the block's smallest code is stored as that code, which can only shrink the step
  it divides.

Values are rounded to the nearest code, or stochastically (``rounding="stochastic"``:
unbiased, for quantities such as a moving average whose per-step changes are smaller than
half a step of the code book). Encoding and decoding are integer operations on the float32
bit pattern (no table look-up), so they fuse into the optimizer step; the exact procedure,
bit for bit, is in the documentation's memory page ("The code books, bit for bit").

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
    "INT8_DEFAULT_BLOCK_SIZE",
    "INT8_SIGNED_FORMAT",
    "INT8_UNSIGNED_FORMAT",
    "CodeFormat",
    "QuantizedArray",
    "QuantizedStorage",
    "block_absmax",
    "check_bits",
    "check_block_size",
    "check_code_format",
    "code_book",
    "decode_magnitudes",
    "default_block_size",
    "default_format",
    "dequantize",
    "encode_magnitudes",
    "pack_int4",
    "packed_shape",
    "quantize",
    "quantize_with_absmax",
    "scales_shape",
    "stored_absmax",
    "unpack_int4",
    "zeros",
    "zeros_like",
]


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


#: The signed 4-bit code book's format: 2 exponent and 1 mantissa bits with subnormals
#: (FP4 "E2M1", halved): magnitudes 0, 0.125, 0.25, 0.375, 0.5, 0.75, 1, 1.5.
INT4_SIGNED_FORMAT = CodeFormat(2, 1, True)
#: The unsigned 4-bit code book's format: 2 exponent and 2 mantissa bits, no subnormals, so
#: no code for 0: values from 0.125 to 1.75.
INT4_UNSIGNED_FORMAT = CodeFormat(2, 2, False)
#: The signed 8-bit code book's format (first moment): 3 exponent and 4 mantissa bits.
INT8_SIGNED_FORMAT = CodeFormat(3, 4, True)
#: The unsigned 8-bit code book's format (second moment's root): 4 and 4 bits.
INT8_UNSIGNED_FORMAT = CodeFormat(4, 4, True)
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
#: The block size of the 4-bit codes when none is given.
INT4_DEFAULT_BLOCK_SIZE = 128
#: The block size of the 8-bit codes when none is given.
INT8_DEFAULT_BLOCK_SIZE = 256
BITS = (8, 4)
_SIGN_NIBBLE = 8
_ROUNDINGS = ("nearest", "stochastic")


def default_format(bits: int, signed: bool) -> CodeFormat:
    """The code book of ``bits``-bit codes, signed (first moment) or unsigned (second)."""
    if bits == 8:
        return INT8_SIGNED_FORMAT if signed else INT8_UNSIGNED_FORMAT
    return INT4_SIGNED_FORMAT if signed else INT4_UNSIGNED_FORMAT


def default_block_size(bits: int) -> int:
    """The block size of ``bits``-bit codes when none is given: 256 (8 bits), 128 (4)."""
    return INT8_DEFAULT_BLOCK_SIZE if bits == 8 else INT4_DEFAULT_BLOCK_SIZE


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["bits", "signed", "block_size", "length", "code_format"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A float32 array stored as blockwise 8-bit or 4-bit codes and one scale per block.

    The codes and scales are the pytree's children (they jit, donate, shard and checkpoint
    like any array: a checkpoint holds them under ``codes`` and ``scales``); the rest is
    static metadata, part of the tree's structure.

    Attributes:
      codes: with ``bits=8``, ``int8`` (signed code book) or ``uint8`` (unsigned), shaped
        like the stored array; with ``bits=4``, ``uint8`` two codes per byte, shape
        :func:`packed_shape` of it (element ``2j`` of a row in the low 4 bits of byte
        ``j``, see :func:`pack_int4`).
      scales: float32, ``scales_shape(shape, block_size)``: each block's largest magnitude
        divided by the code book's largest value.
      bits: static; 8 or 4.
      signed: static; the signed code book (first moment) or the unsigned one.
      block_size: static; elements per block along the last axis (even with 4 bits).
      length: static; the stored array's last-axis length (1 for a 0-d array).
      code_format: static; the code book (:func:`default_format` unless chosen).
    """

    codes: jax.Array
    scales: jax.Array
    bits: int
    signed: bool
    block_size: int
    length: int
    code_format: CodeFormat

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the stored (decoded) array."""
        codes_shape = tuple(self.codes.shape)
        if self.bits == 8 or not codes_shape:
            return codes_shape
        return (*codes_shape[:-1], self.length)


def check_bits(bits: Any, name: str = "bits") -> None:
    """Raises ValueError unless ``bits`` is 8 or 4."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name} must be 8 or 4; got {bits!r}.")


def check_block_size(block_size: Any, bits: int = 8, name: str = "block_size") -> None:
    """Raises unless ``block_size`` is an int in [1, inf), even for 4-bit codes.

    Raises:
      TypeError: for anything but an integer (a Python or NumPy one; a bool is refused).
      ValueError: for an integer below 1, or an odd one with ``bits=4`` (a 4-bit block is
        whole bytes).
    """
    _validate.check_int(name, block_size, low=1, static=True)
    if bits == 4 and block_size % 2:
        raise ValueError(
            f"{name} must be an even int in [2, inf) for 4-bit codes (two per byte, a block "
            f"is whole bytes); got {block_size!r}."
        )


def check_code_format(code_format: Any, bits: int, signed: bool, name: str = "code_format") -> None:
    """Raises unless ``code_format`` is a :class:`CodeFormat` that ``bits``-bit codes hold.

    Its codes must fit the width (``exponent_bits + mantissa_bits`` at most ``bits``, one
    less when ``signed``, whose top bit is the sign), and a signed book needs subnormals
    (an exact 0, the sign of which is not stored).

    Raises:
      TypeError: for anything but a :class:`CodeFormat`.
      ValueError: for a format the width does not hold, naming ``name``.
    """
    if not isinstance(code_format, CodeFormat):
        raise TypeError(f"{name} must be a quantize.CodeFormat; got {code_format!r}.")
    e_bits, m_bits, subnormals = code_format
    room = bits - int(bool(signed))
    if not (1 <= e_bits < 8 and 0 <= m_bits < 23 and e_bits + m_bits <= room):
        raise ValueError(
            f"{name}={code_format} does not fit {bits}-bit {'signed' if signed else 'unsigned'} "
            f"codes: exponent_bits in [1, 8), mantissa_bits in [0, 23), their sum at most {room}."
        )
    if signed and not subnormals:
        raise ValueError(f"{name}={code_format}: a signed code book needs subnormals (a 0).")


def _resolve(
    bits: Any, signed: bool, block_size: Any, code_format: CodeFormat | None
) -> tuple[int, CodeFormat]:
    """The checked block size and code book of a call (defaults where None)."""
    check_bits(bits)
    block_size = default_block_size(bits) if block_size is None else block_size
    check_block_size(block_size, bits)
    fmt = default_format(bits, signed) if code_format is None else code_format
    check_code_format(fmt, bits, signed)
    return int(block_size), fmt


def encode_magnitudes(
    y: jax.Array, fmt: CodeFormat, stochastic: bool = False, salt: jax.Array | None = None
) -> jax.Array:
    """Code (int32, >= 0) of magnitudes ``0 <= y`` (float32) in the code book ``fmt``.

    The nearest code (ties up), or with ``stochastic`` one of the two codes around ``y``:
    the upper one with probability equal to the fraction of the way from the lower one to
    ``y``, the random bits hashed from ``y``'s bits and ``salt``. Values beyond the largest
    code get the largest code; without subnormals, values below the smallest get code 0.
    The exact integer procedure is spelled out in the documentation's memory page ("The
    code books, bit for bit").
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


def code_book(signed: bool, bits: int = 8, code_format: CodeFormat | None = None) -> np.ndarray:
    """All values of a code book, as a float32 NumPy array.

    Args:
      signed: the signed book or the unsigned one.
      bits: 8 (index ``i`` holds code ``i - 127`` signed, 255 values; code ``i`` unsigned,
        256 values) or 4 (indexed by the stored nibble, 16 values; signed: bit 3 is the
        sign).
      code_format: None (:func:`default_format`) or another :class:`CodeFormat`.

    Returns:
      The values, indexed as above.

    Example:
      >>> from adamw_jax import quantize
      >>> book = quantize.code_book(signed=False)
      >>> float(book[0]), float(book[-1]), len(book)
      (0.0, 1.9375, 256)
      >>> quantize.code_book(signed=False, bits=4)[[0, -1]]
      array([0.125, 1.75 ], dtype=float32)
    """
    _, fmt = _resolve(bits, signed, None, code_format)
    if bits == 4:
        return np.asarray(_decode_nibbles(jnp.arange(16, dtype=jnp.int32), signed, fmt))
    if signed:
        positive = np.asarray(decode_magnitudes(jnp.arange(128, dtype=jnp.int32), fmt))
        return np.concatenate([-positive[:0:-1], positive])
    return np.asarray(decode_magnitudes(jnp.arange(256, dtype=jnp.int32), fmt))


def scales_shape(shape: tuple[int, ...], block_size: int = 256) -> tuple[int, ...]:
    """The shape of the per-block scales of an array of ``shape``."""
    if not shape:
        return ()
    return (*shape[:-1], math.ceil(shape[-1] / block_size))


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the packed 4-bit codes of an array of ``shape``: last axis halved, up."""
    if not shape:
        return ()
    return (*shape[:-1], -(-shape[-1] // 2))


def quantize(
    x: jax.Array,
    *,
    signed: bool,
    bits: int = 8,
    block_size: int | None = None,
    code_format: CodeFormat | None = None,
    keep_nonzero: bool = False,
    rounding: str = "nearest",
    salt: jax.Array | int | None = None,
) -> QuantizedArray:
    r"""Stores a float array as blockwise 8-bit or 4-bit codes and float32 scales.

    .. math::

      s_b = \max_{i \in b} |x_i| / q_{\max}, \qquad
      c_i = \operatorname{argmin}_c |q_c - x_i / s_b|

    where :math:`q` is the code book (see the module docstring). The result decodes to
    :math:`q_{c_i} s_b`. With 8 bits the error is at most :math:`2^{-5}|x_i| + 2^{-11}
    s_b` (signed) or :math:`2^{-5}|x_i| + 2^{-19} s_b` (unsigned); with 4 bits at most half
    a step of the book, :math:`|x_i|/6 + s_b / 16` (signed), :math:`|x_i| / 10` above the
    unsigned book's smallest value (and :math:`s_b / 8` below it). Zeros stay exactly zero
    (the 4-bit unsigned book has no 0: they come back as its smallest value times the
    scale, 0 in an all-zero block), each block's largest magnitude comes back to float32
    rounding, and a block holding a NaN or an infinity decodes to non-finite values.

    ``rounding="stochastic"`` instead picks, between the two codes around :math:`x_i / s_b`,
    the upper one with probability equal to the fraction of the way from the lower one to
    it, so that the stored value is unbiased, and the error is below one step of the book.
    A quantity updated by steps smaller than half the book's step (an exponential moving
    average with a decay close to 1) does not move under round to nearest, since each step
    rounds back to the old code; stochastic rounding moves it by the right amount on
    average. The random bits are a hash of :math:`x_i / s_b`'s float32 bit pattern and of
    ``salt``: no key, and the same inputs always give the same codes. Pass a ``salt`` that
    changes between calls (the step count) when the same value may be quantized again.

    Args:
      x: a real floating array of any shape (computed in float32).
      signed: use the signed code book; otherwise the unsigned one, which requires
        ``x >= 0`` (negative values are stored as its smallest value).
      bits: 8 (one code per byte) or 4 (two per byte).
      block_size: elements per block along the last axis, an int in [1, inf), even with
        ``bits=4``; None means 256 (8 bits) or 128 (4 bits).
      code_format: None (:func:`default_format`) or a :class:`CodeFormat` the width holds
        (:func:`check_code_format`).
      keep_nonzero: store positive values too small for the smallest nonzero code as that
        code rather than 0 (used for the 8-bit second moment, which divides the update).
      rounding: ``"nearest"`` (the nearest code, ties up) or ``"stochastic"``.
      salt: with ``"stochastic"``, None or an integer scalar (array or Python int, taken
        modulo ``2**32``) mixed into the random bits.

    Returns:
      A :class:`QuantizedArray` of ``x.shape``.

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
      >>> q4 = quantize.quantize(jnp.array([0.0, -1.0, 0.25, 3.0]), signed=True, bits=4)
      >>> q4.codes, q4.scales  # nibbles 0, 8 + 4 (-0.5); 1 (0.125), 7 (1.5), low first
      (Array([192, 113], dtype=uint8), Array([2.], dtype=float32))
      >>> quantize.dequantize(q4)
      Array([ 0.  , -1.  ,  0.25,  3.  ], dtype=float32)

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
      Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
      Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015
      (stochastic rounding).
    """
    block_size, fmt = _resolve(bits, signed, block_size, code_format)
    _validate.check_choice("rounding", rounding, _ROUNDINGS)
    absmax = block_absmax(x, signed=signed, block_size=block_size)
    return quantize_with_absmax(
        x,
        absmax,
        signed=signed,
        bits=bits,
        block_size=block_size,
        code_format=fmt,
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
    xb = _numerics.split_blocks(x.astype(jnp.float32).reshape(x.shape or (1,)), block_size)
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
    xb = _numerics.split_blocks(x.astype(jnp.float32).reshape(x.shape or (1,)), block_size)
    largest, smallest = _numerics.block_max_min(xb)
    # Both results are used (the unsigned book's min(-smallest, 0) <= 0 changes nothing),
    # which keeps this one fused two-output reduction (see _numerics.block_max_min).
    absmax = jnp.maximum(largest, -smallest if signed else jnp.minimum(-smallest, 0.0))
    return jnp.maximum(absmax, 0.0).reshape(scales_shape(x.shape, block_size))


def quantize_with_absmax(
    x: jax.Array,
    absmax: jax.Array,
    *,
    signed: bool,
    bits: int = 8,
    block_size: int | None = None,
    code_format: CodeFormat | None = None,
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
        magnitude, or an upper bound of it (values above it get the largest code).
      signed, bits, block_size, code_format, keep_nonzero, rounding, salt: as for
        :func:`quantize`.

    Returns:
      A :class:`QuantizedArray` of ``x.shape``.
    """
    block_size, fmt = _resolve(bits, signed, block_size, code_format)
    _validate.check_choice("rounding", rounding, _ROUNDINGS)
    x = _check_floating(x)
    magnitude, code, scales = _block_codes(x, absmax, fmt, signed, block_size, rounding, salt)
    if keep_nonzero:  # a positive magnitude (positive bit pattern) gets at least code 1
        positive = jnp.minimum(jax.lax.bitcast_convert_type(magnitude, jnp.int32), 1)
        code = jnp.maximum(code, positive)
    n = (x.shape or (1,))[-1]
    if bits == 4:
        codes = _nibble_codes(x, code, signed, block_size)
    elif signed:  # -code where x's sign bit is set: (code ^ s) - s with s = 0 or -1
        sign = _sign_blocks(x, block_size)
        codes = _numerics.unblock(((code ^ sign) - sign).astype(jnp.int8), n).reshape(x.shape)
    else:
        codes = _numerics.unblock(code.astype(jnp.uint8), n).reshape(x.shape)
    return QuantizedArray(codes, scales, bits, bool(signed), block_size, n, fmt)


def _nibble_codes(x: jax.Array, code: jax.Array, signed: bool, block_size: int) -> jax.Array:
    """4-bit codes (int32, in blocks) with ``x``'s signs, packed two per byte."""
    if signed:  # the sign bit where x's is set and the code is not 0 (no negative zero)
        sign = _sign_blocks(x, block_size) & jnp.int32(_SIGN_NIBBLE)
        code = code | jnp.where(code > 0, sign, 0)
    # Blocks are whole bytes (block_size is even): pack each block's codes, then drop the
    # padding bytes past ceil(n / 2) (the padding elements are 0: code 0).
    n = (x.shape or (1,))[-1]
    return _numerics.unblock(_pack_pairs(code), -(-n // 2)).reshape(packed_shape(x.shape))


def _sign_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """-1 where ``x``'s sign bit is set, else 0 (int32), split into blocks."""
    xb = _numerics.split_blocks(x.astype(jnp.float32).reshape(x.shape or (1,)), block_size)
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


def _decode_nibbles(nibbles: jax.Array, signed: bool, fmt: CodeFormat) -> jax.Array:
    """The code-book values (float32) of 4-bit codes (int32)."""
    if not signed:
        return decode_magnitudes(nibbles, fmt)
    # The magnitude's value, the nibble's sign bit moved to the float's sign bit.
    values = decode_magnitudes(nibbles & (_SIGN_NIBBLE - 1), fmt)
    sign = (nibbles & _SIGN_NIBBLE) << 28
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(values, jnp.int32) | sign, jnp.float32
    )


def _check_quantized(q: Any) -> None:
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"q must be a QuantizedArray; got {type(q).__name__}.")
    expected = (jnp.int8 if q.signed else jnp.uint8) if q.bits == 8 else jnp.uint8
    if q.codes.dtype != expected:
        raise TypeError(
            f"a {q.bits}-bit {'signed' if q.signed else 'unsigned'} QuantizedArray's codes "
            f"must be {jnp.dtype(expected)}; got {q.codes.dtype}."
        )


def dequantize(q: QuantizedArray) -> jax.Array:
    r"""The float32 array a :class:`QuantizedArray` stores: :math:`x_i = q_{c_i} s_b`.

    Args:
      q: the codes, scales and metadata, as made by :func:`quantize`.

    Returns:
      A float32 array of ``q.shape``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import quantize
      >>> q = quantize.quantize(jnp.array([4.0, 1.0, 0.0]), signed=False, block_size=2)
      >>> q.scales.shape
      (2,)
      >>> quantize.dequantize(q)
      Array([4., 1., 0.], dtype=float32)
      >>> q4 = quantize.quantize(jnp.array([1.75, 0.5, 0.0]), signed=False, bits=4, block_size=4)
      >>> quantize.dequantize(q4)  # no code for 0: the smallest value times the scale
      Array([1.75 , 0.5  , 0.125], dtype=float32)
    """
    _check_quantized(q)
    shape, n = q.shape, q.length
    if q.bits == 4:
        nibbles = _nibbles(q.codes, n)
        values = _decode_nibbles(nibbles, q.signed, q.code_format)
    else:
        k = q.codes.astype(jnp.int32).reshape(shape or (1,))
        values = decode_magnitudes(jnp.abs(k), q.code_format)
        if q.signed:  # copy the code's sign bit onto the (non-negative) value
            sign = k & jnp.int32(-(2**31))
            values = jax.lax.bitcast_convert_type(
                jax.lax.bitcast_convert_type(values, jnp.int32) | sign, jnp.float32
            )
    blocks = _numerics.split_blocks(values, q.block_size)
    s = q.scales.astype(jnp.float32).reshape(blocks.shape[:-1])
    return _numerics.unblock(blocks * s[..., None], n).reshape(shape)


def _nibbles(codes: jax.Array, n: int) -> jax.Array:
    """The nibbles (int32, at least 1-D) of packed 4-bit codes of last-axis length ``n``."""
    return _unpack_bytes(codes.reshape(codes.shape or (1,)), n)


def stored_absmax(q: QuantizedArray) -> jax.Array:
    """The largest magnitude each block of ``q`` decodes to, from its codes and scales.

    The code-book value of the block's largest code (in magnitude) times its scale: each
    block's largest magnitude of ``dequantize(q)``, found without decoding every element.

    Args:
      q: a :class:`QuantizedArray`.

    Returns:
      A float32 array shaped like ``q.scales``.
    """
    _check_quantized(q)
    codes = q.codes.reshape(q.codes.shape or (1,))
    if q.bits == 4:
        top = _largest_nibble(codes, q.signed, q.block_size)
    else:
        largest, smallest = _numerics.block_max_min(_numerics.split_blocks(codes, q.block_size))
        top = jnp.maximum(largest.astype(jnp.int32), -smallest.astype(jnp.int32))
    value = decode_magnitudes(top, q.code_format)
    return value.reshape(q.scales.shape) * q.scales.astype(jnp.float32)


def _largest_nibble(codes: jax.Array, signed: bool, block_size: int) -> jax.Array:
    """Each block's largest 4-bit magnitude code (int32) of packed codes (at least 1-D)."""
    # The two nibbles' larger magnitude, per byte (as bytes), then per block.
    data = _numerics.split_blocks(codes, block_size // 2)
    low, high = data & jnp.uint8(15), data >> jnp.uint8(4)
    if signed:
        low, high = low & jnp.uint8(_SIGN_NIBBLE - 1), high & jnp.uint8(_SIGN_NIBBLE - 1)
    # Padding bytes are 0: never above. One two-output reduction (see _numerics.block_max_min).
    zero = jnp.zeros([], jnp.uint8)
    top_low, top_high = jax.lax.reduce(
        (low, high),
        (zero, zero),
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.maximum(a[1], b[1])),
        (low.ndim - 1,),
    )
    return jnp.maximum(top_low, top_high).astype(jnp.int32)


def zeros(
    shape: tuple[int, ...],
    *,
    signed: bool,
    bits: int = 8,
    block_size: int | None = None,
    code_format: CodeFormat | None = None,
) -> QuantizedArray:
    """A :class:`QuantizedArray` of zeros: zero codes and zero scales.

    Args:
      shape: the shape of the stored array.
      signed, bits, block_size, code_format: as for :func:`quantize`.

    Returns:
      A :class:`QuantizedArray` that dequantizes to ``jnp.zeros(shape)`` (a zero scale
      makes every code 0, the 4-bit unsigned book's too).
    """
    block_size, fmt = _resolve(bits, signed, block_size, code_format)
    shape = tuple(shape)
    if bits == 4:
        codes = jnp.zeros(packed_shape(shape), jnp.uint8)
    else:
        codes = jnp.zeros(shape, jnp.int8 if signed else jnp.uint8)
    scales = jnp.zeros(scales_shape(shape, block_size), jnp.float32)
    return QuantizedArray(codes, scales, bits, bool(signed), block_size, (shape or (1,))[-1], fmt)


def zeros_like(
    x: jax.Array,
    *,
    signed: bool,
    bits: int = 8,
    block_size: int | None = None,
    code_format: CodeFormat | None = None,
) -> QuantizedArray:
    """A :class:`QuantizedArray` of zeros shaped, and sharded, like ``x``.

    Under a mesh with explicit axes (``jax.sharding.AxisType.Explicit``) the codes and
    scales carry the types that quantizing ``x`` gives them (8-bit codes split like ``x``,
    4-bit ones with their last axis halved), so a state made here has the same types as
    one that an optimizer step returns.

    Args:
      x: the array (or tracer) whose shape and sharding the zeros take.
      signed, bits, block_size, code_format: as for :func:`quantize`.

    Returns:
      A :class:`QuantizedArray` that dequantizes to ``jnp.zeros_like(x, jnp.float32)``.
    """
    block_size, fmt = _resolve(bits, signed, block_size, code_format)
    length = (jnp.shape(x) or (1,))[-1]
    if _numerics.explicit_sharding(x) is None and (bits == 4 or _on_one_device(x)):
        # Plain zeros: nothing to take from x but its shape (and, eagerly, no program to
        # compile per leaf shape).
        return zeros(jnp.shape(x), signed=signed, bits=bits, block_size=block_size, code_format=fmt)
    if bits == 4:
        q = quantize(
            jnp.zeros_like(x, dtype=jnp.float32),
            signed=signed,
            bits=4,
            block_size=block_size,
            code_format=fmt,
        )
        codes, scales = jnp.zeros_like(q.codes), jnp.zeros_like(q.scales)
    else:
        codes = jnp.zeros_like(x, dtype=jnp.int8 if signed else jnp.uint8)
        absmax = block_absmax(
            jnp.zeros_like(x, dtype=jnp.float32), signed=signed, block_size=block_size
        )
        scales = jnp.zeros_like(absmax)
    return QuantizedArray(codes, scales, bits, bool(signed), block_size, length, fmt)


def _on_one_device(x: Any) -> bool:
    """Whether ``x`` is a concrete array on one device (or a NumPy array): its zeros need
    no sharding."""
    if isinstance(x, np.ndarray):
        return True
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    return len(x.sharding.device_set) == 1


class QuantizedStorage(NamedTuple):
    """A moment stored as blockwise codes, for ``mu_dtype``/``nu_dtype``: ``"int8"`` and
    ``"int4"`` spelled out, with the code book and rounding open to choice.

    ``mu_dtype="int8"`` is ``QuantizedStorage(8)`` and ``"int4"`` is
    ``QuantizedStorage(4)``; the other fields change what those defaults choose, for
    experiments. The fused kernel implements the defaults only: another code book or
    rounding makes :func:`adamw_jax.fused_adamw` take its XLA code (and
    ``backend="kernel"`` refuses it, naming it).

    Attributes:
      bits: 8 or 4.
      rounding: None (the default: the first moment to nearest with 8 bits, stochastically
        with 4; the second moment stochastically), ``"nearest"`` or ``"stochastic"``.
      code_format: None (:func:`default_format`: the signed book for the first moment, the
        unsigned one for the second moment's square root) or a :class:`CodeFormat` the
        width holds.

    Example:
      >>> import adamw_jax
      >>> from adamw_jax import quantize
      >>> e3m1 = quantize.QuantizedStorage(4, code_format=quantize.CodeFormat(3, 1, False))
      >>> tx = adamw_jax.adamw(1e-3, mu_dtype="int4", nu_dtype=e3m1)
    """

    bits: int
    rounding: str | None = None
    code_format: CodeFormat | None = None


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
