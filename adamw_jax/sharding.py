"""Optimizer state born sharded: moments placed like their parameters, or split ZeRO-1 style.

``jax.jit(tx.init)(params)`` builds the moments from ``jnp.zeros`` inside the jitted
function, and zeros made there do not inherit the input's sharding: every moment of a large,
sharded model would first be materialized whole on one device. :func:`init` instead asks
:func:`state_shardings` where each state leaf belongs and creates the state in place through
``jax.jit(tx.init, out_shardings=...)``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding


def _sharding_of(leaf: Any) -> Sharding | None:
    """The sharding a param leaf carries (a ``jax.Array`` or a ``ShapeDtypeStruct``), if any."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return getattr(leaf, "sharding", None)
    return None


def _replicated(shardings: list[Sharding]) -> Sharding:
    """A sharding that replicates over the devices the params live on."""
    named = [s for s in shardings if isinstance(s, NamedSharding)]
    if named:
        mesh = named[0].mesh
        for s in named[1:]:
            if s.mesh != mesh:
                raise ValueError(
                    f"params must all be placed on one mesh; got leaves on {mesh} and on {s.mesh}."
                )
    device_sets = {frozenset(s.device_set) for s in shardings}
    if len(device_sets) > 1:
        raise ValueError(
            "params must all live on the same set of devices; got "
            f"{len(device_sets)} different device sets."
        )
    if named:
        return NamedSharding(named[0].mesh, PartitionSpec())
    devices = sorted(shardings[0].device_set, key=lambda d: d.id)
    if len(devices) == 1:
        return SingleDeviceSharding(devices[0])
    return NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec())


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axis names one entry of a ``PartitionSpec`` uses."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def _split_over(sharding: Sharding, shape: tuple[int, ...], axis: str) -> Sharding:
    """``sharding``, additionally split over mesh ``axis`` along the first free dimension.

    The dimension chosen is the first one not already sharded whose size is a positive
    multiple of the axis' size. Leaves already split over ``axis``, and leaves with no such
    dimension (scalars, odd sizes), keep ``sharding``.
    """
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if any(axis in _mesh_axes(entry) for entry in spec):
        return sharding
    size = sharding.mesh.shape[axis]
    for i, (dim, entry) in enumerate(zip(shape, spec, strict=True)):
        if entry is None and dim > 0 and dim % size == 0:
            new_spec = PartitionSpec(*spec[:i], axis, *spec[i + 1 :])
            return NamedSharding(sharding.mesh, new_spec, memory_kind=sharding.memory_kind)
    return sharding


def _param_index_per_state_leaf(state: Any, params: Any) -> list[int | None]:
    """For every leaf of ``state`` (in flattening order), the index of its param or None.

    Two passes. First, every subtree of ``state`` with exactly the params' tree structure
    (the moments of ``scale_by_adam``, ``MultiSteps``' accumulated gradients, at any depth
    inside ``optax.chain``, ``inject_hyperparams`` or ``MultiSteps``) is zipped with the
    params position by position. Then each leaf still unmatched is given the param whose key
    path is the longest suffix of the leaf's key path: this covers trees that are the params'
    with some leaves masked out (``optax.masked`` replaces them by ``optax.MaskedNode``).
    """
    params_treedef = jax.tree.structure(params)
    num_params = params_treedef.num_leaves

    def is_params_like(node: Any) -> bool:
        return jax.tree.structure(node) == params_treedef

    def positions(node: Any) -> Any:
        if is_params_like(node):
            return jax.tree.unflatten(params_treedef, list(range(num_params)))
        return -1

    index_tree = jax.tree.map(positions, state, is_leaf=is_params_like)
    indices: list[int | None] = [None if i < 0 else i for i in jax.tree.leaves(index_tree)]

    param_paths = {
        tuple(path): i for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    }
    state_paths = [tuple(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
    if len(state_paths) != len(indices):  # defensive: both flatten the same tree
        raise AssertionError("state flattening mismatch")
    for k, path in enumerate(state_paths):
        if indices[k] is not None:
            continue
        for start in range(len(path) + 1):
            match = param_paths.get(path[start:])
            if match is not None:
                indices[k] = match
                break
    return indices


def state_shardings(
    tx: optax.GradientTransformation,
    params: optax.Params,
    zero_axis: str | None = None,
) -> Any:
    """The sharding tree of ``tx.init(params)``: moments placed like their params.

    The state's shapes come from ``jax.eval_shape(tx.init, params)``, so nothing is
    allocated. Each state leaf is matched to a param: subtrees of the state with the params'
    tree structure (the moments, at any depth of ``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.MultiSteps``) are matched position by position,
    and trees of params with masked-out leaves (``optax.masked``) by key path. Then:

    * a leaf with its param's shape gets its param's sharding (with ``zero_axis``,
      additionally split over that mesh axis, see below);
    * a leaf whose shape differs from its param's (for example a moment stored in another
      layout) is replicated over the params' devices: correct, but it costs every device a
      full copy and the update step a reshard;
    * every other leaf (step counts, injected hyperparameters) is replicated.

    With ``zero_axis`` (ZeRO stage 1), every param-shaped state leaf is also split over the
    mesh axis ``zero_axis``, along its first dimension that is not already sharded and whose
    size is a multiple of the axis' size; leaves with no such dimension keep their param's
    sharding. Use it when the params are replicated over a data-parallel axis: each device
    then holds ``1/N`` of the moments, at the price of an all-gather of the updates per step.

    Args:
      tx: the gradient transformation whose state is to be placed.
      params: the parameters: ``jax.Array`` leaves, or ``jax.ShapeDtypeStruct`` leaves with a
        ``sharding`` (abstract params); all on one mesh (or one device).
      zero_axis: None, or the name of an axis of the params' mesh to split the moments over.

    Returns:
      A pytree of ``jax.sharding.Sharding`` with the structure of ``tx.init(params)``,
      usable as ``out_shardings`` of ``jax.jit``.

    Raises:
      ValueError: if no param carries a sharding, the params span several meshes or device
        sets, or ``zero_axis`` is not an axis of the params' mesh.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> import adamw_jax
      >>> mesh = Mesh(jax.devices()[:1], ("data",))
      >>> params = {"w": jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P("data")))}
      >>> shardings = adamw_jax.sharding.state_shardings(adamw_jax.adamw(1e-3), params)
      >>> shardings[0].mu["w"].spec == P("data"), shardings[0].count.spec == P()
      (True, True)

    References:
      Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
      Models", SC 2020.
    """
    param_leaves = jax.tree.leaves(params)
    param_shardings = [_sharding_of(leaf) for leaf in param_leaves]
    placed = [s for s in param_shardings if s is not None]
    if not placed:
        raise ValueError(
            "params carry no sharding: place them with jax.device_put(params, shardings), "
            "or give jax.ShapeDtypeStruct leaves a sharding=..."
        )
    replicated = _replicated(placed)
    if zero_axis is not None:
        if not isinstance(replicated, NamedSharding):
            raise ValueError(
                f"zero_axis={zero_axis!r} needs params placed with a NamedSharding on a mesh; "
                f"got {type(placed[0]).__name__}."
            )
        names = replicated.mesh.axis_names
        if zero_axis not in names:
            raise ValueError(f"zero_axis must be one of the mesh axes {names}; got {zero_axis!r}.")

    abstract_state = jax.eval_shape(tx.init, params)
    state_leaves, state_treedef = jax.tree.flatten(abstract_state)
    indices = _param_index_per_state_leaf(abstract_state, params)

    out = []
    for leaf, index in zip(state_leaves, indices, strict=True):
        sharding = replicated
        if index is not None:
            param = param_leaves[index]
            if np.shape(leaf) == np.shape(param) and param_shardings[index] is not None:
                sharding = param_shardings[index]
                if zero_axis is not None:
                    sharding = _split_over(sharding, np.shape(leaf), zero_axis)
        out.append(sharding)
    return jax.tree.unflatten(state_treedef, out)


def init(
    tx: optax.GradientTransformation,
    params: optax.Params,
    zero_axis: str | None = None,
) -> optax.OptState:
    """``tx.init(params)``, created directly with the shardings of :func:`state_shardings`.

    No state leaf is ever materialized on a single device first: the zeros are made by
    ``jax.jit(tx.init, out_shardings=state_shardings(tx, params, zero_axis))``, so each
    device allocates only its own shards. Given abstract params (``jax.ShapeDtypeStruct``
    leaves with a ``sharding``), it returns the abstract state (``ShapeDtypeStruct`` leaves
    carrying their shardings) through ``jax.eval_shape``, allocating nothing; use that to
    plan memory or to restore a checkpoint straight into place.

    Args:
      tx: the gradient transformation.
      params: the parameters, placed on a mesh (``jax.Array``), or abstract
        (``jax.ShapeDtypeStruct`` with ``sharding``).
      zero_axis: None, or a mesh axis to split the moments over (ZeRO-1; see
        :func:`state_shardings`).

    Returns:
      The optimizer state, each leaf placed as :func:`state_shardings` says; abstract if any
      param leaf is a ``jax.ShapeDtypeStruct``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> import adamw_jax
      >>> mesh = Mesh(jax.devices()[:1], ("data",))
      >>> params = {"w": jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P("data")))}
      >>> state = adamw_jax.sharding.init(adamw_jax.adamw(1e-3), params)
      >>> state[0].mu["w"].sharding == params["w"].sharding
      True
      >>> abstract = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32,
      ...                                       sharding=NamedSharding(mesh, P("data")))}
      >>> adamw_jax.sharding.init(adamw_jax.adamw(1e-3), abstract)[0].nu["w"].shape
      (4, 2)
    """
    shardings = state_shardings(tx, params, zero_axis)
    create = jax.jit(tx.init, out_shardings=shardings)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        return jax.eval_shape(create, params)
    return create(params)
