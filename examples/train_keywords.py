"""Keyword spotting on synthesized speech (Flax NNX): AdamW vs Adam + L2 on unseen speakers.

The data set (``keywords_data.py``) is made on the machine with espeak-ng (the library in the
``espeakng-loader`` wheel, pinned in the ``examples`` extra): the 20 words of
the Speech Commands vocabulary spoken by 200 synthetic speakers (an accent, a voice variant,
a speaking rate and a pitch each), one second at 16 kHz with noise, 4000 clips. The speakers
are split by voice variant, so the validation and test speakers' voices are never heard in
training. The features are log-mel spectrograms (98 frames x 40 bands, computed in JAX),
standardized per band with the training set's statistics.

The classifier is a small 1-D convolutional network over time (the mel bands are its input
channels, LayerNorm, GELU, strided convolutions, mean and max pooling over time, 77k
parameters). It is trained with ``adamw_jax.adamw`` (decoupled weight decay) and with
``adamw_jax.adam(l2=...)`` (the coefficient as an L2 penalty added to the gradient), each
over a small grid of learning rates x coefficients with the same budget (same steps, batch,
initialization and batch order for every configuration). Each method's configuration with
the lowest validation error is trained again with its curves recorded, and both are
evaluated on the test speakers. Neither method decays biases or LayerNorm scales.

A training run is one function ``train(hparams, key) -> dict of scalar metrics`` (``hparams``
holds the learning rate and the coefficient as traced float32 scalars), and
``adamw_jax.tuning.sweep`` runs it for every configuration of the grid (on a CPU, one
compiled run in a loop; on a GPU, vmapped chunks of configurations).

It prints the grid, a table (train and test accuracy, the generalization gap) and writes a
PNG of the curves and of the test confusion matrices.

Run from the repository root (after ``pip install -e ".[examples]"``, which brings espeak-ng)::

    python examples/train_keywords.py                  # the full comparison: ~15 min
    python examples/train_keywords.py --more-seeds 3   # ... and 3 other seeds of each choice
    python examples/train_keywords.py --quick          # a fast smoke run
    python examples/train_keywords.py --help           # every flag
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import adamw_jax
from adamw_jax import masks, schedules, tuning

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keywords_data as kd  # the data builder next to this file

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

NUM_CLASSES = len(kd.WORDS)
PLOT_NAME = "keywords_adamw.png"  # the plot's file name when --out names a directory
METHODS = ("AdamW", "Adam+L2")
# The grids: the same learning rates for both methods, and for each method coefficients
# spanning two decades around where it works (an L2 penalty inside Adam acts far more
# strongly than decoupled decay at the same value; see examples/README.md, digits).
GRID_LR = (1e-3, 3e-3, 1e-2)
GRID_COEFFICIENT = {"AdamW": (0.1, 1.0, 10.0), "Adam+L2": (1e-3, 1e-2, 1e-1)}
QUICK_GRID_LR = (3e-3,)
QUICK_GRID_COEFFICIENT = {"AdamW": (0.1,), "Adam+L2": (1e-3,)}


class Config(NamedTuple):
    steps: int = 600
    batch_size: int = 64
    width: int = 48
    eval_every: int = 100
    warmup: int = 30


QUICK = Config(steps=300, batch_size=32, width=32, eval_every=50, warmup=20)


# ----------------------------------------------------------------------------------- data
class Arrays(NamedTuple):
    """Standardized features ``(n, 98, 40)`` and int32 labels of each split."""

    x: dict[str, jax.Array]
    y: dict[str, jax.Array]


def prepare(data: kd.Keywords) -> Arrays:
    """Log-mel features of every clip, split by speaker, standardized per mel band."""
    features = np.asarray(kd.log_mel(data.audio))
    parts = {s: data.split_mask(s) for s in kd.SPLITS}
    train = features[parts["train"]]
    mean, std = train.mean(axis=(0, 1)), train.std(axis=(0, 1))
    x = {s: jnp.asarray((features[m] - mean) / std) for s, m in parts.items()}
    y = {s: jnp.asarray(data.label[m]) for s, m in parts.items()}
    return Arrays(x, y)


# ---------------------------------------------------------------------------------- model
class Conv1D(nnx.Module):
    """A convolution over time ("same" padding, a stride) as one product of shifted slices.

    ``lax.conv`` would do, but XLA:CPU runs a convolution inside a loop (the ``lax.scan`` of
    a whole training run) about 8x slower than outside one; slices and a matrix product run
    as fast in both.
    """

    def __init__(self, d_in: int, d_out: int, size: int, stride: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (size * d_in, d_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32))
        self.size, self.stride = size, stride

    def __call__(self, x: jax.Array) -> jax.Array:  # (batch, time, d_in)
        n = -(-x.shape[1] // self.stride)  # output frames; padding as lax.conv's "SAME"
        pad = max(self.stride * (n - 1) + self.size - x.shape[1], 0)
        x = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
        taps = [
            jax.lax.slice_in_dim(x, j, j + self.stride * (n - 1) + 1, self.stride, axis=1)
            for j in range(self.size)
        ]
        return jnp.concatenate(taps, axis=-1) @ self.kernel + self.bias


class KeywordNet(nnx.Module):
    """Conv1D over time (mel bands as channels): 4 conv blocks, mean+max pool, linear head."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        # (in, out, kernel, stride): 98 -> 98 -> 49 -> 25 -> 13 frames.
        shapes = [
            (kd.N_MELS, width, 5, 1),
            (width, width, 5, 2),
            (width, 2 * width, 5, 2),
            (2 * width, 2 * width, 3, 2),
        ]
        self.convs = nnx.List([Conv1D(*shape, rngs=rngs) for shape in shapes])
        self.norms = nnx.List([nnx.LayerNorm(o, rngs=rngs) for _, o, _, _ in shapes])
        self.head = nnx.Linear(4 * width, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.gelu(norm(conv(x)))
        return self.head(jnp.concatenate([x.mean(axis=1), x.max(axis=1)], axis=-1))


# ------------------------------------------------------------------------------- training
def make_optimizer(method: str, hparams: dict, cfg: Config) -> optax.GradientTransformation:
    """``method`` at ``hparams``: linear warmup then cosine decay; no decay on biases/norms."""
    schedule = schedules.warmup_cosine(
        hparams["learning_rate"], warmup_steps=cfg.warmup, decay_steps=cfg.steps
    )
    mask = masks.by_name()
    if method == "AdamW":
        return adamw_jax.adamw(schedule, weight_decay=hparams["weight_decay"], mask=mask)
    if method == "Adam+L2":
        return adamw_jax.adam(schedule, l2=hparams["weight_decay"], mask=mask)
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")


class State(NamedTuple):
    params: Any
    opt_state: Any
    data_key: jax.Array


class Trainer(NamedTuple):
    """The pieces of one training run (all pure, all jit-able)."""

    start: Callable[[dict, Any, jax.Array], State]  # (hparams, params, data_key)
    init: Callable[[dict, jax.Array], State]  # (hparams, key)
    chunk: Callable[[dict, State, jax.Array], tuple[State, jax.Array]]
    evaluate: Callable[[Any], tuple[dict[str, jax.Array], jax.Array]]
    train: Callable[[dict, jax.Array], dict[str, jax.Array]]


@functools.partial(jax.jit, static_argnums=0)
def initial_params(width: int, key: jax.Array) -> nnx.State:
    """A fresh KeywordNet's parameters (one compiled program for both methods)."""
    return nnx.state(KeywordNet(width, rngs=nnx.Rngs(key)))


EVAL_BATCH = 250  # clips per forward pass in evaluations


def _per_clip(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cross-entropy, correctness (0. or 1.) and the predicted word of each clip."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    predicted = jnp.argmax(logits, axis=-1)
    return loss, (predicted == y).astype(jnp.float32), predicted


def _evaluation_set(data: Arrays) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """Every split's clips in one array, padded to a multiple of EVAL_BATCH, with
    ``(batches, EVAL_BATCH, ...)`` shapes, and each clip's split index (-1: padding)."""
    which = np.concatenate([np.full(len(data.y[s]), i) for i, s in enumerate(kd.SPLITS)])
    pad = -len(which) % EVAL_BATCH
    x = jnp.concatenate([*(data.x[s] for s in kd.SPLITS), jnp.zeros((pad, *kd.FEATURE_SHAPE))])
    y = jnp.concatenate([*(data.y[s] for s in kd.SPLITS), jnp.zeros((pad,), jnp.int32)])
    shape = (-1, EVAL_BATCH)
    return x.reshape(*shape, *kd.FEATURE_SHAPE), y.reshape(shape), np.append(which, [-1] * pad)


def make_trainer(method: str, data: Arrays, cfg: Config) -> Trainer:
    """A training run of ``method`` on ``data``: ``trainer.train(hparams, key)`` is the whole
    run (``cfg.steps`` steps, ``cfg.eval_every`` per chunk) and returns scalar metrics."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: KeywordNet(cfg.width, rngs=nnx.Rngs(0))))
    x_train, y_train = data.x["train"], data.y["train"]
    n_train = x_train.shape[0]
    per_epoch = n_train // cfg.batch_size
    x_eval, y_eval, which = _evaluation_set(data)

    def logits(params, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(x)

    def start(hparams: dict, params, data_key: jax.Array) -> State:
        return State(params, make_optimizer(method, hparams, cfg).init(params), data_key)

    def init(hparams: dict, key: jax.Array) -> State:
        init_key, data_key = jax.random.split(key)
        return start(hparams, initial_params(cfg.width, init_key), data_key)

    def step(hparams: dict, state: State, i: jax.Array) -> tuple[State, jax.Array]:
        # Reshuffled epochs: batch i is a slice of epoch i // per_epoch's permutation.
        order = jax.random.permutation(jax.random.fold_in(state.data_key, i // per_epoch), n_train)
        idx = jax.lax.dynamic_slice(order, ((i % per_epoch) * cfg.batch_size,), (cfg.batch_size,))

        def loss_fn(params) -> jax.Array:
            return _per_clip(logits(params, x_train[idx]), y_train[idx])[0].mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        tx = make_optimizer(method, hparams, cfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return State(params, opt_state, state.data_key), loss

    def chunk(hparams: dict, state: State, c: jax.Array) -> tuple[State, jax.Array]:
        """Steps ``c * eval_every`` to ``(c + 1) * eval_every - 1``; their mean loss."""
        steps = c * cfg.eval_every + jnp.arange(cfg.eval_every)
        state, losses = jax.lax.scan(lambda s, i: step(hparams, s, i), state, steps)
        return state, losses.mean()

    def evaluate(params) -> tuple[dict[str, jax.Array], jax.Array]:
        """Loss and accuracy on each split, the validation error, the gap and the weight
        norm; and the word predicted for each test clip."""
        loss, correct, predicted = (
            a.reshape(-1)
            for a in jax.lax.map(lambda b: _per_clip(logits(params, b[0]), b[1]), (x_eval, y_eval))
        )
        out = {}
        for i, split in enumerate(kd.SPLITS):
            mask, n = which == i, float(np.sum(which == i))
            out[f"{split}_loss"] = jnp.sum(jnp.where(mask, loss, 0.0)) / n
            out[f"{split}_acc"] = jnp.sum(jnp.where(mask, correct, 0.0)) / n
        out["val_error"] = 1.0 - out["val_acc"]
        out["gap"] = out["train_acc"] - out["test_acc"]
        out["weight_norm"] = optax.tree.norm(params)
        return out, predicted[np.flatnonzero(which == kd.SPLITS.index("test"))]

    def train(hparams: dict, key: jax.Array) -> dict[str, jax.Array]:
        chunks = jnp.arange(cfg.steps // cfg.eval_every)  # parse_args checks that it divides
        state, _ = jax.lax.scan(lambda s, c: chunk(hparams, s, c), init(hparams, key), chunks)
        return evaluate(state.params)[0]

    return Trainer(start, init, chunk, evaluate, train)


# ---------------------------------------------------------------------------- final runs
def train_with_curves(
    trainer: Trainer,
    config: dict[str, float],
    key: jax.Array,
    cfg: Config,
    name: str,
    progress: bool,
) -> dict[str, Any]:
    """``trainer.train`` again, chunk by chunk from Python: curves and a progress bar.

    After each chunk of ``cfg.eval_every`` steps it evaluates every split; the last
    evaluation is the run's result (the same computation as ``trainer.train``'s).
    """

    @jax.jit
    def segment(hparams: dict, state: State, c: jax.Array):  # one program: compiled once
        state, batch_loss = trainer.chunk(hparams, state, c)
        return state, batch_loss, *trainer.evaluate(state.params)

    hparams = {k: jnp.float32(v) for k, v in config.items()}
    start = time.perf_counter()
    init_key, data_key = jax.random.split(key)  # as trainer.init does
    state = trainer.start(hparams, initial_params(cfg.width, init_key), data_key)
    curves: dict[str, list[float]] = {"step": [], "batch_loss": []}
    bar = tqdm(total=cfg.steps, desc=f"{name:>7}", disable=not progress, dynamic_ncols=True)
    for c in range(cfg.steps // cfg.eval_every):
        state, batch_loss, metrics, predicted = segment(hparams, state, jnp.int32(c))
        metrics = {k: float(v) for k, v in metrics.items()}
        curves["step"].append((c + 1) * cfg.eval_every)
        curves["batch_loss"].append(float(batch_loss))
        for k, v in metrics.items():
            curves.setdefault(k, []).append(v)
        bar.update(cfg.eval_every)
        bar.set_postfix(loss=f"{float(batch_loss):.3f}", val_acc=f"{metrics['val_acc']:.3f}")
    bar.close()
    return {
        **metrics,
        "config": config,
        "history": curves,
        "params": state.params,
        "predicted": np.asarray(predicted),
        "wall_time": time.perf_counter() - start,
    }


def test_errors(predicted: np.ndarray, data: kd.Keywords) -> tuple[np.ndarray, dict[str, float]]:
    """The test confusion counts ``(20, 20)`` (row: the word said, column: the word
    predicted) and each test speaker's accuracy, by ``"variant/accent"``."""
    test = data.split_mask("test")
    said, speaker = data.label[test], data.speaker[test]
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(counts, (said, predicted), 1)
    per_speaker = {}
    for s in np.unique(speaker):
        who, mine = data.speakers[s], speaker == s
        per_speaker[f"{who.variant}/{who.accent}"] = float(np.mean(predicted[mine] == said[mine]))
    return counts, per_speaker


# -------------------------------------------------------------------------------- report
def format_grid(grids: dict[str, tuning.Results]) -> str:
    """Each configuration's validation error and test accuracy (%), one block per method.

    The choice is made on the validation error alone; the test accuracies show how well
    that choice transfers to other unseen speakers.
    """
    lines = []
    for name, results in grids.items():
        label = "lambda" if name == "AdamW" else "l2"
        lines.append(f"{name}: validation error / test accuracy (%), unseen speakers")
        coefficients = sorted({c["weight_decay"] for c in results.configs})
        lines.append(f"  {'lr / ' + label:<12}" + "".join(f"{c:>14g}" for c in coefficients))
        for lr in sorted({c["learning_rate"] for c in results.configs}):
            cells = []
            for wd in coefficients:
                i = results.configs.index({"learning_rate": lr, "weight_decay": wd})
                val, test = results.metrics["val_error"][i, 0], results.metrics["test_acc"][i, 0]
                cells.append(f"{100 * val:7.1f} /{100 * test:5.1f}")
            lines.append(f"  {lr:<12g}" + "".join(cells))
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = ("method", "lr", "coef", "train acc", "val acc", "test acc", "gap", "wall time")
    rows = [header]
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r['config']['learning_rate']:g}",
                f"{r['config']['weight_decay']:g}",
                f"{100 * r['train_acc']:.1f}%",
                f"{100 * r['val_acc']:.1f}%",
                f"{100 * r['test_acc']:.1f}%",
                f"{100 * r['gap']:.1f}",
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
    """Curves (loss and accuracy on train and validation) and each test confusion matrix."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 10), constrained_layout=True)
    (ax_loss, ax_acc), cm_axes = axes
    for (name, r), color in zip(results.items(), ("C0", "C3"), strict=False):
        h = r["history"]
        ax_loss.plot(h["step"], h["train_loss"], color=color, label=f"{name} train")
        ax_loss.plot(h["step"], h["val_loss"], color=color, linestyle="--", label=f"{name} val")
        ax_acc.plot(h["step"], h["train_acc"], color=color, label=f"{name} train")
        ax_acc.plot(h["step"], h["val_acc"], color=color, linestyle="--", label=f"{name} val")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy (val: unseen speakers)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, (name, r) in zip(cm_axes, results.items(), strict=False):
        counts = r["confusion"]
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(NUM_CLASSES), kd.WORDS, rotation=90)
        ax.set_yticks(range(NUM_CLASSES), kd.WORDS)
        ax.set(
            xlabel="predicted",
            ylabel="said",
            title=f"{name}: test confusion, accuracy {100 * r['test_acc']:.1f}%",
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_method(
    name: str, args: argparse.Namespace, arrays: Arrays, data: kd.Keywords
) -> tuple[dict[str, Any], tuning.Results | None]:
    """One method: its grid (when it has more than one configuration), the chosen
    configuration trained again with curves, and optionally more seeds of it.

    Returns the run's dict and the grid's ``tuning.Results`` (None without a grid).
    """
    cfg: Config = args.config
    key = jax.random.key(args.seed)
    trainer = make_trainer(name, arrays, cfg)
    configs = tuning.grid(learning_rate=args.grid[name][0], weight_decay=args.grid[name][1])
    grid = None
    if len(configs) > 1:
        grid = tuning.sweep(trainer.train, configs, key=key, progress=args.progress)
        best, _ = grid.best("val_error")
    else:
        best = configs[0]
    # The key of every member of a one-seed sweep: the run reproduces the grid's member.
    r = train_with_curves(trainer, best, tuning.seed_keys(key, 1)[0], cfg, name, args.progress)
    r["confusion"], r["speaker_acc"] = test_errors(r.pop("predicted"), data)
    if args.more_seeds:  # other initializations and batch orders, same data
        more = tuning.sweep(
            trainer.train,
            [best],
            key=jax.random.fold_in(key, 1),
            seeds=args.more_seeds,
            progress=args.progress,
        )
        r["more_seeds"] = {k: more.metrics[k][0] for k in ("train_acc", "test_acc", "gap")}
    return r, grid


def format_seeds(results: dict[str, dict[str, Any]]) -> str:
    """Test accuracy and gap over the extra seeds: mean, standard deviation, range."""
    lines = []
    for name, r in results.items():
        if "more_seeds" in r:
            acc, gap = 100 * r["more_seeds"]["test_acc"], 100 * r["more_seeds"]["gap"]
            lines.append(
                f"{name}: {len(acc)} more seeds: test acc {acc.mean():.1f} +- "
                f"{acc.std(ddof=1):.1f}% ({acc.min():.1f}-{acc.max():.1f}), "
                f"gap {gap.mean():.1f} +- {gap.std(ddof=1):.1f}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(
        description="Keyword spotting on espeak-ng voices (Flax NNX): AdamW vs Adam+L2, "
        "each over a small lr x coefficient grid, tested on unseen speakers.",
    )
    add = p.add_argument
    add("--steps", type=int, help=f"optimizer steps per run ({d.steps}; {QUICK.steps} quick)")
    add("--batch-size", type=int, help=f"clips per step ({d.batch_size})")
    add("--width", type=int, help=f"channels of the first conv layers ({d.width})")
    add(
        "--eval-every",
        type=int,
        help=f"steps between evaluations; divides --steps ({d.eval_every})",
    )
    add("--lr", type=float, nargs="+", help=f"the grid's learning rates {GRID_LR}")
    add(
        "--adamw-wd",
        type=float,
        nargs="+",
        help=f"AdamW's coefficients {GRID_COEFFICIENT['AdamW']}",
    )
    add("--l2", type=float, nargs="+", help=f"Adam+L2's coefficients {GRID_COEFFICIENT['Adam+L2']}")
    add(
        "--per-variant",
        type=int,
        help="speakers per voice variant, 1-8: 2000 clips each (2; 1 quick)",
    )
    add(
        "--more-seeds",
        type=int,
        default=0,
        help="train each chosen configuration again with this many other seeds (init and "
        "batch order; 0: none, else >= 2) and report the spread (%(default)s)",
    )
    add("--seed", type=int, default=0, help="seed of the data, init and batches (%(default)s)")
    add("--data-dir", default="out/keywords", help="cache of the synthesized audio (%(default)s)")
    add(
        "--out",
        default=f"out/{PLOT_NAME}",
        help="the PNG: a .png file or a directory (%(default)s)",
    )
    add("--quick", action="store_true", help="a fast run: 2000 clips, a small net, one config each")
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    args = p.parse_args(argv)
    base = QUICK if args.quick else d
    given = {f: getattr(args, f) for f in Config._fields[:4] if getattr(args, f) is not None}
    args.config = base._replace(**given)
    args.lr = tuple(args.lr or (QUICK_GRID_LR if args.quick else GRID_LR))
    coefficients = QUICK_GRID_COEFFICIENT if args.quick else GRID_COEFFICIENT
    args.grid = {
        "AdamW": (args.lr, tuple(args.adamw_wd or coefficients["AdamW"])),
        "Adam+L2": (args.lr, tuple(args.l2 or coefficients["Adam+L2"])),
    }
    if args.per_variant is None:
        args.per_variant = 1 if args.quick else 2
    c = args.config
    for name in ("steps", "batch_size", "width", "eval_every"):
        if getattr(c, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(c, name)}")
    if c.steps % c.eval_every:
        p.error(f"--eval-every must divide --steps; got {c.eval_every} and {c.steps}")
    if args.more_seeds < 0 or args.more_seeds == 1:
        p.error(f"--more-seeds must be 0 or >= 2; got {args.more_seeds}")
    if not 1 <= args.per_variant <= len(kd.ACCENTS):
        p.error(f"--per-variant must be in [1, {len(kd.ACCENTS)}]; got {args.per_variant}")
    values = [*args.lr, *args.grid["AdamW"][1], *args.grid["Adam+L2"][1]]
    if min(args.lr) <= 0 or min(values) < 0:
        p.error(f"need learning rates > 0 and coefficients >= 0; got {values}")
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        out = out / PLOT_NAME
    elif out.suffix.lower() != ".png":
        p.error(f"--out must be a .png file or a directory; got {args.out!r}")
    args.out = str(out)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; returns ``{"AdamW": {...}, "Adam+L2": {...}, "grids", "data", "out"}``.

    Each method's dict holds the best configuration's ``config``, ``train_acc``,
    ``val_acc``, ``test_acc``, ``gap`` (train - test accuracy), losses, ``weight_norm``,
    ``confusion`` (test counts, said x predicted), ``speaker_acc`` (each test speaker's
    accuracy), ``history``, ``params`` (the trained parameters) and ``wall_time``.
    ``grids`` maps each method to its grid results (``configs``, ``metrics``).
    """
    args = parse_args(argv)
    cfg: Config = args.config
    start = time.perf_counter()
    data = kd.load_or_build(args.data_dir, args.seed, args.per_variant, progress=args.progress)
    arrays = prepare(data)
    counts = {s: int(arrays.y[s].shape[0]) for s in kd.SPLITS}
    speakers = {s: sum(sp.split == s for sp in data.speakers) for s in kd.SPLITS}
    print(
        f"keywords: {len(data.label)} clips of {NUM_CLASSES} words by {len(data.speakers)} "
        f"speakers; train/val/test speakers {speakers['train']}/{speakers['val']}/"
        f"{speakers['test']}, clips {counts['train']}/{counts['val']}/{counts['test']}; "
        f"features {kd.FEATURE_SHAPE}; data ready in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"{cfg.steps} steps of {cfg.batch_size}, width {cfg.width}; jax on {jax.default_backend()}"
    )
    results, grids = {}, {}
    for name in METHODS:
        results[name], grid = run_method(name, args, arrays, data)
        if grid is not None:
            grids[name] = grid
    if grids:
        print(format_grid(grids))
    print(format_table(results))
    if args.more_seeds:
        print(format_seeds(results))
    for name, r in results.items():
        worst = sorted(r["speaker_acc"].items(), key=lambda item: item[1])[:3]
        print(
            f"{name}: hardest test speakers " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in worst)
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(
        results,
        args.out,
        f"keyword spotting on espeak-ng voices, {cfg.steps} steps; best config per method",
    )
    print(f"plot written to {args.out}; {time.perf_counter() - start:.0f} s in all")
    return {
        **results,
        "grids": grids,
        "data": {"clips": counts, "speakers": speakers},
        "out": args.out,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
