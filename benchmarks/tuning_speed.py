"""How fast a sweep trains a population, against the loop of solo jitted runs a user would
write, compile time included on both sides.

The workload is the digits-size problem of the tuning example: a 64-128-128-10 MLP, batch
128, 300 steps of ``adamw_jax.adamw`` with a warm-up cosine schedule, 16 configurations.
Every contender is timed from a cleared compilation cache, interleaved over rounds; the
medians and their ratios to the loop are printed.

It then times the loop-style path: one step of a ``tuning.Population`` of ``--members``
digits-size MLPs (one compiled call) against a loop of as many separately jitted member
steps fed the same batch, after compilation, median over ``--population-steps`` steps.

    python benchmarks/tuning_speed.py [--rounds 3] [--configs 16] [--steps 300]
        [--members 16] [--population-steps 200] [--part all|sweep|population]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax
from adamw_jax import schedules, tuning


def make_train(steps: int):
    """A digits-size training run, on random data of the digits' shapes."""
    data_key, label_key = jax.random.split(jax.random.key(123))
    x = jax.random.normal(data_key, (300, 64))
    y = jax.random.randint(label_key, (300,), 0, 10)
    sizes = [64, 128, 128, 10]

    def train(hparams, key):
        keys = jax.random.split(key, len(sizes))
        params = [
            (jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), jnp.zeros(b))
            for k, a, b in zip(keys[:-1], sizes[:-1], sizes[1:], strict=True)
        ]
        lr = schedules.warmup_cosine(hparams["learning_rate"], warmup_steps=10, decay_steps=steps)
        tx = adamw_jax.adamw(lr, weight_decay=hparams["weight_decay"])

        def loss_fn(params, xb, yb):
            h = xb
            for w, b in params[:-1]:
                h = jax.nn.relu(h @ w + b)
            logits = h @ params[-1][0] + params[-1][1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        def step(carry, t):
            params, state = carry
            idx = jax.random.permutation(jax.random.fold_in(keys[-1], t), 300)[:128]
            grads = jax.grad(loss_fn)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return {"train_loss": loss_fn(params, x, y)}

    return train


def user_loop(train, configs, key):
    """The loop a user writes: one jitted function, called per configuration."""
    solo = jax.jit(train)
    return [float(solo(tuning.as_hparams(c), key)["train_loss"]) for c in configs]


def make_loop():
    """``init``, ``step`` and the batches of the same digits-size MLP, written as a loop."""
    sizes = [64, 128, 128, 10]

    def init(hparams, key):
        keys = jax.random.split(key, len(sizes) - 1)
        params = [
            (jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), jnp.zeros(b))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
        ]
        return params, adamw_jax.adamw(hparams["learning_rate"]).init(params)

    def loss_fn(params, xb, yb):
        h = xb
        for w, b in params[:-1]:
            h = jax.nn.relu(h @ w + b)
        logits = h @ params[-1][0] + params[-1][1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(state, batch, hparams):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=hparams["weight_decay"])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    y = rng.integers(0, 10, 300).astype(np.int32)

    def batches(n):
        return [(x[i], y[i]) for i in rng.integers(0, 300, (n, 128))]

    return init, step, batches


def population_race(members: int, steps: int) -> None:
    """Seconds per step: the population's one call against the loop of solo jitted steps."""
    init, step, batches = make_loop()
    configs = [
        {"learning_rate": float(lr), "weight_decay": 0.1}
        for lr in np.geomspace(1e-4, 1e-1, members)
    ]
    key = jax.random.key(0)
    pop = tuning.Population(init, step, configs, key=key)
    solo_init, solo_step = jax.jit(init), jax.jit(step)
    hparams = [tuning.as_hparams(c) for c in configs]
    states = [solo_init(h, key) for h in hparams]

    def loop_step(batch):
        nonlocal states
        out = [solo_step(s, batch, h) for s, h in zip(states, hparams, strict=True)]
        states = [o[0] for o in out]
        return np.asarray([o[1]["loss"] for o in out])

    contenders = {"loop of solo jitted steps": loop_step, "population step": pop.step}
    times = {name: [] for name in contenders}
    for batch in batches(5):  # compiles both
        for run in contenders.values():
            run(batch)
    for batch in batches(steps):
        for name, run in contenders.items():  # interleaved, same batch
            start = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - start)
    loop = statistics.median(times["loop of solo jitted steps"])
    print(
        f"{members} members, one step of a digits-size MLP (batch 128), "
        f"{jax.devices()[0].platform}, median of {steps} interleaved steps after compilation"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<32} {median * 1e3:7.2f} ms   {loop / median:5.2f}x faster than the loop")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--population-steps", type=int, default=200)
    parser.add_argument("--part", choices=("all", "sweep", "population"), default="all")
    args = parser.parse_args(argv)
    if args.part != "sweep":
        population_race(args.members, args.population_steps)
    if args.part == "population":
        return
    train = make_train(args.steps)
    side = int(np.ceil(np.sqrt(args.configs)))
    configs = tuning.grid(
        learning_rate=tuning.log_values(1e-3, 1e-1, side),
        weight_decay=tuning.log_values(1e-4, 1e-1, side),
    )[: args.configs]
    key = jax.random.key(0)
    contenders = {
        "loop of solo jitted runs": lambda: user_loop(train, configs, key),
        "sweep (default)": lambda: tuning.sweep(train, configs, key=key, progress=False),
    }
    for chunk in (2, 4, len(configs)):
        contenders[f"sweep, vmapped chunks of {chunk}"] = lambda chunk=chunk: tuning.sweep(
            train, configs, key=key, members_per_call=chunk, progress=False
        )
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            jax.clear_caches()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    loop = statistics.median(times["loop of solo jitted runs"])
    print(
        f"{len(configs)} configurations x {args.steps} steps, {jax.devices()[0].platform}, "
        f"compile included, median of {args.rounds} interleaved rounds"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<32} {median:7.2f} s   {median / loop:5.2f}x the loop")


if __name__ == "__main__":
    main()
