"""Memory, quality and speed of AdamW's state in float32, bfloat16, blockwise int8 and int4.

Prints three tables:

1. optimizer-state bytes per parameter on a transformer-shaped tree (about 17M parameters);
2. final losses of the same runs (same seed, same settings) with fp32, bf16, int8 and int4
   moments on a least-squares problem and on an MLP trained on scikit-learn's digits;
3. the int8, int4 and fp32 step times on the transformer-shaped tree, measured interleaved
   in this run, and their ratios to fp32's.

Usage::

    python benchmarks/memory.py            # full run (about a minute on 2 CPU cores)
    python benchmarks/memory.py --quick    # smaller tree and fewer steps
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax

MOMENTS = {
    "fp32": {},
    "bf16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    "int8": {"mu_dtype": "int8", "nu_dtype": "int8"},
    "int4": {"mu_dtype": "int4", "nu_dtype": "int4"},
}


def transformer_params(vocab: int, d: int, layers: int, seed: int = 0) -> dict:
    """A decoder-only transformer's parameter shapes, filled with small random values."""
    shapes = {"embed": (vocab, d), "final_norm": {"scale": (d,), "bias": (d,)}}
    for i in range(layers):
        shapes[f"layer_{i}"] = {
            "attn": {"qkv": (d, 3 * d), "qkv_bias": (3 * d,), "out": (d, d), "out_bias": (d,)},
            "mlp": {"up": (d, 4 * d), "up_bias": (4 * d,), "down": (4 * d, d), "down_bias": (d,)},
            "norm1": {"scale": (d,), "bias": (d,)},
            "norm2": {"scale": (d,), "bias": (d,)},
        }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    arrays = [0.02 * jax.random.normal(k, s) for k, s in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, arrays)


def bytes_table(params: dict) -> dict[str, float]:
    n = sum(x.size for x in jax.tree.leaves(params))
    out = {}
    for name, kw in MOMENTS.items():
        state = jax.eval_shape(adamw_jax.adamw(1e-3, **kw).init, params)
        out[name] = adamw_jax.state_nbytes(state) / n
    return out


def step_times(params: dict, repeats: int) -> dict[str, float]:
    """Median seconds of one jitted AdamW step (update + apply): fp32, int8, int4 interleaved."""
    grads = jax.tree.map(lambda p: 0.01 * jnp.sin(1000.0 * p), params)
    runners = {}
    for name in ("fp32", "int8", "int4"):
        tx = adamw_jax.adamw(1e-3, **MOMENTS[name])

        def step(p, s, g, tx=tx):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p)
        p, s = fn(p, s, grads)  # compile
        jax.block_until_ready(p)
        runners[name] = [fn, p, s]
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            fn, p, s = runner
            t0 = time.perf_counter()
            p, s = fn(p, s, grads)
            jax.block_until_ready((p, s))
            times[name].append(time.perf_counter() - t0)
            runner[1], runner[2] = p, s
    return {name: float(np.median(t)) for name, t in times.items()}


def least_squares(kw: dict, steps: int) -> float:
    ka, kw_, kn = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (512, 128))
    y = a @ jax.random.normal(kw_, (128, 64)) + 0.1 * jax.random.normal(kn, (512, 64))
    tx = adamw_jax.adamw(3e-3, weight_decay=1e-2, **kw)

    def loss(w):
        return jnp.mean((a @ w - y) ** 2)

    def step(carry, _):
        w, s = carry
        updates, s = tx.update(jax.grad(loss)(w), s, w)
        return (optax.apply_updates(w, updates), s), None

    w0 = jnp.zeros((128, 64))
    (w, _), _ = jax.jit(lambda w: jax.lax.scan(step, (w, tx.init(w)), length=steps))(w0)
    return float(loss(w))


def digits_mlp(kw: dict, steps: int) -> tuple[float, float]:
    """A 64-256-256-10 MLP on the digits (80/20 split), minibatches of 64; final losses."""
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    split = int(0.8 * len(x))
    tr, te = perm[:split], perm[split:]
    xtr, ytr, xte, yte = map(jnp.asarray, (x[tr], labels[tr], x[te], labels[te]))
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)

    def dense(k, m, n):
        return {"w": jax.random.normal(k, (m, n)) * np.float32(np.sqrt(2.0 / m)), "b": jnp.zeros(n)}

    params = {"l1": dense(k1, 64, 256), "l2": dense(k2, 256, 256), "l3": dense(k3, 256, 10)}

    def loss(p, xb, yb):
        h = jax.nn.relu(xb @ p["l1"]["w"] + p["l1"]["b"])
        h = jax.nn.relu(h @ p["l2"]["w"] + p["l2"]["b"])
        logits = h @ p["l3"]["w"] + p["l3"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    tx = adamw_jax.adamw(1e-3, weight_decay=1e-2, mask=adamw_jax.masks.by_ndim(2), **kw)
    batches = np.random.default_rng(1).integers(0, split, size=(steps, 64))

    def step(carry, idx):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p, xtr[idx], ytr[idx]), s, p)
        return (optax.apply_updates(p, updates), s), None

    run = jax.jit(lambda p, b: jax.lax.scan(step, (p, tx.init(p)), b))
    (p, _), _ = run(params, jnp.asarray(batches))
    return float(loss(p, xtr, ytr)), float(loss(p, xte, yte))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller tree, fewer steps")
    args = parser.parse_args()
    vocab, d, layers = (4096, 256, 2) if args.quick else (8192, 512, 4)
    steps = 100 if args.quick else 1000
    repeats = 5 if args.quick else 15

    params = transformer_params(vocab, d, layers)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"Transformer-shaped tree: {n / 1e6:.2f}M parameters "
        f"(vocab {vocab}, d_model {d}, {layers} layers)"
    )
    print("\nOptimizer-state bytes per parameter (adamw, both moments):")
    table = bytes_table(params)
    for name, b in table.items():
        print(f"  {name:5s} {b:6.3f}   ({table['fp32'] / b:4.2f}x smaller than fp32)")

    print(f"\nFinal loss with the same seed and settings ({steps} steps):")
    print(
        f"  {'moments':8s} {'least sq.':>10s} {'vs fp32':>8s} {'digits train':>13s} "
        f"{'vs fp32':>8s} {'digits test':>12s} {'vs fp32':>8s}"
    )
    ref = None
    for name, kw in MOMENTS.items():
        ls = least_squares(kw, steps)
        tr, te = digits_mlp(kw, steps)
        ref = ref or (ls, tr, te)
        rel = [f"{100 * (v / r - 1):+7.2f}%" for v, r in zip((ls, tr, te), ref, strict=True)]
        print(f"  {name:8s} {ls:10.5f} {rel[0]} {tr:13.5f} {rel[1]} {te:12.5f} {rel[2]}")

    print(f"\nStep time (jit, donated buffers, median of {repeats}, interleaved):")
    t = step_times(params, repeats)
    for name, sec in t.items():
        print(f"  {name:5s} {1e3 * sec:8.2f} ms")
    print(f"  int8 / fp32 = {t['int8'] / t['fp32']:.2f}x")
    print(f"  int4 / fp32 = {t['int4'] / t['fp32']:.2f}x")


if __name__ == "__main__":
    main()
