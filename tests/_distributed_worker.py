"""One process of the two-process ``jax.distributed`` check of ``test_sharding.py``.

Usage: ``python tests/_distributed_worker.py PORT PROCESS_ID OUT.npz`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; two such processes (ids 0 and 1) form
one mesh of 8 CPU devices, train a small MLP data- and model-parallel with
``adamw_jax.adamw`` and process 0 writes the final params to ``OUT.npz``. ``train`` is also
called by ``_sharding_worker.py`` in one process with 8 devices, for the reference result.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adamw_jax

STEPS = 20
BATCH, D_IN, HIDDEN, D_OUT = 32, 16, 32, 4
SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def _problem() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Initial params and all batches, the same in every process (a fixed seed)."""
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(D_IN, HIDDEN)).astype(np.float32) / np.sqrt(D_IN),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": rng.normal(size=(HIDDEN, D_OUT)).astype(np.float32) / np.sqrt(HIDDEN),
        "b2": np.zeros(D_OUT, np.float32),
    }
    x = rng.normal(size=(STEPS, BATCH, D_IN)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(D_IN, D_OUT)).astype(np.float32))
    return params, x, y


def _global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def train(mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """``STEPS`` jitted AdamW steps of an MLP over ``mesh`` ("data", "model"); final params."""
    init_params, xs, ys = _problem()
    param_shardings = {k: NamedSharding(mesh, SPECS[k]) for k in init_params}
    batch_sharding = NamedSharding(mesh, P("data", None))
    params = {k: _global(v, param_shardings[k]) for k, v in init_params.items()}
    tx = adamw_jax.adamw(
        lambda t: 1e-2 * jnp.minimum(1.0, (t.astype(jnp.float32) + 1.0) / 5.0),
        weight_decay=0.1,
        mask=adamw_jax.masks.by_ndim(2),
    )
    state = adamw_jax.sharding.init(tx, params)
    state_shardings = adamw_jax.sharding.state_shardings(tx, params)

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    def step(p, s, x, y):
        grads = jax.grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step, out_shardings=(param_shardings, state_shardings))
    for t in range(STEPS):
        x, y = _global(xs[t], batch_sharding), _global(ys[t], batch_sharding)
        params, state = step(params, state, x, y)
    gathered = multihost_utils.process_allgather(params, tiled=True)
    return {k: np.asarray(v) for k, v in gathered.items()}


def main(port: int, process_id: int, out_path: str) -> None:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    counts = (jax.process_count(), jax.device_count(), jax.local_device_count())
    if counts != (2, 8, 4):
        raise SystemExit(f"expected 2 processes, 8 devices, 4 local; got {counts}")
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    result = train(mesh)
    if process_id == 0:
        np.savez(out_path, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
