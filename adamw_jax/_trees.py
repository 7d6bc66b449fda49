"""Pytree helpers: per-leaf results back into trees, and the bytes a state holds."""

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def unzip(treedef: Any, rows: Sequence[Sequence[Any]], width: int) -> list[Any]:
    """Per-leaf tuples ``rows`` (one per leaf of ``treedef``) as ``width`` trees."""
    return [jax.tree.unflatten(treedef, [row[k] for row in rows]) for k in range(width)]


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
