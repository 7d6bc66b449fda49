"""Choosing lr and weight decay on digits: full grid, separable search, Optuna, the tau rule.

The setting of notebook 01: scikit-learn's handwritten digits with only 300 training images
(30 per class), the rest split into validation and test halves; a 64-128-128-10 MLP whose
hidden layers are followed by a parameter-free LayerNorm; batch 128, a cosine schedule.
Every configuration gets the same training budget and the same seeds (initialization and
batch order), and every strategy is run with ``adamw_jax.tuning``:

* **grid**: every cell of an lr x decay grid (:func:`adamw_jax.tuning.sweep`);
* **separable**: the lr line at the middle decay, then the decay line at the best lr
  (:func:`adamw_jax.tuning.separable_search`), a third of the grid or less;
* **optuna**: TPE over the grid's ranges with as many evaluations as the separable search
  (:func:`adamw_jax.tuning.optuna_search`);
* **tau rule**: no decay search at all: the lr line with the decay that
  :func:`adamw_jax.schedules.suggest_weight_decay` gives (for decoupled decay only).

for AdamW with the paper's lambda (``decay_coupling="schedule"``: the decay per step is
lambda times the schedule's multiplier) and for Adam + L2 (``adam(l2=...)``). Each
strategy picks its configuration by validation error; the table reports that
configuration's test error, the evaluations and wall time spent, and the gap to the
grid's best validation error. A PNG shows the best validation error found against
evaluations; a second one (``_heatmap.png``) the grid's validation error over lr and decay
for each method, the decoupling paper's Figure 2 (:meth:`adamw_jax.tuning.Results.heatmap`);
a CSV holds every run.

Run from the repository root::

    python examples/tune_weight_decay.py              # a few minutes on 2 cores
    python examples/tune_weight_decay.py --quick      # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adamw_jax
from adamw_jax import schedules, tuning

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

METHODS = ("AdamW (paper λ)", "Adam + L2")
STRATEGIES = ("grid", "separable", "optuna", "tau rule")
HIDDEN = 128
BATCH = 128
N_TRAIN = 300


# ----------------------------------------------------------------------------------- data
def load_data(seed: int = 0) -> dict[str, tuple[jax.Array, jax.Array]]:
    """300 stratified training images; the other 1497 split into validation and test."""
    images, labels = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        images, labels, train_size=N_TRAIN, stratify=labels, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1.0
    return {
        name: (jnp.asarray((x - mean) / std, jnp.float32), jnp.asarray(y, jnp.int32))
        for name, (x, y) in {
            "train": (x_train, y_train),
            "val": (x_val, y_val),
            "test": (x_test, y_test),
        }.items()
    }


# ------------------------------------------------------------------------ model, training
def init_params(key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    sizes = [64, HIDDEN, HIDDEN, 10]
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense{i}": {
            "kernel": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "bias": jnp.zeros(n_out),
        }
        for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def apply(params: dict, x: jax.Array) -> jax.Array:
    for i in range(2):
        h = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
        h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
        x = jax.nn.relu(h)
    return x @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def make_optimizer(method: str, hparams: dict[str, jax.Array], steps: int):
    """The optimizer of ``method`` from traced hyperparameters (a cosine schedule)."""
    peak = hparams["learning_rate"]
    lr = schedules.warmup_cosine(peak, warmup_steps=0, decay_steps=steps)
    if method == "Adam + L2":
        return adamw_jax.adam(lr, l2=hparams["weight_decay"])
    return adamw_jax.adamw(
        lr,
        weight_decay=hparams["weight_decay"],
        decay_coupling="schedule",
        peak_learning_rate=peak,
    )


def make_train(method: str, data: dict, steps: int) -> Callable:
    """``train(hparams, key)``: one whole run, returning validation and test error (%)."""
    x_train, y_train = data["train"]

    def error(params, split):
        x, y = data[split]
        wrong = jnp.argmax(apply(params, x), -1) != y
        return 100.0 * jnp.mean(wrong.astype(jnp.float32))

    def train(hparams, key):
        init_key, data_key = jax.random.split(key)
        params = init_params(init_key)
        tx = make_optimizer(method, hparams, steps)

        def loss_fn(p, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

        def step(carry, t):
            params, state = carry
            idx = jax.random.permutation(jax.random.fold_in(data_key, t), N_TRAIN)[:BATCH]
            grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return {
            "val_error": error(params, "val"),
            "test_error": error(params, "test"),
            "train_loss": loss_fn(params, x_train, y_train),
        }

    return train


# ----------------------------------------------------------------------------- strategies
def run_strategies(method: str, train: Callable, args: argparse.Namespace) -> dict[str, Any]:
    """Every strategy's Results for one method (the tau rule only for decoupled decay)."""
    lrs = tuning.log_values(10 ** args.log_lr[0], 10 ** args.log_lr[1], args.num_lrs)
    decays = tuning.log_values(10 ** args.log_decay[0], 10 ** args.log_decay[1], args.num_decays)
    common = {"key": jax.random.key(args.seed), "seeds": args.seeds, "progress": args.progress}
    found = {
        "grid": tuning.sweep(train, tuning.grid(learning_rate=lrs, weight_decay=decays), **common),
        "separable": tuning.separable_search(train, lrs, decays, metric="val_error", **common),
    }
    space = {
        "learning_rate": tuning.log_range(lrs[0], lrs[-1]),
        "weight_decay": tuning.log_range(decays[0], decays[-1]),
    }
    found["optuna"] = tuning.optuna_search(
        train,
        space,
        n_trials=len(found["separable"].configs),
        batch=args.optuna_batch,
        metric="val_error",
        **common,
    )
    if method != "Adam + L2":
        rule = schedules.suggest_weight_decay(
            max(lrs), steps=args.steps, timescale=args.timescale, decay_coupling="schedule"
        )
        found["tau rule"] = tuning.sweep(
            train, tuning.grid(learning_rate=lrs, weight_decay=[rule]), **common
        )
    return found


def summarize(found: dict[str, tuning.Results]) -> dict[str, dict[str, float]]:
    """Per strategy: evaluations, wall time, the chosen configuration and its errors."""
    grid_best = found["grid"].best("val_error")[1]["val_error"]
    rows = {}
    for name, results in found.items():
        config, metrics = results.best("val_error")
        rows[name] = {
            "evaluations": results.evaluations,
            "wall_time": results.wall_time,
            "learning_rate": config["learning_rate"],
            "weight_decay": config["weight_decay"],
            "val_error": metrics["val_error"],
            "test_error": metrics["test_error"],
            "gap": metrics["val_error"] - grid_best,
        }
    return rows


def best_so_far(results: tuning.Results) -> np.ndarray:
    """The best seed-averaged validation error after each configuration, in order."""
    means = np.where(np.isfinite(results.mean("val_error")), results.mean("val_error"), np.inf)
    return np.minimum.accumulate(means)


# ------------------------------------------------------------------------------ reporting
def format_table(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        f"{'method':<16} {'strategy':<10} {'runs':>5} {'time s':>7} {'lr':>9} {'decay':>9} "
        f"{'val err %':>9} {'test err %':>10} {'gap pts':>8}"
    ]
    for method, rows in summaries.items():
        for strategy, r in rows.items():
            lines.append(
                f"{method:<16} {strategy:<10} {r['evaluations']:>5d} {r['wall_time']:>7.1f} "
                f"{r['learning_rate']:>9.2e} {r['weight_decay']:>9.2e} {r['val_error']:>9.2f} "
                f"{r['test_error']:>10.2f} {r['gap']:>+8.2f}"
            )
    return "\n".join(lines)


def plot(found: dict[str, dict[str, tuning.Results]], out: Path, title: str) -> None:
    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4), sharey=True)
    for ax, (method, per_strategy) in zip(np.atleast_1d(axes), found.items(), strict=True):
        for strategy, results in per_strategy.items():
            curve = best_so_far(results)
            evaluations = np.arange(1, len(curve) + 1) * results.seeds
            ax.step(evaluations, curve, where="post", label=strategy)
        ax.set_xscale("log")
        ax.set_title(method)
        ax.set_xlabel("training runs (configurations x seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    np.atleast_1d(axes)[0].set_ylabel("best validation error so far (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_heatmaps(found: dict[str, dict[str, tuning.Results]], out: Path, title: str) -> None:
    """Each method's grid: validation error over lr and decay, the best cell starred."""
    fig, axes = plt.subplots(1, len(found), figsize=(6.5 * len(found), 5.2))
    for ax, (method, per_strategy) in zip(np.atleast_1d(axes), found.items(), strict=True):
        per_strategy["grid"].heatmap("learning_rate", "weight_decay", "val_error", ax=ax)
        ax.set_title(method)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def save_csv(found: dict[str, dict[str, tuning.Results]], out: Path) -> None:
    """Every run of every strategy and method, one row each."""
    rows = [
        {"method": method, "strategy": strategy, **record}
        for method, per_strategy in found.items()
        for strategy, results in per_strategy.items()
        for record in results.to_records()
    ]
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]
    out.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800, help="training steps per run (%(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration (%(default)s)")
    p.add_argument("--num-lrs", type=int, default=7, help="learning rates on the grid")
    p.add_argument("--num-decays", type=int, default=8, help="decays on the grid")
    p.add_argument("--log-lr", type=float, nargs=2, default=(-3.5, -0.5), help="log10 lr range")
    p.add_argument(
        "--log-decay", type=float, nargs=2, default=(-7.0, 0.0), help="log10 decay range"
    )
    p.add_argument("--optuna-batch", type=int, default=4, help="Optuna trials per population")
    p.add_argument(
        "--timescale",
        type=float,
        default=0.25,
        help="the tau rule's EMA timescale as a fraction of the run (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="data split and key seed")
    p.add_argument("--quick", action="store_true", help="a small grid and short runs (a test)")
    p.add_argument("--out", default="out/tune_weight_decay.png", help="the PNG; a CSV beside it")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.num_lrs, args.num_decays = 60, 1, 3, 4
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every strategy for both methods; returns the summaries and the outputs' paths."""
    args = parse_args(argv)
    start = time.perf_counter()
    data = load_data(args.seed)
    found = {m: run_strategies(m, make_train(m, data, args.steps), args) for m in METHODS}
    summaries = {method: summarize(per_strategy) for method, per_strategy in found.items()}
    print(format_table(summaries))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"digits, {N_TRAIN} training images, LayerNorm MLP, {args.steps} steps, "
        f"{args.seeds} seed(s), {args.num_lrs}x{args.num_decays} grid"
    )
    plot(found, out, title)
    heatmap = out.with_name(out.stem + "_heatmap.png")
    plot_heatmaps(found, heatmap, title)
    save_csv(found, out.with_suffix(".csv"))
    elapsed = time.perf_counter() - start
    print(
        f"plots {out} and {heatmap}, every run in {out.with_suffix('.csv')}; {elapsed:.0f} s in all"
    )
    return {
        "summaries": summaries,
        "results": found,
        "out": out,
        "heatmap": heatmap,
        "csv": out.with_suffix(".csv"),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
