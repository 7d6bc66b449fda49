"""Running a population of training runs: its members one at a time or in vmapped chunks,
on one device or with the member axis split over the devices of a mesh.

A member is one configuration trained with one key. ``train(hparams, key)`` is the user's
whole training run: ``hparams`` a dict of float32 scalars, the result a dict of scalar
metrics. Members are run by one compiled program per chunk size; the last chunk is padded
with copies of its last member, whose results are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Train = Callable[[dict[str, jax.Array], jax.Array], Mapping[str, jax.Array]]

# Members per call where none is asked for: a loop on CPU, where a vmapped population is no
# faster than the loop (see the tuning benchmark); large chunks on accelerators.
CPU_MEMBERS_PER_DEVICE = 1
ACCELERATOR_MEMBERS_PER_DEVICE = 64


class Population(NamedTuple):
    """The members' inputs, member-major: configuration ``c`` with seed ``s`` is member
    ``c * seeds + s``."""

    hparams: dict[str, np.ndarray]  # name -> (members,) float32
    seed: np.ndarray  # (members,) int32: which of the seed keys each member trains with
    key_data: np.ndarray  # the raw data of the key the seed keys are split from
    key_impl: Any  # the PRNG implementation of typed keys, or None for raw uint32 keys
    seeds: int  # how many seed keys


def seed_keys(key: jax.Array, seeds: int) -> jax.Array:
    """The key of each seed: ``jax.random.split(key, seeds)``, shared by all configurations
    (so configurations differ only in their hyperparameters)."""
    return jax.random.split(key, seeds)


def is_typed_key(key: Any) -> bool:
    """Whether ``key`` is a typed key (``jax.random.key``) rather than raw uint32 data."""
    return jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)


def check_key(key: Any) -> None:
    """Raises unless ``key`` is one PRNG key: a typed key or raw uint32 data of shape (2,)."""
    typed = is_typed_key(key)
    raw = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    if not ((typed and np.ndim(key) == 0) or raw):
        raise TypeError(f"key must be one PRNG key (jax.random.key(seed)); got {key!r}.")


def population(configs: list[dict[str, float]], key: jax.Array, seeds: int) -> Population:
    """Every configuration times every seed, as arrays with a leading member axis.

    The seed keys themselves are split inside the compiled program (no eager dispatch,
    whose compilation would cost every sweep a fraction of a second); they are the same
    bits as :func:`seed_keys`.
    """
    typed = is_typed_key(key)
    hparams = {
        name: np.repeat(np.asarray([c[name] for c in configs], np.float32), seeds)
        for name in configs[0]
    }
    return Population(
        hparams=hparams,
        seed=np.tile(np.arange(seeds, dtype=np.int32), len(configs)),
        key_data=np.asarray(jax.random.key_data(key) if typed else key),
        key_impl=jax.random.key_impl(key) if typed else None,
        seeds=seeds,
    )


def default_members_per_call(num_members: int, mesh: Mesh | None) -> int:
    """One member per device on CPU, up to 64 per device on accelerators; a multiple of
    the mesh's size when there is one."""
    devices = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    per_device = (
        CPU_MEMBERS_PER_DEVICE if devices.platform == "cpu" else ACCELERATOR_MEMBERS_PER_DEVICE
    )
    num_devices = 1 if mesh is None else mesh.size
    needed_per_device = -(-num_members // num_devices)
    return num_devices * max(1, min(per_device, needed_per_device))


def _wrap(key_data: jax.Array, key_impl: Any) -> jax.Array:
    """A typed key from its raw data, or the raw key itself when keys are raw."""
    return key_data if key_impl is None else jax.random.wrap_key_data(key_data, impl=key_impl)


def _check_metrics(out: Any, batched: bool) -> None:
    """Raises unless ``train``'s output (its shapes) is a non-empty dict of real scalars."""
    if not isinstance(out, Mapping) or not out:
        raise TypeError(
            f"train must return a non-empty dict of scalar metrics (name -> scalar); got "
            f"{type(out).__name__}: {out!r}."
        )
    for name, value in out.items():
        if not isinstance(name, str):
            raise TypeError(f"train's metric names must be strings; got {name!r}.")
        shape = value.shape[1:] if batched else value.shape
        real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        if shape != () or not real:
            raise TypeError(
                f"train's metric {name!r} must be a real scalar; got shape {shape} and dtype "
                f"{value.dtype}."
            )


def member_fn(train: Train, pop: Population) -> Callable:
    """``train`` as a function of a member's hyperparameters and seed index."""

    def member(hparams, seed):
        keys = seed_keys(_wrap(jnp.asarray(pop.key_data), pop.key_impl), pop.seeds)
        return train(hparams, keys[seed])

    return member


def compile_runner(train: Train, members_per_call: int, mesh: Mesh | None, pop: Population):
    """The compiled program for one chunk, after checking what ``train`` returns.

    ``train`` itself for one member without a mesh, else ``vmap(train)``, with the member
    axis sharded over every axis of ``mesh``. Traced and compiled once, ahead of time.
    """

    member = member_fn(train, pop)
    single = mesh is None and members_per_call == 1
    if single:
        runner = jax.jit(member)
    elif mesh is None:
        runner = jax.jit(jax.vmap(member))
    else:
        runner = jax.jit(_split_over(mesh, member, members_per_call // mesh.size))
    lowered = runner.lower(*_inputs(pop, 0, members_per_call, mesh))
    _check_metrics(lowered.out_info, batched=not single)
    return lowered.compile()


def _split_over(mesh: Mesh, member: Callable, per_device: int) -> Callable:
    """``member`` over a chunk whose member axis is split over every axis of ``mesh``.

    Each device runs its members with ``shard_map``: one member as the unbatched program
    (so it computes exactly what the member computes alone), several with ``vmap``.
    """
    spec = PartitionSpec(mesh.axis_names)
    if per_device == 1:

        def body(hparams, seed):
            out = member({k: v[0] for k, v in hparams.items()}, seed[0])
            return jax.tree.map(lambda x: x[None], out)

    else:
        body = jax.vmap(member)
    return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def _chunk(pop: Population, start: int, size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Members ``start .. start + size``, padded with copies of the last member."""
    stop = min(start + size, len(pop.seed))
    index = np.minimum(np.arange(start, start + size), stop - 1)
    return {k: v[index] for k, v in pop.hparams.items()}, pop.seed[index]


def _put(values: np.ndarray, mesh: Mesh | None) -> Any:
    """A host array as the runner's input: as is, or as a global array split over ``mesh``
    (each process supplies its addressable shards, so this works across hosts)."""
    if mesh is None:
        return values
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def _inputs(pop: Population, start: int, size: int, mesh: Mesh | None) -> tuple[Any, Any]:
    """The runner's arguments for the chunk of ``size`` members from ``start``."""
    hparams, seed = _chunk(pop, start, size)
    if mesh is None and size == 1:
        return {k: v[0] for k, v in hparams.items()}, seed[0]
    return {k: _put(v, mesh) for k, v in hparams.items()}, _put(seed, mesh)


def _to_host(value: jax.Array) -> np.ndarray:
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def run(
    runner: Callable,
    pop: Population,
    members_per_call: int,
    mesh: Mesh | None,
    on_chunk_done: Callable[[int], None],
) -> dict[str, np.ndarray]:
    """Every member's metrics, name -> (members,) float64.

    One chunk is dispatched while the previous one finishes; ``on_chunk_done`` is called
    with the number of real (not padding) members of each finished chunk.
    """
    num_members = len(pop.seed)
    pending: list[tuple[int, Any]] = []
    outputs: list[dict[str, np.ndarray]] = []

    def finish(count: int, out: Any) -> None:
        host = {k: np.atleast_1d(_to_host(v)).astype(np.float64)[:count] for k, v in out.items()}
        outputs.append(host)
        on_chunk_done(count)

    for start in range(0, num_members, members_per_call):
        count = min(members_per_call, num_members - start)
        out = runner(*_inputs(pop, start, members_per_call, mesh))
        pending.append((count, out))
        if len(pending) > 1:
            finish(*pending.pop(0))
    for count, out in pending:
        finish(count, out)
    return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}
