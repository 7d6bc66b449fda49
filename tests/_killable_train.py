"""A small training run that checkpoints every step and resumes; killed at random by a test.

Usage: python _killable_train.py CKPT_DIR OUT_NPZ STEPS

Trains a small MLP with adamw_jax.adamw (AMSGrad, a schedule, a mask) on fixed synthetic data,
checkpointing params, optimizer state and step with orbax after every step (through the
helpers of examples/char_transformer.py), resuming from the latest checkpoint when one
exists. At the end it writes the final params to OUT_NPZ. Prints "step N" after each step.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_transformer.py"


def load_example():
    spec = importlib.util.spec_from_file_location("char_transformer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(ckpt_dir: str, out: str, steps: int) -> None:
    ex = load_example()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (128, 16))
    y = jnp.tanh(x @ jax.random.normal(k2, (16, 4)))
    params = {
        "w1": 0.3 * jax.random.normal(k3, (16, 64)),
        "b1": jnp.zeros(64),
        "w2": 0.3 * jax.random.normal(jax.random.fold_in(k3, 1), (64, 4)),
        "b2": jnp.zeros(4),
    }
    tx = adamw_jax.adamw(
        optax.cosine_decay_schedule(3e-2, steps),
        weight_decay=0.1,
        amsgrad=True,
        mask=adamw_jax.masks.by_ndim(2),
    )

    def loss(p, i):
        rows = jnp.roll(x, i, axis=0)[:32]
        target = jnp.roll(y, i, axis=0)[:32]
        return jnp.mean((jnp.tanh(rows @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - target) ** 2)

    @jax.jit
    def step_fn(state):
        grads = jax.grad(loss)(state["params"], state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }

    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}
    manager = ex.checkpoint_manager(ckpt_dir, max_to_keep=2)
    latest = manager.latest_step()
    if latest is not None:
        state, _ = ex.restore_checkpoint(manager, latest, state)
        print(f"resumed {latest}", flush=True)
    while int(state["step"]) < steps:
        state = step_fn(state)
        n = int(state["step"])
        ex.save_checkpoint(manager, n, state, {"step": n})
        print(f"step {n}", flush=True)
    np.savez(out, **{k: np.asarray(v) for k, v in state["params"].items()})


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
