"""Conformance with Optax: the same calls give the same states and updates, except where stated.

``adamw_jax.adamw``, ``adam``, ``scale_by_adam`` and ``add_decayed_weights`` take Optax's
positional arguments in Optax's order with Optax's defaults
(``test_positional_arguments_are_optaxs``), so each comparison below makes *the same call* to
both libraries, with one change on Optax's side: ``b1`` and ``b2``, when Python floats (given
or defaulted), are passed to Optax as float32 scalars (``jnp.float32(0.999)``), see
difference 3. Optax runs under JAX's standard dtype promotion (it fails under the strict
promotion the tests turn on, difference 4); adamw_jax runs under strict promotion.

Conformance (``test_same_updates_and_states_as_optax``): 100 steps of a small MLP regression
(minibatches drawn with a fixed seed; params: matrices, vectors and a scalar), float32, in
one jitted ``lax.scan``. Both transformations get the same gradients and params at every step
(the params follow Optax's updates). Every step's updates, and the final ``count``, ``mu``,
``nu`` (and ``nu_max``, the injected hyperparameters, the accumulated gradients: whatever
both states hold) agree to ``rtol=1e-6`` with no ``atol``, in the same dtypes.

The scan is compiled with XLA's backend optimization level 0. At the default level LLVM
contracts multiply-adds into FMAs, and since the two libraries write the same sums in a
different operand order (``b1 * m + (1 - b1) * g`` against ``(1 - b1) * g + b1 * m``) it
rounds them differently, by about an ulp per step: over 100 steps ``nu`` then differs by up
to 9e-7 relatively, and ``mu`` and the updates, where they cross zero, by far more relatively
(the error being an ulp of the summands, not of their cancelled sum). Without contraction the
runs agree to the last bit (MultiSteps: within an ulp), except for the Nesterov look-ahead,
which the two libraries round differently and which gets an ``atol`` (``_lookahead_atol``).

Cases:

* ``adamw``: defaults; positional ``b2``/``eps``/``eps_root``/``mu_dtype``/``weight_decay``;
  a weight decay with a bool-tree mask and with a callable mask (positional, as Optax's);
  an ``optax.warmup_cosine_decay_schedule`` learning rate with a weight-decay schedule;
  ``eps_root > 0``; ``mu_dtype=jnp.bfloat16``;
* ``adamw(..., nesterov=True)`` against ``optax.nadamw`` and ``optax.adamw(nesterov=True)``;
* ``adam`` against ``optax.adam`` (also ``nesterov=True``); ``adam(..., l2=...)`` against
  Optax's chain ``add_decayed_weights -> scale_by_adam -> scale_by_learning_rate``;
  ``adam(..., amsgrad=True)`` against ``optax.amsgrad`` (``nu_max`` compared too);
* ``scale_by_adam`` against ``optax.scale_by_adam`` (also ``nesterov=True``);
* ``add_decayed_weights`` against ``optax.add_decayed_weights``: a number with a mask, and a
  schedule (its ``count`` compared);
* ``adamw`` inside ``optax.chain`` after ``optax.clip_by_global_norm``, inside
  ``optax.MultiSteps`` (``mini_step``, ``gradient_step``, ``acc_grads`` compared) and inside
  ``optax.inject_hyperparams`` (the injected hyperparameters compared at every step).
* Optax's own aliases built on adamw_jax (``OPTAX_ALIASES_ON_OURS``): ``optax.adam``,
  ``nadam``, ``lamb``, ``lion``, ``fromage`` and ``lars``, each the chain Optax assembles
  for it with adamw_jax's ``scale_by_adam`` and ``add_decayed_weights`` in place of Optax's
  (the other pieces, trust ratio, Lion's sign, momentum, learning rate, are Optax's),
  against the alias itself: ``lamb`` with a bool-tree mask and a weight decay, ``lion``
  with a callable mask (its momentum compared at every step), ``fromage`` with a constant
  and a scheduled learning rate (its L2 coefficient ``1 / sqrt(1 + lr^2) - 1`` is
  negative), ``lars`` with its default mask ``True`` and with a bool tree (its momentum
  compared at every step). Same tolerance, ``rtol=1e-6`` and no ``atol``.

Deliberate differences, one test each (``test_difference_<n>_*``):

1. Complex params with a real ``mu_dtype`` are refused (``ValueError`` at ``init``). Optax
   accepts them and keeps only the first moment's real part (JAX warns that this cast will
   become an error).
2. ``ScaleByAdamState`` has a fourth field, ``nu_max`` (AMSGrad's running maximum, laid out
   like ``nu``; ``optax.EmptyState()`` unless ``amsgrad``), so the tree structures differ and
   states are compared field by field (``count``, ``mu``, ``nu``). The decay steps' states
   differ too (difference 9).
3. The betas are float32 throughout: ``1 - b`` is computed in float32 from the same float32
   ``b`` that ``b**t`` uses, so at ``t = 1`` the bias correction divides by exactly the factor
   the moment was multiplied by. Optax computes ``1 - b`` from the Python float (in float64)
   and ``b**t`` from its float32 rounding: with ``b2 = 0.999`` its second moment is 1.3e-5
   larger (relatively) than adamw_jax's, and its first direction is ``g / (|g| + eps)``
   times ``1 - 6.6e-6`` instead of to within an ulp or two. Given float32 betas, Optax does
   adamw_jax's arithmetic.
4. adamw_jax runs under ``jax_numpy_dtype_promotion="strict"``, with the same results as
   under standard promotion; Optax's Adam raises ``TypePromotionError`` there (``b**count``
   mixes the float ``b`` with the int32 count), as do ``optax.MultiSteps`` and Optax's
   schedules (the tests run those under standard promotion).
5. ``eps = 0`` with a zero gradient (a zero second moment) gives a zero direction, not 0/0:
   adamw_jax's updates are the decay alone; Optax's are NaN.
6. ``mu_dtype=None`` means the params' dtype, kept at every step. With bfloat16 params and
   float32 gradients Optax's first moment becomes float32 after one step (the state's dtype
   changes, so it cannot be a ``lax.scan`` carry) and its updates are float32; adamw_jax keeps
   the first moment in bfloat16 and returns the updates in the params' dtype.
7. The moments are computed in float32 and only stored in a low precision. Optax computes in
   bfloat16 wherever its Python-float betas (weakly typed) meet a bfloat16 array: with
   bfloat16 params, ``b2 = 0.999`` rounds to 1.0 there, so its second moment never decays
   (after the gradients shrink tenfold it is 1.9 times the float32 one; adamw_jax's stays
   within 2%, its bfloat16 second moment being rounded stochastically); with
   ``mu_dtype=jnp.bfloat16`` it multiplies the stored first moment by ``b1`` in bfloat16
   (0.8984375), so after two steps a third of its entries differ from adamw_jax's (which
   equal Optax's given float32 betas).
8. Masks: a mask's leaves may be boolean arrays, also traced ones (Optax's ``masked`` needs
   Python booleans); a single boolean for the whole tree is refused by ``adamw`` and
   ``decoupled_weight_decay`` (``TypeError``; under ``inject_hyperparams`` it is what a
   callable mask turns into), where Optax takes it as a prefix of the params
   (``add_decayed_weights`` takes it too, as Optax's: ``optax.lars`` passes ``True``); a
   callable mask is called with the params at ``update`` (Optax calls it with the updates
   that reach its ``add_decayed_weights``: Adam's directions). Masks see paths as
   ``adamw_jax.masks`` writes them, and a bool tree that differs from the params only in
   Flax NNX's Variable layer is matched by path (Optax's ``masked`` refuses it).
9. The decay steps' states always hold a ``count``: ``add_decayed_weights``'s state is
   ``AddDecayedWeightsState(count)`` for a number or a schedule, with or without a mask
   (Optax's is ``EmptyState``, ``WeightDecaySchedule`` or a ``MaskedState`` around either),
   and ``adamw``'s state is ``(ScaleByAdamState, DecoupledWeightDecayState)`` where Optax's
   is ``(ScaleByAdamState, <add_decayed_weights' state>, EmptyState)``. A checkpoint's
   structure does not depend on these choices; it is not Optax's.
10. ``adamw_jax.adam`` with ``l2 > 0`` (or a scheduled or traced ``l2``) needs the params at
    ``update``, as any L2 penalty does; with the default ``l2 = 0`` it does not, like
    ``optax.adam``.
11. Hyperparameters are checked when the transformation is built: out-of-range or
    non-finite values (``b1 = 1``, a negative learning rate, a NaN ``eps``, a negative
    decoupled weight decay, ...) raise ``ValueError``; Optax accepts them.
    ``add_decayed_weights`` takes any finite coefficient, negative ones included, as
    Optax's (``optax.fromage`` passes one).
12. Integer params are refused (``TypeError`` naming the leaf); Optax steps them, with float
    updates and an integer second moment.
"""

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax

TypePromotionError = jax.dtypes.TypePromotionError

STEPS = 100
LR = 3e-3
B1, B2 = 0.9, 0.999
RTOL = 1e-6
# LLVM at level 0 does not contract multiply-adds into FMAs (see the module docstring).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


# --------------------------------------------------------------------------------------
# The problem: a small MLP regression with seeded minibatches.


def _init_params(seed: int = 0) -> dict:
    """A 3-16-1 tanh MLP and an output scale: matrices, vectors and a scalar."""
    rng = np.random.default_rng(seed)
    return {
        "hidden": {
            "kernel": jnp.asarray(rng.normal(0.0, 0.6, (3, 16)), jnp.float32),
            "bias": jnp.asarray(rng.normal(0.0, 0.1, (16,)), jnp.float32),
        },
        "out": {
            "kernel": jnp.asarray(rng.normal(0.0, 0.3, (16, 1)), jnp.float32),
            "bias": jnp.zeros((1,), jnp.float32),
        },
        "scale": jnp.asarray(0.8, jnp.float32),
    }


def _batches(seed: int = 1, batch: int = 16) -> tuple[jax.Array, jax.Array]:
    """``STEPS`` minibatches ``(x, y)`` of a noisy smooth target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (STEPS, batch, 3))
    y = np.sin(x @ np.array([1.0, -2.0, 0.5]))[..., None]
    y = y + 0.1 * rng.normal(0.0, 1.0, (STEPS, batch, 1))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    pred = params["scale"] * (h @ params["out"]["kernel"] + params["out"]["bias"])
    return jnp.mean((pred - y) ** 2)


DECAY_KERNELS = {  # a bool-tree mask: decay the two kernels only
    "hidden": {"kernel": True, "bias": False},
    "out": {"kernel": True, "bias": False},
    "scale": False,
}


def _rank_at_least_2(tree):
    """A callable mask: decay the leaves of rank >= 2 (the kernels)."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, tree)


# --------------------------------------------------------------------------------------
# Running Optax under standard promotion, and making the same call to both libraries.


def _under(mode: str, tx) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its ``init`` and ``update`` traced under dtype promotion ``mode``."""
    tx = optax.with_extra_args_support(tx)

    def init(params):
        with jax.numpy_dtype_promotion(mode):
            return tx.init(params)

    def update(updates, state, params=None, **extra):
        with jax.numpy_dtype_promotion(mode):
            return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(init, update)


def _standard_schedule(schedule: Callable) -> Callable:
    """An Optax schedule callable under strict promotion (it mixes int32 and floats)."""

    def wrapped(count):
        with jax.numpy_dtype_promotion("standard"):
            return schedule(count)

    return wrapped


LR_SCHEDULE = _standard_schedule(
    optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=10, decay_steps=STEPS)
)
WD_SCHEDULE = _standard_schedule(optax.linear_schedule(0.1, 0.01, transition_steps=STEPS))


def _f32_betas(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, with Python-float ``b1``/``b2`` (given or default) in float32.

    Difference 3: adamw_jax forms ``1 - b`` from the float32 ``b``; this makes Optax do so.
    """
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    for name in ("b1", "b2"):
        if isinstance(bound.arguments.get(name), float):
            bound.arguments[name] = jnp.float32(bound.arguments[name])
    return fn(*bound.args, **bound.kwargs)


@dataclass(frozen=True)
class Case:
    """How to build adamw_jax's and Optax's transformation for one comparison.

    Attributes:
      ours, ref: build adamw_jax's and Optax's transformation.
      step_scale: the params move by ``step_scale * ref's updates`` (``-LR`` for
        transformations that return a direction, not a step).
      extras: ``state -> pytree`` of more state to compare at every step.
      lookahead_atol: whether the updates get an ``atol`` (Nesterov: ``_lookahead_atol``).
    """

    ours: Callable[[], Any]
    ref: Callable[[], Any]
    step_scale: float = 1.0
    extras: Callable[[Any], Any] | None = None
    lookahead_atol: bool = False


def _same(ours_fn, ref_fn, *args, **kwargs) -> Case:
    """The same call to both libraries (Optax's betas in float32)."""
    return Case(lambda: ours_fn(*args, **kwargs), lambda: _f32_betas(ref_fn, *args, **kwargs))


def _multisteps_state(state):
    return state.mini_step, state.gradient_step, state.acc_grads


def _hyperparams(state):
    return state.hyperparams


def _count(state):
    return state.count


def _multisteps(tx):
    return optax.MultiSteps(tx, every_k_schedule=4).gradient_transformation()


# Optax's own aliases re-assembled on adamw_jax: each is the chain Optax builds for it, with
# adamw_jax's scale_by_adam and add_decayed_weights in place of Optax's. The other pieces
# are Optax's, run under standard promotion (difference 4).


def _optax_piece(tx) -> optax.GradientTransformationExtraArgs:
    return _under("standard", tx)


def _adam_on_ours(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, *, nesterov=False):
    """``optax.adam`` (``optax.nadam`` with ``nesterov=True``) on adamw_jax's scale_by_adam."""
    return optax.chain(
        adamw_jax.scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov),
        _optax_piece(optax.scale_by_learning_rate(learning_rate)),
    )


def _lamb_on_ours(
    learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None
):
    """``optax.lamb``: Adam's direction, an L2 term, the trust ratio, the learning rate."""
    return optax.chain(
        adamw_jax.scale_by_adam(b1, b2, eps, eps_root),
        adamw_jax.add_decayed_weights(weight_decay, mask),
        _optax_piece(optax.scale_by_trust_ratio()),
        _optax_piece(optax.scale_by_learning_rate(learning_rate)),
    )


def _lion_on_ours(learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3, mask=None):
    """``optax.lion``: the sign of the interpolated momentum, an L2 term, the learning rate."""
    return optax.chain(
        _optax_piece(optax.scale_by_lion(b1, b2)),
        adamw_jax.add_decayed_weights(weight_decay, mask),
        _optax_piece(optax.scale_by_learning_rate(learning_rate)),
    )


def _fromage_multiplier(learning_rate):
    return 1 / (1 + learning_rate**2) ** 0.5


def _fromage_on_ours(learning_rate, min_norm=1e-6):
    """``optax.fromage``: its L2 coefficient ``1 / sqrt(1 + lr^2) - 1`` is negative."""
    if callable(learning_rate):
        step_size = lambda c: _fromage_multiplier(learning_rate(c)) * learning_rate(c)  # noqa: E731
        coefficient = lambda c: _fromage_multiplier(learning_rate(c)) - 1  # noqa: E731
    else:
        step_size = learning_rate * _fromage_multiplier(learning_rate)
        coefficient = _fromage_multiplier(learning_rate) - 1
    return optax.chain(
        _optax_piece(optax.scale_by_trust_ratio(min_norm)),
        _optax_piece(optax.scale_by_learning_rate(step_size)),
        adamw_jax.add_decayed_weights(coefficient),
    )


def _lars_on_ours(learning_rate, weight_decay=0.0, weight_decay_mask=True, momentum=0.9):
    """``optax.lars``: its default decay mask is the single boolean ``True``."""
    return optax.chain(
        adamw_jax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        _optax_piece(optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), True)),
        _optax_piece(optax.scale_by_learning_rate(learning_rate)),
        _optax_piece(optax.trace(decay=momentum)),
    )


def _states_of(kind: type) -> Callable[[Any], list]:
    """``state -> [each state of type kind in it]``: an Optax piece's state, in both chains."""

    def extras(state):
        found = []

        def is_kind(x):
            if isinstance(x, kind):
                found.append(x)
                return True
            return False

        jax.tree.leaves(state, is_leaf=is_kind)
        return found

    return extras


FROMAGE_LR = _standard_schedule(
    optax.exponential_decay(0.2, transition_steps=STEPS, decay_rate=0.1)
)

OPTAX_ALIASES_ON_OURS = {
    "optax.adam-on-ours": _same(_adam_on_ours, optax.adam, LR, B1, 0.99, 1e-7),
    "optax.nadam-on-ours": replace(
        _same(functools.partial(_adam_on_ours, nesterov=True), optax.nadam, LR, B1, B2),
        lookahead_atol=True,
    ),
    "optax.lamb-on-ours": _same(
        _lamb_on_ours, optax.lamb, LR, B1, B2, 1e-6, 0.0, 0.01, DECAY_KERNELS
    ),
    "optax.lion-on-ours": Case(  # the same Python-float betas: both run Optax's scale_by_lion
        lambda: _lion_on_ours(LR, 0.9, 0.99, 0.1, _rank_at_least_2),
        lambda: optax.lion(LR, 0.9, 0.99, None, 0.1, _rank_at_least_2),
        extras=_states_of(optax.ScaleByLionState),
    ),
    "optax.fromage-on-ours": Case(lambda: _fromage_on_ours(0.1), lambda: optax.fromage(0.1)),
    "optax.fromage-schedule-on-ours": Case(
        lambda: _fromage_on_ours(FROMAGE_LR), lambda: optax.fromage(FROMAGE_LR)
    ),
    "optax.lars-on-ours": Case(
        lambda: _lars_on_ours(0.05, 0.01),
        lambda: optax.lars(0.05, 0.01),
        extras=_states_of(optax.TraceState),
    ),
    "optax.lars-mask-on-ours": Case(
        lambda: _lars_on_ours(0.05, 0.01, DECAY_KERNELS),
        lambda: optax.lars(0.05, 0.01, DECAY_KERNELS),
        extras=_states_of(optax.TraceState),
    ),
}


CASES = {
    "adamw-defaults": _same(adamw_jax.adamw, optax.adamw, LR),
    "adamw-positional": _same(adamw_jax.adamw, optax.adamw, LR, B1, 0.99, 1e-6, 0.0, None, 0.05),
    "adamw-mask-tree": _same(
        adamw_jax.adamw, optax.adamw, LR, B1, B2, 1e-8, 0.0, None, 0.1, DECAY_KERNELS
    ),
    "adamw-mask-callable": _same(
        adamw_jax.adamw, optax.adamw, LR, B1, B2, 1e-8, 0.0, None, 0.1, _rank_at_least_2
    ),
    "adamw-lr-and-wd-schedules": _same(
        adamw_jax.adamw, optax.adamw, LR_SCHEDULE, weight_decay=WD_SCHEDULE, mask=DECAY_KERNELS
    ),
    "adamw-eps_root": _same(adamw_jax.adamw, optax.adamw, LR, B1, B2, 1e-8, 1e-6),
    "adamw-bf16-mu": _same(adamw_jax.adamw, optax.adamw, LR, B1, B2, 1e-8, 0.0, jnp.bfloat16),
    "adamw-nesterov-vs-nadamw": Case(
        lambda: adamw_jax.adamw(LR, B1, B2, 1e-8, 0.0, None, 0.01, nesterov=True),
        lambda: _f32_betas(optax.nadamw, LR, B1, B2, 1e-8, 0.0, None, 0.01),
        lookahead_atol=True,
    ),
    "adamw-nesterov": replace(
        _same(adamw_jax.adamw, optax.adamw, LR, weight_decay=0.01, nesterov=True),
        lookahead_atol=True,
    ),
    "adam": _same(adamw_jax.adam, optax.adam, LR, B1, B2, 1e-8, 0.0, None),
    "adam-nesterov": replace(
        _same(adamw_jax.adam, optax.adam, LR, nesterov=True), lookahead_atol=True
    ),
    "adam-l2": Case(
        lambda: adamw_jax.adam(LR, B1, B2, l2=0.01),
        lambda: optax.chain(
            optax.add_decayed_weights(0.01),
            _f32_betas(optax.scale_by_adam, B1, B2),
            optax.scale_by_learning_rate(LR),
        ),
    ),
    "adam-amsgrad-vs-amsgrad": Case(
        lambda: adamw_jax.adam(LR, B1, B2, 1e-8, 0.0, None, amsgrad=True),
        lambda: _f32_betas(optax.amsgrad, LR, B1, B2, 1e-8, 0.0, None),
    ),
    "scale_by_adam": replace(
        _same(adamw_jax.scale_by_adam, optax.scale_by_adam, B1, B2, 1e-8, 0.0, None),
        step_scale=-LR,
    ),
    "scale_by_adam-nesterov": replace(
        _same(adamw_jax.scale_by_adam, optax.scale_by_adam, B1, B2, nesterov=True),
        step_scale=-LR,
        lookahead_atol=True,
    ),
    "add_decayed_weights-mask": replace(
        _same(adamw_jax.add_decayed_weights, optax.add_decayed_weights, 0.1, DECAY_KERNELS),
        step_scale=-LR,
    ),
    "add_decayed_weights-schedule": replace(
        _same(adamw_jax.add_decayed_weights, optax.add_decayed_weights, WD_SCHEDULE),
        step_scale=-LR,
        extras=_count,
    ),
    "chain-clip_by_global_norm": Case(
        lambda: optax.chain(
            optax.clip_by_global_norm(0.5), adamw_jax.adamw(LR, B1, B2, 1e-8, 0.0, None, 0.01)
        ),
        lambda: optax.chain(
            optax.clip_by_global_norm(0.5),
            _f32_betas(optax.adamw, LR, B1, B2, 1e-8, 0.0, None, 0.01),
        ),
    ),
    "MultiSteps": Case(
        # MultiSteps needs standard promotion; adamw_jax inside it runs under strict.
        lambda: _under(
            "standard",
            _multisteps(_under("strict", adamw_jax.adamw(LR, B1, B2, 1e-8, 0.0, None, 0.01))),
        ),
        lambda: _multisteps(_f32_betas(optax.adamw, LR, B1, B2, 1e-8, 0.0, None, 0.01)),
        extras=_multisteps_state,
    ),
    "inject_hyperparams": replace(
        _same(
            optax.inject_hyperparams(adamw_jax.adamw),
            optax.inject_hyperparams(optax.adamw),
            *(LR_SCHEDULE, B1, B2, 1e-8, 0.0, None, 0.01, DECAY_KERNELS),
        ),
        extras=_hyperparams,
    ),
    **OPTAX_ALIASES_ON_OURS,
}


def _lookahead_atol(u_ref) -> np.ndarray:
    """The updates' ``atol`` with Nesterov: RTOL times each step's largest ``|update|``.

    The look-ahead is a sum of two terms, ``b1 m / (1 - b1^(t+1))`` and
    ``(1 - b1) g / (1 - b1^t)``, that cancel where the gradient opposes the momentum. Optax
    computes ``b1 * (m / c)`` where adamw_jax computes ``(b1 / c) * m``, so the terms differ
    by an ulp, and where they cancel the update (crossing zero) differs by an ulp *of the
    terms*, not of itself. Adam's normalized directions are all of one scale, so the step's
    largest update is the terms' size; the atol is the bound RTOL puts on that update. (The
    differences seen are at most 2.1e-7 of it.)
    """
    per_leaf = [np.abs(np.asarray(u)).reshape(STEPS, -1).max(1) for u in jax.tree.leaves(u_ref)]
    return RTOL * np.max(per_leaf, axis=0)


def _adam_state(state) -> Any:
    """The one Adam state (a NamedTuple with ``count``, ``mu`` and ``nu``) in ``state``."""
    found = []

    def is_adam(x):
        if {"count", "mu", "nu"} <= set(getattr(x, "_fields", ())):
            found.append(x)
            return True
        return False

    jax.tree.leaves(state, is_leaf=is_adam)
    assert len(found) <= 1, found
    return found[0] if found else None


def _run(case: Case):
    """100 steps side by side; the params follow Optax's updates (times ``step_scale``).

    Returns both final states and, per step, both updates and both ``extras(state)``.
    """
    tx_ours, tx_ref = case.ours(), _under("standard", case.ref())
    extras = case.extras or (lambda state: ())
    params = _init_params()

    def step(carry, batch):
        params, s_ours, s_ref = carry
        grads = jax.grad(_loss)(params, batch)
        u_ours, s_ours = tx_ours.update(grads, s_ours, params)
        u_ref, s_ref = tx_ref.update(grads, s_ref, params)
        params = jax.tree.map(lambda p, u: p + case.step_scale * u, params, u_ref)
        return (params, s_ours, s_ref), (u_ours, u_ref, extras(s_ours), extras(s_ref))

    def run(data):
        return jax.lax.scan(step, (params, tx_ours.init(params), tx_ref.init(params)), data)

    data = _batches()
    compiled = jax.jit(run).lower(data).compile(compiler_options=COMPILER_OPTIONS)
    (_, s_ours, s_ref), per_step = compiled(data)
    return s_ours, s_ref, per_step


def _assert_close(ours, ref, what: str, atol: Any = 0.0):
    """Same structure, dtypes and finite values, within ``RTOL`` and ``atol`` (chex).

    ``atol`` is one number, or one per step (the leaves' first axis): then each step's
    slice is compared with its own, which ``chex.assert_trees_all_close`` takes as a number.
    """
    try:
        chex.assert_trees_all_equal_dtypes(ours, ref)
        chex.assert_tree_all_finite((ours, ref))
        ours, ref = (jax.tree.map(lambda x: np.asarray(x, np.float64), t) for t in (ours, ref))
        if np.ndim(atol) == 0:
            chex.assert_trees_all_close(ours, ref, rtol=RTOL, atol=float(atol))
        else:
            for t, atol_t in enumerate(atol):
                step_t = lambda tree: jax.tree.map(lambda x: x[t], tree)  # noqa: E731
                chex.assert_trees_all_close(
                    step_t(ours), step_t(ref), rtol=RTOL, atol=float(atol_t)
                )
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


@pytest.mark.parametrize("name", list(CASES))
def test_same_updates_and_states_as_optax(name):
    case = CASES[name]
    s_ours, s_ref, (u_ours, u_ref, x_ours, x_ref) = _run(case)
    atol = _lookahead_atol(u_ref) if case.lookahead_atol else 0.0
    _assert_close(u_ours, u_ref, "updates of the 100 steps", atol)
    _assert_close(x_ours, x_ref, "state at every step")
    a_ours, a_ref = _adam_state(s_ours), _adam_state(s_ref)
    assert (a_ours is None) == (a_ref is None)
    if a_ref is not None:
        expected_count = STEPS // 4 if name == "MultiSteps" else STEPS
        assert int(a_ours.count) == int(a_ref.count) == expected_count
        assert a_ours.count.dtype == a_ref.count.dtype == jnp.int32
        for field in a_ref._fields[1:]:  # mu, nu (and nu_max for AMSGrad), field by field
            _assert_close(getattr(a_ours, field), getattr(a_ref, field), f"final {field}")


# --------------------------------------------------------------------------------------
# The same calls: Optax's positional arguments, order and defaults.


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (adamw_jax.adamw, optax.adamw),
        (adamw_jax.adam, optax.adam),
        (adamw_jax.scale_by_adam, optax.scale_by_adam),
        (adamw_jax.add_decayed_weights, optax.add_decayed_weights),
        (adamw_jax.fused_adamw, optax.adamw),
    ],
    ids=["adamw", "adam", "scale_by_adam", "add_decayed_weights", "fused_adamw"],
)
def test_positional_arguments_are_optaxs(ours, theirs):
    """Optax's positional parameters, in order, with Optax's defaults; ``nesterov`` by name."""

    def positional(fn):
        return [
            (p.name, p.default)
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    assert positional(ours) == positional(theirs)
    theirs_kw = {
        p.name: p.default
        for p in inspect.signature(theirs).parameters.values()
        if p.kind == p.KEYWORD_ONLY
    }
    ours_params = inspect.signature(ours).parameters
    for name, default in theirs_kw.items():
        assert ours_params[name].kind == inspect.Parameter.KEYWORD_ONLY
        assert ours_params[name].default == default


# --------------------------------------------------------------------------------------
# The deliberate differences.


def _small_tree():
    return {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.2])}


def test_difference_1_complex_params_with_a_real_mu_dtype_are_refused():
    params = {"c": jnp.array([1 + 1j, 2 - 0.5j], jnp.complex64)}
    with pytest.raises(ValueError, match="mu_dtype"):
        adamw_jax.adamw(LR, B1, B2, 1e-8, 0.0, jnp.float32).init(params)
    # Optax steps them, and its float32 first moment keeps only the real part.
    tx = _under("standard", optax.adamw(LR, B1, B2, 1e-8, 0.0, jnp.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX: "Casting from complex to real dtypes ..."
        _, state = tx.update(params, tx.init(params), params)
    mu = state[0].mu["c"]
    assert mu.dtype == jnp.float32
    np.testing.assert_allclose(mu, (1 - B1) * np.real(params["c"]), rtol=1e-6)
    # With None (or a complex mu_dtype) adamw_jax takes complex params, as Optax does.
    _, ours = adamw_jax.adamw(LR).update(params, adamw_jax.adamw(LR).init(params), params)
    assert ours[0].mu["c"].dtype == jnp.complex64


def test_difference_2_scale_by_adam_state_has_nu_max():
    assert adamw_jax.ScaleByAdamState._fields == (*optax.ScaleByAdamState._fields, "nu_max")
    assert optax.ScaleByAmsgradState._fields == adamw_jax.ScaleByAdamState._fields
    params = _small_tree()
    plain = adamw_jax.scale_by_adam(B1, B2).init(params)
    assert plain.nu_max == optax.EmptyState()
    amsgrad = adamw_jax.scale_by_adam(B1, B2, amsgrad=True).init(params)
    chex.assert_trees_all_equal_structs(amsgrad.nu_max, amsgrad.nu)
    # So the trees differ, while each of Optax's fields matches.
    theirs = optax.scale_by_adam(B1, B2).init(params)
    assert jax.tree.structure(plain) != jax.tree.structure(theirs)
    for field in theirs._fields:
        chex.assert_trees_all_equal(getattr(plain, field), getattr(theirs, field))


def test_difference_3_betas_and_bias_correction_are_float32():
    params = _small_tree()
    grads = {"w": jnp.array([[3.0, -0.5], [2e-3, 0.7]]), "b": jnp.array([1e-4, -9.0])}
    eps = 1e-8
    ours_tx = adamw_jax.scale_by_adam(B1, B2, eps)
    u_ours, s_ours = ours_tx.update(grads, ours_tx.init(params))
    py_tx = _under("standard", optax.scale_by_adam(B1, B2, eps))  # Optax's own call
    u_py, s_py = py_tx.update(grads, py_tx.init(params))
    f32_tx = _under("standard", optax.scale_by_adam(jnp.float32(B1), jnp.float32(B2), eps))
    u_f32, s_f32 = f32_tx.update(grads, f32_tx.init(params))

    # (1 - b2) in float64, then rounded, against 1 - float32(b2): 1.3e-5 apart.
    expected_ratio = (1 - B2) / float(1 - np.float32(B2))
    for a, b in zip(jax.tree.leaves(s_py.nu), jax.tree.leaves(s_ours.nu), strict=True):
        np.testing.assert_allclose(a / b, expected_ratio, rtol=1e-6)
    assert abs(expected_ratio - 1 - 1.29e-5) < 1e-7
    # adamw_jax's first direction is g / (|g| + eps) to within two ulps; Optax's is off by
    # the mismatch of (1 - b1) and of sqrt(1 - b2) between moment and correction.
    for g, u, u_py_ in zip(
        jax.tree.leaves(grads), jax.tree.leaves(u_ours), jax.tree.leaves(u_py), strict=True
    ):
        exact = np.asarray(g, np.float64) / (np.abs(np.asarray(g, np.float64)) + eps)
        np.testing.assert_allclose(u, exact, rtol=2.5e-7)
        np.testing.assert_allclose(u_py_ / exact, 1 - 6.6e-6, rtol=2e-7)
    # Given float32 betas, Optax does the same arithmetic (to an ulp: run op by op, XLA
    # compiles Optax's jitted bias correction on its own).
    chex.assert_trees_all_close(u_f32, u_ours, rtol=RTOL)
    chex.assert_trees_all_close((s_f32.mu, s_f32.nu), (s_ours.mu, s_ours.nu), rtol=RTOL)


def test_difference_4_strict_dtype_promotion():
    params, grads = _small_tree(), jax.tree.map(lambda x: 0.1 * x - 0.05, _small_tree())
    with jax.numpy_dtype_promotion("strict"):
        ours = adamw_jax.adamw(LR)
        strict_out = ours.update(grads, ours.init(params), params)
        theirs = optax.adamw(LR)
        with pytest.raises(TypePromotionError, match="jax_numpy_dtype_promotion=strict"):
            theirs.update(grads, theirs.init(params), params)
    with jax.numpy_dtype_promotion("standard"):
        standard_out = ours.update(grads, ours.init(params), params)
    chex.assert_trees_all_equal(strict_out, standard_out)


def test_difference_5_eps_zero_with_zero_gradients_is_not_nan():
    params = _small_tree()
    zeros = jax.tree.map(jnp.zeros_like, params)
    ours = adamw_jax.adamw(LR, B1, B2, 0.0, 0.0, None, 0.1)
    u_ours, _ = ours.update(zeros, ours.init(params), params)
    chex.assert_trees_all_close(u_ours, jax.tree.map(lambda p: -LR * 0.1 * p, params), rtol=1e-6)
    theirs = _under("standard", optax.adamw(LR, B1, B2, 0.0, 0.0, None, 0.1))
    u_theirs, _ = theirs.update(zeros, theirs.init(params), params)
    assert all(np.isnan(u).all() for u in jax.tree.leaves(u_theirs))


def test_difference_6_mu_keeps_the_params_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _small_tree())
    grads = jax.tree.map(lambda x: (0.1 * x - 0.05).astype(jnp.float32), params)
    ours = adamw_jax.adamw(LR)
    u_ours, s_ours = ours.update(grads, ours.init(params), params)
    assert {x.dtype for x in jax.tree.leaves((u_ours, s_ours[0].mu, s_ours[0].nu))} == {
        jnp.dtype(jnp.bfloat16)
    }
    theirs = _under("standard", optax.adamw(LR))
    s0 = theirs.init(params)
    u_theirs, s_theirs = theirs.update(grads, s0, params)
    assert {x.dtype for x in jax.tree.leaves(s0[0].mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves((u_theirs, s_theirs[0].mu))} == {
        jnp.dtype(jnp.float32)
    }
    # So Optax's state cannot be carried through lax.scan; adamw_jax's can.
    gs = jax.tree.map(lambda g: jnp.stack([g, g]), grads)

    def scan(tx):
        def step(s, g):
            return tx.update(g, s, params)[1], None

        return jax.lax.scan(step, tx.init(params), gs)

    scan(ours)
    with pytest.raises(TypeError, match="carry"):
        scan(theirs)


def _second_moment(tx, grads, params, mode):
    """The second moment (as float32) after feeding ``grads`` (steps first) to ``tx``."""
    tx = _under(mode, tx)

    def step(s, g):
        return tx.update(g, s, params)[1], None

    state, _ = jax.jit(lambda gs: jax.lax.scan(step, tx.init(params), gs))(grads)
    return np.asarray(state[0].nu, np.float32)


def test_difference_7_bf16_second_moment_is_computed_in_float32():
    # 100 steps of unit-scale gradients, then 700 of a tenth of that.
    rng = np.random.default_rng(0)
    scale = np.where(np.arange(800) < 100, 1.0, 0.1)[:, None]
    grads = jnp.asarray(scale * rng.normal(size=(800, 1024)), jnp.bfloat16)
    params = jnp.zeros(1024, jnp.bfloat16)
    f32 = _second_moment(
        adamw_jax.adamw(LR), grads.astype(jnp.float32), params.astype(jnp.float32), "strict"
    )
    ours = _second_moment(adamw_jax.adamw(LR), grads, params, "strict")
    theirs = _second_moment(optax.adamw(LR), grads, params, "standard")
    assert abs(ours.mean() / f32.mean() - 1) < 0.02
    assert theirs.mean() / f32.mean() > 1.8  # never decayed: b2 = 0.999 is 1.0 in bfloat16
    assert float(jnp.asarray(B2, jnp.bfloat16)) == 1.0


def test_difference_7_bf16_first_moment_is_decayed_in_float32():
    rng = np.random.default_rng(0)
    grads = jnp.asarray(rng.normal(size=(2, 4096)), jnp.float32)
    params = jnp.zeros(4096, jnp.float32)

    def first_moment(tx, mode):
        tx = _under(mode, tx)
        state = tx.init(params)
        for g in grads:
            _, state = tx.update(g, state, params)
        assert state[0].mu.dtype == jnp.bfloat16
        return np.asarray(state[0].mu, np.float32)

    ours = first_moment(adamw_jax.adamw(LR, B1, B2, 1e-8, 0.0, jnp.bfloat16), "strict")
    theirs = first_moment(optax.adamw(LR, B1, B2, 1e-8, 0.0, jnp.bfloat16), "standard")
    f32_betas = _f32_betas(optax.adamw, LR, B1, B2, 1e-8, 0.0, jnp.bfloat16)
    np.testing.assert_array_equal(first_moment(f32_betas, "standard"), ours)
    assert np.mean(ours != theirs) > 0.25
    assert float(jnp.asarray(B1, jnp.bfloat16)) == 0.8984375


def test_difference_8_masks():
    params = _small_tree()
    grads = jax.tree.map(lambda x: 0.1 * x - 0.05, params)
    python_mask = {"w": True, "b": False}
    array_mask = {"w": jnp.array(True), "b": jnp.array(False)}

    # Boolean-array leaves, traced under jit: adamw_jax takes them, optax.masked cannot.
    def step(make, mask):
        tx = make(LR, B1, B2, 1e-8, 0.0, None, 0.1, mask)
        return tx.update(grads, tx.init(params), params)[0]

    expected = step(adamw_jax.adamw, python_mask)
    chex.assert_trees_all_close(
        jax.jit(lambda m: step(adamw_jax.adamw, m))(array_mask), expected, rtol=1e-6
    )
    with jax.numpy_dtype_promotion("standard"), pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(lambda m: step(optax.adamw, m))(array_mask)

    # A single boolean: refused by adamw_jax's adamw, a prefix of the params for Optax;
    # add_decayed_weights takes it, as Optax's does.
    with pytest.raises(TypeError, match="single boolean"):
        adamw_jax.adamw(LR, mask=True)
    with jax.numpy_dtype_promotion("standard"):
        everything = step(optax.adamw, True)
        chex.assert_trees_all_close(everything, step(optax.adamw, None), rtol=0)
    for mask, expected in (
        (True, jax.tree.map(lambda g, p: g + 0.1 * p, grads, params)),
        (False, grads),
    ):
        l2 = adamw_jax.add_decayed_weights(0.1, mask)
        chex.assert_trees_all_close(
            l2.update(grads, l2.init(params), params)[0], expected, rtol=1e-6
        )

    # A callable mask is called at update with the params (adamw_jax), or with the updates
    # that reach Optax's add_decayed_weights: Adam's directions.
    seen = []

    def recording(tree):
        seen.append(tree)
        return _rank_at_least_2(tree)

    tx = adamw_jax.adamw(LR, B1, B2, 1e-8, 0.0, None, 0.1, recording)
    state = tx.init(params)
    seen.clear()
    tx.update(grads, state, params)
    chex.assert_trees_all_equal(seen[-1], params)
    with jax.numpy_dtype_promotion("standard"):
        tx = optax.adamw(LR, B1, B2, 1e-8, 0.0, None, 0.1, recording)
        state = tx.init(params)
        seen.clear()
        tx.update(grads, state, params)
        direction = optax.scale_by_adam(B1, B2, 1e-8).update(grads, state[0])[0]
    chex.assert_trees_all_equal(seen[-1], direction)


def test_difference_9_decay_states_always_hold_a_count():
    params = _small_tree()
    ours = [
        adamw_jax.add_decayed_weights(0.1).init(params),
        adamw_jax.add_decayed_weights(lambda count: 0.1).init(params),
        adamw_jax.add_decayed_weights(0.1, {"w": True, "b": False}).init(params),
    ]
    for state in ours:
        assert isinstance(state, adamw_jax.AddDecayedWeightsState)
        assert int(state.count) == 0
    theirs = [
        optax.add_decayed_weights(0.1).init(params),
        optax.add_decayed_weights(lambda count: 0.1).init(params),
        optax.add_decayed_weights(0.1, {"w": True, "b": False}).init(params),
    ]
    assert [type(s).__name__ for s in theirs] == [
        "EmptyState",
        "WeightDecaySchedule",
        "MaskedState",
    ]

    s_ours, s_theirs = adamw_jax.adamw(LR).init(params), optax.adamw(LR).init(params)
    assert [type(s).__name__ for s in s_ours] == ["ScaleByAdamState", "DecoupledWeightDecayState"]
    assert [type(s).__name__ for s in s_theirs] == ["ScaleByAdamState", "EmptyState", "EmptyState"]


def test_difference_10_adam_needs_the_params_only_for_an_l2_penalty():
    params = _small_tree()
    grads = jax.tree.map(lambda x: 0.1 * x - 0.05, params)
    ours = adamw_jax.adam(LR)
    theirs = _under("standard", optax.adam(LR))
    without_params = ours.update(grads, ours.init(params))  # no params needed, as Optax
    chex.assert_trees_all_equal(without_params, ours.update(grads, ours.init(params), params))
    chex.assert_trees_all_close(
        without_params[0],
        theirs.update(grads, theirs.init(params))[0],
        rtol=1e-5,  # Python-float betas on Optax's side: difference 3
    )
    penalized = adamw_jax.adam(LR, l2=1e-3)
    with pytest.raises(ValueError, match="add_decayed_weights needs the params"):
        penalized.update(grads, penalized.init(params))


@pytest.mark.parametrize(
    "name, value",
    [
        ("b1", 1.0),
        ("b2", -0.1),
        ("learning_rate", -1e-3),
        ("learning_rate", math.inf),
        ("eps", math.nan),
        ("eps_root", -1e-8),
        ("weight_decay", -0.1),
    ],
)
def test_difference_11_hyperparameters_are_checked(name, value):
    kwargs = {"learning_rate": LR, name: value}
    optax.adamw(**kwargs)  # builds without complaint
    with pytest.raises(ValueError, match=name):
        adamw_jax.adamw(**kwargs)


def test_difference_11_add_decayed_weights_takes_negative_coefficients_as_optax():
    for weight_decay in (-0.1, lambda count: -0.1):
        adamw_jax.add_decayed_weights(weight_decay)  # as optax.add_decayed_weights
    with pytest.raises(ValueError, match=r"weight_decay must be in \(-inf, inf\)"):
        adamw_jax.add_decayed_weights(math.inf)


def test_difference_12_integer_params_are_refused():
    params = {"i": jnp.array([1, 2], jnp.int32)}
    with pytest.raises(TypeError, match=r"\['i'\]"):
        adamw_jax.adamw(LR).init(params)
    theirs = _under("standard", optax.adamw(LR))
    updates, state = theirs.update(params, theirs.init(params), params)
    assert jnp.issubdtype(updates["i"].dtype, jnp.floating)
    assert state[0].nu["i"].dtype == jnp.int32
