"""The trees and the contenders that ``benchmarks/step_time.py`` times.

A contender is set up once per tree and then stepped again and again on the same donated
buffers: :class:`Contender` holds its step function and its current arguments. The
bandwidth probes' C++ loops ship in the fused kernel's extension (``csrc/fused_adamw.cc``);
this module registers and calls them: one with the float32 step's traffic, one with the
traffic of the step on ``"int8"`` or ``"int4"`` moments (each block's codes and scales).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.machinery
import math
import runpy
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import fused, state_nbytes
from adamw_jax.alias import adamw
from adamw_jax.quantize import QuantizedArray

LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-2
# The contender whose time is the limit, the one every ratio is to, and the fused step
# that the fused steps on low-bit moments are compared with.
PROBE, REFERENCE, FUSED = "bandwidth probe", "optax.adamw", "adamw_jax.fused_adamw"
# The fused optimizer as an Optax transformation (update + apply_updates).
FUSED_UPDATE = "adamw_jax.fused_adamw (Optax protocol)"
# The probes' FFI targets, and their handlers' symbols in the kernel's extension.
PROBE_TARGET, _PROBE_SYMBOL = "adamw_jax_stream_probe", "AdamwJaxStreamProbe"
BLOCK_PROBE_TARGET, _BLOCK_PROBE_SYMBOL = "adamw_jax_block_probe", "AdamwJaxBlockProbe"
# Low-bit moment storages the fused step is timed with (--moments), and the kernel's
# `kinds` code of each (csrc/fused_adamw.cc, enum Kind).
LOWBIT = ("int8", "int4")
_KINDS = {"float32": 0, "int8": 2, "int4": 3}


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
    if name == "lm16m":
        return _lm_shapes(scale)
    raise ValueError(f"unknown tree {name!r}; choose from array16m, array64m, gpt, many, lm16m.")


def _lm_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """The 16.8M-parameter transformer-shaped tree of benchmarks/memory.py (vocab 8192,
    d_model 512, 4 layers), its sizes scaled."""
    root = math.sqrt(scale)
    d, vocab = max(8, round(512 * root / 8) * 8), max(8, int(8192 * root))
    shapes = {"embed": (vocab, d), "final_norm.scale": (d,), "final_norm.bias": (d,)}
    for i in range(4):
        layer = {
            "attn.qkv": (d, 3 * d),
            "attn.qkv_bias": (3 * d,),
            "attn.out": (d, d),
            "attn.out_bias": (d,),
            "mlp.up": (d, 4 * d),
            "mlp.up_bias": (4 * d,),
            "mlp.down": (4 * d, d),
            "mlp.down_bias": (d,),
            "norm1.scale": (d,),
            "norm1.bias": (d,),
            "norm2.scale": (d,),
            "norm2.bias": (d,),
        }
        shapes |= {f"layer_{i}.{k}": v for k, v in layer.items()}
    return shapes


def tree_title(name: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """A benchmark tree's label, its counts taken from ``shapes`` (so ``--quick`` and
    ``--scale`` label what they run)."""
    size = sum(math.prod(shape) for shape in shapes.values())
    if name in ("array16m", "array64m"):
        return f"one {_size_label(size)}-param array"
    if name == "gpt":
        return f"GPT-like, {len(shapes)} leaves"
    if name == "many":
        return "many small leaves"
    return f"transformer-shaped, {size / 1e6:.3g}M params"


def _size_label(size: int) -> str:
    """16M for 16 * 2**20, 16K for 16 * 2**10, else the count with separators."""
    for shift, unit in ((20, "M"), (10, "K")):
        if size % 2**shift == 0:
            return f"{size >> shift}{unit}"
    return f"{size:,}"


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
    probe: str = PROBE  # the probe with this contender's traffic: its limit
    moment_bytes: int | None = None  # a low-bit probe's: the bytes of the moments it moves


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


_ROOT = Path(__file__).resolve().parent.parent
# How many leaves one call takes, as the kernel's calls do (adamw_jax/fused.py).
_LEAVES_PER_CALL = 64


@functools.cache
def _probe_library() -> ctypes.CDLL | None:
    """The probes' extension (benchmarks/bandwidth_probe.cc), compiled on first use.

    Built with the kernel's own flags (setup.py's COMPILE_ARGS) into the temporary
    directory, once per version of the sources; None where it cannot be built (no
    compiler, no XLA FFI headers) or does not load.
    """
    setup = runpy.run_path(str(_ROOT / "setup.py"), run_name="setup")
    include = setup["_ffi_include_dir"]()
    if include is None:
        return None
    sources = [_ROOT / "benchmarks" / "bandwidth_probe.cc", _ROOT / "adamw_jax/csrc/fused_adamw.cc"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    library = Path(tempfile.gettempdir()) / f"adamw_jax_probe_{digest}{suffix}"
    if not library.exists():
        partial = library.with_name(library.name + f".{id(library)}.tmp")
        command = ["g++", *setup["COMPILE_ARGS"], "-shared", "-fPIC", f"-I{include}"]
        command += [f"-I{_ROOT / 'adamw_jax/csrc'}", str(sources[0]), "-o", str(partial)]
        try:
            subprocess.run(command, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        partial.replace(library)
    try:
        return ctypes.CDLL(str(library))
    except OSError:
        return None


def _register_probe(target: str, symbol: str) -> bool:
    """Registers the probes' handler ``symbol`` as the CPU FFI target ``target``."""
    library = _probe_library()
    if library is None:
        return False
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def _aliased_call(target: str, per_leaf: list[list[jax.Array]], leading, **attributes) -> list:
    """Calls ``target`` on every leaf's inputs as the kernel is called: outputs aliased to
    every input but the gradient (second), at most ``_LEAVES_PER_CALL`` leaves a call,
    ``leading(start, stop)`` the operands before the leaves'."""
    out = []
    for start in range(0, len(per_leaf), _LEAVES_PER_CALL):
        stop = min(start + _LEAVES_PER_CALL, len(per_leaf))
        operands, results, aliases = list(leading(start, stop)), [], {}
        for ins in per_leaf[start:stop]:
            for position, x in enumerate(ins):
                if position != 1:
                    aliases[len(operands) + position] = len(results)
                    results.append(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
            operands += ins
        call = jax.ffi.ffi_call(target, results, input_output_aliases=aliases)
        out += call(*operands, **attributes)
    return out


@functools.cache
def probe_available() -> bool:
    """Whether the C++ bandwidth probe builds and loads (CPU only); registers it."""
    return _register_probe(PROBE_TARGET, _PROBE_SYMBOL)


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
    out = _aliased_call(PROBE_TARGET, per_leaf, lambda start, stop: [])
    p, m, v = (jax.tree.unflatten(treedef, out[k::3]) for k in range(3))
    return p, (m, v)


def probe_step(params, grads, state):
    """Reads p, g, m, v and writes p, m, v once: the step's memory traffic, no arithmetic."""
    if _native_probe() and jax.tree.leaves(params):
        return stream_probe(params, grads, *state)
    m, v = state
    add = jax.tree.map
    return add(jnp.add, params, grads), (add(jnp.add, m, grads), add(jnp.add, v, grads))


def jax_contenders(params_np, grads_np, fused_only: bool = False) -> list[Contender]:
    """The bandwidth probe, adamw_jax's three steps and optax.adamw, each on its own copy.

    With ``fused_only``, the probe and the fused step only.
    """
    grads = jax.tree.map(jnp.asarray, grads_np)

    def fresh():
        return jax.tree.map(jnp.array, params_np)

    if fused_only:
        return [
            _probe_contender(fresh(), grads),
            _fused_contender(fresh(), grads),
            _fused_update_contender(fresh(), grads),
        ]

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
        _fused_update_contender(fresh(), grads),
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
    return jax_contender(FUSED, opt.step, params, grads, state, note)


def _fused_update_contender(params, grads) -> Contender:
    """The fused optimizer in the Optax protocol: its ``update``, then ``apply_updates``."""
    opt = fused.fused_adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    state = opt.init(params)
    return jax_contender(FUSED_UPDATE, optax_step(opt), params, grads, state, "XLA update")


@functools.cache
def block_probe_available() -> bool:
    """Whether the C++ probe of the low-bit steps loads (CPU only); registers it."""
    return _register_probe(BLOCK_PROBE_TARGET, _BLOCK_PROBE_SYMBOL)


def _moment_parts(stored: Any) -> tuple[int, tuple[Any, ...]]:
    """A stored moment's kernel kind and arrays: float32 values, or codes and scales."""
    if isinstance(stored, QuantizedArray):
        return _KINDS[f"int{stored.bits}"], (stored.codes, stored.scales)
    return _KINDS["float32"], (stored,)


def _moment_from(stored: Any, out) -> Any:
    """The probe's next outputs in the form of ``stored``."""
    if isinstance(stored, QuantizedArray):
        return dataclasses.replace(stored, codes=next(out), scales=next(out))
    return next(out)


def block_probe(block_size: int):
    """The probe with the traffic of the fused step on low-bit moments.

    Returns ``step(params, grads, (mu, nu)) -> (params, (mu, nu))`` on the moments of a
    ``fused_adamw(..., mu_dtype=q, nu_dtype=q)`` state. It takes the kernel's operands and
    work split, and streams through each chunk's share of every array the step moves (the
    params, both moments' codes and scales read and written, the gradient read), adding
    one per code and the gradient to the params; the small float32 leaves as the float32
    probe. Needs :func:`block_probe_available`.
    """

    def step(params, grads, moments):
        treedef = jax.tree.structure(params)
        stored = [treedef.flatten_up_to(m) for m in moments]  # quantized moments whole
        per_leaf, kinds = [], []
        leaves = zip(jax.tree.leaves(params), treedef.flatten_up_to(grads), *stored, strict=True)
        for p, g, m, v in leaves:
            (m_kind, m_parts), (v_kind, v_parts) = _moment_parts(m), _moment_parts(v)
            per_leaf.append([p, g, *m_parts, *v_parts])
            kinds += [m_kind, v_kind]
        kinds = np.asarray(kinds, np.uint8)
        out = iter(
            _aliased_call(
                BLOCK_PROBE_TARGET,
                per_leaf,
                lambda start, stop: [kinds[2 * start : 2 * stop]],
                block_size=np.int64(block_size),
            )
        )
        columns: list[list[Any]] = [[], [], []]
        for m, v in zip(*stored, strict=True):
            columns[0].append(next(out))
            columns[1].append(_moment_from(m, out))
            columns[2].append(_moment_from(v, out))
        p, m, v = (jax.tree.unflatten(treedef, c) for c in columns)
        return p, (m, v)

    return step


def _block_probe_contender(q: str, opt: fused.FusedAdamW, params, grads) -> Contender:
    """The probe with the traffic of ``opt``'s step on ``q`` moments."""
    adam = opt.init(params)[0]
    block = 128 if q == "int4" else 256  # the default block sizes
    moments = (adam.mu, adam.nu)
    note = f"C++ same-pattern probe ({q})"
    c = jax_contender(f"{PROBE} {q}", block_probe(block), params, grads, moments, note)
    c.probe, c.moment_bytes = c.name, state_nbytes(moments)
    return c


def lowbit_contenders(
    params_np, grads_np, moments: list[str], fused_only: bool = False
) -> list[Contender]:
    """Per low-bit storage: its probe, the fused step and (unless ``fused_only``) adamw's
    XLA step on it."""
    grads = jax.tree.map(jnp.asarray, grads_np)

    def fresh():
        return jax.tree.map(jnp.array, params_np)

    out = []
    for q in moments:
        kwargs = {"mu_dtype": q, "nu_dtype": q, "weight_decay": WEIGHT_DECAY}
        opt = fused.fused_adamw(LEARNING_RATE, **kwargs)
        if jax.default_backend() == "cpu" and block_probe_available():
            out.append(_block_probe_contender(q, opt, fresh(), grads))
        params = fresh()
        state = opt.init(params)
        note = "C++ kernel" if opt.kernel_used(params, grads, state) else "XLA fallback"
        out.append(jax_contender(f"{FUSED} {q}", opt.step, params, grads, state, note))
        out[-1].probe = f"{PROBE} {q}"
        if not fused_only:
            tx = adamw(LEARNING_RATE, **kwargs)
            params = fresh()
            name = f"adamw_jax.adamw {q} (Optax protocol)"
            out.append(jax_contender(name, optax_step(tx), params, grads, tx.init(params), "XLA"))
            out[-1].probe = f"{PROBE} {q}"
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
