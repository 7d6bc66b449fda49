"""How fast a search refuses a name ``train`` does not have, against a one-configuration
sweep (trace, compile, train), both from a cleared compilation cache.

A misspelt metric or hyperparameter is found by tracing ``train`` once on abstract inputs,
before anything compiles; the target is under a tenth of the sweep. The workload is the
digits-size MLP of ``tuning_speed.py``.

    python benchmarks/tuning_checks.py [--rounds 5] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from tuning_speed import make_train

from adamw_jax import tuning


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    train = make_train(args.steps)
    key = jax.random.key(0)
    config = {"learning_rate": 1e-2, "weight_decay": 1e-3}

    def sweep():
        tuning.sweep(train, [config], key=key, progress=False)

    def unknown_metric():
        try:
            tuning.separable_search(train, [1e-2], [1e-3], key=key, metric="accuracy",
                                    progress=False)  # fmt: skip
        except KeyError:
            return
        raise AssertionError("the unknown metric was not refused")

    def unknown_hparam():
        try:
            tuning.sweep(train, [{"learning_rate": 1e-2}], key=key, progress=False)
        except KeyError:
            return
        raise AssertionError("the missing hyperparameter was not refused")

    contenders = {
        "one-configuration sweep": sweep,
        "unknown metric refused": unknown_metric,
        "missing hyperparameter refused": unknown_hparam,
    }
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            jax.clear_caches()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["one-configuration sweep"])
    print(
        f"{args.steps} steps, {jax.devices()[0].platform}, from cleared caches, median of "
        f"{args.rounds} interleaved rounds"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<32} {median:7.3f} s   {median / base:6.3f}x the sweep")


if __name__ == "__main__":
    main()
