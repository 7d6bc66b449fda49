"""Training quality of AdamW with float32, int8 and int4 moments, and where int4's error is.

For each task, moment storage and seed, the same run (same data order, same init) with
``adamw(mu_dtype=m, nu_dtype=m)`` (``--moments int8-int4``: the first moment in 8 bits,
the second in 4); printed: the mean train loss of the last 100 steps, the validation loss
at the end, and each one's difference from float32 with the same seed.

* ``digits``: ``examples/train_digits.py``'s Flax NNX MLP (64-256-256-10) on
  scikit-learn's digits, AdamW (lr 2e-3, decay 1e-2, biases not decayed), 1500 steps of 64
  (``--digits-steps``). With the default ``min_quantize_size`` (4096) the first two
  kernels are quantized (96% of the parameters).
* ``char``: ``examples/char_transformer.py``'s character-level Transformer (630k
  parameters), its default configuration: 1000 optimizer steps (``--char-steps``).
* ``lsq``: ``benchmarks/memory.py``'s least-squares problem (AdamW, lr 3e-3, 1000 steps).
* ``quad``: a diagonal quadratic whose curvatures span two decades, one per entry (AdamW,
  lr 1e-2, 400 steps): each block mixes entries whose second moments differ by more than
  the 4-bit unsigned book's range.

``lsq`` and ``quad`` have no validation set: both columns are the final loss.

What the int4 storage does can be changed for a comparison (of the digits, lsq and quad
tasks; passed to ``adamw`` as a :class:`~adamw_jax.quantize.QuantizedStorage`, which the
fused kernel does not implement, so those runs take the XLA code):
``--int4-first-moment-rounding nearest`` rounds the 4-bit first moment to nearest instead
of stochastically; ``--int4-second-moment-format e3m1`` stores the second moment's root
with 3 exponent bits and 1 mantissa bit (range 192, steps of up to 50%) instead of 2 and 2
(range 14, steps of up to 25%).

``--shadow`` trains the char LM with float32 AdamW for ``--shadow-steps`` steps and feeds
the same clipped gradients to ``scale_by_adam`` with int4 moments (both, the first only,
the second only) and int8 moments; it prints, per 100 steps, the relative error of each
one's step direction from float32's (``|d - d32| / |d32|`` over all leaves) and the ratio
of their norms.

Usage::

    python benchmarks/lowbit_quality.py                           # digits and char, seeds 0, 1
    python benchmarks/lowbit_quality.py --tasks digits --seeds 0  # a quick look
    python benchmarks/lowbit_quality.py --tasks lsq quad --seeds 0 \
        --int4-first-moment-rounding nearest
    python benchmarks/lowbit_quality.py --tasks quad --seeds 0 --int4-second-moment-format e3m1
    python benchmarks/lowbit_quality.py --tasks digits --moments fp32 int4 --block-size 32
    python benchmarks/lowbit_quality.py --tasks digits --moments fp32 bf16  # a small perturbation
    python benchmarks/lowbit_quality.py --tasks --shadow --seeds 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import char_transformer
import memory
import train_digits

import adamw_jax
from adamw_jax import quantize

# adamw's (mu_dtype, nu_dtype) for each storage: the char LM's own table, so that every
# task takes the same names.
MOMENTS = char_transformer.MOMENT_DTYPES
SECOND_MOMENT_FORMATS = {
    "e2m2": quantize.CodeFormat(2, 2, False),
    "e3m1": quantize.CodeFormat(3, 1, False),
}


def _storage(moments: str, block_size: int | None = None, int4: tuple | None = None) -> dict:
    """adamw's storage keywords for ``moments``; ``int4`` replaces ``"int4"`` by the given
    ``(first, second)`` :class:`~adamw_jax.quantize.QuantizedStorage` (the comparisons'
    roundings and code books)."""
    mu_dtype, nu_dtype = MOMENTS[moments]
    if int4 is not None:
        mu_dtype = int4[0] if mu_dtype == "int4" else mu_dtype
        nu_dtype = int4[1] if nu_dtype == "int4" else nu_dtype
    return {"mu_dtype": mu_dtype, "nu_dtype": nu_dtype, "block_size": block_size}


def int4_storage(first_rounding: str, second_format: str) -> tuple | None:
    """The 4-bit moments' storage for the flags; None for the library's defaults."""
    if (first_rounding, second_format) == ("stochastic", "e2m2"):
        return None
    return (
        quantize.QuantizedStorage(4, rounding=first_rounding),
        quantize.QuantizedStorage(4, code_format=SECOND_MOMENT_FORMATS[second_format]),
    )


def digits_run(
    moments: str, seed: int, steps: int, block_size: int | None = None, int4: tuple | None = None
) -> tuple[float, float]:
    """Mean train loss of the last 100 steps and final validation loss of the digits MLP."""
    args = SimpleNamespace(
        hidden=256, seed=seed, batch_size=64, steps=steps, eval_every=100, progress=False
    )
    mask = adamw_jax.masks.by_name()
    tx = adamw_jax.adamw(2e-3, weight_decay=1e-2, mask=mask, **_storage(moments, block_size, int4))
    result = train_digits.train_one(moments, tx, train_digits.load_splits(seed), args)
    history = result["history"]
    return history["train_loss"][-1], history["val_loss"][-1]


def char_run(moments: str, seed: int, steps: int) -> tuple[float, float]:
    """Mean train loss of the last 100 steps and final validation loss of the char LM."""
    argv = ["--moments", moments, "--seed", str(seed), "--steps", str(steps)]
    result = char_transformer.main([*argv, "--save-every", "0", "--no-progress"])
    return float(np.mean(result["losses"][-100:])), result["val_loss"]


def quad_run(
    moments: str,
    seed: int,
    block_size: int | None = None,
    steps: int = 400,
    int4: tuple | None = None,
) -> float:
    """Final loss of AdamW on a quadratic whose curvatures span two decades."""
    rng = np.random.default_rng(seed)
    curvature = jnp.asarray(10.0 ** rng.uniform(-1.0, 1.0, size=(64, 96)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(64, 96)), jnp.float32)
    tx = adamw_jax.adamw(1e-2, weight_decay=1e-2, **_storage(moments, block_size, int4))

    def step(carry, _):
        w, s = carry
        updates, s = tx.update(curvature * (w - target) / w.size, s, w)
        return (optax.apply_updates(w, updates), s), None

    w0 = jnp.zeros((64, 96))
    (w, _), _ = jax.jit(lambda w: jax.lax.scan(step, (w, tx.init(w)), length=steps))(w0)
    return float(0.5 * jnp.mean(curvature * (w - target) ** 2))


def shadow(seed: int, steps: int) -> None:
    """Direction errors of int4/int8 moments fed a float32 char-LM run's gradients."""
    cfg = char_transformer.Config()
    data = char_transformer.CharData(char_transformer.load_text())
    model = char_transformer.CharTransformer(
        data.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.block
    )
    params = model.init(jax.random.key(seed), jnp.zeros((1, cfg.block), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, steps, 0.1 * cfg.lr)
    clip = optax.clip_by_global_norm(cfg.clip)
    decay = {"weight_decay": cfg.weight_decay, "mask": adamw_jax.masks.by_name()}
    ref = optax.chain(clip, adamw_jax.adamw(schedule, b2=0.99, **decay))
    variants = {
        "fp32": {},
        "int4": {"mu_dtype": "int4", "nu_dtype": "int4"},
        "int4 first only": {"mu_dtype": "int4"},
        "int4 second only": {"nu_dtype": "int4"},
        "int8": {"mu_dtype": "int8", "nu_dtype": "int8"},
    }
    txs = {k: adamw_jax.scale_by_adam(b2=0.99, **kw) for k, kw in variants.items()}

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))

    @jax.jit
    def step(params, ref_state, states, x, y):
        grads = jax.grad(char_transformer.loss_fn)(params, model.apply, x, y)
        updates, ref_state = ref.update(grads, ref_state, params)
        clipped, _ = clip.update(grads, clip.init(grads))
        out = {k: tx.update(clipped, states[k]) for k, tx in txs.items()}
        base = out["fp32"][0]
        stats = {
            k: jnp.stack(
                [norm(jax.tree.map(jnp.subtract, d, base)) / norm(base), norm(d) / norm(base)]
            )
            for k, (d, _) in out.items()
            if k != "fp32"
        }
        states = {k: s for k, (_, s) in out.items()}
        return optax.apply_updates(params, updates), ref_state, states, stats

    ref_state, states = ref.init(params), {k: tx.init(params) for k, tx in txs.items()}
    rows = []
    print(f"\nchar LM, seed {seed}: step directions fed float32 AdamW's gradients")
    print("  steps       " + "  ".join(f"{k:>22s}" for k in variants if k != "fp32"))
    print("              " + "  ".join(f"{'rel. error / norm ratio':>22s}" for _ in txs)[24:])
    for t in range(steps):
        x, y = data.batch(data.train, seed, t, cfg.batch_size * cfg.accum, cfg.block)
        params, ref_state, states, stats = step(
            params, ref_state, states, jnp.asarray(x), jnp.asarray(y)
        )
        rows.append({k: np.asarray(v) for k, v in stats.items()})
        if (t + 1) % 100 == 0:
            window = {k: np.mean([r[k] for r in rows[-100:]], axis=0) for k in rows[-1]}
            cells = "  ".join(f"{e:13.3f} / {r:6.3f}" for e, r in window.values())
            print(f"  {t - 98:4d}-{t + 1:4d}  {cells}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=["digits", "char"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--moments", nargs="+", default=["fp32", "int8", "int4"], choices=list(MOMENTS)
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="quantization block of the digits, lsq and quad runs (the char LM keeps its own)",
    )
    parser.add_argument("--digits-steps", type=int, default=1500)
    parser.add_argument("--char-steps", type=int, default=1000)
    parser.add_argument("--shadow", action="store_true")
    parser.add_argument("--shadow-steps", type=int, default=300)
    parser.add_argument(
        "--int4-first-moment-rounding", choices=("stochastic", "nearest"), default="stochastic"
    )
    parser.add_argument(
        "--int4-second-moment-format", choices=tuple(SECOND_MOMENT_FORMATS), default="e2m2"
    )
    args = parser.parse_args(argv)
    int4 = int4_storage(args.int4_first_moment_rounding, args.int4_second_moment_format)
    if int4 is not None and ("char" in args.tasks or args.shadow):
        parser.error(
            "--int4-first-moment-rounding and --int4-second-moment-format apply to the "
            "digits, lsq and quad tasks (the char LM builds its optimizer from its own table)"
        )

    def final_loss(run):
        return lambda moments, seed: (run(moments, seed),) * 2

    runners = {
        "digits": lambda m, s: digits_run(m, s, args.digits_steps, args.block_size, int4),
        "char": lambda m, s: char_run(m, s, args.char_steps),
        "lsq": final_loss(
            lambda m, s: memory.least_squares(_storage(m, args.block_size, int4), 1000)
        ),
        "quad": final_loss(lambda m, s: quad_run(m, s, args.block_size, int4=int4)),
    }
    results = {}
    for task in args.tasks:
        for seed in args.seeds:
            for moments in args.moments:
                results[task, seed, moments] = runners[task](moments, seed)
                print(f"[{task} seed {seed} {moments}] {results[task, seed, moments]}", flush=True)
    if results:
        print("\ntask    seed  moments  train (last 100)  vs fp32   val loss   vs fp32")
    for (task, seed, moments), (train, val) in results.items():
        ref = results.get((task, seed, "fp32"), (train, val))
        print(
            f"{task:7s} {seed:4d}  {moments:7s} {train:16.4f} {100 * (train / ref[0] - 1):+7.2f}% "
            f"{val:9.4f} {100 * (val / ref[1] - 1):+7.2f}%"
        )
    if args.shadow:
        shadow(args.seeds[0], args.shadow_steps)
    return results


if __name__ == "__main__":
    main()
