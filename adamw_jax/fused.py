"""A fused AdamW step: params, moments and decay updated in one pass over memory.

:func:`adamw_jax.adamw` is an Optax transformation: its ``update`` returns updates that
``optax.apply_updates`` then adds to the params. Under ``jax.jit`` on CPU, XLA turns that
into several loops over memory per leaf. :func:`fused_adamw` takes the whole step at once,
``(params, grads, state) -> (params, state)``: on CPU it calls a small C++ kernel (an XLA FFI
custom call, built by ``pip install``) that reads the params, gradients and moments of every
leaf once, writes the new ones in place of the donated inputs, and shares the work with
XLA's intra-op threads. Moments stored as blockwise ``"int8"`` or ``"int4"`` codes are
decoded, updated and re-encoded in the same pass, to the same codes and scales as the XLA
code. Elsewhere (GPU, TPU, the kernel not built, a dtype it does not take) it runs the same
step as ``adamw``'s XLA code. Its state *is* ``adamw(...)``'s state, so the two can be
swapped mid-training and checkpoints are interchangeable. The optimizer is also an Optax
transformation (``init``/``update``), for ``optax.chain``, ``flax.nnx.Optimizer`` and
Flax's ``TrainState``, whose ``update`` is ``adamw``'s.
"""

import ctypes
import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import _moment_storage, _numerics, _validate, masks
from adamw_jax._base import (
    DecayTarget,
    Hyperparameter,
    Mask,
    MomentDtype,
    ScalarOrArray,
    ScalarOrSchedule,
)
from adamw_jax.alias import adamw
from adamw_jax.decay import DecoupledWeightDecayState, _decay_scalars, _effective_coupling
from adamw_jax.moments import ScaleByAdamState, nesterov_weights
from adamw_jax.quantize import QuantizedArray

__all__ = ["FusedAdamW", "fused_adamw"]

BACKENDS = ("auto", "kernel", "xla")
_TARGET = "adamw_jax_fused_adamw"
_EXTENSION = "adamw_jax._fused_adamw_kernel"
_LEAVES_PER_CALL = 64
# How the kernel's `kinds` operand names a moment's storage (enum Kind in csrc/fused_adamw.cc).
_FLOAT32, _BFLOAT16, _INT8, _INT4 = 0, 1, 2, 3
_FLOAT_KINDS = {jnp.dtype(jnp.float32): _FLOAT32, jnp.dtype(jnp.bfloat16): _BFLOAT16}
# The quantized kinds. The kernel takes a leaf whose moments are both int8, both int4 or
# both floating: which products XLA's compiled code fuses in a mix of quantized and
# floating moments varies with the leaf's shape, so the kernel could not promise the XLA
# path's codes there; such a step takes the XLA code.
_QUANTIZED = (_INT8, _INT4)
# The kernel's `coupling` attribute (enum Decay in csrc/fused_adamw.cc) for each coupling
# the step applies: "schedule" and "adamc" are "lr" with the decay factor already scaled by
# the peak (_decay_scalars).
_LR_COUPLED, _INDEPENDENT = 1, 2
_KERNEL_COUPLING = {
    "lr": _LR_COUPLED,
    "schedule": _LR_COUPLED,
    "none": _INDEPENDENT,
    "adamc": _LR_COUPLED,
}


class FusedAdamW(NamedTuple):
    """The optimizer :func:`fused_adamw` builds: an Optax transformation with a fused step.

    Its first two fields are an ``optax.GradientTransformation``'s, so it goes wherever
    one is expected: ``optax.chain``, ``flax.nnx.Optimizer``, Flax Linen's
    ``TrainState.apply_gradients``. ``step`` is the fast path: one call that returns the
    new params, written in place of the donated ones.

    Attributes:
      init: ``params -> state``, the same state as ``adamw(...).init(params)``.
      update: ``(grads, state, params) -> (updates, state)``, Optax's protocol:
        ``adamw(...).update``, bit for bit (``params`` required). It runs ``adamw``'s XLA
        code, not the kernel: the protocol needs the updates as a tree of their own, and
        deriving them from the kernel's in-place params (``new - params``) costs a copy of
        the params and two more passes, 3.6-4.8x the fused step's time on large leaves
        against 1.35-1.8x for the XLA update (``docs/performance.md``).
      step: ``(params, grads, state) -> (params, state)``: one AdamW step. Jit it with the
        params and state donated (``jax.jit(step, donate_argnums=(0, 2))``) so that it runs
        in place.
      kernel_used: ``(params, grads, state) -> bool``: whether ``step`` takes the C++
        kernel for these arguments (False means the XLA path).
    """

    init: Callable[[optax.Params], optax.OptState]
    update: Callable[[optax.Updates, optax.OptState, optax.Params | None], tuple[Any, Any]]
    step: Callable[[optax.Params, optax.Updates, optax.OptState], tuple[Any, Any]]
    kernel_used: Callable[[optax.Params, optax.Updates, optax.OptState], bool]


@functools.cache
def kernel_available() -> bool:
    """Whether the C++ kernel was built and loads into this JAX (CPU only).

    Registers the custom call on first use and runs one tiny step through it, so that a
    kernel built against an incompatible ``jaxlib`` reports False instead of failing later.
    """
    if not _register_cpu_target(_TARGET, "AdamwJaxFusedAdamw"):
        return False
    try:
        _run_self_test()
    except Exception:  # any failure to run means: use the XLA path
        return False
    return True


@_validate.refuses_pytorch_keywords
def fused_adamw(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrArray = 0.9,
    b2: ScalarOrArray = 0.999,
    eps: ScalarOrArray = 1e-8,
    eps_root: ScalarOrArray = 0.0,
    mu_dtype: MomentDtype = None,
    weight_decay: Hyperparameter = 1e-4,
    mask: Mask = None,
    *,
    nesterov: bool = False,
    nesterov_bias_correction: str = "optax",
    decay_coupling: str = "lr",
    peak_learning_rate: float | None = None,
    amsgrad: bool = False,
    nu_dtype: MomentDtype = None,
    block_size: int | None = None,
    min_quantize_size: int | None = None,
    param_update: str | None = None,
    moment_layout: str = "tree",
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    decay_target: DecayTarget = "zero",
    backend: str = "auto",
) -> FusedAdamW:
    r"""AdamW with a fused step ``(params, grads, state) -> (params, state)``.

    The step of :func:`adamw_jax.adamw` followed by ``optax.apply_updates``, with the same
    arguments, state and numbers (to a few ulps). On CPU, float32 params and gradients with
    float32, bfloat16, ``"int8"`` or ``"int4"`` moments, and a mask of one bool per leaf,
    run through a C++ kernel that reads and writes each leaf's params and moments once: 28
    bytes per parameter with float32 moments, against about 40 for the XLA code of the
    two-part Optax step. ``"int8"`` (16 bytes per parameter, plus the scales) and
    ``"int4"`` moments (about 14) it decodes, updates and re-encodes block by block in the
    same pass, to the XLA code's codes and scales bit for bit (the same code books, block
    bounds and hashed stochastic rounding); that arithmetic, not memory, bounds this step
    on CPU. Everything else runs ``adamw``'s XLA code: other platforms or dtypes, a
    quantized moment stored unlike the other one, element-wise masks, the kernel not
    built, and the options the kernel does not implement (``param_update``,
    ``moment_layout="packed"``, ``cautious``, ``cautious_weight_decay``, a
    ``decay_target`` other than ``"zero"``).

    The result is also an ``optax.GradientTransformation`` (``init``/``update``), for
    ``optax.chain``, ``flax.nnx.Optimizer`` or Flax's ``TrainState``; there ``update`` is
    ``adamw``'s, since the kernel cannot pay in that protocol (:class:`FusedAdamW`). The
    fused speed is ``step``'s.

    The arguments are :func:`adamw_jax.adamw`'s, every one, in its order, with its
    defaults and meaning (described there; the storage keywords in
    :func:`adamw_jax.scale_by_adam`), and one more.

    Args:
      backend: ``"auto"`` (the kernel when it applies, else XLA), ``"kernel"`` (a
        ValueError naming the reason when it does not apply: at once for an option the
        kernel does not implement, at the step for the arguments) or ``"xla"`` (always the
        XLA code).

    Returns:
      A :class:`FusedAdamW` of ``init``, ``update``, ``step`` and ``kernel_used``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import adamw_jax
      >>> opt = adamw_jax.fused_adamw(0.1, weight_decay=0.0)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> step = jax.jit(opt.step, donate_argnums=(0, 2))
      >>> params, state = step(params, {"w": jnp.array([1.0, -2.0, 0.0])}, state)
      >>> params["w"]
      Array([0.9, 1.1, 1. ], dtype=float32)

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    tx = adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        nesterov_bias_correction=nesterov_bias_correction,
        decay_coupling=decay_coupling,
        peak_learning_rate=peak_learning_rate,
        amsgrad=amsgrad,
        nu_dtype=nu_dtype,
        block_size=block_size,
        min_quantize_size=min_quantize_size,
        param_update=param_update,
        moment_layout=moment_layout,
        cautious=cautious,
        cautious_weight_decay=cautious_weight_decay,
        decay_target=decay_target,
    )
    coupling = _effective_coupling(decay_coupling, peak_learning_rate)
    storage = _moment_storage.moment_storage(
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        block_size=block_size,
        min_quantize_size=min_quantize_size,
        moment_layout=moment_layout,
    )
    xla_only = _xla_only_options(
        backend, storage, param_update, cautious, cautious_weight_decay, decay_target
    )
    options = _KernelOptions(amsgrad, nesterov, _KERNEL_COUPLING[coupling], storage.block_size)
    hyper_args = (b1, b2, eps, eps_root, learning_rate, weight_decay, coupling, peak_learning_rate)

    def plan(params, grads, state):
        """How the kernel takes this step (a _KernelPlan), or None for the XLA code."""
        if backend == "xla" or xla_only or jax.default_backend() != "cpu":
            return None
        if not kernel_available():
            return None
        return _kernel_plan(mask, params, grads, state, options, storage)

    def kernel_used(params, grads, state) -> bool:
        return plan(params, grads, state) is not None

    def step(params, grads, state):
        _validate.check_updates_given("fused_adamw's step", grads)
        how = plan(params, grads, state)
        if how is None and backend == "kernel":
            raise _kernel_refused()
        if how is None or not jax.tree.leaves(params):  # an empty tree: no call to make
            return _xla_step(tx, params, grads, state)
        hyper = _kernel_hyper(*hyper_args, state, nesterov_bias_correction=nesterov_bias_correction)
        return _kernel_step(options, params, state, hyper, how)

    return FusedAdamW(tx.init, tx.update, step, kernel_used)


def _xla_only_options(
    backend: str,
    storage: _moment_storage.MomentStorage,
    param_update: str | None,
    cautious: bool,
    cautious_weight_decay: bool,
    decay_target: Any,
) -> tuple[str, ...]:
    """The names of the given options that the kernel does not implement.

    Checks ``backend``, and refuses those options by name with ``backend="kernel"``.
    """
    _validate.check_choice("backend", backend, BACKENDS)
    pulls_to_zero = isinstance(decay_target, str) and decay_target == "zero"
    given = (
        ("param_update", param_update is not None),
        ("moment_layout", storage.layout != "tree"),
        ("cautious", bool(cautious)),
        ("cautious_weight_decay", bool(cautious_weight_decay)),
        ("decay_target", not pulls_to_zero),
    )
    names = tuple(name for name, on in given if on)
    if backend == "kernel" and names:
        raise _kernel_refused(names)
    if _check_kernel_storage(storage, backend):  # refuses by name with backend="kernel"
        names += ("mu_dtype/nu_dtype",)
    return names


def _xla_step(tx: optax.GradientTransformation, params, grads, state):
    """The step as ``adamw``'s XLA code takes it: ``tx.update``, then ``apply_updates``."""
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


class _KernelPlan(NamedTuple):
    """How the kernel takes one step: its per-leaf operands, in ``jax.tree.leaves`` order.

    Attributes:
      leaves: per leaf, the kernel's inputs: ``p, g``, then each moment's (``mu``, ``nu``,
        and ``nu_max`` with AMSGrad) values, or codes and scales.
      moments: per leaf, its stored moments (``mu``, ``nu``, and ``nu_max`` with AMSGrad),
        whose form the kernel's outputs take.
      flags: one uint8 per leaf, 1 where the weight decay applies.
      kinds: two uint8 per leaf: how its first and second moment are stored (``_FLOAT32``,
        ``_BFLOAT16``, ``_INT8`` or ``_INT4``).
    """

    leaves: list[list[Any]]
    moments: list[list[Any]]
    flags: Any
    kinds: np.ndarray


def _kernel_plan(
    mask, params, grads, state, options: "_KernelOptions", storage: _moment_storage.MomentStorage
) -> _KernelPlan | None:
    """The kernel's operands if it can take these arguments, else None."""
    if not (isinstance(state, tuple) and len(state) == 2):
        return None
    adam_state, _ = state
    p_leaves, treedef = jax.tree.flatten(params)
    stored = [adam_state.mu, adam_state.nu, *([adam_state.nu_max] if options.amsgrad else [])]
    try:
        g_leaves = treedef.flatten_up_to(grads)
        moments = [
            _moment_storage.per_param(grads, m, storage, second=k > 0) for k, m in enumerate(stored)
        ]
    except (ValueError, TypeError, AttributeError):
        return None
    f32 = jnp.dtype(jnp.float32)
    leaves, per_leaf, kinds = [], [], []
    for p, g, *leaf_moments in zip(p_leaves, g_leaves, *moments, strict=True):
        if not all(isinstance(x, (jax.Array, np.ndarray)) for x in (p, g)):
            return None
        if jnp.result_type(p) != f32 or jnp.result_type(g) != f32 or jnp.shape(p) != jnp.shape(g):
            return None
        leaf_kinds = [_kind(m) for m in leaf_moments]
        if None in leaf_kinds or leaf_kinds[2:] not in ([], leaf_kinds[1:2]):
            return None  # a storage the kernel does not take (AMSGrad's maximum: like nu)
        if leaf_kinds[0] != leaf_kinds[1] and {*leaf_kinds[:2]} & {*_QUANTIZED}:
            return None  # quantized moments with another storage: see _QUANTIZED
        leaves.append([p, g, *(part for m in leaf_moments for part in _parts(m))])
        per_leaf.append(leaf_moments)
        kinds += leaf_kinds[:2]
    flags = _decay_flags(mask, params, len(p_leaves))
    if flags is None:
        return None
    return _KernelPlan(leaves, per_leaf, flags, np.asarray(kinds, np.uint8))


def _kind(stored: Any) -> int | None:
    """How the kernel names a leaf's stored moment; None if it does not take it.

    ``stored`` has passed :func:`adamw_jax._moment_storage.per_param`: its format (width,
    signedness, block size, code book) is the configured one, which
    :func:`_check_kernel_storage` found to be the kernel's.
    """
    if isinstance(stored, QuantizedArray):
        fits = _arrays(stored.codes, stored.scales)
        fits = fits and jnp.result_type(stored.scales) == jnp.float32
        return (_INT8 if stored.bits == 8 else _INT4) if fits else None
    return _FLOAT_KINDS.get(jnp.result_type(stored)) if _arrays(stored) else None


def _check_kernel_storage(storage: _moment_storage.MomentStorage, backend: str) -> bool:
    """Whether ``storage`` holds low-bit moments the kernel does not implement.

    The kernel encodes the default code books and roundings of ``"int8"`` and ``"int4"``
    only; another :class:`~adamw_jax.quantize.QuantizedStorage` takes the XLA code, and
    with ``backend="kernel"`` is refused here, by name, rather than encoded otherwise.
    """
    for name, requested in (("mu_dtype", storage.mu_dtype), ("nu_dtype", storage.nu_dtype)):
        if _moment_storage.is_lowbit(requested) and not _moment_storage.is_default_lowbit(
            requested
        ):
            if backend == "kernel":
                raise ValueError(
                    f'backend="kernel" but the fused kernel does not implement {name}='
                    f"{requested!r}: it encodes the default code books and roundings of "
                    '"int8" and "int4" only. Use backend="auto" or "xla" (the XLA code).'
                )
            return True
    return False


def _arrays(*xs: Any) -> bool:
    return all(isinstance(x, (jax.Array, np.ndarray)) for x in xs)


def _parts(stored: Any) -> tuple[Any, ...]:
    """A stored moment's arrays, as the kernel takes them: values, or codes and scales."""
    if _moment_storage.is_quantized(stored):
        return (stored.codes, stored.scales)
    return (stored,)


def _rebuild(stored: Any, out: Iterator[jax.Array]) -> Any:
    """The kernel's next outputs in the form of the moment ``stored`` it updated."""
    if isinstance(stored, QuantizedArray):
        return dataclasses.replace(stored, codes=next(out), scales=next(out))
    return next(out)


def _decay_flags(mask, params, num_leaves: int):
    """One uint8 per leaf, 1 where the mask selects it; None for an element-wise mask."""
    tree = masks.resolve_mask(mask, params)
    if tree is None:
        return np.ones([num_leaves], np.uint8)
    flags: list[Any] = []

    def expand(m, subtree):
        flags.extend([m] * len(jax.tree.leaves(subtree)))

    jax.tree.map(expand, tree, params)
    if any(jnp.ndim(m) != 0 for m in flags):
        return None
    if all(isinstance(m, (bool, np.bool_)) for m in flags):
        return np.asarray(flags, np.uint8)
    return jnp.stack([jnp.asarray(m).astype(jnp.uint8) for m in flags])


def _kernel_refused(options: tuple[str, ...] = ()) -> ValueError:
    """The error of ``backend="kernel"`` where the kernel does not apply.

    ``options`` names the given options the kernel does not implement, if any.
    """
    if options:
        return ValueError(
            'backend="kernel" but the fused kernel does not apply here: it does not '
            f"implement {', '.join(options)} as given (they run on the XLA code: use "
            'backend="auto" or "xla", or leave them at their defaults).'
        )
    return ValueError(
        'backend="kernel" but the fused kernel does not apply here: it needs the '
        "CPU backend, the built kernel (kernel_available() is "
        f"{kernel_available()}), float32 params and grads, float32 or bfloat16 moments, "
        'or "int8" or "int4" ones (mu_dtype and nu_dtype the same), and a mask of one '
        "bool per leaf."
    )


class _KernelHyper(NamedTuple):
    """The kernel's float32 scalars for one step.

    It reads them as one float32 vector in the order of these fields: its ``enum Hyper``
    in ``csrc/fused_adamw.cc`` names the same slots, and the two change together.
    """

    b1: jax.Array
    one_minus_b1: jax.Array
    b2: jax.Array
    one_minus_b2: jax.Array
    inv_c1: jax.Array  # 1 / (1 - b1^t)
    inv_c2: jax.Array  # 1 / (1 - b2^t)
    eps: jax.Array
    eps_root: jax.Array
    lr: jax.Array  # the learning rate at this step
    # the decay factor: weight_decay, weight_decay / peak ("schedule") or
    # weight_decay * lr / peak ("adamc")
    wd: jax.Array
    nesterov_m: jax.Array  # b1 / (1 - b1^(t+1)); "algoperf": b1 / (1 - b1^t)
    nesterov_g: jax.Array  # (1 - b1) / (1 - b1^t)
    # The step count t as uint32, its bits carried in a float32 slot (not a float value): the
    # salt of the second moment's stochastic rounding in bfloat16.
    rounding_salt: jax.Array
    c2: jax.Array  # 1 - b2^t: AMSGrad's maximum divides by it, as the XLA code does

    def stacked(self) -> jax.Array:
        """The vector the kernel reads: the fields, in order."""
        return jnp.stack([jnp.reshape(x, []) for x in self])


def _kernel_hyper(
    b1,
    b2,
    eps,
    eps_root,
    learning_rate,
    weight_decay,
    coupling,
    peak_learning_rate,
    state,
    *,
    nesterov_bias_correction: str = "optax",
) -> _KernelHyper:
    """The kernel's scalars for this step, computed as ``adamw``'s XLA code does."""
    adam_state, decay_state = state
    r = jnp.float32
    beta1, beta2 = jnp.asarray(b1, r), jnp.asarray(b2, r)
    count = optax.safe_increment(adam_state.count)
    t = count.astype(r)
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    lr = _numerics.value_at(learning_rate, decay_state.count)
    wd = _numerics.value_at(weight_decay, decay_state.count)
    scalars = _decay_scalars(lr, wd, coupling, peak_learning_rate, r)
    nesterov_m, nesterov_g = nesterov_weights(
        beta1, c1, 1 - beta1 ** (t + 1), nesterov_bias_correction
    )
    return _KernelHyper(
        b1=beta1,
        one_minus_b1=1 - beta1,
        b2=beta2,
        one_minus_b2=1 - beta2,
        inv_c1=1 / c1,
        inv_c2=1 / c2,
        eps=jnp.asarray(eps, r),
        eps_root=jnp.asarray(eps_root, r),
        lr=scalars.lr,
        wd=scalars.decay,
        nesterov_m=nesterov_m,
        nesterov_g=nesterov_g,
        rounding_salt=jax.lax.bitcast_convert_type(count.astype(jnp.uint32), jnp.float32),
        c2=c2,
    )


class _KernelOptions(NamedTuple):
    """The kernel's attributes: the same for every step of one optimizer."""

    amsgrad: bool
    nesterov: bool
    coupling: int  # how the decay enters the step: _LR_COUPLED or _INDEPENDENT
    block_size: int  # elements per block of quantized moments


def _kernel_step(options: _KernelOptions, params, state, hyper, how: _KernelPlan):
    """The step through the kernel: the new ``(params, state)``, written in place."""
    adam_state, decay_state = state
    treedef = jax.tree.structure(params)
    out = iter(_run_kernel(options, how, hyper))
    # The kernel's outputs, per leaf: p, then each moment's values, or codes and scales.
    columns: list[list[Any]] = [[] for _ in range(3 + int(options.amsgrad))]
    for stored in how.moments:
        columns[0].append(next(out))
        for column, moment in zip(columns[1:], stored, strict=True):
            column.append(_rebuild(moment, out))
    new_params, mu, nu, *nu_max = (jax.tree.unflatten(treedef, c) for c in columns)
    new_adam = ScaleByAdamState(
        optax.safe_increment(adam_state.count),
        mu,
        nu,
        nu_max[0] if options.amsgrad else adam_state.nu_max,
    )
    new_decay = DecoupledWeightDecayState(optax.safe_increment(decay_state.count))
    return new_params, (new_adam, new_decay)


def _run_kernel(options: _KernelOptions, how: _KernelPlan, hyper: _KernelHyper):
    """Runs the kernel on the plan's leaves; returns its outputs.

    The outputs are every leaf's inputs but ``g`` (``p``, then the moments' arrays), in
    order, each aliased to its input.
    """
    vector = hyper.stacked()
    flags = jnp.asarray(how.flags, jnp.uint8)
    return _aliased_call(
        _TARGET,
        how.leaves,
        lambda start, stop: [vector, flags[start:stop], how.kinds[2 * start : 2 * stop]],
        amsgrad=np.int64(options.amsgrad),
        nesterov=np.int64(options.nesterov),
        coupling=np.int64(options.coupling),
        block_size=np.int64(options.block_size),
    )


def _aliased_call(
    target: str,
    per_leaf: list[list[jax.Array]],
    leading: Callable[[int, int], list[jax.Array]],
    read_only: tuple[int, ...] = (1,),
    **attributes: Any,
) -> list[jax.Array]:
    """Calls the FFI ``target`` on every leaf's inputs, its outputs aliased to inputs.

    ``per_leaf`` holds each leaf's inputs; every one of them but those at the positions
    ``read_only`` (the gradient, second) is overwritten: the call's outputs are those
    inputs, in order. XLA's alias analysis grows steeply with the aliases of one call, so
    leaves travel in calls of at most ``_LEAVES_PER_CALL``; ``leading(start, stop)`` gives
    the operands that come before the leaves' in the call of leaves ``start`` to ``stop``
    (excluded). Returns every leaf's outputs, in order.
    """
    out = []
    for start in range(0, len(per_leaf), _LEAVES_PER_CALL):
        stop = min(start + _LEAVES_PER_CALL, len(per_leaf))
        operands, results, aliases = list(leading(start, stop)), [], {}
        for ins in per_leaf[start:stop]:
            for position, x in enumerate(ins):
                if position in read_only:
                    continue
                aliases[len(operands) + position] = len(results)
                results.append(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
            operands += ins
        call = jax.ffi.ffi_call(target, results, input_output_aliases=aliases)
        out += call(*operands, **attributes)
    return out


def _run_self_test() -> None:
    """One tiny step through the kernel; raises when it does not run."""
    zero, one = np.float32(0.0), np.float32(1.0)
    hyper = _KernelHyper(*[zero] * len(_KernelHyper._fields))._replace(
        inv_c1=one, inv_c2=one, c2=one
    )
    x = jnp.ones([1], jnp.float32)
    options = _KernelOptions(amsgrad=False, nesterov=False, coupling=_LR_COUPLED, block_size=1)
    how = _KernelPlan([[x, x, x, x]], [[x, x]], np.ones([1], np.uint8), np.zeros([2], np.uint8))
    jax.block_until_ready(_run_kernel(options, how, hyper))


def _register_cpu_target(target: str, symbol: str) -> bool:
    """Registers the built extension's handler ``symbol`` as the CPU FFI target ``target``.

    Returns False when the extension was not built, does not load or has no such handler.
    """
    library = _extension()
    if library is None:
        return False
    try:
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
    except Exception:  # any failure to load means: not available
        return False
    return True


@functools.cache
def _extension() -> ctypes.CDLL | None:
    """The built C++ extension, loaded; None when it was not built or does not load."""
    try:
        spec = importlib.util.find_spec(_EXTENSION)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        return ctypes.CDLL(spec.origin)
    except OSError:
        return None
