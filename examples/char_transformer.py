"""A character-level Transformer language model in Flax Linen, trained with AdamW.

The text is the help-topic documentation that ships with Python itself
(``pydoc_data.topics``: about 0.7 MB of English prose and code, no download). The model is a
small decoder-only (GPT-style) Transformer written in Flax Linen and trained with
``flax.training.train_state.TrainState`` and the pieces people combine with AdamW:

- a linear warmup then cosine decay of the learning rate (``optax``),
- gradient clipping by global norm (``optax.clip_by_global_norm``),
- a decay mask that leaves out biases, LayerNorm scales and embeddings
  (``adamw_jax.masks.by_name()``),
- gradient accumulation over micro-batches (``optax.MultiSteps``),
- ``jax.jit`` with the train state (params and optimizer state) donated.

``--moments bf16``, ``--moments int8`` or ``--moments int4`` stores AdamW's two moments in
bfloat16 or as blockwise 8-bit or 4-bit codes (``adamw(mu_dtype=..., nu_dtype=...)``)
instead of float32, and ``--moments int8-int4`` the first moment in 8 bits and the second
in 4; the run prints how many parameters' moments are quantized and the optimizer state's
bytes.

Every ``--save-every`` optimizer steps it writes a checkpoint with orbax-checkpoint: params,
optimizer state, step and the data position. ``--resume`` continues from the latest one.
Batches are a pure function of ``(seed, micro-step)``, so a resumed run ends with params and
optimizer state bitwise equal to an uninterrupted run. Restoring a checkpoint into a state of
another structure (say, one saved without ``amsgrad`` into a run with ``--amsgrad``, or with a
different ``mu_dtype``) raises a ``ValueError`` that lists the differences.

At the end it prints the validation loss in bits per character and samples some text.

Run from the repository root::

    python examples/char_transformer.py                         # defaults: a few minutes
    python examples/char_transformer.py --steps 3000            # longer, better samples
    python examples/char_transformer.py --stop-after 200        # "interrupted" at step 200
    python examples/char_transformer.py --resume                # ... and continued
    python examples/char_transformer.py --small                 # a seconds-long smoke run
    python examples/char_transformer.py --moments int8          # 8-bit optimizer moments
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from tqdm.auto import tqdm

import adamw_jax
from adamw_jax import masks


# ----------------------------------------------------------------------------------- data
def load_text() -> str:
    """Python's bundled help topics, joined in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


class CharData:
    """The text as int32 character ids, split 90/10 into train and validation.

    Batches are drawn at random offsets, as a pure function of ``(seed, index)``: the
    data-iterator position is just the index of the next micro-batch.
    """

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        ids = np.array([self.index[c] for c in text], dtype=np.int32)
        cut = int(0.9 * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> np.ndarray:
        return np.array([self.index[c] for c in s if c in self.index], dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    @staticmethod
    def batch(ids: np.ndarray, seed: int, index: int, batch_size: int, block: int):
        """Inputs and next-character targets, ``(batch_size, block)`` each."""
        rng = np.random.default_rng([seed, index])
        starts = rng.integers(0, len(ids) - block - 1, size=batch_size)
        window = ids[starts[:, None] + np.arange(block + 1)]
        return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class Config:
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    block: int = 64
    batch_size: int = 16
    accum: int = 2  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    amsgrad: bool = False
    moments: str = "fp32"  # a key of MOMENT_DTYPES
    eval_batches: int = 16
    sample_chars: int = 400


SMALL = dict(
    d_model=32,
    n_layers=2,
    n_heads=2,
    block=32,
    batch_size=8,
    accum=2,
    steps=40,
    lr=1e-2,
    warmup=5,
    eval_batches=4,
    sample_chars=120,
)


# How AdamW's two moments are stored: adamw's (mu_dtype, nu_dtype); the arithmetic is
# float32 in every case. With "int8" or "int4", leaves under min_quantize_size (4096)
# elements stay float32. "int8-int4" keeps the first moment in 8 bits, the second in 4.
MOMENT_DTYPES: dict[str, tuple[Any, Any]] = {
    "fp32": (None, None),
    "bf16": (jnp.bfloat16, jnp.bfloat16),
    "int8": ("int8", "int8"),
    "int4": ("int4", "int4"),
    "int8-int4": ("int8", "int4"),
}
QUANTIZED = adamw_jax.QuantizedArray


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: causal self-attention, then a GELU MLP."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.n_heads, name="attn")(h, mask=mask)
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(4 * self.d_model, name="mlp_in")(h)
        return x + nn.Dense(self.d_model, name="mlp_out")(nn.gelu(h))


class CharTransformer(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, a final LayerNorm, a linear head."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    block: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        positions = jnp.arange(tokens.shape[-1])
        x = nn.Embed(self.vocab_size, self.d_model, name="tok_embed")(tokens)
        x = x + nn.Embed(self.block, self.d_model, name="pos_embed")(positions)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.n_layers):
            x = Block(self.d_model, self.n_heads, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.vocab_size, name="head")(x)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Clip, then AdamW with warmup + cosine and a decay mask, accumulated over micro-batches."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup,
        decay_steps=cfg.steps,
        end_value=0.1 * cfg.lr,
    )
    mu_dtype, nu_dtype = MOMENT_DTYPES[cfg.moments]
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        adamw_jax.adamw(
            schedule,
            b2=0.99,
            weight_decay=cfg.weight_decay,
            mask=masks.by_name(),
            amsgrad=cfg.amsgrad,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
    )
    return optax.MultiSteps(inner, every_k_schedule=cfg.accum).gradient_transformation()


def loss_fn(params, apply_fn, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array):
    """One micro-batch: gradients in, the optimizer (MultiSteps) applies every k-th call."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=grads), loss


def eval_loss(params, apply_fn, xs: jax.Array, ys: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats per character) over a stack of validation batches."""
    return jnp.mean(jax.lax.map(lambda xy: loss_fn(params, apply_fn, *xy), (xs, ys)))


def generate(
    params,
    apply_fn,
    key: jax.Array,
    prompt: jax.Array,
    length: jax.Array,
    n_new: int,
    temperature: float = 0.8,
) -> jax.Array:
    """Samples ``n_new`` characters after ``prompt[:length]`` (a ``block``-sized buffer)."""
    block = prompt.shape[0]

    def step(carry, key):
        buf, n = carry
        logits = apply_fn({"params": params}, buf[None])[0, n - 1]
        nxt = jax.random.categorical(key, logits / temperature).astype(buf.dtype)
        full = n == block
        buf = jnp.where(full, jnp.roll(buf, -1).at[-1].set(nxt), buf.at[n % block].set(nxt))
        return (buf, jnp.minimum(n + 1, block)), nxt

    _, out = jax.lax.scan(step, (prompt, length), jax.random.split(key, n_new))
    return out


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_manager(directory: str | Path, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An orbax manager for checkpoints made of a ``state`` pytree and a ``meta`` JSON dict."""
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as checkpoint ``step``.

    Waits until the checkpoint is on disk: the training step donates its input buffers, so
    they must not be read by a background save afterwards.
    """
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    manager.wait_until_finished()


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"a.b.0.c": (shape, dtype)}`` for every array leaf (namedtuple fields by name)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    )[0]
    return {
        ".".join(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        for path, leaf in leaves
    }


def _summarize(paths: list[str]) -> str:
    """``"a.b.* (12 leaves)"`` for paths under one common prefix, else the first few."""
    parts = [p.split(".") for p in paths]
    common = []
    for names in zip(*parts, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    if len(paths) > 1 and common:
        return f"{'.'.join(common)}.* ({len(paths)} leaves)"
    return ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else "")


def check_compatible(saved: Any, target: Any, where: str = "the checkpoint") -> None:
    """Raises ``ValueError`` listing how ``saved``'s leaves differ from ``target``'s.

    Compares leaf paths, shapes and dtypes. orbax itself rejects some of these differences
    with a terse message, and silently casts others (a dtype change, e.g. another
    ``mu_dtype``); this check names every difference before anything is restored.
    """
    have, want = _signature(saved), _signature(target)
    problems = []
    for label, paths in (
        (f"in the target but not in {where}", [k for k in want if k not in have]),
        (f"in {where} but not in the target", [k for k in have if k not in want]),
    ):
        if paths:
            problems.append(f"{label}: {_summarize(paths)}")
    for k in sorted(want.keys() & have.keys()):
        if want[k] != have[k]:
            problems.append(
                f"{k}: saved {have[k][0]} {have[k][1]}, target {want[k][0]} {want[k][1]}"
            )
    if problems:
        raise ValueError(
            f"{where} does not match the state it is restored into (different optimizer "
            "configuration, e.g. amsgrad or mu_dtype, or a different model?):\n  "
            + "\n  ".join(problems[:12])
            + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        )


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target: Any):
    """Restores checkpoint ``step`` into the structure of ``target``; returns (state, meta).

    Raises:
      ValueError: the saved tree's paths, shapes or dtypes differ from ``target``'s.
    """
    saved = manager.item_metadata(step)["state"]
    check_compatible(saved, target, where=f"checkpoint {step} in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["meta"]


# ------------------------------------------------------------------------------- training
def quantized_params(opt_state: Any) -> int:
    """How many parameters have their moments stored as 8-bit or 4-bit codes in ``opt_state``."""
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, QUANTIZED))
    # Each quantized parameter leaf has two quantized moments (mu, nu): count one of them.
    sizes = [math.prod(x.shape) for x in leaves if isinstance(x, QUANTIZED)]
    return sum(sizes) // 2


def describe_moments(moments: str, opt_state: optax.MultiStepsState, n_params: int) -> str:
    """One line: the moments' storage and the optimizer state's bytes per parameter."""
    adam = adamw_jax.state_nbytes(opt_state.inner_opt_state)
    total = adamw_jax.state_nbytes(opt_state)
    line = (
        f"moments: {moments}; AdamW state {adam / n_params:.2f} bytes/param "
        f"({total / n_params:.2f} with MultiSteps' gradient accumulator)"
    )
    if any(isinstance(dtype, str) for dtype in MOMENT_DTYPES[moments]):  # "int8" / "int4"
        q = quantized_params(opt_state)
        line += f"; {q:,} of {n_params:,} parameters quantized, the rest float32"
    return line


class Compiled(NamedTuple):
    """The jitted functions of one configuration."""

    create_state: Callable[[jax.Array], train_state.TrainState]
    train_step: Callable[..., Any]
    eval_loss: Callable[..., jax.Array]
    generate: Callable[..., jax.Array]


@functools.lru_cache(maxsize=4)
def build(cfg: Config, vocab_size: int) -> Compiled:
    """The model, the optimizer and the jitted functions of a configuration.

    Cached, so that runs in one process with the same configuration (an interrupted run and
    its resumption, in the tests) share the same functions and compile them once.
    """
    model = CharTransformer(vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.block)
    tx = make_optimizer(cfg)

    def create_state(key: jax.Array) -> train_state.TrainState:
        params = model.init(key, jnp.zeros((1, cfg.block), jnp.int32))["params"]
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        return state.replace(step=jnp.zeros([], jnp.int32))  # an array, so it checkpoints

    return Compiled(
        # Jitted: one compilation instead of one per initializer and optimizer-state leaf.
        create_state=jax.jit(create_state),
        # The train state (params, optimizer state) is donated: updated in place.
        train_step=jax.jit(train_step, donate_argnums=(0,)),
        eval_loss=jax.jit(eval_loss, static_argnums=(1,)),
        generate=jax.jit(generate, static_argnums=(1, 5)),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(
        description="Character-level Transformer (Flax Linen) on Python's help topics, "
        "trained with adamw_jax.adamw; checkpoints and resumes with orbax.",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps (default {d.steps}; {SMALL['steps']} with --small)",
    )
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({d.lr})")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW's decoupled decay (%(default)s; not on biases, norms, embeddings)",
    )
    p.add_argument(
        "--accum", type=int, default=None, help=f"micro-batches per optimizer step ({d.accum})"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help=f"sequences per micro-batch ({d.batch_size})"
    )
    p.add_argument("--amsgrad", action="store_true", help="AdamW with AMSGrad")
    p.add_argument(
        "--moments",
        choices=tuple(MOMENT_DTYPES),
        default=d.moments,
        help="storage of AdamW's moments: float32, bfloat16, blockwise 8-bit or 4-bit codes, "
        "or 8-bit first and 4-bit second (leaves under 4096 elements stay float32) "
        "(%(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of init, batches, sampling (%(default)s)"
    )
    p.add_argument("--small", action="store_true", help="tiny model, few steps (a smoke test)")
    p.add_argument(
        "--ckpt-dir",
        default="checkpoints/char_transformer",
        help="where checkpoints go (%(default)s)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=100,
        help="optimizer steps between checkpoints, 0: never (%(default)s)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=100,
        help="optimizer steps between evaluations (%(default)s)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many optimizer steps, as if interrupted (the "
        "schedule still spans --steps)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    overrides = dict(SMALL) if args.small else {}
    for name in ("steps", "lr", "accum", "batch_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    overrides.update(weight_decay=args.weight_decay, amsgrad=args.amsgrad, moments=args.moments)
    args.config = dataclasses.replace(Config(), **overrides)
    c = args.config
    if c.steps < 1 or c.accum < 1 or c.batch_size < 1 or c.lr <= 0 or c.weight_decay < 0:
        p.error(
            f"need --steps, --accum, --batch-size >= 1, --lr > 0, --weight-decay >= 0; "
            f"got {c.steps}, {c.accum}, {c.batch_size}, {c.lr}, {c.weight_decay}"
        )
    if c.steps <= c.warmup:
        p.error(f"need --steps > the {c.warmup} warmup steps of this configuration; got {c.steps}")
    if args.save_every < 0 or args.eval_every < 1:
        p.error("need --save-every >= 0 and --eval-every >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains (or resumes) and returns a summary.

    Returns a dict with ``losses`` (mean train loss of each optimizer step run in this
    call), ``val_loss`` (nats/char), ``bpc``, ``sample``, ``state`` (``{"params",
    "opt_state", "step"}`` at the end), ``start_step``, ``end_step``, ``wall_time``.
    """
    args = parse_args(argv)
    cfg: Config = args.config
    data = CharData(load_text())
    run = build(cfg, data.vocab_size)
    key = jax.random.key(args.seed)
    abstract = jax.eval_shape(run.create_state, key)  # shapes and dtypes, nothing computed
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    print(
        f"text: {len(data.train) + len(data.val):,} chars, vocab {data.vocab_size}; "
        f"model: {n_params:,} params; {cfg.steps} steps x {cfg.accum} micro-batches of "
        f"{cfg.batch_size}x{cfg.block}; jax on {jax.default_backend()}"
    )
    print(
        masks.describe(masks.by_name(), abstract.params).splitlines()[-1]
        + " (no decay on biases, LayerNorm scales, embeddings)"
    )
    print(describe_moments(cfg.moments, abstract.opt_state, n_params))

    manager = checkpoint_manager(args.ckpt_dir) if (args.save_every or args.resume) else None
    micro = 0  # the data position: index of the next micro-batch
    if args.resume and manager is not None and manager.latest_step() is not None:
        step = manager.latest_step()
        target = {"params": abstract.params, "opt_state": abstract.opt_state, "step": abstract.step}
        restored, meta = restore_checkpoint(manager, step, target)
        state = abstract.replace(**restored)
        micro = int(meta["data_position"])
        if meta.get("seed", args.seed) != args.seed:
            raise ValueError(
                f"checkpoint {step} was written with --seed {meta['seed']}, this run has "
                f"--seed {args.seed}: the data order would not continue; pass the same seed"
            )
        if micro != int(state.step) or micro != step * cfg.accum:
            raise ValueError(
                f"checkpoint {step}: data position {micro} does not match step "
                f"{int(state.step)} with accum={cfg.accum}"
            )
        print(f"resumed from step {step} in {args.ckpt_dir} (data position {micro})")
    else:
        if args.resume:
            print(f"no checkpoint in {args.ckpt_dir}: starting from scratch")
        # Committed to the device, as restored arrays are: a fresh and a resumed run then
        # use the same compiled step (jit specializes on where its inputs are committed).
        state = jax.device_put(run.create_state(key), jax.devices()[0])

    vx, vy = zip(
        *(
            CharData.batch(data.val, args.seed + 1, i, cfg.batch_size, cfg.block)
            for i in range(cfg.eval_batches)
        ),
        strict=True,
    )
    val_batches = (jnp.asarray(np.stack(vx)), jnp.asarray(np.stack(vy)))

    start_step = micro // cfg.accum
    end_step = cfg.steps if args.stop_after is None else min(cfg.steps, args.stop_after)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(
        range(start_step + 1, end_step + 1),
        desc="train",
        disable=not args.progress,
        dynamic_ncols=True,
    )
    for step in bar:
        total = 0.0
        for _ in range(cfg.accum):
            x, y = CharData.batch(data.train, args.seed, micro, cfg.batch_size, cfg.block)
            state, loss = run.train_step(state, jnp.asarray(x), jnp.asarray(y))
            micro += 1
            total += float(loss)
        losses.append(total / cfg.accum)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % args.eval_every == 0 and step != cfg.steps:
            val = float(run.eval_loss(state.params, state.apply_fn, *val_batches))
            bar.write(
                f"step {step:5d}  train loss {losses[-1]:.3f}  val {val:.3f} nats/char "
                f"= {val / math.log(2):.3f} bits/char"
            )
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(
                manager,
                step,
                {"params": state.params, "opt_state": state.opt_state, "step": state.step},
                {"data_position": micro, "seed": args.seed, "config": dataclasses.asdict(cfg)},
            )
    bar.close()
    wall = time.perf_counter() - t0

    val = float(run.eval_loss(state.params, state.apply_fn, *val_batches))
    train = ""
    if losses:  # the mean over a window is less noisy than one step's two micro-batches
        tail = losses[-100:]
        train = (
            f"train loss {losses[-1]:.4f} (last step), {np.mean(tail):.4f} (mean of the last "
            f"{len(tail)}); "
        )
    print(
        f"after {end_step} steps: {train}val loss {val:.4f} nats/char, "
        f"{val / math.log(2):.4f} bits/char; {wall:.1f} s"
    )
    prompt = "The "
    buf = np.zeros(cfg.block, np.int32)
    buf[: len(prompt)] = data.encode(prompt)
    out = run.generate(
        state.params,
        state.apply_fn,
        jax.random.key(args.seed + 2),
        jnp.asarray(buf),
        jnp.int32(len(prompt)),
        cfg.sample_chars,
    )
    sample = prompt + data.decode(np.asarray(out))
    print("sample:\n" + sample)
    if manager is not None:
        manager.close()
    return {
        "losses": losses,
        "val_loss": val,
        "bpc": val / math.log(2),
        "sample": sample,
        "state": {"params": state.params, "opt_state": state.opt_state, "step": state.step},
        "start_step": start_step,
        "end_step": end_step,
        "wall_time": wall,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
