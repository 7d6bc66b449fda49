"""Tuning a Flax NNX model written as an ordinary training loop, 16 runs at a time.

The model, its ``nnx.Optimizer`` and the step are the usual NNX code; the data comes from a
Python iterator over shuffled minibatches of scikit-learn's digits. ``tuning.loop_train``
turns ``init``/``step``/``batches`` into a training run the searches accept, and
``tuning.separable_search`` drives it: the learning rates at a fixed decay, then the decays
at the best learning rate, each line 8 configurations x 2 seeds = 16 members trained as one
``tuning.Population`` (one compiled call per step for all 16). ``--storage`` makes the
search resumable after a kill; the validation error over the two hyperparameters is drawn
as a heatmap.

    python examples/tune_nnx_loop.py --out /tmp/tune_nnx_loop
    python examples/tune_nnx_loop.py --quick --out /tmp/tune_nnx_loop   # about 15 s of CPU
    python examples/tune_nnx_loop.py --storage /tmp/search.db          # resumable
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adamw_jax
from adamw_jax import tuning

HEATMAP_NAME = "tune_nnx_loop.png"


class MLP(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def load_data(seed: int = 0):
    """The digits as float32 features in [0, 1] and int32 labels: train and validation."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)


def make_train(steps: int, hidden: int, batch_size: int = 64) -> tuning.LoopTrain:
    """The loop: NNX init and step, a Python iterator of minibatches, the validation error."""
    x_train, x_val, y_train, y_val = load_data()

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    def init(hparams, key):
        model = MLP(hidden, nnx.Rngs(key))
        tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=hparams["weight_decay"])
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    def step(state, batch, hparams):
        model, optimizer = state
        loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
        optimizer.update(model, grads)
        return (model, optimizer), {"loss": loss}

    def batches():
        rng = np.random.default_rng(0)  # a fresh iterator gives the same batches
        while True:
            order = rng.permutation(len(x_train))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                index = order[start : start + batch_size]
                yield x_train[index], y_train[index]

    def evaluate(state):
        model, _ = state
        wrong = jnp.argmax(model(x_val), axis=-1) != y_val
        return {"val_error": 100.0 * wrong.mean()}

    return tuning.loop_train(init, step, batches=batches, steps=steps, evaluate=evaluate)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run, for the tests")
    parser.add_argument("--steps", type=int, default=None, help="steps per run")
    parser.add_argument("--storage", default=None, help="a file the search resumes from")
    parser.add_argument("--out", type=Path, default=Path("."), help="the heatmap's folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 600)
    train = make_train(steps, hidden=32 if args.quick else 128)
    storage = {} if args.storage is None else {"storage": args.storage}
    results = tuning.separable_search(
        train,
        tuning.log_values(1e-4, 1e-1, 8),
        tuning.log_values(1e-5, 1.0, 8),
        key=jax.random.key(0),
        metric="val_error",
        seeds=2,
        progress=not args.no_progress,
        **storage,
    )
    best, metrics = results.best("val_error")
    print(f"{results.evaluations} runs; best {best}: validation error {metrics['val_error']:.2f}%")
    args.out.mkdir(parents=True, exist_ok=True)
    heatmap = args.out / HEATMAP_NAME
    results.heatmap("learning_rate", "weight_decay", "val_error", path=heatmap)
    print(f"heatmap: {heatmap}")
    return {"results": results, "heatmap": heatmap}


if __name__ == "__main__":
    main()
