"""Run by test_tuning.py in a fresh process with 8 CPU devices: a sweep whose member axis is
split over a mesh of the 8 devices (2x4), against the same sweep on one device.

Writes OUT/tuning.npz: each metric of the unsharded loop and of the sweep split over the
mesh with two members per device (vmapped), for the MLP and the element-wise training runs,
and of the MLP's sweep with one member per device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from _helpers import elementwise_train, mlp_train
from jax.sharding import Mesh

from adamw_jax import tuning

jax.config.update("jax_numpy_dtype_promotion", "strict")


def main(out: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    configs = tuning.grid(learning_rate=[1e-3, 1e-2, 0.1, 3.0], weight_decay=[0.0, 0.1])
    key = jax.random.key(3)
    arrays = {"device_count": np.asarray(jax.device_count())}
    for name, train in (("mlp", mlp_train(40)), ("elementwise", elementwise_train(40))):
        runs = {
            "loop": tuning.sweep(train, configs, key=key, progress=False),
            "mesh2": tuning.sweep(
                train, configs, key=key, mesh=mesh, members_per_call=16, progress=False
            ),
        }
        if name == "mlp":
            runs["mesh"] = tuning.sweep(train, configs, key=key, mesh=mesh, progress=False)
        for run, results in runs.items():
            for metric, values in results.metrics.items():
                arrays[f"{name}/{run}/{metric}"] = values
    np.savez(out / "tuning.npz", **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
