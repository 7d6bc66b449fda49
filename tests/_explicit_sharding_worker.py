"""The 8-device checks of moments born sharded like their params, run in a fresh process.

Under a mesh whose axes are ``jax.sharding.AxisType.Explicit`` an array's sharding is part
of its type, so a ``lax.scan`` training loop needs ``init`` to return the same types as
``update``. For each moment storage and layout, on an explicit and on an auto mesh, this
script records the state's types after ``init`` and after a scanned run, the final params'
largest relative difference from the same run without a mesh, and the type of one sharded
moment; ``test_sharding.py`` asserts on ``OUT_DIR/explicit.json``. (8 CPU devices exist only
if ``XLA_FLAGS`` asks for them before JAX starts, hence the separate process.)
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import adamw_jax
from adamw_jax import compat

STEPS = 6
SPECS = {"w": P("x", "y"), "b": P("y"), "e": P(None, "x"), "scale": P()}
SHAPES = {"w": (16, 256), "b": (64,), "e": (8, 32), "scale": ()}


def _int8(block_size: int, dtype: str = "int8") -> optax.GradientTransformation:
    return adamw_jax.adamw(
        1e-2,
        weight_decay=0.1,
        mu_dtype=dtype,
        nu_dtype=dtype,
        block_size=block_size,
        min_quantize_size=64,
    )


STORAGES = {
    "tree": lambda: adamw_jax.adamw(1e-2, weight_decay=0.1),
    "tree_amsgrad": lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True),
    "packed": lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, moment_layout="packed"),
    "packed_amsgrad": lambda: adamw_jax.adamw(
        1e-2, weight_decay=0.1, moment_layout="packed", amsgrad=True
    ),
    "bfloat16": lambda: adamw_jax.adamw(
        1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
    ),
    "float16": lambda: adamw_jax.adamw(
        1e-2, weight_decay=0.1, mu_dtype=jnp.float16, nu_dtype=jnp.float16
    ),
    # Every shard of every quantized leaf along its last axis is a multiple of 16 long.
    "int8": lambda: _int8(block_size=16),
    # b's shards are 16 long: a block of 32 would span two (refused under explicit axes).
    "int8_blocks_span_shards": lambda: _int8(block_size=32),
    # 4-bit codes, two per byte along the last axis: every shard holds whole blocks, so
    # whole bytes; block 32 is refused as for int8.
    "int4": lambda: _int8(block_size=16, dtype="int4"),
    "int4_blocks_span_shards": lambda: _int8(block_size=32, dtype="int4"),
    "torch_adamw": lambda: compat.torch_adamw(1e-2, weight_decay=0.1),
    "keras_adamw": lambda: compat.keras_adamw(1e-2),
}


def _problem() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    noise = {k: rng.normal(size=(STEPS, *s)).astype(np.float32) for k, s in SHAPES.items()}
    return params, noise


def _run(tx, params, noise):
    """``STEPS`` steps in one jitted ``lax.scan``: the state's types after init and after."""
    state = tx.init(params)

    def body(carry, g_noise):
        p, s = carry
        grads = jax.tree.map(lambda x, n: x + 0.1 * n, p, g_noise)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, final), _ = jax.jit(lambda p, s, n: jax.lax.scan(body, (p, s), n))(
        params, state, noise
    )
    return params, final, _types(state), _types(final)


def _types(tree) -> list[str]:
    return [str(jax.typeof(x)) for x in jax.tree.leaves(tree)]


def _moment_type(state) -> str:
    """The type of the first state leaf shaped like ``w`` (a moment, or its codes; 4-bit
    codes have half its last axis)."""
    rows, length = SHAPES["w"]
    for shape in ((rows, length), (rows, length // 2)):
        for leaf in jax.tree.leaves(state):
            if jnp.shape(leaf) == shape:
                return str(jax.typeof(leaf))
    return "none"


def main(out: str) -> None:
    host_params, host_noise = _problem()
    results = {"devices": jax.device_count()}
    for name, make in STORAGES.items():
        ref_params, *_ = _run(make(), host_params, host_noise)
        for axis_type in (AxisType.Explicit, AxisType.Auto):
            mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(axis_type,) * 2)
            with jax.set_mesh(mesh):
                params = {k: jax.device_put(v, SPECS[k]) for k, v in host_params.items()}
                noise = {k: jax.device_put(v, P(None, *SPECS[k])) for k, v in host_noise.items()}
                try:
                    new, final, types_init, types_out = _run(make(), params, noise)
                except Exception as err:  # recorded, so the test names the case
                    results[f"{name}/{axis_type.name}"] = {"error": f"{type(err).__name__}: {err}"}
                    continue
                diff = max(
                    float(np.max(np.abs(np.asarray(a) - b) / (np.abs(b) + 1e-6)))
                    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref_params), strict=True)
                )
                results[f"{name}/{axis_type.name}"] = {
                    "types_equal": types_init == types_out,
                    "types_init": types_init,
                    "types_out": types_out,
                    "max_rel_diff": diff,
                    "moment_type": _moment_type(final),
                }
    with open(f"{out}/explicit.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
