"""Training quality of AdamW with float32, int8 and int4 moments, on the two examples.

For each task, moment storage and seed, the same run (same data order, same init) with
``adamw(mu_dtype=m, nu_dtype=m)``; printed: the mean train loss of the last 100 steps, the
validation loss at the end, and each one's difference from float32 with the same seed.

* ``digits``: ``examples/train_digits.py``'s Flax NNX MLP (64-256-256-10) on
  scikit-learn's digits, AdamW (lr 2e-3, decay 1e-2, biases not decayed), 1500 steps of 64
  (``--digits-steps``). Its leaves are small: with the default ``min_quantize_size`` (4096)
  the two 256-wide kernels are quantized (82% of the parameters).
* ``char``: ``examples/char_transformer.py``'s character-level Transformer (630k
  parameters), its default configuration: 1000 optimizer steps (``--char-steps``).
* ``lsq``: ``benchmarks/memory.py``'s least-squares problem (AdamW, lr 3e-3, 1000 steps);
  both columns are its final loss.

``--int4-first-moment-rounding nearest`` rounds the 4-bit first moment to nearest instead
of stochastically (what the library did first; see ``adamw_jax._moment_storage``).

``--shadow`` adds, for the digits MLP, where an int4 run's error comes from: the same
gradients fed side by side to an int4 and a float32 moment (on the float32 run's
trajectory), and the relative error of the int4 step direction, of its first moment and of
its second moment over the run.

Usage::

    python benchmarks/lowbit_quality.py                           # both tasks, seeds 0 and 1
    python benchmarks/lowbit_quality.py --tasks digits --seeds 0  # a quick look
    python benchmarks/lowbit_quality.py --tasks digits --shadow
    python benchmarks/lowbit_quality.py --tasks lsq --seeds 0 --int4-first-moment-rounding nearest
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
from adamw_jax import _moment_storage

MOMENTS = {"fp32": None, "int8": "int8", "int4": "int4"}


def digits_run(moments: str, seed: int, steps: int) -> tuple[float, float]:
    """Mean train loss of the last 100 steps and final validation loss of the digits MLP."""
    dtype = MOMENTS[moments]
    args = SimpleNamespace(
        hidden=256, seed=seed, batch_size=64, steps=steps, eval_every=100, progress=False
    )
    tx = adamw_jax.adamw(
        2e-3,
        weight_decay=1e-2,
        mask=adamw_jax.masks.by_name(),
        mu_dtype=dtype,
        nu_dtype=dtype,
    )
    result = train_digits.train_one(moments, tx, train_digits.load_splits(seed), args)
    history = result["history"]
    return history["train_loss"][-1], history["val_loss"][-1]


def char_run(moments: str, seed: int, steps: int) -> tuple[float, float]:
    """Mean train loss of the last 100 steps and final validation loss of the char LM."""
    argv = ["--moments", moments, "--seed", str(seed), "--steps", str(steps)]
    result = char_transformer.main([*argv, "--save-every", "0", "--no-progress"])
    return float(np.mean(result["losses"][-100:])), result["val_loss"]


def shadow(steps: int, seed: int = 0) -> None:
    """Relative errors of an int4 moment fed a float32 run's gradients (digits MLP)."""
    data = train_digits.load_splits(seed)
    x, y = (jnp.asarray(a) for a in data["train"])
    from flax import nnx

    model = train_digits.MLP(256, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    order = train_digits.batch_indices(len(y), 64, steps, seed)

    def loss(p, xb, yb):
        return train_digits.loss_fn(nnx.merge(graphdef, nnx.State(p)), xb, yb)

    ref = adamw_jax.adamw(2e-3, weight_decay=1e-2, mask=adamw_jax.masks.by_name())
    fp32 = adamw_jax.scale_by_adam()
    int4 = adamw_jax.scale_by_adam(mu_dtype="int4", nu_dtype="int4")
    kernel = ("l2", "kernel")

    def step(carry, idx):
        p, s_ref, s32, s4 = carry
        g = jax.grad(loss)(p, x[idx], y[idx])
        u, s_ref = ref.update(g, s_ref, p)
        d32, s32 = fp32.update(g, s32)
        d4, s4 = int4.update(g, s4)
        a, b = d4[kernel[0]][kernel[1]], d32[kernel[0]][kernel[1]]
        m4 = adamw_jax.quantize.dequantize_int4(s4.mu[kernel[0]][kernel[1]])
        v4 = jnp.square(adamw_jax.quantize.dequantize_int4(s4.nu[kernel[0]][kernel[1]]))
        m32, v32 = s32.mu[kernel[0]][kernel[1]], s32.nu[kernel[0]][kernel[1]]

        def rel(e, r):
            return jnp.linalg.norm(e - r) / jnp.linalg.norm(r)

        stats = jnp.stack([rel(a, b), rel(m4, m32), rel(v4, v32), jnp.mean(v4) / jnp.mean(v32)])
        return (optax.apply_updates(p, u), s_ref, s32, s4), stats

    init = (params, ref.init(params), fp32.init(params), int4.init(params))
    _, stats = jax.jit(lambda c, o: jax.lax.scan(step, c, o))(init, jnp.asarray(order))
    stats = np.asarray(stats)
    print(f"\nint4 vs float32 moments fed the same gradients (digits l2 kernel, {steps} steps):")
    print("  steps       |d4-d32|/|d32|  |m4-m32|/|m32|  |v4-v32|/|v32|  mean v4/mean v32")
    for lo in range(0, steps, max(steps // 5, 1)):
        window = stats[lo : lo + max(steps // 5, 1)].mean(axis=0)
        print(
            f"  {lo + 1:5d}-{lo + len(stats[lo : lo + max(steps // 5, 1)]):5d} "
            f"{window[0]:14.4f} {window[1]:15.4f} {window[2]:15.4f} {window[3]:17.4f}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "char"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--moments", nargs="+", default=list(MOMENTS), choices=list(MOMENTS))
    parser.add_argument("--digits-steps", type=int, default=1500)
    parser.add_argument("--char-steps", type=int, default=1000)
    parser.add_argument("--shadow", action="store_true")
    parser.add_argument(
        "--int4-first-moment-rounding", choices=("stochastic", "nearest"), default="stochastic"
    )
    args = parser.parse_args(argv)
    _moment_storage.INT4_FIRST_MOMENT_ROUNDING = args.int4_first_moment_rounding

    def lsq(moments: str) -> tuple[float, float]:
        dtype = MOMENTS[moments]
        loss = memory.least_squares({"mu_dtype": dtype, "nu_dtype": dtype}, 1000)
        return loss, loss

    runners = {
        "digits": lambda m, s: digits_run(m, s, args.digits_steps),
        "char": lambda m, s: char_run(m, s, args.char_steps),
        "lsq": lambda m, s: lsq(m),
    }
    results = {}
    for task in args.tasks:
        for seed in args.seeds:
            for moments in args.moments:
                results[task, seed, moments] = runners[task](moments, seed)
                print(f"[{task} seed {seed} {moments}] {results[task, seed, moments]}", flush=True)
    print("\ntask    seed  moments  train (last 100)  vs fp32   val loss   vs fp32")
    for (task, seed, moments), (train, val) in results.items():
        ref = results.get((task, seed, "fp32"), (train, val))
        print(
            f"{task:7s} {seed:4d}  {moments:7s} {train:16.4f} {100 * (train / ref[0] - 1):+7.2f}% "
            f"{val:9.4f} {100 * (val / ref[1] - 1):+7.2f}%"
        )
    if args.shadow:
        shadow(args.digits_steps)
    return results


if __name__ == "__main__":
    main()
