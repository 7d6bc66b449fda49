r"""Blockwise 8-bit storage of moment states, and the byte count of an optimizer state.

A float32 array is cut into blocks of ``block_size`` consecutive elements along its last
axis (the last block of each row may be shorter). Each block keeps one float32 scale, its
largest magnitude divided by the code book's largest value, and one byte per element: the
code of the nearest code-book value to ``x / scale``.

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

Both maps are monotone in the code and map code 0 to exactly 0. Encoding and decoding are
integer operations on the float32 bit pattern (no table look-up), so they fuse into the
optimizer step.

Blocks run along the last axis only, so a leaf sharded along any of its leading axes keeps
every block inside one shard; a leaf sharded along its last axis does too when each shard's
length there is a multiple of ``block_size``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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


def _encode(y: jax.Array, signed: bool) -> jax.Array:
    """Nearest code (int32, >= 0) of magnitudes ``0 <= y`` (float32) in the code book."""
    e_bits, m_bits, bias = _format(signed)
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    # Round to nearest by adding half of the dropped mantissa bits; a carry moves into the
    # exponent, which is the next code up.
    normal = ((bits + (1 << (22 - m_bits))) >> (23 - m_bits)) - ((127 - bias) << m_bits)
    subnormal = jnp.round(y * jnp.float32(2.0 ** (bias - 1 + m_bits))).astype(jnp.int32)
    code = jnp.where(y < jnp.float32(2.0 ** (1 - bias)), subnormal, normal)
    return jnp.clip(code, 0, 2 ** (e_bits + m_bits) - 1)


def _decode(k: jax.Array, signed: bool) -> jax.Array:
    """The code-book value (float32) of codes ``0 <= k`` (int32)."""
    e_bits, m_bits, bias = _format(signed)
    k = jnp.clip(k, 0, 2 ** (e_bits + m_bits) - 1)
    exponent, mantissa = k >> m_bits, k & (2**m_bits - 1)
    normal_bits = ((exponent + (127 - bias)) << 23) | (mantissa << (23 - m_bits))
    normal = jax.lax.bitcast_convert_type(normal_bits, jnp.float32)
    subnormal = mantissa.astype(jnp.float32) * jnp.float32(2.0 ** (1 - bias - m_bits))
    return jnp.where(exponent == 0, subnormal, normal)


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


def _check_block_size(block_size: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be an int in [1, inf); got {block_size!r}.")
    if block_size < 1:
        raise ValueError(f"block_size must be in [1, inf); got {block_size!r}.")


def scales_shape(shape: tuple[int, ...], block_size: int = 256) -> tuple[int, ...]:
    """The shape of the per-block scales of an array of ``shape``."""
    if not shape:
        return ()
    return (*shape[:-1], math.ceil(shape[-1] / block_size))


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` (ndim >= 1) zero-padded along its last axis and split to (..., blocks, block)."""
    n = x.shape[-1]
    n_blocks = math.ceil(n / block_size)
    pad = n_blocks * block_size - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], n_blocks, block_size)


def _unblock(xb: jax.Array, n: int) -> jax.Array:
    return xb.reshape(*xb.shape[:-2], -1)[..., :n]


def quantize(
    x: jax.Array, *, signed: bool, block_size: int = 256, keep_nonzero: bool = False
) -> QuantizedArray:
    r"""Stores a float array as blockwise 8-bit codes and float32 scales.

    .. math::

      s_b = \max_{i \in b} |x_i| / q_{\max}, \qquad
      c_i = \operatorname{argmin}_c |q_c - x_i / s_b|

    where :math:`q` is the signed or unsigned code book (see the module docstring). The
    result decodes to :math:`q_{c_i} s_b`, with an error of at most
    :math:`2^{-5}|x_i| + 2^{-11} s_b` (signed) or :math:`2^{-5}|x_i| + 2^{-19} s_b`
    (unsigned). Zeros stay exactly
    zero; a block holding a NaN or an infinity decodes to non-finite values.

    Args:
      x: a real floating array of any shape (computed in float32).
      signed: use the signed code book (``int8`` codes); otherwise the unsigned one
        (``uint8`` codes), which requires ``x >= 0`` (negative values are stored as 0).
      block_size: elements per block along the last axis, in [1, inf).
      keep_nonzero: store positive values too small for the smallest nonzero code as that
        code rather than 0 (used for the second moment, which divides the update).

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
    """
    _check_block_size(block_size)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a real floating array; got dtype {x.dtype}.")
    shape = x.shape
    xf = x.astype(jnp.float32).reshape(shape or (1,))
    xb = _blocks(xf, block_size)
    magnitude = jnp.abs(xb) if signed else jnp.maximum(xb, 0.0)
    absmax = jax.lax.reduce_max(magnitude, (magnitude.ndim - 1,))
    top = jnp.float32(code_book_max(signed))
    scales = absmax / top
    inverse = jnp.where(absmax > 0, top / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    inverse = jnp.where(jnp.isfinite(absmax), inverse, absmax)  # propagate nan/inf
    code = _encode(magnitude * inverse[..., None], signed)
    if keep_nonzero:
        code = jnp.where((magnitude > 0) & (code == 0), 1, code)
    if signed:
        codes = jnp.where(xb < 0, -code, code).astype(jnp.int8)
    else:
        codes = code.astype(jnp.uint8)
    codes = _unblock(codes, xf.shape[-1]).reshape(shape)
    return QuantizedArray(codes, scales.reshape(scales_shape(shape, block_size)))


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
    _check_block_size(block_size)
    codes, scales = q
    signed = codes.dtype == jnp.int8
    if not signed and codes.dtype != jnp.uint8:
        raise TypeError(f"codes must be int8 or uint8; got {codes.dtype}.")
    shape = codes.shape
    k = codes.astype(jnp.int32).reshape(shape or (1,))
    values = _decode(jnp.abs(k), signed)
    if signed:
        values = jnp.where(k < 0, -values, values)
    n = k.shape[-1]
    s = scales.astype(jnp.float32).reshape(scales_shape(k.shape, block_size))
    out = _blocks(values, block_size) * s[..., None]
    return _unblock(out, n).reshape(shape)


def zeros(shape: tuple[int, ...], *, signed: bool, block_size: int = 256) -> QuantizedArray:
    """A :class:`QuantizedArray` of zeros: zero codes and zero scales.

    Args:
      shape: the shape of the stored array.
      signed: ``int8`` codes (signed code book) or ``uint8`` (unsigned).
      block_size: elements per block along the last axis, in [1, inf).

    Returns:
      A :class:`QuantizedArray` that dequantizes to ``jnp.zeros(shape)``.
    """
    _check_block_size(block_size)
    codes = jnp.zeros(shape, jnp.int8 if signed else jnp.uint8)
    return QuantizedArray(codes, jnp.zeros(scales_shape(tuple(shape), block_size), jnp.float32))


def state_nbytes(tree: Any) -> int:
    """The bytes held by the arrays of a pytree, such as an optimizer state.

    Args:
      tree: any pytree; leaves with a ``shape`` and ``dtype`` (``jax.Array``,
        ``np.ndarray``, ``jax.ShapeDtypeStruct``) are counted, other leaves (Python numbers)
        add nothing.

    Returns:
      The total size in bytes, as a Python int.

    Example:
      >>> import jax.numpy as jnp
      >>> import adamw_jax
      >>> params = {"w": jnp.zeros((100, 100))}
      >>> adamw_jax.state_nbytes(adamw_jax.adamw(1e-3).init(params))  # 2 moments, 2 counts
      80008
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return int(total)
