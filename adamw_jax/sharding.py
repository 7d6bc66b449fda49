"""Optimizer state born sharded: moments placed like their parameters, or split ZeRO-1 style.

``jax.jit(tx.init)(params)`` builds the moments from ``jnp.zeros`` inside the jitted
function, and zeros made there do not inherit the input's sharding: every moment of a large,
sharded model would first be materialized whole on one device. :func:`init` instead asks
:func:`state_shardings` where each state leaf belongs and creates the state in place through
``jax.jit(tx.init, out_shardings=...)``.
"""

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from adamw_jax._packing import PackedMoments
from adamw_jax.quantize import QuantizedArray

__all__ = ["init", "state_shardings"]


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


def _split_over(
    sharding: Sharding, shape: tuple[int, ...], axis: str, last_quantum: int | None = 1
) -> Sharding:
    """``sharding``, additionally split over mesh ``axis`` along the first free dimension.

    The dimension chosen is the first one not already sharded whose size is a positive
    multiple of the axis' size; for the last dimension, each piece must moreover be a
    multiple of ``last_quantum`` (a quantized leaf's block length; None: never the last).
    Leaves already split over ``axis``, and leaves with no such dimension (scalars, odd
    sizes), keep ``sharding``.
    """
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if any(axis in _mesh_axes(entry) for entry in spec):
        return sharding
    size = sharding.mesh.shape[axis]
    for i, (dim, entry) in enumerate(zip(shape, spec, strict=True)):
        if entry is not None or dim <= 0 or dim % size:
            continue
        if i == len(shape) - 1 and (last_quantum is None or (dim // size) % last_quantum):
            continue
        new_spec = PartitionSpec(*spec[:i], axis, *spec[i + 1 :])
        return NamedSharding(sharding.mesh, new_spec, memory_kind=sharding.memory_kind)
    return sharding


def _block_length(codes_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> int | None:
    """The block length of a quantized leaf (None when its last axis is not whole blocks)."""
    if not codes_shape or not scales_shape or scales_shape[-1] == 0:
        return None
    n, n_blocks = codes_shape[-1], scales_shape[-1]
    return n // n_blocks if n % n_blocks == 0 else None


def _scales_sharding(
    codes_sharding: Sharding,
    codes_shape: tuple[int, ...],
    scales_shape: tuple[int, ...],
    replicated: Sharding,
) -> Sharding:
    """Where a quantized leaf's per-block scales go, given where its codes are.

    The scales have the codes' leading dimensions, sharded the same way; along the last
    axis they are split like the codes when every shard holds whole blocks, and otherwise
    replicated over that axis' mesh axes.
    """
    if not isinstance(codes_sharding, NamedSharding):
        return codes_sharding if len(codes_sharding.device_set) == 1 else replicated
    if not scales_shape:
        return NamedSharding(codes_sharding.mesh, PartitionSpec())
    spec = tuple(codes_sharding.spec) + (None,) * (len(codes_shape) - len(codes_sharding.spec))
    last = spec[-1]
    pieces = int(np.prod([codes_sharding.mesh.shape[a] for a in _mesh_axes(last)]))
    block = _block_length(codes_shape, scales_shape)
    if block is None or scales_shape[-1] % pieces:
        last = None
    return NamedSharding(
        codes_sharding.mesh,
        PartitionSpec(*spec[:-1], last),
        memory_kind=codes_sharding.memory_kind,
    )


def _packed_codes_sharding(sharding: Sharding, shape: tuple[int, ...]) -> Sharding:
    """Where a ``"int4"`` leaf's packed codes go, given where its unpacked values would.

    The codes (two per byte along the last axis, which is halved) are split like the
    values, except along the last axis where a piece would hold an odd number of values
    (a byte would span two pieces): that axis is then replicated.
    """
    if not isinstance(sharding, NamedSharding) or not shape:
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    pieces = int(np.prod([sharding.mesh.shape[a] for a in _mesh_axes(spec[-1])]))
    if pieces == 1 or (shape[-1] % pieces == 0 and (shape[-1] // pieces) % 2 == 0):
        return sharding
    spec = PartitionSpec(*spec[:-1], None)
    return NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)


def _is_quantized(node: Any) -> bool:
    return isinstance(node, QuantizedArray)


def _param_index_per_state_unit(state: Any, params: Any) -> list[int | None]:
    """For every unit of ``state``, the index of its param or None.

    A unit is a leaf, or a whole :class:`~adamw_jax.quantize.QuantizedArray` (codes and
    scales), in the order of ``jax.tree.leaves(state, is_leaf=_is_quantized)``. Two passes.
    First, every subtree of ``state`` with exactly the params' tree structure (the moments
    of ``scale_by_adam``, ``MultiSteps``' accumulated gradients, at any depth inside
    ``optax.chain``, ``inject_hyperparams`` or ``MultiSteps``) is zipped with the params
    position by position. Then each unit still unmatched is given the param whose key path
    is the longest suffix of the unit's key path: this covers trees that are the params'
    with some leaves masked out (``optax.masked`` replaces them by ``optax.MaskedNode``).
    """
    params_treedef = jax.tree.structure(params)
    num_params = params_treedef.num_leaves

    def is_params_like(node: Any) -> bool:
        return jax.tree.structure(node, is_leaf=_is_quantized) == params_treedef

    def positions(node: Any) -> Any:
        if isinstance(node, PackedMoments):  # a buffer of one leaf is that param's
            own = tuple(g[0] if len(g) == 1 else -1 for g in node.groups)
            return PackedMoments(own, node.groups, node.num_leaves)
        if is_params_like(node):
            return jax.tree.unflatten(params_treedef, list(range(num_params)))
        return -1

    def is_unit(node: Any) -> bool:
        return _is_quantized(node) or isinstance(node, PackedMoments) or is_params_like(node)

    index_tree = jax.tree.map(positions, state, is_leaf=is_unit)
    indices: list[int | None] = [None if i < 0 else i for i in jax.tree.leaves(index_tree)]

    param_paths = {
        tuple(path): i for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    }
    unit_paths = [
        tuple(path) for path, _ in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_quantized)
    ]
    if len(unit_paths) != len(indices):  # defensive: both flatten the same tree
        raise AssertionError("state flattening mismatch")
    for k, path in enumerate(unit_paths):
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
    * an ``"int8"`` moment (a :class:`~adamw_jax.quantize.QuantizedArray`): its codes,
      shaped like the param, get the param's sharding; its per-block scales are sharded
      like the codes on the leading axes and, along the last axis, like the codes when each
      shard holds whole blocks (each shard's length there a multiple of ``block_size``),
      otherwise replicated over that axis (correct, but the step then communicates to find
      each block's scale);
    * an ``"int4"`` moment (a :class:`~adamw_jax.quantize.QuantizedArray` of 4 bits): its packed
      codes get the param's sharding (their last axis is half the param's), except that
      a last axis whose shards would hold an odd number of the param's elements is
      replicated (a byte holds two); the scales as for ``"int8"``;
    * ``moment_layout="packed"`` moments (:class:`~adamw_jax.PackedMoments`): a buffer
      holding one leaf is that leaf's moment and is placed like its param; a buffer shared
      by small leaves is replicated;
    * any other leaf whose shape differs from its param's (a moment stored in another
      layout) is replicated over the params' devices: correct, but it costs every device a
      full copy and the update step a reshard;
    * every other leaf (step counts, injected hyperparameters) is replicated.

    With ``zero_axis`` (ZeRO stage 1), every param-shaped state leaf is also split over the
    mesh axis ``zero_axis``, along its first dimension that is not already sharded and whose
    size is a multiple of the axis' size; leaves with no such dimension keep their param's
    sharding (for an ``"int8"`` or ``"int4"`` moment, the last axis is chosen only if the
    pieces hold whole blocks). Use it when the params are replicated over a data-parallel
    axis: each device then holds ``1/N`` of the moments, at the price of an all-gather of
    the updates per step.

    ``optax.tree_utils.tree_map_params(tx, lambda _, spec: spec, state, param_specs)``
    gives the same specs for the ``"tree"`` layout with floating moments. It cannot for
    ``"int8"``/``"int4"`` moments or the ``"packed"`` layout, whose moments are not one
    array shaped like their param (Optax's helper raises a pytree structure error naming
    ``QuantizedArray`` or ``PackedMoments``; without a spec tree it
    would apply its function to the codes and the block scales alike): use this function
    there.

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
    units, state_treedef = jax.tree.flatten(abstract_state, is_leaf=_is_quantized)
    indices = _param_index_per_state_unit(abstract_state, params)

    def like_param(shape, index, last_quantum=1):
        """The param's sharding (ZeRO-split) if ``shape`` is the param's, else replicated."""
        if index is None or param_shardings[index] is None:
            return replicated
        if tuple(shape) != tuple(np.shape(param_leaves[index])):
            return replicated
        sharding = param_shardings[index]
        if zero_axis is not None:
            sharding = _split_over(sharding, tuple(shape), zero_axis, last_quantum)
        return sharding

    out: list[Any] = []
    for unit, index in zip(units, indices, strict=True):
        if _is_quantized(unit):  # 4-bit codes: placed as their unpacked values would be
            values = like_param(unit.shape, index, last_quantum=unit.block_size)
            codes = values if unit.bits == 8 else _packed_codes_sharding(values, unit.shape)
            scales = _scales_sharding(codes, unit.shape, tuple(unit.scales.shape), replicated)
            out.append(dataclasses.replace(unit, codes=codes, scales=scales))
        else:
            out.append(like_param(np.shape(unit), index))
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
