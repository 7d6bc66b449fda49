"""The packed moment layout of :func:`adamw_jax.scale_by_adam` (``moment_layout="packed"``).

With the default ``"tree"`` layout each parameter leaf has its own moment arrays, and XLA
compiles (and runs) a few small kernels per leaf; on trees of many small leaves (biases,
norm scales, per-head tensors) that per-leaf cost, not memory traffic, decides the step's
time and its compile time. The packed layout keeps the moments of small leaves in shared
one-dimensional buffers, so that their moments are updated by one kernel per buffer:

* leaves with at least :data:`PACK_BELOW` elements, and empty leaves, keep a buffer of
  their own, in their own shape (their step is exactly the ``"tree"`` step);
* smaller leaves whose moments have the same storage dtypes share one buffer (in
  ``jax.tree.leaves`` order, at most :data:`MAX_LEAVES` leaves per buffer; a group of one
  keeps its leaf's shape). Each leaf's direction is a slice of its buffer's, and XLA's
  compile time grows with the number of slices taken from one buffer, hence the limit.

A moment is then a :class:`PackedMoments`: its buffers are its pytree children (arrays
that jit, donate and checkpoint like any other); which leaves each buffer holds is static
metadata of the node, part of the state's structure. Updates are checked against it by
their number of leaves and each leaf's shape, not by their tree structure: wrappers such
as Flax NNX's variables may surround the params at ``init`` and be gone at ``update``.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adamw_jax import _numerics

PACK_BELOW = 2**16
MAX_LEAVES = 32


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["buffers"], meta_fields=["groups", "num_leaves"]
)
@dataclasses.dataclass(frozen=True)
class PackedMoments:
    """A moment in the ``"packed"`` layout of :func:`adamw_jax.scale_by_adam`.

    Attributes:
      buffers: one array per group: the leaf's own shape for a group of one leaf, else
        one-dimensional, the group's leaves flattened and concatenated in order.
      groups: static; for each buffer, the indices (in ``jax.tree.leaves`` order) of the
        param leaves it holds.
      num_leaves: static; the number of param leaves.
    """

    buffers: tuple[jax.Array, ...]
    groups: tuple[tuple[int, ...], ...]
    num_leaves: int


def plan(shapes: Sequence[tuple[int, ...]], keys: Sequence[Any]) -> tuple[tuple[int, ...], ...]:
    """Groups of leaf indices sharing a buffer, for leaves of ``shapes`` with storage ``keys``.

    Leaves with fewer than :data:`PACK_BELOW` (and more than 0) elements are grouped by
    key, in order, at most :data:`MAX_LEAVES` per group; every other leaf is a group of its
    own. Groups are ordered by their first leaf.
    """
    out: list[list[int]] = []
    open_groups: dict[Any, list[int]] = {}
    for i, (shape, key) in enumerate(zip(shapes, keys, strict=True)):
        size = math.prod(shape)
        if size == 0 or size >= PACK_BELOW:
            out.append([i])
            continue
        group = open_groups.get(key)
        if group is None or len(group) == MAX_LEAVES:
            group = open_groups[key] = []
            out.append(group)
        group.append(i)
    return tuple(tuple(g) for g in out)


def buffer_shape(shapes: Sequence[tuple[int, ...]], group: Sequence[int]) -> tuple[int, ...]:
    """The shape of a group's buffer: the leaf's own for one leaf, else 1-D of the total."""
    if len(group) == 1:
        return tuple(shapes[group[0]])
    return (sum(math.prod(shapes[i]) for i in group),)


def zeros(params: Any, dtypes: Sequence[Any], keys: Sequence[Any]) -> PackedMoments:
    """Zero moments for ``params``, leaf ``i`` stored in ``dtypes[i]``, grouped by ``keys``."""
    leaves = jax.tree.leaves(params)
    shapes = [tuple(jnp.shape(p)) for p in leaves]
    groups = plan(shapes, keys)

    def buffer(group):
        if len(group) == 1:  # the leaf's own shape, and sharding
            return jnp.zeros_like(leaves[group[0]], dtype=dtypes[group[0]])
        return jnp.zeros(buffer_shape(shapes, group), dtypes[group[0]])  # replicated

    return PackedMoments(tuple(buffer(g) for g in groups), groups, len(shapes))


def _flatten(x: jax.Array) -> jax.Array:
    """``x`` as one dimension; a leaf sharded over explicit mesh axes is gathered first.

    A shared buffer is replicated: splitting a sharded axis into a flat one is a reshape
    that explicit sharding cannot type.
    """
    sharding = _numerics.explicit_sharding(x)
    if sharding is None:
        return x.reshape(-1)
    return jax.lax.reshape(x, (x.size,), out_sharding=_numerics.replicated(sharding))


def _unflatten(piece: jax.Array, like: jax.Array) -> jax.Array:
    """A flat ``piece`` of a shared buffer in the shape, and explicit sharding, of ``like``."""
    out = piece.reshape(like.shape)
    sharding = _numerics.explicit_sharding(like)
    return out if sharding is None else jax.sharding.reshard(out, sharding)


def check_matches(updates: Any, moments: PackedMoments) -> None:
    """Raises ValueError unless ``updates`` has the leaves and shapes ``moments`` holds."""
    shapes = [tuple(jnp.shape(g)) for g in jax.tree.leaves(updates)]
    if len(shapes) != moments.num_leaves:
        raise ValueError(
            f"updates have {len(shapes)} leaves, but the state's moments "
            f"(moment_layout='packed') hold {moments.num_leaves}: a different tree."
        )
    for group, buffer in zip(moments.groups, moments.buffers, strict=True):
        if tuple(jnp.shape(buffer)) != buffer_shape(shapes, group):
            raise ValueError(
                f"updates' leaves {list(group)} have shapes {[shapes[i] for i in group]}, "
                f"but the state's packed buffer for them has shape {tuple(jnp.shape(buffer))}."
            )


def update(
    step: Callable[..., tuple[Any, ...]],
    grads: Sequence[jax.Array],
    mu: PackedMoments,
    nu: PackedMoments,
    nu_max: PackedMoments | None,
) -> tuple[list[jax.Array], PackedMoments, PackedMoments, PackedMoments | None]:
    """Runs ``step`` once per buffer; returns per-leaf directions and the new buffers.

    ``step(grad, mu, nu, nu_max) -> (direction, mu, nu, nu_max)`` is
    :func:`adamw_jax.scale_by_adam`'s elementwise step, ``nu_max`` None without AMSGrad.
    The gradients of a shared buffer are concatenated (see :func:`_step_buffer`).
    """
    directions: list[Any] = [None] * len(grads)
    new_mu, new_nu, new_max = [], [], []
    for k, group in enumerate(mu.groups):
        old_max = None if nu_max is None else nu_max.buffers[k]
        group_directions, m, v, vm = _step_buffer(
            step, grads, group, mu.buffers[k], nu.buffers[k], old_max
        )
        for i, direction in zip(group, group_directions, strict=True):
            directions[i] = direction
        new_mu.append(m)
        new_nu.append(v)
        new_max.append(vm)

    def like(old: PackedMoments, buffers: list[jax.Array]) -> PackedMoments:
        return PackedMoments(tuple(buffers), old.groups, old.num_leaves)

    return (
        directions,
        like(mu, new_mu),
        like(nu, new_nu),
        None if nu_max is None else like(nu_max, new_max),
    )


def _step_buffer(
    step: Callable[..., tuple[Any, ...]],
    grads: Sequence[jax.Array],
    group: Sequence[int],
    mu: jax.Array,
    nu: jax.Array,
    nu_max: jax.Array | None,
) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array | None]:
    """``step`` on one buffer: its leaves' directions (in ``group``'s order), its new moments.

    A buffer of one leaf takes the leaf's gradient as it is. A shared buffer takes its
    leaves' gradients concatenated (in their dtype, or in their
    :func:`~adamw_jax._numerics.compute_dtype` when they differ), and its direction is
    sliced back into leaves, each cast to the wider of its gradient's and the moment's dtype.
    """
    if len(group) == 1:
        direction, new_mu, new_nu, new_max = step(grads[group[0]], mu, nu, nu_max)
        return [direction], new_mu, new_nu, new_max
    dtypes = {jnp.dtype(grads[i].dtype) for i in group}
    common = dtypes.pop() if len(dtypes) == 1 else _numerics.compute_dtype(*dtypes)
    grad = jnp.concatenate([_flatten(grads[i].astype(common)) for i in group])
    direction, new_mu, new_nu, new_max = step(grad, mu, nu, nu_max)
    directions = []
    offset = 0
    for i in group:
        size = math.prod(jnp.shape(grads[i]))
        piece = _unflatten(jax.lax.slice(direction, (offset,), (offset + size,)), grads[i])
        directions.append(piece.astype(_numerics.wider(grads[i].dtype, mu.dtype)))
        offset += size
    return directions, new_mu, new_nu, new_max
