r"""Populations in the user's own training loop: every member advanced by one compiled call.

A member's state is whatever ``init(hparams, key)`` returns — a plain pytree, a Linen
``TrainState`` or Flax NNX objects (an ``nnx.Module`` and its ``nnx.Optimizer``) — kept as
its array leaves with a leading member axis. The structure around the leaves (the NNX graph,
the ``TrainState``'s ``tx``) is rebuilt inside each compiled call by tracing ``init`` again
with that call's hyperparameters, so an optimizer built in ``init`` from traced
hyperparameters is live in ``step``; the arrays ``init`` would compute there are unused and
compiled away.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adamw_jax import _validate
from adamw_jax.tuning import _storage
from adamw_jax.tuning._population import Population as _Members
from adamw_jax.tuning._population import check_key, seed_keys
from adamw_jax.tuning._space import check_configs
from adamw_jax.tuning._sweep import PopulationTrain, as_hparams

Init = Callable[[dict[str, jax.Array], jax.Array], Any]
Step = Callable[[Any, Any, dict[str, jax.Array]], tuple[Any, Mapping[str, jax.Array]]]


# ------------------------------------------------------------------ states as array leaves
def _nnx() -> Any:
    """Flax NNX when it is imported (a state holding NNX objects implies it), else None."""
    return sys.modules.get("flax.nnx")


def _holds_graph(nnx: Any, state: Any) -> bool:
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Pytree))
    return any(isinstance(x, nnx.Pytree) for x in leaves)


def _split(state: Any) -> tuple[Any, list[Any]]:
    """The static structure of a state and its array leaves (NNX graphs through nnx.split)."""
    nnx = _nnx()
    if nnx is not None and _holds_graph(nnx, state):
        graph, arrays = nnx.split(state)
        leaves, treedef = jax.tree.flatten(arrays)
        return ("nnx", graph, treedef), leaves
    leaves, treedef = jax.tree.flatten(state)
    return ("tree", treedef), leaves


def _merge(static: Any, leaves: Sequence[Any]) -> Any:
    if static[0] == "nnx":
        return _nnx().merge(static[1], jax.tree.unflatten(static[2], leaves))
    return jax.tree.unflatten(static[1], leaves)


# What tracing raises when init reads a hyperparameter's value to build a shape.
_SHAPE_FROM_VALUE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


def _trace_init(init: Init, hparams: dict, key: jax.Array) -> tuple[Any, list[Any]]:
    try:
        return _split(init(hparams, key))
    except _SHAPE_FROM_VALUE as err:
        raise TypeError(
            "init must return a state whose shapes and types do not depend on hparams: "
            "every member's state is stacked along one member axis, and hparams are traced "
            f"float32 scalars. Tracing init failed with: {err}"
        ) from err


def _check_metrics(fn: str, metrics: Any) -> None:
    """Raises unless ``metrics`` (one member's) is a non-empty dict of real scalars."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise TypeError(
            f"{fn} must return a non-empty dict of scalar metrics (name -> scalar); got "
            f"{type(metrics).__name__}."
        )
    for name, value in metrics.items():
        value = jnp.asarray(value)
        real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        if not isinstance(name, str) or value.shape != () or not real:
            raise TypeError(
                f"{fn}'s metric {name!r} must be a real scalar per member (named by a "
                f"string); got shape {value.shape} and dtype {value.dtype}."
            )


def _layout(leaves: Sequence[Any]) -> list[tuple[tuple[int, ...], str]]:
    """Each leaf's shape and dtype (a Python number counts as the array it becomes)."""
    return [
        (tuple(np.shape(x)), str(getattr(x, "dtype", None) or jnp.asarray(x).dtype)) for x in leaves
    ]


def _check_same_leaves(static, leaves, new_static, new_leaves) -> None:
    if static != new_static or _layout(leaves) != _layout(new_leaves):
        raise TypeError(
            "step must return (state, metrics) with the state of init's structure, shapes and "
            f"dtypes; init's leaves are {_layout(leaves)}, step returned {_layout(new_leaves)}."
        )


def _all_finite(metrics: Mapping[str, jax.Array], leaves: Sequence[jax.Array]) -> jax.Array:
    checks = [jnp.isfinite(jnp.asarray(v)).all() for v in metrics.values()]
    checks += [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all()


# --------------------------------------------------------------------- one member's calls
def _member_init(init: Init) -> Callable:
    def member(hparams, key):
        return _trace_init(init, hparams, key)[1]

    return member


def _member_step(init: Init, step: Step) -> Callable:
    """One member's step: its new leaves and its metrics (kept or discarded by
    :func:`_member_select`, in a call of its own)."""

    def member(leaves, batch, hparams, key):
        static, template = _trace_init(init, hparams, key)
        new_state, metrics = step(_merge(static, leaves), batch, hparams)
        _check_metrics("step", metrics)
        new_static, new_leaves = _split(new_state)
        _check_same_leaves(static, template, new_static, new_leaves)
        return new_leaves, dict(metrics)

    return member


def _member_select(old, new, metrics, active):
    """A member's new leaves where it stays active and all it returned is finite, else its
    old ones (a select: a diverged update never leaves the member); and whether it stays."""
    keep = active & _all_finite(metrics, new)
    return [jnp.where(keep, n, o) for n, o in zip(new, old, strict=True)], keep


def _member_map(init: Init, fn: Callable) -> Callable:
    def member(leaves, args, hparams, key):
        static, _ = _trace_init(init, hparams, key)
        metrics = fn(_merge(static, leaves), *args)
        _check_metrics("fn", metrics)
        return dict(metrics)

    return member


# ------------------------------------------------------------ the members' layouts in memory
# Vmapped members are stacked: a member leaf of shape s is stored as (members, *s). Members
# alone on their devices are stored as rows: the leaf as (members * s[0], *s[1:]) (scalars
# as (members,)), so that each device holds its member's leaves with their own shapes and
# the member's step program reads them as its solo run does (a stacked block would enter
# it through a reshape, which XLA fuses into the step and can round differently).
def _one_per_device(members: int, mesh: Mesh | None) -> bool:
    """Whether ``members`` run one per device of ``mesh`` (or alone, without one)."""
    return members == (1 if mesh is None else mesh.size)


def _as_rows(stacked: Sequence[Any], shapes: Sequence[tuple]) -> list[Any]:
    return [
        x.reshape((x.shape[0] * s[0], *s[1:])) if s else x
        for x, s in zip(stacked, shapes, strict=True)
    ]


def _as_stacked(rows: Sequence[Any], shapes: Sequence[tuple], members: int) -> list[Any]:
    return [x.reshape((members, *s)) for x, s in zip(rows, shapes, strict=True)]


def _over_members(
    member: Callable, in_axes: tuple, mesh: Mesh | None, members: int, shapes: Sequence[tuple]
) -> Callable:
    """``member`` over the member axis: vmapped, or split over ``mesh`` with ``shard_map``.

    ``in_axes`` holds, per argument, None (shared), 0 (a leading member axis) or
    ``"leaves"`` (the members' leaves, member leaf shapes ``shapes``, in the layout of
    ``members`` on ``mesh``). One member per device (or a one-member population) runs the
    unbatched ``member`` on its rows, and returns rows.
    """
    if _one_per_device(members, mesh):

        def body(*args):
            own = [
                _from_rows(a, shapes) if axis == "leaves" else a if axis is None else _first(a)
                for a, axis in zip(args, in_axes, strict=True)
            ]
            return jax.tree.map(lambda x: x if x.ndim else x[None], member(*own))

    else:
        body = jax.vmap(member, in_axes=tuple(0 if a == "leaves" else a for a in in_axes))
    if mesh is None:
        return body
    spec = PartitionSpec(mesh.axis_names)
    specs = tuple(PartitionSpec() if axis is None else spec for axis in in_axes)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)


def _from_rows(rows: Sequence[Any], shapes: Sequence[tuple]) -> list[Any]:
    """One device's rows as its member's leaves (scalars arrive as one-element rows)."""
    return [x if s else x[0] for x, s in zip(rows, shapes, strict=True)]


def _first(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


class _Same:
    """A user's function as a static argument of ``jax.jit``, compared by identity (as jit
    compares the functions it compiles), so that any callable, hashable or not, can be one.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.fn is self.fn


# The compiled calls. Their static arguments name the user's functions, the mesh and a
# member's leaf shapes, so jit's own cache compiles each once per population size (and batch
# layout): populations of the same functions share their programs.
_STATIC = ("init", "mesh", "shapes")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _init_call(hparams, keys, *, init, mesh, shapes):
    member = _member_init(init.fn)
    return _over_members(member, (0, 0), mesh, keys.shape[0], shapes)(hparams, keys)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "step", "per_member"))
def _step_call(leaves, batch, hparams, keys, *, init, step, mesh, shapes, per_member):
    member = _member_step(init.fn, step.fn)
    axes = ("leaves", 0 if per_member else None, 0, 0)
    return _over_members(member, axes, mesh, keys.shape[0], shapes)(leaves, batch, hparams, keys)


@functools.partial(jax.jit, static_argnames=("mesh", "shapes"), donate_argnums=(1,))
def _select_call(old, new, metrics, active, *, mesh, shapes):
    """The freezing select, compiled apart from the step so that the step's program is the
    member's own."""
    axes = ("leaves", "leaves", 0, 0)
    return _over_members(_member_select, axes, mesh, active.shape[0], shapes)(
        old, new, metrics, active
    )


@functools.partial(jax.jit, static_argnames=(*_STATIC, "fn", "per_member"))
def _map_call(leaves, args, hparams, keys, *, init, fn, mesh, shapes, per_member):
    member = _member_map(init.fn, fn.fn)
    axes = ("leaves", 0 if per_member else None, 0, 0)
    return _over_members(member, axes, mesh, keys.shape[0], shapes)(leaves, args, hparams, keys)


class _Program:
    """The compiled calls of one ``init``/``step`` pair on one mesh."""

    def __init__(self, init: Init, step: Step, mesh: Mesh | None):
        self.init_fn, self.step_fn, self.mesh = init, step, mesh
        self.shapes: tuple[tuple[int, ...], ...] | None = None  # a member's leaf shapes

    def leaf_shapes(self, hparams: dict, key: jax.Array) -> tuple[tuple[int, ...], ...]:
        """A member's leaf shapes (traced once: shapes do not depend on ``hparams``)."""
        if self.shapes is None:
            leaves = jax.eval_shape(_member_init(self.init_fn), hparams, key)
            self.shapes = tuple(tuple(x.shape) for x in leaves)
        return self.shapes

    def _static(self) -> dict[str, Any]:
        return {"init": _Same(self.init_fn), "mesh": self.mesh, "shapes": self.shapes}

    def init(self, hparams, keys) -> list[Any]:
        return _init_call(hparams, keys, **self._static())

    def step(self, leaves, batch, hparams, keys, per_member: bool):
        step = _Same(self.step_fn)
        return _step_call(
            leaves, batch, hparams, keys, step=step, per_member=per_member, **self._static()
        )

    def select(self, old, new, metrics, active):
        return _select_call(old, new, metrics, active, mesh=self.mesh, shapes=self.shapes)

    def map(self, fn: Callable, leaves, args, hparams, keys, per_member: bool):
        fn = _Same(fn)
        return _map_call(
            leaves, args, hparams, keys, fn=fn, per_member=per_member, **self._static()
        )

    def put(self, tree: Any) -> Any:
        """A tree of member-major arrays, split over the mesh when there is one."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names)))

    def to_layout(self, stacked: Sequence[Any], members: int) -> list[Any]:
        """Stacked member leaves in the layout of ``members`` on the mesh, placed there."""
        if _one_per_device(members, self.mesh):
            stacked = _as_rows(stacked, self.shapes)
        return self.put(list(stacked))

    def to_stacked(self, leaves: Sequence[Any], members: int) -> list[Any]:
        """Member leaves in the layout of ``members`` as stacked ones."""
        if _one_per_device(members, self.mesh):
            return _as_stacked(leaves, self.shapes, members)
        return list(leaves)


def _check_callable(name: str, fn: Any, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be a function {signature}; got {fn!r}.")


def _check_batch(batch: Any, per_member: bool, members: int) -> None:
    _validate.check_bool("per_member", per_member)
    if not per_member:
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        length = np.shape(leaf)[0] if np.ndim(leaf) else None
        if length != members:
            raise ValueError(
                f"batch with per_member=True must have a leading member axis of length "
                f"{members} (the population's members) on every leaf; batch"
                f"{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}."
            )


def _host(metrics: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).astype(np.float64) for k, v in metrics.items()}


class Population:
    r"""Many training runs in your own loop: every member advanced by one compiled call.

    Member ``(c, s)`` (at position ``c * seeds + s``) starts from
    ``init(as_hparams(configs[c]), seed_keys(key, seeds)[s])``: the same hyperparameters and
    key as the same member of :func:`sweep`, so a member is the same run in both. Each
    :meth:`step` runs ``step(state, batch, hparams)`` for every member in one compiled call
    (compiled once per population size and batch layout).

    **Reproducing a member.** A member computes its configuration trained alone
    (``jax.jit(init)`` once, then ``jax.jit(step)`` on the same batches). A member alone on
    a device (one per device of ``mesh``, or a one-member population) is that run bitwise:
    its leaves are stored with their own shapes on its device, its step is the unbatched
    step, and the freezing select runs in a call of its own, so the step's program is the
    solo run's. Vmapped members run the same optimizer arithmetic, but XLA computes batched
    matrix products with other kernels, reduction orders and fusions than unbatched ones,
    so a member with matrix products differs from its solo run by a few ulps per step
    (within 1e-6 relative over a calm run; a chaotic run can amplify it), as in
    :func:`sweep`.

    **Stopping.** A member is frozen — its state no longer updated — when :meth:`stop`
    stops it, or automatically on the step where any metric it returns, or any floating
    leaf of its new state, is NaN or infinite; that step's update is discarded with a
    select, so a diverging member keeps its last finite state and never changes the other
    members' arithmetic. Frozen members still cost compute until :meth:`compact` drops them.

    Args:
      init: ``init(hparams, key) -> state``, traceable by ``jax.jit`` and ``jax.vmap``;
        ``state`` a pytree of arrays, a Linen ``TrainState``, or Flax NNX objects (an
        ``nnx.Module`` and its ``nnx.Optimizer``, built from ``hparams`` as usual). Its
        shapes must not depend on ``hparams``.
      step: ``step(state, batch, hparams) -> (state, metrics)``: one training step (NNX
        objects may be updated in place and returned), ``metrics`` a dict of real scalars.
      configs: a non-empty list of dicts name -> finite number, all with the same names.
      key: a PRNG key; the seed keys are ``jax.random.split(key, seeds)``.
      seeds: seeds per configuration, an int in [1, inf).
      mesh: a ``jax.sharding.Mesh`` to split the member axis over (all its axes; the number
        of members must be a multiple of its size), or None to vmap on one device.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adamw_jax
      >>> from adamw_jax import tuning
      >>> def init(hparams, key):
      ...     w = jax.random.normal(key, (4,))
      ...     tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=0.1)
      ...     return w, tx.init(w)
      >>> def step(state, batch, hparams):
      ...     w, opt_state = state
      ...     loss, g = jax.value_and_grad(lambda w: jnp.mean((batch @ w - 1.0) ** 2))(w)
      ...     tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=0.1)
      ...     updates, opt_state = tx.update(g, opt_state, w)
      ...     return (optax.apply_updates(w, updates), opt_state), {"loss": loss}
      >>> pop = tuning.Population(init, step, tuning.grid(learning_rate=[1e-3, 1e-1]),
      ...                         key=jax.random.key(0))
      >>> for _ in range(100):
      ...     metrics = pop.step(jnp.ones((8, 4)))
      >>> metrics["loss"].shape, bool(metrics["loss"][1] < metrics["loss"][0])
      ((2,), True)
    """

    def __init__(
        self,
        init: Init,
        step: Step,
        configs: Sequence[Mapping[str, float]],
        *,
        key: jax.Array,
        seeds: int = 1,
        mesh: Mesh | None = None,
    ):
        _check_callable("init", init, "(hparams, key) -> state")
        _check_callable("step", step, "(state, batch, hparams) -> (state, metrics)")
        configs = check_configs(configs)
        _validate.check_int("seeds", seeds, low=1)
        check_key(key)
        seed = np.tile(np.arange(seeds, dtype=np.int32), len(configs))
        member_configs = [c for c in configs for _ in range(seeds)]
        self._setup(_Program(init, step, mesh), member_configs, seed, seed_keys(key, seeds)[seed])
        self._start()

    def _setup(self, program: _Program, configs: list, seed: np.ndarray, keys: jax.Array) -> None:
        mesh = program.mesh
        if mesh is not None and len(configs) % mesh.size:
            raise ValueError(
                f"a population split over a mesh needs a multiple of its {mesh.size} devices "
                f"as members (configs times seeds); got {len(configs)}."
            )
        self._program = program
        self.configs: list[dict[str, float]] = configs
        self.seed: np.ndarray = seed
        self.index: np.ndarray = np.arange(len(configs))
        self.active: np.ndarray = np.ones(len(configs), bool)
        self.steps = 0
        self._hparams = program.put(
            {k: np.asarray([c[k] for c in configs], np.float32) for k in configs[0]}
        )
        self._keys = program.put(keys)
        program.leaf_shapes(as_hparams(configs[0]), keys[0])

    def _start(self) -> None:
        """Every member's state from ``init``."""
        self._leaves = self._program.init(self._hparams, self._keys)

    @property
    def size(self) -> int:
        """The number of members (stopped ones included until :meth:`compact`)."""
        return len(self.configs)

    @property
    def state(self) -> Any:
        """Every member's state leaves, in ``init``'s structure, with a leading member axis
        (for reading arrays: NNX objects and optimizers in it are not meant to be run)."""
        holder = []

        def structure(hparams, key):
            static, leaves = _trace_init(self._program.init_fn, hparams, key)
            holder.append(static)
            return leaves

        jax.eval_shape(structure, as_hparams(self.configs[0]), self._keys[0])
        return _merge(holder[0], self._stacked())

    def _stacked(self) -> list[Any]:
        return self._program.to_stacked(self._leaves, self.size)

    def step(self, batch: Any, *, per_member: bool = False) -> dict[str, np.ndarray]:
        """Advances every active member by one ``step`` on ``batch``, in one compiled call.

        Args:
          batch: any pytree of arrays ``step`` takes; the same for every member, or one per
            member with ``per_member=True``.
          per_member: whether every leaf of ``batch`` has a leading member axis of length
            :attr:`size`, member ``i`` getting ``leaf[i]``.

        Returns:
          The metrics, name -> float64 array of shape ``(size,)``; NaN for members stopped
          before this step.
        """
        _check_batch(batch, per_member, self.size)
        was_active = self.active
        program = self._program
        new, metrics = program.step(self._leaves, batch, self._hparams, self._keys, per_member)
        active = program.put(was_active)
        self._leaves, keep = program.select(self._leaves, new, metrics, active)
        self.active = np.asarray(keep)
        self.steps += 1
        return {k: np.where(was_active, v, np.nan) for k, v in _host(metrics).items()}

    def map(self, fn: Callable, *args: Any, per_member: bool = False) -> dict[str, np.ndarray]:
        """``fn(state, *args) -> metrics`` for every member (stopped ones on their last
        state) in one compiled call; name -> float64 array of shape ``(size,)``.

        ``args`` are shared, or one per member along a leading axis with ``per_member=True``.
        """
        _check_callable("fn", fn, "(state, *args) -> metrics")
        _check_batch(args, per_member, self.size)
        metrics = self._program.map(fn, self._leaves, args, self._hparams, self._keys, per_member)
        return _host(metrics)

    def stop(self, member: int) -> None:
        """Freezes member ``member`` (a position in ``range(size)``)."""
        _validate.check_int("member", member, low=0)
        if member >= self.size:
            raise ValueError(f"member must be in [0, {self.size - 1}]; got {member}.")
        self.active = self.active.copy()
        self.active[member] = False

    def compact(self) -> None:
        """Drops the stopped members, so that the survivors' steps compute only theirs (one
        compilation for the new size). With a mesh, as many stopped members are kept as
        round the size up to a multiple of the mesh's. :attr:`configs`, :attr:`seed` and
        :attr:`index` (each member's position in the original population) follow."""
        survivors = np.flatnonzero(self.active)
        if not len(survivors):
            raise ValueError("compact needs at least one active member; every member is stopped.")
        devices = 1 if self._program.mesh is None else self._program.mesh.size
        extra = -len(survivors) % devices
        keep = np.sort(np.concatenate([survivors, np.flatnonzero(~self.active)[:extra]]))
        leaves, keys = [x[keep] for x in self._stacked()], self._keys[keep]
        index, active, steps = self.index[keep], self.active[keep], self.steps
        self._setup(self._program, [self.configs[i] for i in keep], self.seed[keep], keys)
        self._leaves = self._program.to_layout(leaves, self.size)
        self.index, self.active, self.steps = index, active, steps

    def save(self, path: str | Path) -> None:
        """Writes the population to the new directory ``path`` with Orbax: every member's
        state, keys, configuration, seed, index and whether it is active, and the step count.
        Restored by :meth:`restore`, it continues bitwise. Needs ``orbax-checkpoint``
        (``pip install 'adamw_jax[tune]'``)."""
        ocp = _import_orbax()
        path = Path(path).absolute()
        if path.exists():
            raise FileExistsError(f"path must not exist yet (nothing is overwritten); got {path}.")
        leaves = self._stacked()
        keys = [_is_key(x) for x in leaves]
        arrays = [jax.random.key_data(x) if k else x for x, k in zip(leaves, keys, strict=True)]
        meta = {
            "configs": self.configs,
            "seed": self.seed.tolist(),
            "index": self.index.tolist(),
            "active": self.active.tolist(),
            "steps": self.steps,
            "keys": np.asarray(_key_data(self._keys)).tolist(),
            "key_impl": str(jax.random.key_impl(self._keys)) if _is_key(self._keys) else None,
            "leaves": [[list(x.shape), str(x.dtype)] for x in leaves],
            "leaf_key_impl": [
                str(jax.random.key_impl(x)) if k else None
                for x, k in zip(leaves, keys, strict=True)
            ],
        }
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path / "state", [np.asarray(x) for x in arrays])
        checkpointer.wait_until_finished()
        (path / "population.json").write_text(json.dumps(meta))

    @classmethod
    def restore(
        cls, path: str | Path, init: Init, step: Step, *, mesh: Mesh | None = None
    ) -> Population:
        """The population :meth:`save` wrote to ``path``, with the same ``init`` and ``step``
        (``init``'s state must have the saved shapes), on ``mesh`` or one device."""
        ocp = _import_orbax()
        path = Path(path).absolute()
        meta = json.loads((path / "population.json").read_text())
        _check_callable("init", init, "(hparams, key) -> state")
        _check_callable("step", step, "(state, batch, hparams) -> (state, metrics)")
        pop = cls.__new__(cls)
        keys = np.asarray(meta["keys"], np.uint32)
        if meta["key_impl"] is not None:
            keys = jax.random.wrap_key_data(keys, impl=meta["key_impl"])
        pop._setup(
            _Program(init, step, mesh), meta["configs"], np.asarray(meta["seed"], np.int32), keys
        )
        member = jax.eval_shape(_member_init(init), as_hparams(pop.configs[0]), pop._keys[0])
        expected = [[[pop.size, *x.shape], str(x.dtype)] for x in member]
        if expected != meta["leaves"]:
            raise ValueError(
                f"init must build the saved state: the population at {path} has leaves "
                f"{meta['leaves']}, init gives {expected}."
            )
        arrays = ocp.StandardCheckpointer().restore(path / "state")
        leaves = [
            np.asarray(x) if impl is None else jax.random.wrap_key_data(np.asarray(x), impl=impl)
            for x, impl in zip(arrays, meta["leaf_key_impl"], strict=True)
        ]
        pop._leaves = pop._program.to_layout(leaves, pop.size)
        pop.index, pop.steps = np.asarray(meta["index"]), int(meta["steps"])
        pop.active = np.asarray(meta["active"], bool)
        return pop


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(x: Any) -> Any:
    return jax.random.key_data(x) if _is_key(x) else x


def _import_orbax() -> Any:
    try:
        import orbax.checkpoint as ocp  # an optional extra
    except ImportError as err:
        raise ImportError(
            "Population.save and restore need Orbax, an optional extra: pip install "
            "'adamw_jax[tune]' (or pip install orbax-checkpoint)."
        ) from err
    return ocp


class LoopTrain(PopulationTrain):
    """A training loop as a ``train`` for :func:`sweep` and the searches: see :func:`loop_train`."""

    def __init__(self, init, step, batches, steps, evaluate):
        self.init, self.step, self.batches = init, step, batches
        self.steps, self.evaluate = int(steps), evaluate

    def runner(
        self, members_per_call: int | None, mesh: Mesh | None, members: _Members
    ) -> tuple[int, Callable]:
        """Members per call (by default every member of the first call, a multiple of the
        mesh's size) and the function that trains one call's members as a population."""
        devices = 1 if mesh is None else mesh.size
        chunk = members_per_call or -(-len(members.seed) // devices) * devices
        program = _Program(self.init, self.step, mesh)
        key = members.key_data
        if members.key_impl is not None:
            key = jax.random.wrap_key_data(key, impl=members.key_impl)
        all_keys = seed_keys(key, members.seeds)

        def run(hparams, seed):
            hparams = {k: np.atleast_1d(np.asarray(v)) for k, v in hparams.items()}
            seed = np.atleast_1d(np.asarray(seed))
            configs = [{k: float(v[i]) for k, v in hparams.items()} for i in range(len(seed))]
            pop = Population.__new__(Population)
            pop._setup(program, configs, seed, all_keys[seed])
            pop._start()
            return self._train(pop)

        return chunk, run

    def fingerprint(self, members: _Members) -> str:
        """``init``'s traced computation (its model and optimizer), with the step count."""
        key = members.key_data
        if members.key_impl is not None:
            key = jax.random.wrap_key_data(key, impl=members.key_impl)
        hparams = {name: jax.ShapeDtypeStruct((), jnp.float32) for name in members.hparams}
        traced = jax.make_jaxpr(self.init)(hparams, key)
        return f"{_storage.fingerprint(traced)}-steps{self.steps}"

    def _train(self, pop: Population) -> dict[str, np.ndarray]:
        """``steps`` steps on the batches of a fresh iterator, then the metrics: those of
        ``evaluate`` (or of the last step), NaN for members stopped on the way."""
        metrics, taken = {}, 0
        for batch in self.batches():
            if taken == self.steps:
                break
            metrics = pop.step(batch)
            taken += 1
        if taken < self.steps:
            raise ValueError(
                f"batches() must yield at least steps={self.steps} batches; its iterator "
                f"ended after {taken}."
            )
        if self.evaluate is not None:
            metrics = pop.map(self.evaluate)
        return {k: np.where(pop.active, v, np.nan) for k, v in metrics.items()}


def loop_train(
    init: Init,
    step: Step,
    *,
    batches: Callable[[], Iterable[Any]],
    steps: int,
    evaluate: Callable[[Any], Mapping[str, jax.Array]] | None = None,
) -> LoopTrain:
    """A training loop as the ``train`` of :func:`sweep`, :func:`separable_search` or
    :func:`optuna_search`: each call's members run as one :class:`Population`.

    For every call's members (by default all of a call's members at once; ``members_per_call``
    and ``mesh`` as for :func:`sweep`), the population is built with ``init``, advanced
    ``steps`` times by ``step`` on the batches of a fresh ``batches()`` iterator (the same
    batches for every member), and its metrics are those of ``evaluate`` (or of the last
    step). A member frozen on the way (a non-finite metric or state) gets NaN metrics, so
    the sweep lists it in ``Results.failures``. A member is the member of
    :class:`Population`: bitwise its solo run when it runs alone on a device, within a few
    ulps per step when vmapped.

    Args:
      init: as for :class:`Population`.
      step: as for :class:`Population`.
      batches: ``batches() -> iterable`` of at least ``steps`` batches, called once per
        call's population (a fresh iterator each time, the same batches each time).
      steps: steps per member, an int in [1, inf).
      evaluate: ``evaluate(state) -> metrics``, a dict of real scalars, run on every
        member after the last step; None for the last step's metrics.
    """
    _check_callable("init", init, "(hparams, key) -> state")
    _check_callable("step", step, "(state, batch, hparams) -> (state, metrics)")
    _check_callable("batches", batches, "() -> iterable of batches")
    _validate.check_int("steps", steps, low=1)
    if evaluate is not None:
        _check_callable("evaluate", evaluate, "(state) -> metrics")
    return LoopTrain(init, step, batches, steps, evaluate)
