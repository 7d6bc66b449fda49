"""How :func:`adamw_jax.scale_by_adam` stores its moments, and loads them back in float32.

Three formats, chosen per leaf:

* a floating dtype (float32, bfloat16, ...): the moment itself, cast;
* float16 for the second moment: its square root, so that :math:`g^2` does not underflow
  (float16's smallest positive value is about 6e-8: ``(1e-4)**2 = 1e-8`` would be stored
  as 0, and the update would divide by ``eps`` alone). A positive value too small even for
  the square root is stored as the smallest positive float16 rather than 0;
* ``"int8"``: blockwise 8-bit codes (:mod:`adamw_jax.quantize`); the second moment is
  quantized as its square root with the unsigned code book, the first with the signed one.
  Leaves with fewer than ``min_quantize_size`` elements stay float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import quantize
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
        return jnp.zeros(shape, jnp.promote_types(keep, jnp.finfo(dtype).dtype))
    if is_complex and not real:
        raise ValueError(
            f'{name}="int8" cannot store the first moment of a complex parameter ({dtype}, '
            f"shape {shape}); use None or a complex dtype."
        )
    return quantize.zeros(shape, signed=not real, block_size=block_size)


def dtype_of(stored: Any) -> jnp.dtype:
    """The dtype a stored moment holds its values in (float32 for quantized ones)."""
    return jnp.dtype(jnp.float32) if is_quantized(stored) else stored.dtype


def load(stored: Any, dtype: Any, block_size: int) -> jax.Array:
    """The first moment in ``dtype``."""
    if is_quantized(stored):
        return quantize.dequantize(stored, block_size).astype(dtype)
    return stored.astype(dtype)


def store(value: jax.Array, like: Any, block_size: int) -> Any:
    """The first moment ``value`` in the format of ``like``."""
    if is_quantized(like):
        return quantize.quantize(value, signed=True, block_size=block_size)
    return value.astype(like.dtype)


def load_second(stored: Any, dtype: Any, block_size: int) -> jax.Array:
    """The second moment (or its running maximum) in real ``dtype``."""
    if is_quantized(stored):
        return jnp.square(quantize.dequantize(stored, block_size).astype(dtype))
    if stored.dtype == jnp.float16:
        return jnp.square(stored.astype(dtype))
    return stored.astype(dtype)


def store_second(value: jax.Array, like: Any, block_size: int) -> Any:
    """The second moment ``value >= 0`` in the format of ``like``."""
    if is_quantized(like):
        root = jnp.sqrt(value.astype(jnp.float32))
        return quantize.quantize(root, signed=False, block_size=block_size, keep_nonzero=True)
    if like.dtype == jnp.float16:
        root = jnp.sqrt(value).astype(jnp.float16)
        tiny = jnp.asarray(jnp.finfo(jnp.float16).smallest_subnormal, jnp.float16)
        return jnp.where((value > 0) & (root == 0), tiny, root)
    return value.astype(like.dtype)


def shape_view(moments: Any) -> Any:
    """``moments`` with each quantized node replaced by its codes (the param's shape)."""
    return jax.tree.map(lambda x: x.codes if is_quantized(x) else x, moments, is_leaf=is_quantized)


def leaves(moments: Any) -> list[Any]:
    """The per-param leaves of a moment tree, a quantized node counting as one leaf."""
    return jax.tree.leaves(moments, is_leaf=is_quantized)
