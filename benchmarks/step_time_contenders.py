"""The trees and the contenders that ``benchmarks/step_time.py`` times.

A contender is set up once per tree and then stepped again and again on the same donated
buffers: :class:`Contender` holds its step function and its current arguments. The
bandwidth probe's C++ loop ships in the fused kernel's extension (``csrc/fused_adamw.cc``);
this module registers and calls it.
"""

from __future__ import annotations

import functools
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
# The contender whose time is the limit, and the one every ratio is to.
PROBE, REFERENCE = "bandwidth probe", "optax.adamw"
# The probe's FFI target, and its handler's symbol in the kernel's extension.
PROBE_TARGET, _PROBE_SYMBOL = "adamw_jax_stream_probe", "AdamwJaxStreamProbe"


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


@functools.cache
def probe_available() -> bool:
    """Whether the C++ bandwidth probe loads (CPU only); registers it on first use."""
    return fused.register_cpu_target(PROBE_TARGET, _PROBE_SYMBOL)


def _native_probe() -> bool:
    """Whether the probe runs the C++ loop here (else its XLA version)."""
    return jax.default_backend() == "cpu" and probe_available()


def stream_probe(
    params: optax.Params, grads: optax.Updates, mu: optax.Updates, nu: optax.Updates
) -> tuple[optax.Params, tuple[optax.Updates, optax.Updates]]:
    """The C++ bandwidth probe: ``p + g, m + g, v + g`` in place, float32 leaves.

    The same memory traffic and call structure as the kernel's step (read 4 arrays, write
    3), with one addition per element: what the machine can move in this pattern. Needs
    :func:`probe_available`; returns ``(params, (mu, nu))``.
    """
    treedef = jax.tree.structure(params)
    columns = [treedef.flatten_up_to(t) for t in (params, grads, mu, nu)]
    per_leaf = [list(x) for x in zip(*columns, strict=True)]
    out = fused.aliased_call(PROBE_TARGET, per_leaf, (0, 2, 3), lambda k: [])
    p, m, v = (jax.tree.unflatten(treedef, out[k::3]) for k in range(3))
    return p, (m, v)


def probe_step(params, grads, state):
    """Reads p, g, m, v and writes p, m, v once: the step's memory traffic, no arithmetic."""
    if _native_probe() and jax.tree.leaves(params):
        return stream_probe(params, grads, *state)
    m, v = state
    add = jax.tree.map
    return add(jnp.add, params, grads), (add(jnp.add, m, grads), add(jnp.add, v, grads))


def jax_contenders(params_np, grads_np) -> list[Contender]:
    """The bandwidth probe, adamw_jax's three steps and optax.adamw, each on its own copy."""
    grads = jax.tree.map(jnp.asarray, grads_np)

    def fresh():
        return jax.tree.map(jnp.array, params_np)

    def optax_protocol(name: str, tx: optax.GradientTransformation, note: str = ""):
        params = fresh()
        return jax_contender(name, optax_step(tx), params, grads, tx.init(params), note)

    return [
        _probe_contender(fresh(), grads),
        optax_protocol(
            "adamw_jax.adamw (Optax protocol)", adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        ),
        optax_protocol(
            "adamw_jax.adamw packed (Optax protocol)",
            adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, moment_layout="packed"),
            'moment_layout="packed"',
        ),
        _fused_contender(fresh(), grads),
        optax_protocol(REFERENCE, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)),
    ]


def _probe_contender(params, grads) -> Contender:
    state = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))
    note = "C++ same-pattern probe" if _native_probe() else "XLA probe"
    return jax_contender(PROBE, probe_step, params, grads, state, note)


def _fused_contender(params, grads) -> Contender:
    opt = fused.fused_adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    state = opt.init(params)
    note = "C++ kernel" if opt.kernel_used(params, grads, state) else "XLA fallback"
    return jax_contender("adamw_jax.fused_adamw", opt.step, params, grads, state, note)


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
