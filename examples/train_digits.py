"""Train a Flax NNX classifier on scikit-learn's handwritten digits: AdamW vs Adam + L2.

The data is ``sklearn.datasets.load_digits`` (1797 8x8 grey-scale images of the digits 0-9,
bundled with scikit-learn, no download), split once into fixed train / validation / test
sets. The same small MLP is trained twice from the same initialization and the same batch
order: once with ``adamw_jax.adamw`` (decoupled weight decay) and once with
``adamw_jax.adam(l2=...)`` (the same coefficient as an L2 penalty added to the gradient).
Biases are not decayed in either run (``adamw_jax.masks.by_name()``).

It prints a table (final train loss, validation and test accuracy, weight norm, wall time)
and writes a PNG of the loss and accuracy curves of both runs.

Run from the repository root::

    python examples/train_digits.py                # defaults: well under a minute on 2 cores
    python examples/train_digits.py --help         # every flag
    python examples/train_digits.py --quick --out /tmp/digits.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import adamw_jax
from adamw_jax import masks

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

NUM_CLASSES = 10
PLOT_NAME = "digits_adamw.png"  # the plot's file name when --out names a directory


# ----------------------------------------------------------------------------------- data
def load_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as float32 features in [0, 1] and int32 labels, split 60/20/20.

    The split is stratified and fixed by ``seed`` (the same split for both optimizers).
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def batch_indices(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """A ``(steps, batch_size)`` array of example indices: reshuffled epochs, fixed by seed."""
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    epochs = -(-steps // per_epoch)
    order = np.concatenate(
        [rng.permutation(num_examples)[: per_epoch * batch_size] for _ in range(epochs)]
    )
    return order[: steps * batch_size].reshape(steps, batch_size)


# ---------------------------------------------------------------------------------- model
class MLP(nnx.Module):
    """64 -> hidden -> hidden -> 10, GELU activations."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.gelu(self.l1(x))
        x = nnx.gelu(self.l2(x))
        return self.out(x)


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def evaluate(model: MLP, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
    return loss, accuracy


def weight_norm(model: nnx.Module) -> float:
    """The global L2 norm of all parameters."""
    return float(optax.tree.norm(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------- training
def make_optimizers(args: argparse.Namespace) -> dict[str, optax.GradientTransformation]:
    """The two optimizers compared: same learning rate, same decay coefficient and mask."""
    mask = masks.by_name()  # no decay on biases
    return {
        "AdamW": adamw_jax.adamw(args.lr, weight_decay=args.weight_decay, mask=mask),
        "Adam+L2": adamw_jax.adam(args.lr, l2=args.weight_decay, mask=mask),
    }


def train_one(
    name: str,
    tx: optax.GradientTransformation,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Trains a freshly initialized MLP (same init for every optimizer) and records curves."""
    model = MLP(args.hidden, rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x_train, y_train = (jnp.asarray(a) for a in data["train"])
    x_val, y_val = (jnp.asarray(a) for a in data["val"])
    order = batch_indices(len(y_train), args.batch_size, args.steps, args.seed)

    history: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": [], "val_acc": []}
    running, seen = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(
        range(1, args.steps + 1),
        desc=f"{name:>7}",
        disable=not args.progress,
        leave=True,
        dynamic_ncols=True,
    )
    for step in bar:
        idx = order[step - 1]
        loss = train_step(model, optimizer, x_train[idx], y_train[idx])
        running, seen = running + float(loss), seen + 1
        if step % args.eval_every == 0 or step == args.steps:
            val_loss, val_acc = evaluate(model, x_val, y_val)
            history["step"].append(step)
            history["train_loss"].append(running / seen)
            history["val_loss"].append(float(val_loss))
            history["val_acc"].append(float(val_acc))
            bar.set_postfix(loss=f"{running / seen:.4f}", val_acc=f"{float(val_acc):.3f}")
            running, seen = 0.0, 0
    wall = time.perf_counter() - start
    bar.close()

    x_test, y_test = (jnp.asarray(a) for a in data["test"])
    train_loss, train_acc = evaluate(model, x_train, y_train)
    _, test_acc = evaluate(model, x_test, y_test)
    return {
        "train_loss": float(train_loss),
        "train_acc": float(train_acc),
        "val_acc": history["val_acc"][-1],
        "test_acc": float(test_acc),
        "weight_norm": weight_norm(model),
        "wall_time": wall,
        "history": history,
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = ("optimizer", "train loss", "val acc", "test acc", "weight norm", "wall time")
    rows = [header]
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r['train_loss']:.4f}",
                f"{100 * r['val_acc']:.1f}%",
                f"{100 * r['test_acc']:.1f}%",
                f"{r['weight_norm']:.2f}",
                f"{r['wall_time']:.1f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    """Loss (train and validation) and validation accuracy against step, one line per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for (name, r), color in zip(results.items(), ("C0", "C3"), strict=False):
        h = r["history"]
        ax_loss.plot(h["step"], h["train_loss"], color=color, label=f"{name} train")
        ax_loss.plot(h["step"], h["val_loss"], color=color, linestyle="--", label=f"{name} val")
        ax_acc.plot(h["step"], h["val_acc"], color=color, label=name)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    ax_acc.set_ylim(
        max(0.0, min(min(r["history"]["val_acc"]) for r in results.values()) - 0.02), 1.0
    )
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="AdamW vs Adam+L2 on scikit-learn's digits with a Flax NNX MLP.",
    )
    add = p.add_argument
    add("--steps", type=int, default=1500, help="optimizer steps per run (%(default)s)")
    add("--lr", type=float, default=2e-3, help="learning rate of both runs (%(default)s)")
    add(
        "--weight-decay",
        type=float,
        default=1e-2,
        help="AdamW's decay coefficient and Adam's L2 coefficient (%(default)s)",
    )
    add("--batch-size", type=int, default=64, help="examples per step (%(default)s)")
    add("--hidden", type=int, default=256, help="width of the hidden layers (%(default)s)")
    add("--eval-every", type=int, default=50, help="steps between evaluations (%(default)s)")
    add("--seed", type=int, default=0, help="seed of split, init, batches (%(default)s)")
    add(
        "--out",
        default=f"out/{PLOT_NAME}",
        help=f"the PNG plot: a .png file, or a directory to write {PLOT_NAME} in (%(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast smoke run: 150 steps, hidden 64, evaluations every 25 steps",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.eval_every = 150, 64, 25
    for name in ("steps", "batch_size", "hidden", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.lr <= 0 or args.weight_decay < 0:
        p.error(f"need --lr > 0 and --weight-decay >= 0; got {args.lr}, {args.weight_decay}")
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        out = out / PLOT_NAME
    elif out.suffix.lower() != ".png":
        p.error(f"--out must be a .png file or a directory; got {args.out!r}")
    args.out = str(out)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; returns ``{"AdamW": {...}, "Adam+L2": {...}, "out": path}``.

    Each run's dict holds ``train_loss``, ``train_acc``, ``val_acc``, ``test_acc``,
    ``weight_norm``, ``wall_time`` (seconds, compilation included) and ``history``.
    """
    args = parse_args(argv)
    data = load_splits(args.seed)
    n = {k: len(v[1]) for k, v in data.items()}
    print(
        f"digits: {n['train']} train / {n['val']} val / {n['test']} test examples; "
        f"{args.steps} steps of {args.batch_size}, lr={args.lr}, "
        f"weight_decay={args.weight_decay}, jax on {jax.default_backend()}"
    )
    results = {name: train_one(name, tx, data, args) for name, tx in make_optimizers(args).items()}
    print(format_table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(
        results,
        args.out,
        f"digits MLP, lr={args.lr}, decay / L2 = {args.weight_decay}, {args.steps} steps",
    )
    print(f"plot written to {args.out}")
    return {**results, "out": args.out}


if __name__ == "__main__":
    main(sys.argv[1:])
