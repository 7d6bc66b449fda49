"""The trees and the contenders that :mod:`adamw_jax.benchmark` times.

A contender is set up once per tree and then stepped again and again on the same donated
buffers: :class:`Contender` holds its step function and its current arguments.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import fused
from adamw_jax.alias import adamw

LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-2


def tree_shapes(
    name: str, scale: float, many_leaves: int, blocks: int = 12
) -> dict[str, tuple[int, ...]]:
    """Leaf shapes of a benchmark tree; ``scale`` multiplies its parameter count."""
    if name == "array16m":
        return {"w": (max(1, int(16 * 2**20 * scale)),)}
    if name == "array64m":
        return {"w": (max(1, int(64 * 2**20 * scale)),)}
    if name == "gpt":  # GPT-2-like: blocks of 16 leaves, embeddings and a final norm
        root = math.sqrt(scale)
        d = max(8, round(512 * root / 8) * 8)
        vocab, ctx = max(8, int(8192 * root)), max(8, int(1024 * root))
        shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f.scale": (d,), "ln_f.bias": (d,)}
        for i in range(blocks):
            block = {
                "ln_1.scale": (d,),
                "ln_1.bias": (d,),
                "attn.query.kernel": (d, d),
                "attn.query.bias": (d,),
                "attn.key.kernel": (d, d),
                "attn.key.bias": (d,),
                "attn.value.kernel": (d, d),
                "attn.value.bias": (d,),
                "attn.proj.kernel": (d, d),
                "attn.proj.bias": (d,),
                "ln_2.scale": (d,),
                "ln_2.bias": (d,),
                "mlp.fc.kernel": (d, 4 * d),
                "mlp.fc.bias": (4 * d,),
                "mlp.proj.kernel": (4 * d, d),
                "mlp.proj.bias": (d,),
            }
            shapes |= {f"h{i}.{k}": v for k, v in block.items()}
        return shapes
    if name == "many":
        size = max(1, int(1000 * scale))
        return {f"p{i:04d}": (size,) for i in range(many_leaves)}
    raise ValueError(f"unknown tree {name!r}; choose from array16m, array64m, gpt, many.")


TREE_TITLES = {
    "array16m": "one 16M-param array",
    "array64m": "one 64M-param array",
    "gpt": "GPT-like, 196 leaves",
    "many": "many small leaves",
}


def make_tree(shapes: dict[str, tuple[int, ...]], seed: int, std: float) -> dict[str, np.ndarray]:
    """Random float32 arrays of the given shapes (NumPy, so that every contender copies)."""
    rng = np.random.default_rng(seed)
    return {k: (std * rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}


@dataclass
class Contender:
    """One optimizer step under test, with the buffers it steps on."""

    name: str
    step: Callable[[], None]  # one step on the current buffers
    sync: Callable[[], None]  # waits until the last step has finished
    compile_s: float | None = None
    peak_mb: float | None = None
    times_ms: list[float] = field(default_factory=list)
    note: str = ""


def _peak_mb(compiled: Any) -> float | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    peak = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return peak / 2**20


def jax_contender(name: str, fn, params, grads, state, note: str = "") -> Contender:
    """Compiles ``fn(params, grads, state) -> (params, state)`` with donation and wraps it."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0, 2)).lower(params, grads, state).compile()
    compile_s = time.perf_counter() - start
    carry = [params, state]

    def step():
        carry[0], carry[1] = compiled(carry[0], grads, carry[1])

    def sync():
        jax.block_until_ready(carry)

    return Contender(name, step, sync, compile_s, _peak_mb(compiled), note=note)


def optax_step(tx: optax.GradientTransformation):
    """The Optax protocol's training step: update, then apply_updates, in one function."""

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def probe_step(params, grads, state):
    """Reads p, g, m, v and writes p, m, v once: the step's memory traffic, no arithmetic."""
    if fused.kernel_available() and jax.default_backend() == "cpu" and jax.tree.leaves(params):
        return fused.stream_probe(params, grads, *state)
    m, v = state
    add = jax.tree.map
    return add(jnp.add, params, grads), (add(jnp.add, m, grads), add(jnp.add, v, grads))


def jax_contenders(params_np, grads_np) -> list[Contender]:
    """The bandwidth probe, adamw_jax's three steps and optax.adamw, each on its own copy."""
    grads = jax.tree.map(jnp.asarray, grads_np)

    def fresh():
        return jax.tree.map(jnp.array, params_np)

    out = []
    p = fresh()
    zeros = jax.tree.map(jnp.zeros_like, p)
    probe_note = "C++ same-pattern probe" if fused.kernel_available() else "XLA probe"
    if jax.default_backend() != "cpu":
        probe_note = "XLA probe"
    out.append(
        jax_contender(
            "bandwidth probe",
            probe_step,
            p,
            grads,
            (zeros, jax.tree.map(jnp.zeros_like, p)),
            probe_note,
        )
    )
    tx = adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    p = fresh()
    out.append(
        jax_contender("adamw_jax.adamw (Optax protocol)", optax_step(tx), p, grads, tx.init(p))
    )
    tx = adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, moment_layout="packed")
    p = fresh()
    name = "adamw_jax.adamw packed (Optax protocol)"
    out.append(jax_contender(name, optax_step(tx), p, grads, tx.init(p), 'moment_layout="packed"'))
    opt = fused.fused_adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    p = fresh()
    state = opt.init(p)
    note = "C++ kernel" if opt.kernel_used(p, grads, state) else "XLA fallback"
    out.append(jax_contender("adamw_jax.fused_adamw", opt.step, p, grads, state, note))
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    p = fresh()
    out.append(jax_contender("optax.adamw", optax_step(tx), p, grads, tx.init(p)))
    return out


def torch_contenders(params_np, grads_np) -> list[Contender]:
    """torch.optim.AdamW with its three implementations, if PyTorch is installed."""
    try:
        import torch
    except ImportError:
        return []
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    out = []
    for label, kwargs in (
        ("foreach=False", {"foreach": False}),
        ("foreach=True", {"foreach": True}),
        ("fused=True", {"fused": True}),
    ):
        params = []
        for key, value in params_np.items():
            t = torch.tensor(value, device=device, requires_grad=True)
            t.grad = torch.tensor(grads_np[key], device=device)
            params.append(t)
        try:
            opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, **kwargs)
        except (RuntimeError, ValueError) as err:  # e.g. no fused kernel on this device
            print(f"torch AdamW {label}: skipped ({err})")
            continue
        opt.step()  # creates the state, so that timed steps do not allocate it
        sync()
        peak = None
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        out.append(Contender(f"torch AdamW {label}", opt.step, sync, None, peak, note=device))
    return out
