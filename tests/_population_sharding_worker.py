"""Run by test_population.py in a fresh process with 8 CPU devices: populations whose member
axis is split over a mesh of the 8 devices (2x4), against each member trained alone.

Writes OUT/population.npz: the per-step losses (members, steps) of 8 members on 8 devices
(mesh1) and of 16 members, two per device (mesh2), and of the same members trained alone
(solo, solo2); and each member's final state leaves, raveled and joined (mesh1_state,
solo_state: members by state size), for the one-per-device population and its solo runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from _helpers import mlp_loop
from jax.sharding import Mesh

from adamw_jax import tuning

STEPS = 10


def solo(loop, config, seeds, seed, key, batches):
    hparams = tuning.as_hparams(config)
    state = jax.jit(loop.init)(hparams, tuning.seed_keys(key, seeds)[seed])
    step = jax.jit(loop.step)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch, hparams)
        losses.append(float(metrics["loss"]))
    return losses, _flat(state)


def _flat(state):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(state)])


def main(out: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    loop, key = mlp_loop(STEPS), jax.random.key(3)
    batches = loop.batches(STEPS)
    arrays = {"device_count": np.asarray(jax.device_count())}
    for name, lrs in (
        ("1", [3e-3, 1e-2, 3e-2, 0.1]),
        ("2", [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]),
    ):
        configs = tuning.grid(learning_rate=lrs[: 4 if name == "1" else 8], weight_decay=[0.1])
        seeds = 2
        pop = tuning.Population(loop.init, loop.step, configs, key=key, seeds=seeds, mesh=mesh)
        losses = np.stack([pop.step(b)["loss"] for b in batches], axis=1)
        arrays[f"mesh{name}"] = losses
        solos = [solo(loop, c, seeds, s, key, batches) for c in configs for s in range(seeds)]
        arrays["solo" if name == "1" else "solo2"] = np.asarray([s[0] for s in solos])
        if name == "1":
            arrays["mesh1_state"] = np.stack(
                [_flat(jax.tree.map(lambda x, i=i: x[i], pop.state)) for i in range(pop.size)]
            )
            arrays["solo_state"] = np.stack([s[1] for s in solos])
    np.savez(out / "population.npz", **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
