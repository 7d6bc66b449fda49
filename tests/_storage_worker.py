"""A sweep or separable search with a storage, run as its own process by the storage tests.

Usage: python _storage_worker.py {sweep,separable} STORAGE OUT_NPZ TRAINED_LOG

Each member appends its (learning_rate, weight_decay, seed) to TRAINED_LOG as it is
trained (a host callback), so a test sees which members this process trained. At the end
the results go to OUT_NPZ (configs and metrics). With the environment variable
``WORKERS_BARRIER`` (a folder), a process's first trained member waits there until two
processes have trained one, so that both are seen working at once.
"""

import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from _helpers import elementwise_train

from adamw_jax import tuning

KEY = jax.random.key(3)
LRS = [0.01, 0.03, 0.1, 0.3]
WDS = [0.0, 0.1, 0.5]


def logged(train, log):
    def record(lr, wd, key_data, loss):
        with open(log, "a") as f:
            f.write(f"{float(lr)!r} {float(wd)!r} {np.asarray(key_data).tolist()}\n")
        hold = os.environ.get("WORKER_HOLD_AFTER")  # members; then wait here to be killed
        if hold and len(Path(log).read_text().splitlines()) >= int(hold):
            time.sleep(120)
        barrier = os.environ.get("WORKERS_BARRIER")
        if barrier:
            open(os.path.join(barrier, str(os.getpid())), "a").close()
            deadline = time.monotonic() + 120
            while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)

    def run(hparams, key):
        out = train(hparams, key)
        jax.debug.callback(
            record,
            hparams["learning_rate"],
            hparams["weight_decay"],
            jax.random.key_data(key),
            out["loss"],  # so that it runs once the member is trained
        )
        return out

    return run


def main(mode: str, storage: str, out: str, log: str) -> None:
    train = logged(elementwise_train(400), log)
    common = {"key": KEY, "seeds": 2, "members_per_call": 1, "progress": False}
    if mode == "sweep":
        configs = tuning.grid(learning_rate=LRS, weight_decay=WDS)
        results = tuning.sweep(train, configs, storage=storage, **common)
    else:
        results = tuning.separable_search(
            train, LRS, WDS, metric="loss", rounds=2, storage=storage, **common
        )
    np.savez(
        out,
        lr=[c["learning_rate"] for c in results.configs],
        wd=[c["weight_decay"] for c in results.configs],
        **results.metrics,
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
