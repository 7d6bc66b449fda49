"""Records, or checks, 200-step float32 trajectories of the library's optimizers.

A refactoring that must not change any number is checked by recording the trajectories
before it and comparing, bit for bit, after it:

    python benchmarks/trajectories.py record before.npz
    ... change the code ...
    python benchmarks/trajectories.py check before.npz

Every hyperparameter is passed by keyword, so a change of defaults or of positional order
does not change what is recorded. The tree mixes a matrix, a vector, a scalar and a
bfloat16 leaf; gradients come from a fixed quadratic loss plus seeded noise.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax
from adamw_jax import compat

STEPS = 200


def _params():
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "dense": {
            "kernel": jax.random.normal(keys[0], (33, 17)),
            "bias": jax.random.normal(keys[1], (17,)),
        },
        "scale": jnp.asarray(1.5),
        "half": jax.random.normal(keys[2], (40,)).astype(jnp.bfloat16),
        "big": jax.random.normal(keys[3], (64, 96)),
    }


def _optimizers():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 20, STEPS)
    return {
        "adamw": adamw_jax.adamw(learning_rate=1e-2, weight_decay=0.1),
        "adamw_schedule": adamw_jax.adamw(
            learning_rate=schedule,
            weight_decay=0.05,
            decay_coupling="schedule",
            peak_learning_rate=3e-2,
            mask=adamw_jax.masks.by_ndim(2),
        ),
        "adamw_amsgrad_nesterov": adamw_jax.adamw(
            learning_rate=1e-2, weight_decay=0.1, amsgrad=True, nesterov=True
        ),
        "adamw_bf16": adamw_jax.adamw(
            learning_rate=1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
        ),
        "adamw_int8": adamw_jax.adamw(
            learning_rate=1e-2,
            weight_decay=0.1,
            mu_dtype="int8",
            nu_dtype="int8",
            min_quantize_size=256,
            block_size=64,
        ),
        "adamw_packed": adamw_jax.adamw(
            learning_rate=1e-2, weight_decay=0.1, moment_layout="packed", decay_coupling="none"
        ),
        "adam_l2": adamw_jax.adam(learning_rate=1e-2, l2=1e-3),
        "fused_adamw": adamw_jax.fused_adamw(learning_rate=1e-2, weight_decay=0.1),
        "fused_adamw_xla": adamw_jax.fused_adamw(
            learning_rate=1e-2, weight_decay=0.1, backend="xla"
        ),
        "torch_adamw": compat.torch_adamw(lr=1e-2, weight_decay=0.1),
        "torch_adamw_amsgrad": compat.torch_adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
        "keras_adamw": compat.keras_adamw(learning_rate=1e-2, weight_decay=0.004),
    }


def _loss(params, key):
    leaves = jax.tree.leaves(params)
    noise = jax.random.split(key, len(leaves))
    return sum(
        jnp.sum((x.astype(jnp.float32) - 0.3) ** 2 * (1 + 0.1 * jax.random.normal(k, x.shape)))
        for x, k in zip(leaves, noise, strict=True)
    )


def trajectories() -> dict[str, np.ndarray]:
    """name -> the params' leaves after every step, concatenated as float32."""
    out = {}
    for name, tx in _optimizers().items():

        @jax.jit
        def step(params, state, key, tx=tx):
            grads = jax.grad(_loss)(params, key)
            if isinstance(tx, adamw_jax.FusedAdamW):
                return tx.step(params, grads, state)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params = _params()
        state = tx.init(params)
        rows = []
        for t in range(STEPS):
            params, state = step(params, state, jax.random.key(t))
            rows.append(
                np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(params)])
            )
        out[name] = np.stack(rows)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("record", "check"):
        print(__doc__)
        return 2
    current = trajectories()
    if argv[1] == "record":
        np.savez(argv[2], **current)
        print(f"recorded {len(current)} trajectories of {STEPS} steps in {argv[2]}")
        return 0
    recorded = np.load(argv[2])
    failed = 0
    for name, now in current.items():
        same = name in recorded and np.array_equal(recorded[name], now)
        print(f"{name:24s} {'bitwise identical' if same else 'DIFFERENT'}")
        failed += not same
    print(f"{len(current) - failed} identical, {failed} different")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
