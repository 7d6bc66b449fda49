"""Three demonstrations of adamw_jax's stability tools on the character-level language model.

The model, the text and the loss are those of ``char_transformer.py`` (a small decoder-only
Transformer in Flax Linen on Python's bundled help topics), in a smaller, faster
configuration; the optimizer is the same chain (global-norm clipping at 1.0, then AdamW
with warmup + cosine and a decay mask that leaves out biases, LayerNorm scales and
embeddings), one batch per step. Each subcommand prints a table, and writes a PNG and a
JSON file of its figures to ``--out`` (default ``out/``):

``spikes``
    Corrupted batches (targets shuffled) injected at random steps; the same run without
    protection, with ``adamw_jax.skip_spikes`` on the loss and on the gradient norm (and
    on the loss with the default window), and a clean run: final validation loss, steps
    skipped, corrupted steps caught, clean steps wrongly skipped.
``finetune``
    Pre-trains on one part of the help topics, fine-tunes on the other; validation loss on
    both parts after fine-tuning with ``decay_target="zero"`` vs ``"init"`` at a few decay
    strengths (forgetting vs adaptation).
``cautious``
    Final validation loss of standard AdamW, cautious weight decay and cautious updates,
    two seeds each.

Run from the repository root::

    python examples/stability_demos.py spikes            # 6-8 CPU-minutes each
    python examples/stability_demos.py finetune
    python examples/stability_demos.py cautious
    python examples/stability_demos.py spikes --quick    # a smoke run: a tiny model

The three full runs took 16 minutes of wall time each on a shared 2-core machine (other
jobs running); ``examples/README.md`` has their tables and what they show.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import re
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
from tqdm.auto import tqdm

import adamw_jax
from adamw_jax import masks

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt


def _load_char_transformer():
    """``char_transformer.py``, next to this file, imported as a module (its model and data)."""
    name = "_char_transformer_for_stability_demos"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().parent / "char_transformer.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while building
        spec.loader.exec_module(module)
    return sys.modules[name]


lm = _load_char_transformer()


# --------------------------------------------------------------------------------- set-up
@dataclasses.dataclass(frozen=True)
class Setup:
    """The model, the batches and the step counts of one mode (full or ``--quick``)."""

    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 4
    block: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    eval_batches: int = 16
    eval_every: int = 50
    steps: int = 600  # spikes and cautious runs; pre-training
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    finetune_warmup: int = 20
    corrupt_from: int = 100  # the first step a corrupted batch may come at
    corrupt_fraction: float = 0.04  # of the steps from corrupt_from on
    strengths: tuple[float, ...] = (0.3, 3.0, 30.0)  # fine-tuning decay coefficients


QUICK = Setup(
    d_model=32,
    n_layers=1,
    n_heads=2,
    block=32,
    batch_size=16,
    lr=1e-2,
    warmup=10,
    eval_batches=4,
    eval_every=20,
    steps=200,
    finetune_steps=60,
    finetune_warmup=5,
    corrupt_from=120,
    corrupt_fraction=0.05,
    strengths=(30.0,),
)


# ------------------------------------------------------------------------------- training
class Model(NamedTuple):
    """The char LM of one set-up, with its jitted initializer, gradient and evaluation.

    The gradient is jitted apart from the optimizer's update, so that it compiles once for
    all the optimizers a demo compares (each of those compiles only its own update).
    """

    module: Any
    init: Callable[[int], Any]  # seed -> params
    grad: Callable[..., Any]  # (params, x, y) -> (loss, grads, global norm of grads)
    evaluate: Callable[..., jax.Array]  # (params, xs, ys) -> mean loss over the batches


@functools.cache
def model_for(setup: Setup, vocab_size: int) -> Model:
    """Built once per set-up and vocabulary: every run in a process shares its compilations."""
    module = lm.CharTransformer(
        vocab_size, setup.d_model, setup.n_layers, setup.n_heads, setup.block
    )
    dummy = jnp.zeros((1, setup.block), jnp.int32)
    init = jax.jit(lambda key: module.init(key, dummy)["params"])

    def grad(params, x, y):
        loss, grads = jax.value_and_grad(lm.loss_fn)(params, module.apply, x, y)
        return loss, grads, optax.tree.norm(grads)

    def evaluate(params, xs, ys):
        return lm.eval_loss(params, module.apply, xs, ys)

    return Model(module, lambda seed: init(jax.random.key(seed)), jax.jit(grad), jax.jit(evaluate))


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One optimizer configuration: ``char_transformer``'s chain and the options compared.

    The chain is global-norm clipping at 1.0, then ``adamw_jax.adamw`` with a linear warmup
    and a cosine decay to a tenth of ``lr``, and a decay mask leaving out biases, LayerNorm
    scales and embeddings. With ``skip`` (a ``skip_spikes`` metric) the whole chain is
    wrapped in ``adamw_jax.skip_spikes``, which then sees the gradient norm before clipping.
    """

    steps: int
    lr: float
    warmup: int
    weight_decay: float
    decay_target: str = "zero"
    cautious: bool = False
    cautious_weight_decay: bool = False
    skip: str | None = None
    skip_kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.lr, self.warmup, self.steps, 0.1 * self.lr
        )
        tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            adamw_jax.adamw(
                schedule,
                b2=0.99,
                weight_decay=self.weight_decay,
                mask=masks.by_name(),
                cautious=self.cautious,
                cautious_weight_decay=self.cautious_weight_decay,
                decay_target=self.decay_target,
            ),
        )
        if self.skip is not None:
            tx = adamw_jax.skip_spikes(tx, metric=self.skip, **dict(self.skip_kwargs))
        return tx


class Trainer(NamedTuple):
    """An optimizer and its jitted update of the params."""

    tx: optax.GradientTransformation
    update: Callable[..., Any]  # (params, opt_state, grads, loss) -> (params, opt_state)


@functools.cache
def trainer_for(opt: Optimizer) -> Trainer:
    """The optimizer ``opt`` describes and its jitted update; built (and compiled) once."""
    tx = opt.build()

    def update(params, opt_state, grads, loss):
        extra = {"value": loss} if opt.skip == "loss" else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

    return Trainer(tx, jax.jit(update))


@dataclasses.dataclass
class RunResult:
    """What one training run records."""

    losses: list[float]  # training loss of every step
    grad_norms: list[float]  # global norm of every step's gradient, before clipping
    skipped: list[int]  # the steps (from 1) skip_spikes skipped
    eval_steps: list[int]  # steps of the evaluations (0: before training)
    evals: dict[str, list[float]]  # validation loss of each evaluation set at eval_steps
    params: Any
    wall_time: float

    def final(self, name: str = "val") -> float:
        return self.evals[name][-1]


def eval_batches(ids: np.ndarray, setup: Setup, seed: int) -> tuple[jax.Array, jax.Array]:
    """A fixed stack of ``setup.eval_batches`` batches drawn from ``ids``."""
    pairs = [
        lm.CharData.batch(ids, seed, i, setup.batch_size, setup.block)
        for i in range(setup.eval_batches)
    ]
    xs, ys = zip(*pairs, strict=True)
    return jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))


def train(
    model: Model,
    trainer: Trainer,
    params: Any,
    batches: Callable[[int], tuple[np.ndarray, np.ndarray]],
    steps: int,
    evals: dict[str, tuple[jax.Array, jax.Array]],
    eval_every: int,
    desc: str,
    progress: bool = True,
) -> RunResult:
    """Runs ``steps`` steps on ``batches(step)`` (step from 1); evaluates every ``eval_every``."""
    opt_state = trainer.tx.init(params)
    r = RunResult([], [], [], [], {name: [] for name in evals}, params, 0.0)

    def evaluate(step: int) -> None:
        r.eval_steps.append(step)
        for name, xy in evals.items():
            r.evals[name].append(float(model.evaluate(params, *xy)))

    evaluate(0)
    start = time.perf_counter()
    no_skips = jnp.zeros([], jnp.int32)
    record = []  # device scalars, read once at the end: the steps are not held up
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        x, y = batches(step)
        loss, grads, norm = model.grad(params, jnp.asarray(x), jnp.asarray(y))
        params, opt_state = trainer.update(params, opt_state, grads, loss)
        # A SkipSpikesState counts the steps it skipped.
        record.append((loss, norm, getattr(opt_state, "skipped", no_skips)))
        if step % eval_every == 0 or step == steps:
            evaluate(step)
            bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{r.final(next(iter(evals))):.3f}")
    bar.close()
    losses, norms, skips = (np.asarray(v) for v in zip(*jax.device_get(record), strict=True))
    r.losses, r.grad_norms = losses.tolist(), norms.tolist()
    r.skipped = (np.flatnonzero(np.diff(skips, prepend=0)) + 1).tolist()
    r.wall_time, r.params = time.perf_counter() - start, params
    return r


def moving_average(values: Sequence[float], width: int) -> np.ndarray:
    """Trailing mean over up to ``width`` values (NaNs left out)."""
    v = np.asarray(values, np.float64)
    out = np.empty_like(v)
    for i in range(len(v)):
        window = v[max(0, i - width + 1) : i + 1]
        out[i] = np.nanmean(window) if np.isfinite(window).any() else np.nan
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


# --------------------------------------------------------------------------------- spikes
# skip_spikes as the spikes demo configures it: a window of 20 accepted steps, not the
# default 100, because these runs are short and their loss falls fast (see the README).
SKIP_KWARGS = {"threshold": 6.0, "window": 20, "warmup": 20}
SPIKE_RUNS = {  # name: (skip_spikes metric or None, corrupted?, skip_spikes arguments)
    "clean": (None, False, {}),
    "corrupted": (None, True, {}),
    "corrupted + skip (loss)": ("loss", True, SKIP_KWARGS),
    "corrupted + skip (grad norm)": ("grad_norm", True, SKIP_KWARGS),
    "corrupted + skip (loss, window 100)": ("loss", True, {}),
}
QUICK_SPIKE_RUNS = tuple(SPIKE_RUNS)[:3]  # --quick: one metric, the demo's window


def corrupted_steps(setup: Setup, seed: int) -> list[int]:
    """The steps whose batch is corrupted: a random ``corrupt_fraction`` of the steps from
    ``corrupt_from`` on."""
    rng = np.random.default_rng([seed, 7])
    candidates = np.arange(setup.corrupt_from, setup.steps + 1)
    n = round(setup.corrupt_fraction * len(candidates))
    return sorted(int(s) for s in rng.choice(candidates, n, replace=False))


def shuffle_targets(y: np.ndarray, seed: int, step: int) -> np.ndarray:
    """The batch's targets permuted across all its positions: right characters, wrong places."""
    rng = np.random.default_rng([seed, step, 1])
    return rng.permutation(y.reshape(-1)).reshape(y.shape)


def demo_spikes(args: argparse.Namespace, setup: Setup, data: Any) -> dict[str, Any]:
    """The spike runs; returns a summary per run and the curves."""
    bad = corrupted_steps(setup, args.seed)
    bad_set = set(bad)
    model = model_for(setup, data.vocab_size)
    evals = {"val": eval_batches(data.val, setup, args.seed + 1)}
    print(f"{len(bad)} corrupted batches (targets shuffled) at steps {bad}")

    def batches(corrupt: bool) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        def get(step: int) -> tuple[np.ndarray, np.ndarray]:
            x, y = lm.CharData.batch(data.train, args.seed, step, setup.batch_size, setup.block)
            return x, (shuffle_targets(y, args.seed, step) if corrupt and step in bad_set else y)

        return get

    runs = {}
    for name, (metric, corrupt, skip_kwargs) in SPIKE_RUNS.items():
        if args.quick and name not in QUICK_SPIKE_RUNS:
            continue
        opt = Optimizer(
            setup.steps,
            setup.lr,
            setup.warmup,
            setup.weight_decay,
            skip=metric,
            skip_kwargs=tuple(skip_kwargs.items()),
        )
        trainer = trainer_for(opt)
        run = train(
            model,
            trainer,
            model.init(args.seed),
            batches(corrupt),
            setup.steps,
            evals,
            setup.eval_every,
            name,
            args.progress,
        )
        skipped = set(run.skipped)
        runs[name] = {
            "val_loss": run.final(),
            "skipped": len(skipped),
            "caught": len(skipped & bad_set) if corrupt else 0,
            "clean_skipped": len(skipped - bad_set) if corrupt else len(skipped),
            "missed": sorted(bad_set - skipped) if corrupt and metric else [],
            "wall_time": run.wall_time,
            "losses": run.losses,
            "grad_norms": run.grad_norms,
            "skipped_steps": run.skipped,
            "eval_steps": run.eval_steps,
            "val_curve": run.evals["val"],
        }
    return {"corrupted_steps": bad, "runs": runs}


def spikes_table(result: dict[str, Any]) -> str:
    n = len(result["corrupted_steps"])
    clean = result["runs"]["clean"]["val_loss"]
    rows = [("run", "val loss", "vs clean", "skipped", f"caught (of {n})", "clean skipped")]
    for name, r in result["runs"].items():
        has_skip = SPIKE_RUNS[name][0] is not None
        rows.append(
            (
                name,
                f"{r['val_loss']:.4f}",
                f"{r['val_loss'] - clean:+.4f}",
                str(r["skipped"]) if has_skip else "-",
                str(r["caught"]) if has_skip else "-",
                str(r["clean_skipped"]) if has_skip else "-",
            )
        )
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_spikes(result: dict[str, Any], setup: Setup, path: Path) -> None:
    """Training loss on the clean batches (smoothed) and validation loss, from the first
    corrupted batch on; the corrupted batches as vertical lines."""
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    bad = np.array(result["corrupted_steps"], int)
    start = max(1, setup.corrupt_from - setup.eval_every)
    colors = dict(zip(SPIKE_RUNS, ("0.4", "C3", "C0", "C2", "C1"), strict=True))
    shown: list[float] = []
    for name, r in result["runs"].items():
        losses = np.array(r["losses"])
        steps = np.arange(1, len(losses) + 1)
        losses[bad - 1] = np.nan  # the corrupted batches' own loss is far off the scale
        smooth = moving_average(losses, 25)
        ax_train.plot(steps[start - 1 :], smooth[start - 1 :], color=colors[name], label=name)
        shown += smooth[start - 1 :].tolist()
        evals = np.array(r["eval_steps"]) >= start
        ax_val.plot(
            np.array(r["eval_steps"])[evals],
            np.array(r["val_curve"])[evals],
            color=colors[name],
            label=name,
            marker=".",
        )
    spikes = np.array(result["runs"]["corrupted"]["losses"])[bad - 1]
    for k, step in enumerate(bad):
        label = f"corrupted batch (loss {spikes.min():.1f}-{spikes.max():.1f})" if k == 0 else None
        ax_train.axvline(step, color="C3", alpha=0.25, lw=1, label=label)
    ax_train.set_ylim(np.nanmin(shown) - 0.05, np.nanmax(shown) + 0.05)
    ax_train.set(
        xlabel="step", ylabel="nats/char", title="training loss on clean batches (mean of 25)"
    )
    ax_val.set(xlabel="step", ylabel="nats/char", title="validation loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"char LM, {setup.steps} steps; {len(bad)} batches with shuffled targets; "
        f"skip_spikes threshold {SKIP_KWARGS['threshold']:g}, window {SKIP_KWARGS['window']}"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------- finetune
def text_parts(text: str) -> dict[str, str]:
    """The help topics in two parts: paragraphs at the margin (prose) and indented ones
    (code examples, grammar rules, the method entries of the built-in types)."""
    paragraphs = re.split(r"\n\s*\n", text)
    return {
        "A": "\n\n".join(p for p in paragraphs if not p.startswith(" ")),
        "B": "\n\n".join(p for p in paragraphs if p.startswith(" ")),
    }


def split_ids(data: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """``text`` as character ids of ``data``'s vocabulary, split 90/10 (train, validation)."""
    ids = data.encode(text)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def demo_finetune(args: argparse.Namespace, setup: Setup, data: Any) -> dict[str, Any]:
    """Pre-trains on part A, then fine-tunes on part B with each decay target and strength."""
    parts = {name: split_ids(data, text) for name, text in text_parts(lm.load_text()).items()}
    print(", ".join(f"part {k}: {len(t):,} + {len(v):,} chars" for k, (t, v) in parts.items()))
    model = model_for(setup, data.vocab_size)
    evals = {name: eval_batches(val, setup, args.seed + 1) for name, (_, val) in parts.items()}

    def batches(name: str) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        ids = parts[name][0]
        return lambda step: lm.CharData.batch(ids, args.seed, step, setup.batch_size, setup.block)

    pre_opt = Optimizer(setup.steps, setup.lr, setup.warmup, setup.weight_decay)
    pre = train(
        model,
        trainer_for(pre_opt),
        model.init(args.seed),
        batches("A"),
        setup.steps,
        evals,
        setup.eval_every,
        "pre-train on A",
        args.progress,
    )
    settings = [("none", 0.0)] if not args.quick else []
    settings += [(target, s) for s in setup.strengths for target in ("zero", "init")]
    runs = {}
    for target, strength in settings:
        opt = Optimizer(
            setup.finetune_steps,
            setup.finetune_lr,
            setup.finetune_warmup,
            strength,
            decay_target="zero" if target == "none" else target,
        )
        run = train(
            model,
            trainer_for(opt),
            pre.params,
            batches("B"),
            setup.finetune_steps,
            evals,
            setup.eval_every,
            f"fine-tune on B, {target} {strength:g}",
            args.progress,
        )
        runs[f"{target} {strength:g}"] = {
            "target": target,
            "strength": strength,
            "val_A": run.final("A"),
            "val_B": run.final("B"),
            "eval_steps": run.eval_steps,
            "curve_A": run.evals["A"],
            "curve_B": run.evals["B"],
            "wall_time": run.wall_time,
        }
    pretrained = {"val_A": pre.final("A"), "val_B": pre.final("B"), "wall_time": pre.wall_time}
    return {"pretrained": pretrained, "runs": runs}


def finetune_table(result: dict[str, Any]) -> str:
    pre = result["pretrained"]
    rows = [("decay target", "strength", "val loss A", "change A", "val loss B", "change B")]
    rows.append(("(pre-trained)", "-", f"{pre['val_A']:.4f}", "", f"{pre['val_B']:.4f}", ""))
    for r in result["runs"].values():
        rows.append(
            (
                r["target"],
                f"{r['strength']:g}",
                f"{r['val_A']:.4f}",
                f"{r['val_A'] - pre['val_A']:+.4f}",
                f"{r['val_B']:.4f}",
                f"{r['val_B'] - pre['val_B']:+.4f}",
            )
        )
    return format_table(rows)


TARGET_COLORS = {"zero": "C3", "init": "C0"}


def _plot_tradeoff(ax: Any, pre: dict[str, float], runs: list[dict[str, Any]]) -> None:
    """Loss on A against loss on B, one line per target through its strengths; the axes
    hold the runs that kept part A within 0.3 of the pre-trained loss, the rest are named."""
    base = [r for r in runs if r["target"] == "none"]
    kept = [pre] + [r for r in runs if r["val_A"] < pre["val_A"] + 0.3]
    for target, color in TARGET_COLORS.items():
        mine = base + [r for r in runs if r["target"] == target]
        xy = [(r["val_B"], r["val_A"]) for r in mine]
        ax.plot(*zip(*xy, strict=True), color=color, marker="o", label=f'decay_target="{target}"')
        for r, point in zip(mine[len(base) :], xy[len(base) :], strict=True):
            ax.annotate(
                f"{r['strength']:g}",
                point,
                xytext=(5, 3 if target == "zero" else -11),
                textcoords="offset points",
                fontsize=8,
                color=color,
            )
    for r in base:
        ax.annotate(
            "no decay",
            (r["val_B"], r["val_A"]),
            xytext=(-48, -3),
            textcoords="offset points",
            fontsize=8,
            color="0.3",
        )
    ax.scatter([pre["val_B"]], [pre["val_A"]], color="k", marker="*", s=120, zorder=3)
    ax.annotate(
        "pre-trained", (pre["val_B"], pre["val_A"]), xytext=(-30, 8), textcoords="offset points"
    )
    off = [
        f'"{r["target"]}" {r["strength"]:g}: A {r["val_A"]:.2f}, B {r["val_B"]:.2f}'
        for r in runs
        if r["val_A"] >= pre["val_A"] + 0.3
    ]
    if off:
        ax.text(
            0.98,
            0.97,
            "off the axes:\n" + "\n".join(off),
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
        )
    b, a = [r["val_B"] for r in kept], [r["val_A"] for r in kept]
    ax.set_xlim(min(b) - 0.05, max(b) + 0.05)
    ax.set_ylim(min(a) - 0.02, max(a) + 0.06)
    ax.set(
        xlabel="validation loss on B (fine-tuning part)",
        ylabel="validation loss on A (pre-training part)",
        title="after fine-tuning (labels: decay strength)",
    )


def _plot_strengths(ax: Any, pre: dict[str, float], runs: list[dict[str, Any]]) -> None:
    """Loss on A (solid) and B (dashed) against the strength, per target; references."""
    for target, color in TARGET_COLORS.items():
        mine = [r for r in runs if r["target"] == target]
        x = [r["strength"] for r in mine]
        ax.plot(
            x,
            [r["val_A"] for r in mine],
            color=color,
            marker="o",
            label=f'"{target}": part A (forgetting)',
        )
        ax.plot(
            x,
            [r["val_B"] for r in mine],
            color=color,
            marker="s",
            ls="--",
            label=f'"{target}": part B (adaptation)',
        )
    for r in runs:
        if r["target"] == "none":
            ax.axhline(r["val_A"], color="0.5", lw=0.8)
            ax.axhline(r["val_B"], color="0.5", lw=0.8, ls="--")
    ax.axhline(pre["val_A"], color="k", lw=0.8, ls=":", label="pre-trained, A and B")
    ax.axhline(pre["val_B"], color="k", lw=0.8, ls=":")
    ax.set(
        xscale="log",
        xlabel="weight decay strength (grey: no decay)",
        ylabel="validation loss (nats/char)",
        title="validation loss after fine-tuning",
    )


def plot_finetune(result: dict[str, Any], setup: Setup, path: Path) -> None:
    """Loss on A (forgetting) against loss on B (adaptation); both against the strength."""
    fig, (ax_trade, ax_strength) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    runs = list(result["runs"].values())
    _plot_tradeoff(ax_trade, result["pretrained"], runs)
    _plot_strengths(ax_strength, result["pretrained"], runs)
    for ax in (ax_trade, ax_strength):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right" if ax is ax_trade else "best")
    fig.suptitle(
        f"char LM pre-trained {setup.steps} steps on A, fine-tuned {setup.finetune_steps} "
        f"steps on B (peak lr {setup.finetune_lr:g})"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------- cautious
CAUTIOUS_VARIANTS = {
    "AdamW": {},
    "cautious weight decay": {"cautious_weight_decay": True},
    "cautious updates": {"cautious": True},
}
SEEDS = (0, 1)


def demo_cautious(args: argparse.Namespace, setup: Setup, data: Any) -> dict[str, Any]:
    """Each variant with two seeds (seeds ``--seed`` and ``--seed + 1``: init and batches)."""
    model = model_for(setup, data.vocab_size)
    evals = {"val": eval_batches(data.val, setup, 1)}  # the same batches for every run
    runs = {}
    for name, flags in CAUTIOUS_VARIANTS.items():
        opt = Optimizer(setup.steps, setup.lr, setup.warmup, setup.weight_decay, **flags)
        trainer = trainer_for(opt)
        for seed in (args.seed + s for s in SEEDS):
            run = train(
                model,
                trainer,
                model.init(seed),
                lambda step, seed=seed: lm.CharData.batch(
                    data.train, seed, step, setup.batch_size, setup.block
                ),
                setup.steps,
                evals,
                setup.eval_every,
                f"{name}, seed {seed}",
                args.progress,
            )
            runs[f"{name}, seed {seed}"] = {
                "variant": name,
                "seed": seed,
                "val_loss": run.final(),
                "train_loss_last_50": float(np.mean(run.losses[-50:])),
                "eval_steps": run.eval_steps,
                "val_curve": run.evals["val"],
                "wall_time": run.wall_time,
            }
    return {"runs": runs}


def cautious_table(result: dict[str, Any]) -> str:
    by_variant: dict[str, list[float]] = {}
    for r in result["runs"].values():
        by_variant.setdefault(r["variant"], []).append(r["val_loss"])
    seeds = sorted({r["seed"] for r in result["runs"].values()})
    base = np.mean(by_variant["AdamW"])
    rows = [("variant", *(f"seed {s}" for s in seeds), "mean", "vs AdamW")]
    for name, losses in by_variant.items():
        rows.append(
            (
                name,
                *(f"{v:.4f}" for v in losses),
                f"{np.mean(losses):.4f}",
                f"{np.mean(losses) - base:+.4f}",
            )
        )
    return format_table(rows)


def plot_cautious(result: dict[str, Any], setup: Setup, path: Path) -> None:
    """Validation loss curves, and the final validation loss of every run."""
    fig, (ax_curve, ax_final) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colors = dict(zip(CAUTIOUS_VARIANTS, ("0.3", "C0", "C3"), strict=True))
    seeds = sorted({r["seed"] for r in result["runs"].values()})
    for r in result["runs"].values():
        k = seeds.index(r["seed"])
        ax_curve.plot(
            r["eval_steps"],
            r["val_curve"],
            color=colors[r["variant"]],
            ls=("-", "--")[k % 2],
            lw=3 if r["variant"] == "AdamW" else 1.5,  # under the others where they overlap
            label=f"{r['variant']}, seed {r['seed']}",
        )
        i = list(CAUTIOUS_VARIANTS).index(r["variant"])
        ax_final.scatter(
            [i + 0.1 * (k - 0.5)],
            [r["val_loss"]],
            color=colors[r["variant"]],
            marker="os"[k % 2],
            label=f"seed {r['seed']}" if i == 0 else None,
        )
    late = [v for r in result["runs"].values() for v in r["val_curve"][len(r["val_curve"]) // 3 :]]
    ax_curve.set_ylim(min(late) - 0.03, max(late) + 0.03)
    ax_curve.set(xlabel="step", ylabel="validation loss (nats/char)", title="validation loss")
    ax_final.set_xticks(range(len(CAUTIOUS_VARIANTS)), list(CAUTIOUS_VARIANTS))
    ax_final.set(ylabel="final validation loss (nats/char)", title=f"after {setup.steps} steps")
    for ax in (ax_curve, ax_final):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"char LM, {setup.steps} steps, lr {setup.lr:g}, weight decay "
        f"{setup.weight_decay:g}: AdamW and its cautious variants"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ CLI
DEMOS = {
    "spikes": "corrupted batches with and without skip_spikes",
    "finetune": "fine-tuning with decay toward zero vs toward the pre-trained weights",
    "cautious": "standard AdamW, cautious weight decay, cautious updates; two seeds",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="adamw_jax's stability tools on the character-level LM of "
        "char_transformer.py: spike skipping, decay toward the initial weights, cautious "
        "variants.",
    )
    p.add_argument(
        "demo", choices=tuple(DEMOS), help="; ".join(f"{k}: {v}" for k, v in DEMOS.items())
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: a tiny model (20k parameters), 200 steps"
    )
    p.add_argument("--out", default="out", help="directory for the PNG and JSON (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of init and batches (%(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    args.setup = QUICK if args.quick else Setup()
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs one demo; returns its results, with ``png`` and ``json`` (the files written)."""
    args = parse_args(argv)
    setup: Setup = args.setup
    data = lm.CharData(lm.load_text())
    model = model_for(setup, data.vocab_size)
    shapes = jax.eval_shape(model.init, 0)
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    print(
        f"{args.demo}: char LM with {n_params:,} params (d_model {setup.d_model}, "
        f"{setup.n_layers} layers), batches of {setup.batch_size}x{setup.block}; "
        f"jax on {jax.default_backend()}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    demo, table, plot = {
        "spikes": (demo_spikes, spikes_table, plot_spikes),
        "finetune": (demo_finetune, finetune_table, plot_finetune),
        "cautious": (demo_cautious, cautious_table, plot_cautious),
    }[args.demo]
    result = demo(args, setup, data)
    print(table(result))
    plot(result, setup, out / f"stability_{args.demo}.png")
    result["png"] = str(out / f"stability_{args.demo}.png")
    result["json"] = str(out / f"stability_{args.demo}.json")
    result["setup"] = dataclasses.asdict(setup)
    result["wall_time"] = time.perf_counter() - start
    write_json(Path(result["json"]), result)
    print(f"{time.perf_counter() - start:.0f} s; wrote {result['png']} and {result['json']}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
