"""Decay masks: choose which leaves decay, by path pattern or by rank, and show the choice."""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import _validate
from adamw_jax._base import Mask

__all__ = [
    "DEFAULT_EXCLUDE",
    "by_name",
    "by_ndim",
    "describe",
    "leaf_path",
    "map_masked",
    "resolve_mask",
]

#: Paths excluded from decay by default: biases, normalization scales and embeddings, as
#: Flax (Linen and NNX) names them.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"\bbias\b", r"\bscale\b", r"\bembedding\b")


def resolve_mask(mask: Mask, params: optax.Params) -> Any:
    """The bool tree that ``mask`` selects on ``params`` (None when everything decays).

    Args:
      mask: None, a pytree of bools with the structure of ``params`` (or a prefix of it),
        or a callable ``params -> such a pytree``.
      params: the parameters.

    Returns:
      None, or the tree of bools (Python or array booleans).
    """
    if mask is None:
        return None
    tree = mask(params) if callable(mask) else mask
    try:
        jax.tree.map(lambda m, p: None, tree, params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "mask does not match the params: it must have the params' tree structure "
            f"(or a prefix of it). mask: {jax.tree.structure(tree)}; "
            f"params: {jax.tree.structure(params)}."
        ) from err
    return tree


def map_masked(
    mask_tree: Any,
    on: Callable[[jax.Array, jax.Array], jax.Array],
    off: Callable[[jax.Array, jax.Array], jax.Array],
    updates: optax.Updates,
    params: optax.Params,
    *rest: Any,
) -> optax.Updates:
    """Maps ``on(u, p)`` over the leaves the mask selects and ``off(u, p)`` over the rest.

    Args:
      mask_tree: what :func:`resolve_mask` returned: None (every leaf), or a tree of bools
        (Python or array, a prefix of the params' tree).
      on: the map of a selected leaf, ``(update, param, *rest) -> new update``.
      off: the map of any other leaf.
      updates: the updates.
      params: the params, with the updates' structure.
      *rest: more trees with the updates' structure (e.g. a decay target), whose leaves
        ``on`` and ``off`` receive after the param.

    Returns:
      The new updates.
    """
    if mask_tree is None:
        return jax.tree.map(on, updates, params, *rest)

    def select(m, *subtrees):
        if isinstance(m, (bool, np.bool_)):
            return jax.tree.map(on if m else off, *subtrees)
        return jax.tree.map(lambda *x: jnp.where(m, on(*x), off(*x)), *subtrees)

    return jax.tree.map(select, mask_tree, updates, params, *rest)


def _compile(name: str, patterns: str | Sequence[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Sequence):
        raise TypeError(f"{name} must be a regex string or a sequence of them; got {patterns!r}.")
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} must hold regex strings; got {pattern!r}.")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{name} holds an invalid regex {pattern!r}: {err}.") from err
    return compiled


def leaf_path(path: tuple) -> str:
    """The leaf's path as the masks match it: ``jax.tree_util.keystr`` of its key path."""
    return jax.tree_util.keystr(path)


def by_name(
    exclude: str | Sequence[str] = DEFAULT_EXCLUDE,
    include: str | Sequence[str] | None = None,
) -> Callable[[Any], Any]:
    r"""A mask that decays the leaves whose path matches ``include`` and not ``exclude``.

    A leaf's path is ``jax.tree_util.keystr`` of its key path, e.g.
    ``"['params']['Dense_0']['bias']"`` for a Linen param dict or ``"['l1']['bias']"`` for
    an NNX ``nnx.State``. Patterns are Python regexes, matched with ``re.search``.

    Args:
      exclude: regexes; a leaf whose path matches any of them does not decay. The default
        leaves out biases, norm scales and embeddings (:data:`DEFAULT_EXCLUDE`).
      include: regexes; when given, only leaves matching one of them may decay.

    Returns:
      A callable ``params -> bool pytree`` for the ``mask`` argument of
      :func:`adamw_jax.adamw`. It is evaluated on the params at every step, so it works
      inside ``flax.nnx.Optimizer``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import masks
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> masks.by_name()(params)
      {'dense': {'bias': False, 'kernel': True}}
    """
    exclude_re = _compile("exclude", exclude)
    include_re = None if include is None else _compile("include", include)

    def decays(path: str) -> bool:
        if include_re is not None and not any(p.search(path) for p in include_re):
            return False
        return not any(p.search(path) for p in exclude_re)

    def mask_fn(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: decays(leaf_path(path)), params)

    return mask_fn


def by_ndim(min_ndim: int = 2) -> Callable[[Any], Any]:
    """A mask that decays leaves with at least ``min_ndim`` dimensions (kernels, matrices).

    Args:
      min_ndim: the smallest rank that decays, an int in [0, inf). The default 2 leaves
        out biases, norm scales and scalars.

    Returns:
      A callable ``params -> bool pytree`` for the ``mask`` argument of
      :func:`adamw_jax.adamw`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import masks
      >>> masks.by_ndim()({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)})
      {'bias': False, 'kernel': True}
    """
    _validate.check_int("min_ndim", min_ndim, low=0, static=True)

    def mask_fn(params):
        return jax.tree.map(lambda p: bool(np.ndim(p) >= min_ndim), params)

    return mask_fn


def describe(mask: Mask, params: Any) -> str:
    """A readable table of which leaves ``mask`` decays: path, shape, dtype, decays?

    Args:
      mask: None (all leaves), a bool pytree like the params (or a prefix of it), or a
        callable ``params -> bool pytree``.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      The table as a string, ending with a summary of how many leaves and parameters decay.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import masks
      >>> print(masks.describe(masks.by_ndim(), {"b": jnp.ones(2), "w": jnp.ones((2, 3))}))
      path     shape   dtype    decays
      ['b']    (2,)    float32  no
      ['w']    (2, 3)  float32  yes
      1 of 2 leaves decay (6 of 8 parameters)
    """
    tree = resolve_mask(mask, params)
    if tree is None:
        tree = jax.tree.map(lambda _: True, params)
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
    rows = [("path", "shape", "dtype", "decays")]
    n_leaves = n_decay = size = size_decay = 0
    for (path, leaf), m in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(full), strict=True
    ):
        shape = tuple(np.shape(leaf))
        count = int(np.prod(shape, dtype=np.int64))
        if isinstance(m, (bool, np.bool_)):
            decays = "yes" if m else "no"
        else:
            decays = "traced"
        n_leaves, size = n_leaves + 1, size + count
        if decays == "yes":
            n_decay, size_decay = n_decay + 1, size_decay + count
        dtype = getattr(leaf, "dtype", type(leaf).__name__)
        rows.append((leaf_path(path), str(shape), str(dtype), decays))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"{n_decay} of {n_leaves} leaves decay ({size_decay} of {size} parameters)")
    return "\n".join(lines)
