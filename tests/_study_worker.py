"""An Optuna search in a storage, run as its own process by the study tests.

Usage: python _study_worker.py STORAGE STUDY_NAME N_TRIALS TRAINED_LOG

Each member appends its (learning_rate, weight_decay) to TRAINED_LOG once trained (a host
callback), so a test sees which trials this process evaluated.
"""

import sys

import jax
from _helpers import elementwise_train
from _storage_worker import logged

from adamw_jax import tuning

SPACE = {
    "learning_rate": tuning.log_range(1e-3, 0.3),
    "weight_decay": tuning.log_range(1e-4, 1.0),
}


def main(storage: str, study_name: str, n_trials: str, log: str) -> None:
    tuning.optuna_search(
        logged(elementwise_train(300), log),
        SPACE,
        n_trials=int(n_trials),
        batch=2,
        key=jax.random.key(5),
        metric="loss",
        members_per_call=1,
        progress=False,
        storage=storage,
        study_name=study_name,
        heartbeat_interval=1,
        grace_period=4,
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
