r"""Decay masks: choose which leaves decay, by path pattern or by rank, and show the choice.

A mask is None (every leaf decays), a pytree of bools like the params (or a prefix of it),
or a callable ``params -> such a pytree``.

**Paths.** Every function here names a leaf by one path format: its keys joined by ``/``,
dict keys as they are, sequence indices as numbers, attribute names for dataclasses,
named tuples and Flax NNX modules, and nothing for a Flax NNX ``Variable`` (its
``.value`` layer is left out, so ``nnx.state(model, nnx.Param)`` and the pure state
``nnx.Optimizer`` passes to the optimizer give the same paths). For example:

===========================================  ======================================
params                                       a leaf's path
===========================================  ======================================
``{"l1": {"kernel": w, "bias": b}}``         ``l1/bias``
Linen's ``model.init(...)``                  ``params/Dense_0/kernel``
``nnx.state(model, nnx.Param)``              ``layers/0/attn/kernel``
===========================================  ======================================

So the patterns written for MaxText or Levanter match: ``bias$``, ``.*/bias``,
``layers/0/attn/kernel``. :func:`by_name` matches its regexes against these paths with
``re.search``, and :func:`describe` prints them.

A bool-pytree mask is matched to the params by path when its tree differs from theirs
only in the Variable layer (or dict against ``nnx.State``), e.g. one made with
``jax.tree.map(lambda p: p.ndim == 2, nnx.state(model, nnx.Param))`` and used inside
``nnx.Optimizer``. A mask that does not fit is refused, naming the first path that
differs.
"""

import re
import sys
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
#: Flax (Linen and NNX) names them. A model may lack some of them (no biases): the default
#: patterns, unlike those a user writes, may match no leaf.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"\bbias\b", r"\bscale\b", r"\bembedding\b")
# How many paths an error message lists.
_PATHS_SHOWN = 5


def _variable_types() -> tuple[type, ...]:
    """Flax NNX's Variable classes (``VariableState`` too, in the Flax versions with it).

    Empty when ``flax.nnx`` was never imported: then no tree can hold a Variable.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return ()
    # vars(), not getattr: where VariableState is a deprecated alias, getattr warns.
    found = (vars(nnx).get("Variable"), vars(nnx).get("VariableState"))
    return tuple(t for t in found if isinstance(t, type))


def is_variable(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX Variable, a node whose layer paths leave out."""
    types = _variable_types()
    return bool(types) and isinstance(x, types)


def leaf_path(path: tuple) -> str:
    """A key path as the masks write it: its keys joined by ``/`` (see :mod:`adamw_jax.masks`)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for each leaf of ``tree``, in its order, the paths as masks write them.

    A Flax NNX Variable's leaves are named by the Variable's path.
    """
    named = []
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
        inner = jax.tree.leaves(node) if is_variable(node) else [node]
        named.extend((leaf_path(path), leaf) for leaf in inner)
    return named


def resolve_mask(mask: Mask, params: optax.Params) -> Any:
    """The bool tree that ``mask`` selects on ``params`` (None when everything decays).

    Args:
      mask: None, a pytree of bools with the structure of ``params`` (or a prefix of it),
        or a callable ``params -> such a pytree``. A tree that differs from the params'
        only in Flax NNX's Variable layer (or in its container types) is matched by path.
      params: the parameters.

    Returns:
      None, or the tree of bools (Python or array booleans), a prefix of ``params``' tree.

    Raises:
      ValueError: the mask does not fit the params, naming the first path that differs.
    """
    if mask is None:
        return None
    tree = mask(params) if callable(mask) else mask
    try:
        jax.tree.map(lambda m, p: None, tree, params)
    except (ValueError, TypeError):
        return _match_by_path(tree, params)
    return tree


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(leaf_path((key,)) for key in path)


def _match_by_path(tree: Any, params: Any) -> Any:
    """``tree``'s values placed on ``params``' leaves (or Variables) by path; a prefix covers."""
    entries = {}
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
        values = jax.tree.leaves(node) if is_variable(node) else [node]
        entries[_keys(path)] = values[0] if len(values) == 1 else node
    used = set()

    def pick(path, _):
        keys = _keys(path)
        for n in range(len(keys), -1, -1):
            if keys[:n] in entries:
                used.add(keys[:n])
                return entries[keys[:n]]
        raise _misfit(f"the params have {'/'.join(keys)!r}, which the mask does not cover", params)

    resolved = jax.tree_util.tree_map_with_path(pick, params, is_leaf=is_variable)
    for keys in entries:
        if keys not in used:
            raise _misfit(
                f"the mask has {'/'.join(keys)!r}, which is no path of the params", params
            )
    return resolved


def _misfit(what: str, params: Any) -> ValueError:
    return ValueError(
        f"mask does not match the params: {what}. It must be a bool tree like the params (or "
        f"a prefix of it); the params' paths are {_some_paths(params)}."
    )


def _some_paths(tree: Any) -> str:
    """The first few paths of ``tree``'s leaves, for messages."""
    paths = [path for path, _ in named_leaves(tree)]
    shown = ", ".join(repr(p) for p in paths[:_PATHS_SHOWN])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > _PATHS_SHOWN else "")


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


def by_name(
    exclude: str | Sequence[str] = DEFAULT_EXCLUDE,
    include: str | Sequence[str] | None = None,
) -> Callable[[Any], Any]:
    r"""A mask that decays the leaves whose path matches ``include`` and not ``exclude``.

    Patterns are Python regexes, searched (``re.search``) in each leaf's path, written as
    the :mod:`adamw_jax.masks` module describes: ``l1/bias``, ``params/Dense_0/kernel``,
    ``layers/0/attn/kernel``.

    A pattern that matches no leaf's path is an error, raised when the mask is first
    evaluated (at the optimizer's ``init``), naming the pattern and some of the paths:
    otherwise a misspelt exclusion would leave every leaf decaying without a sign (a
    warning would be easy to lose in a training log, and is emitted once per trace). The
    patterns of :data:`DEFAULT_EXCLUDE` are exempt: they are generic, and a model may lack
    biases or embeddings.

    Args:
      exclude: regexes; a leaf whose path matches any of them does not decay. The default
        leaves out biases, norm scales and embeddings (:data:`DEFAULT_EXCLUDE`).
      include: regexes; when given, only leaves matching one of them may decay.

    Returns:
      A callable ``params -> bool pytree`` for the ``mask`` argument of
      :func:`adamw_jax.adamw`. It is evaluated on the params at ``init`` and at every
      step, so it works inside ``flax.nnx.Optimizer``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamw_jax import masks
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> masks.by_name()(params)
      {'dense': {'bias': False, 'kernel': True}}
      >>> masks.by_name(exclude=["bias$"], include=["^dense/"])(params)
      {'dense': {'bias': False, 'kernel': True}}
    """
    exclude_re = _compile("exclude", exclude)
    include_re = None if include is None else _compile("include", include)
    checked = [("exclude", p) for p in exclude_re if p.pattern not in DEFAULT_EXCLUDE]
    checked += [("include", p) for p in include_re or ()]

    def decays(path: str) -> bool:
        if include_re is not None and not any(p.search(path) for p in include_re):
            return False
        return not any(p.search(path) for p in exclude_re)

    def mask_fn(params):
        _check_patterns_match(checked, params)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: decays(leaf_path(path)), params, is_leaf=is_variable
        )

    return mask_fn


def _check_patterns_match(patterns: list[tuple[str, re.Pattern]], params: Any) -> None:
    """Raises ValueError naming the first pattern that matches none of ``params``' paths."""
    paths = [path for path, _ in named_leaves(params)]
    if not paths:
        return
    for name, pattern in patterns:
        if not any(pattern.search(path) for path in paths):
            raise ValueError(
                f"masks.by_name: the {name} pattern {pattern.pattern!r} matches no leaf's "
                f"path; the paths are {_some_paths(params)} (written as adamw_jax.masks "
                "describes: keys joined by '/')."
            )


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

    The paths are written as :mod:`adamw_jax.masks` describes.

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
      path  shape   dtype    decays
      b     (2,)    float32  no
      w     (2, 3)  float32  yes
      1 of 2 leaves decay (6 of 8 parameters)
    """
    tree = resolve_mask(mask, params)
    if tree is None:
        tree = jax.tree.map(lambda _: True, params)
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
    rows = [("path", "shape", "dtype", "decays")]
    n_leaves = n_decay = size = size_decay = 0
    for (path, leaf), m in zip(named_leaves(params), jax.tree.leaves(full), strict=True):
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
        rows.append((path, str(shape), str(dtype), decays))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"{n_decay} of {n_leaves} leaves decay ({size_decay} of {size} parameters)")
    return "\n".join(lines)
