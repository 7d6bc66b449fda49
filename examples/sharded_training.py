"""A character-level language model trained data- and model-parallel, its AdamW state sharded.

The model reads the previous ``CONTEXT`` characters and predicts the next one: a character
embedding, then a two-layer MLP (Megatron-style: the first layer split by columns, the second
by rows over the ``"model"`` mesh axis), then logits. The batch is split over the ``"data"``
axis. The text is the help-topic documentation that ships with Python (``pydoc_data.topics``),
so nothing is downloaded.

The optimizer state is created with :func:`adamw_jax.sharding.init`: every moment is born on
the devices that hold its parameter's shard, and the jitted step (with the state's shardings
as ``out_shardings``) keeps it there with no communication for the optimizer. ``--zero``
additionally splits the moments over the ``"data"`` axis (ZeRO-1). Before training, the script
prints the optimizer-state bytes each device holds, for one device, for the sharded state and
for ZeRO-1, computed from abstract params without allocating anything.

On a CPU-only machine the script asks JAX for 8 host devices (``XLA_FLAGS``, set before JAX
starts, unless you set it yourself); on GPUs or TPUs it uses the accelerators as they are::

    python examples/sharded_training.py                 # 8 CPU devices, 300 steps
    python examples/sharded_training.py --zero          # moments also split over "data"
    python examples/sharded_training.py --quick         # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adamw_jax
from adamw_jax import sharding

CONTEXT = 16


def load_text() -> str:
    """Python's bundled help topics, in a fixed order, as plain ASCII."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text.encode("ascii", "ignore").decode()


def make_mesh(model_parallel: int) -> jax.sharding.Mesh:
    """A ("data", "model") mesh over all devices."""
    n = jax.device_count()
    if n % model_parallel:
        raise ValueError(f"--model-parallel={model_parallel} must divide the {n} devices.")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((n // model_parallel, model_parallel), ("data", "model"), auto)


# Where each parameter lives: the MLP split Megatron-style over "model", the rest replicated.
SPECS = {
    "embed": P(),
    "w1": P(None, "model"),
    "b1": P("model"),
    "w2": P("model", None),
    "b2": P(),
}


def init_params(seed: int, vocab: int, embed: int, hidden: int) -> dict[str, np.ndarray]:
    """Host (NumPy, float32) initial parameters."""
    rng = np.random.default_rng(seed)
    d_in = CONTEXT * embed

    def normal(*shape, scale):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    return {
        "embed": normal(vocab, embed, scale=0.1),
        "w1": normal(d_in, hidden, scale=d_in**-0.5),
        "b1": np.zeros(hidden, np.float32),
        "w2": normal(hidden, vocab, scale=hidden**-0.5),
        "b2": np.zeros(vocab, np.float32),
    }


def loss_fn(params, x, y):
    """Mean cross-entropy (nats) of next-character predictions."""
    h = params["embed"][x].reshape(x.shape[0], -1)
    h = jax.nn.gelu(h @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def bytes_per_device(tree) -> dict[int, int]:
    """Bytes each device holds of ``tree`` (arrays or sharded ``ShapeDtypeStruct``)."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            out[device.id] = out.get(device.id, 0) + nbytes
    return out


def report_state_bytes(tx, params, mesh) -> None:
    """Per-device optimizer-state bytes for one device, sharded and ZeRO-1 (nothing allocated)."""
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in params.items()
    }
    one = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P()))
        for k, v in params.items()
    }
    rows = [
        ("one device (or replicated)", bytes_per_device(sharding.init(tx, one))),
        ("sharded like the params", bytes_per_device(sharding.init(tx, abstract))),
        ("ZeRO-1 over 'data'", bytes_per_device(sharding.init(tx, abstract, zero_axis="data"))),
    ]
    for name, per_device in rows:
        most = max(per_device.values())
        print(f"  optimizer state per device, {name:28s} {most:>10,d} bytes")


def main(argv: Sequence[str] | None = None) -> float:
    """Trains; returns the mean loss (bits per character) of the last tenth of the steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--embed", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument(
        "--model-parallel",
        type=int,
        default=None,
        help='size of the "model" axis (default: 2 when the device count is even, else 1)',
    )
    parser.add_argument("--zero", action="store_true", help="ZeRO-1: split moments over data")
    parser.add_argument("--quick", action="store_true", help="a tiny model and 20 steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.hidden = min(args.steps, 20), 64, 64
    if args.steps < 1:
        parser.error(f"--steps must be >= 1; got {args.steps}")

    text = load_text()
    chars = sorted(set(text))
    ids = np.frombuffer(text.encode(), np.uint8)
    lookup = np.zeros(256, np.int32)
    lookup[np.frombuffer("".join(chars).encode(), np.uint8)] = np.arange(len(chars))
    data = lookup[ids]

    if args.model_parallel is None:
        args.model_parallel = 2 if jax.device_count() % 2 == 0 else 1
    if args.model_parallel < 1 or jax.device_count() % args.model_parallel:
        parser.error(f"--model-parallel={args.model_parallel} must divide {jax.device_count()}")
    mesh = make_mesh(args.model_parallel)
    if args.batch % mesh.shape["data"]:
        parser.error(f"--batch={args.batch} must be a multiple of the data axis {mesh.shape}")
    print(f"{jax.device_count()} devices ({jax.devices()[0].platform}), mesh {dict(mesh.shape)}")
    param_sh = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    batch_sh = NamedSharding(mesh, P("data"))
    host = init_params(args.seed, len(chars), args.embed, args.hidden)
    params = jax.device_put(host, param_sh)

    tx = adamw_jax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(args.steps // 10, 1), args.steps),
        weight_decay=0.1,
        mask=adamw_jax.masks.by_ndim(2),
    )
    zero_axis = "data" if args.zero else None
    report_state_bytes(tx, params, mesh)
    state = sharding.init(tx, params, zero_axis=zero_axis)
    state_sh = sharding.state_shardings(tx, params, zero_axis=zero_axis)
    held = bytes_per_device(state)
    print(f"  this run holds {min(held.values()):,d}..{max(held.values()):,d} bytes per device")

    def train_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    step = jax.jit(train_step, out_shardings=(param_sh, state_sh, None), donate_argnums=(0, 1))
    rng = np.random.default_rng(args.seed)
    every = max(args.steps // 10, 1)
    start, losses, first = time.perf_counter(), [], None
    for t in range(args.steps):
        pos = rng.integers(0, len(data) - CONTEXT - 1, args.batch)
        x = jax.device_put(data[pos[:, None] + np.arange(CONTEXT)], batch_sh)
        y = jax.device_put(data[pos + CONTEXT], batch_sh)
        params, state, loss = step(params, state, x, y)
        losses.append(loss)
        if (t + 1) % every == 0 or t + 1 == args.steps:
            window = np.mean([float(v) for v in losses[-every:]]) / np.log(2)
            first = window if first is None else first
            print(f"step {t + 1:5d}  loss {window:.3f} bits/char (mean of the last {every})")
    elapsed = time.perf_counter() - start
    final = float(np.mean([float(v) for v in losses[-every:]]) / np.log(2))
    print(f"loss {first:.3f} -> {final:.3f} bits/char in {args.steps} steps, {elapsed:.1f} s")
    return final


if __name__ == "__main__":
    # Before JAX starts its backend (importing it does not): 8 devices on a CPU-only host.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    main(sys.argv[1:])
