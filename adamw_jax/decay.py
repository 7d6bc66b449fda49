"""Weight decay: the L2-style ``add_decayed_weights`` and the decoupled decay of AdamW."""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamw_jax import _numerics, _validate, masks
from adamw_jax._base import Mask, ScalarOrSchedule

__all__ = [
    "AddDecayedWeightsState",
    "DecoupledWeightDecayState",
    "add_decayed_weights",
    "decoupled_weight_decay",
]

DECAY_COUPLINGS = ("lr", "schedule", "none", "adamc")
# The couplings whose decay follows learning_rate(t) / peak_learning_rate.
_PEAK_COUPLINGS = ("schedule", "adamc")
DECAY_TARGETS = ("zero", "init")


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights`: the step count, for a scheduled decay."""

    count: jax.Array


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: the step count, and the decay target.

    Attributes:
      count: the step count, int32, for schedules.
      target: the params the decay pulls toward, a tree like the params
        (``decay_target="init"`` or a pytree); None when it pulls toward zero.
    """

    count: jax.Array
    target: Any = None


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0, mask: Mask = None
) -> optax.GradientTransformation:
    r"""Adds ``weight_decay * params`` to the updates (an L2 penalty's gradient).

    .. math::

      u \leftarrow u + \lambda_t\, w

    on the leaves ``mask`` selects. A drop-in for ``optax.add_decayed_weights``: it takes
    the same arguments, a negative coefficient (``optax.fromage`` adds
    :math:`(1/\sqrt{1 + \eta^2} - 1)\, w`) and a single ``True`` or ``False`` for the
    mask (``optax.lars``' default) included. Placed before :func:`adamw_jax.scale_by_adam`
    it is classic Adam with an L2 penalty; placed after it and before the learning rate it
    is AdamW.

    Args:
      weight_decay: :math:`\lambda_t`, a finite real number (negative ones pull the
        weights outward), a scalar array or a schedule.
      mask: None or ``True`` (all leaves), ``False`` (none), a bool pytree like the params
        (or a prefix of it), or a callable ``params -> bool pytree`` (see
        :mod:`adamw_jax.masks`).

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params`` unless
      ``weight_decay`` is the number 0 (then the updates pass through unchanged).

    Example:
      >>> import jax.numpy as jnp
      >>> import adamw_jax
      >>> tx = adamw_jax.add_decayed_weights(0.1)
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> updates["w"]
      Array([0.1, 0.2], dtype=float32)

    References:
      Hanson & Pratt, "Comparing biases for minimal network construction with
      back-propagation", NeurIPS 1988.
    """
    _validate.check_scalar(
        "weight_decay", weight_decay, low=-math.inf, low_inclusive=False, allow_schedule=True
    )
    _validate.check_mask("mask", mask, allow_single_bool=True)

    def init_fn(params):
        masks.resolve_mask(mask, params)  # a mask that does not fit fails here, not later
        return AddDecayedWeightsState(jnp.zeros([], jnp.int32))

    needs_params = not _is_zero(weight_decay)

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        if params is None and not needs_params:  # adding 0 * params needs no params
            _validate.check_updates_given("add_decayed_weights", updates)
            return updates, AddDecayedWeightsState(count)
        _validate.check_update_call("add_decayed_weights", updates, params)
        wd = _numerics.value_at(weight_decay, state.count)
        decay = functools.partial(_add_decayed_weight, wd)
        new = masks.map_masked(masks.resolve_mask(mask, params), decay, _unchanged, updates, params)
        return new, AddDecayedWeightsState(count)

    return optax.GradientTransformation(init_fn, update_fn)


def _is_zero(value: Any) -> bool:
    """Whether ``value`` is known, before tracing, to be the number 0 (not a schedule)."""
    if _numerics.is_schedule(value) or isinstance(value, jax.core.Tracer):
        return False
    return float(value) == 0.0


def _add_decayed_weight(wd: Any, u: jax.Array, p: jax.Array) -> jax.Array:
    """``u + wd * p`` in the update's dtype."""
    c = _numerics.compute_dtype(u.dtype, p.dtype)
    return (u.astype(c) + jnp.asarray(wd, c) * p.astype(c)).astype(u.dtype)


def _unchanged(u: jax.Array, p: jax.Array) -> jax.Array:
    """The update as it is: a leaf that does not decay."""
    del p
    return u


def decoupled_weight_decay(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    mask: Mask = None,
    decay_coupling: str = "lr",
    peak_learning_rate: float | None = None,
    cautious: bool = False,
    decay_target: str | Any = "zero",
) -> optax.GradientTransformation:
    r"""Applies the learning rate and decoupled weight decay to a scaled direction.

    Maps an update direction :math:`u` (e.g. from :func:`adamw_jax.scale_by_adam`) to the
    step :math:`-\eta_t u - d_t w`, where the decay :math:`d_t` depends on
    ``decay_coupling``:

    .. math::

      d_t = \begin{cases}
        \eta_t \lambda_t & \text{"lr" (PyTorch, Optax)} \\
        (\eta_t / \eta_{peak}) \lambda_t & \text{"schedule" (Loshchilov \& Hutter)} \\
        \lambda_t & \text{"none" (independent of the step size)} \\
        (\eta_t^2 / \eta_{peak}) \lambda_t & \text{"adamc" (Defazio)}
      \end{cases}

    and :math:`d_t = 0` on leaves the mask leaves out. With ``"schedule"`` or ``"adamc"``
    and a learning rate that is not a schedule, :math:`\eta_t / \eta_{peak} = 1` unless
    ``peak_learning_rate`` is given (``"adamc"`` is then ``"lr"``).

    The step is computed in float32 or the wider of the update's and the parameter's dtypes,
    and returned in the parameter's dtype (so a bfloat16 direction applied to float32
    params loses nothing further).

    ``"adamc"`` (AdamC) is ``"lr"`` with the decay scaled by :math:`\eta_t / \eta_{peak}`.
    For a layer whose output is normalized (a matrix followed by LayerNorm or RMSNorm), the
    weight norm settles where decay and update balance, at a ratio of update norm to weight
    norm of about :math:`\sqrt{2 d_t} / \eta_t`: with ``"lr"`` that is
    :math:`\sqrt{2 \lambda / \eta_t}`, which grows as the schedule anneals :math:`\eta_t`
    (the gradient norm's rise at the end of training); with ``"adamc"`` it stays
    :math:`\sqrt{2 \lambda / \eta_{peak}}`. It is meant for those layers: give a ``mask``
    that selects them (e.g. ``adamw_jax.masks.by_ndim(2)``, the matrices); the leaves it
    leaves out take the plain step :math:`-\eta_t u`.

    With a decay target :math:`w_{ref}` the decay pulls toward it instead of toward zero
    (as in fine-tuning, where it keeps the weights near the pretrained ones):

    .. math::

      w \leftarrow w - \eta_t u - d_t\, c \odot (w - w_{ref}), \qquad
      c = \begin{cases}
        \mathbb{1}[u \odot (w - w_{ref}) \ge 0] & \text{cautious} \\
        1 & \text{otherwise}
      \end{cases}

    Cautious weight decay (Chen et al.) decays a coordinate only where it moves the same
    way as the update, the sign of :math:`u` agreeing with that of :math:`w - w_{ref}`
    (ties, where either is zero, decay, as the paper's indicator
    :math:`\mathbb{1}[u \odot w \ge 0]`; for complex leaves
    :math:`\operatorname{Re}(u \bar x) \ge 0`).

    Args:
      learning_rate: :math:`\eta_t`, in [0, inf): a number, a scalar array or a schedule
        (a callable of the step count).
      weight_decay: :math:`\lambda_t`, in [0, inf): a number, a scalar array or a schedule;
        1e-4 by default, as ``optax.adamw``'s.
      mask: None (all leaves), a bool pytree like the params (or a prefix of it), or a
        callable ``params -> bool pytree`` (see :mod:`adamw_jax.masks`).
      decay_coupling: ``"lr"``, ``"schedule"``, ``"none"`` or ``"adamc"``.
      peak_learning_rate: :math:`\eta_{peak}`, in (0, inf); only with ``"schedule"`` or
        ``"adamc"``, and required there when ``learning_rate`` is a schedule.
      cautious: a bool; True decays only the coordinates where the update and
        :math:`w - w_{ref}` agree in sign (cautious weight decay). Works with every
        ``decay_coupling`` and mask.
      decay_target: :math:`w_{ref}`: ``"zero"`` (the default, plain decay), ``"init"``
        (the params given to ``init``, copied into the state: the state grows by one copy
        of the params, as ``adamw_jax.state_nbytes`` shows) or a pytree with the params'
        structure and shapes (also copied into the state by ``init``).

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import adamw_jax
      >>> tx = adamw_jax.decoupled_weight_decay(0.1, 0.5, decay_coupling="none")
      >>> params = {"w": jnp.array([2.0])}
      >>> updates, _ = tx.update({"w": jnp.array([1.0])}, tx.init(params), params)
      >>> updates["w"]  # -(0.1 * 1.0 + 0.5 * 2.0)
      Array([-1.1], dtype=float32)
      >>> tx = adamw_jax.decoupled_weight_decay(
      ...     0.1, 0.5, decay_coupling="none", cautious=True, decay_target="init"
      ... )
      >>> state = tx.init(params)  # stores w_ref = 2
      >>> updates, _ = tx.update({"w": jnp.array([1.0])}, state, {"w": jnp.array([3.0])})
      >>> updates["w"]  # -(0.1 * 1.0 + 0.5 * (3.0 - 2.0)): u and w - w_ref agree
      Array([-0.6], dtype=float32)
      >>> updates, _ = tx.update({"w": jnp.array([-1.0])}, state, {"w": jnp.array([3.0])})
      >>> updates["w"]  # they disagree: no decay
      Array([0.1], dtype=float32)

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
      Chen et al., "Cautious Weight Decay", arXiv:2510.12402, 2025.
      Defazio, "Why Gradients Rapidly Increase Near the End of Training",
      arXiv:2506.02285, 2025 (``"adamc"``).
    """
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    _validate.check_scalar("weight_decay", weight_decay, low=0.0, allow_schedule=True)
    _validate.check_choice("decay_coupling", decay_coupling, DECAY_COUPLINGS)
    _validate.check_mask("mask", mask)
    _validate.check_bool("cautious", cautious)
    _check_decay_target(decay_target)
    _check_peak_learning_rate(peak_learning_rate, decay_coupling, learning_rate)
    coupling = _effective_coupling(decay_coupling, peak_learning_rate)

    def init_fn(params):
        masks.resolve_mask(mask, params)  # a mask that does not fit fails here, not later
        return DecoupledWeightDecayState(
            jnp.zeros([], jnp.int32), _initial_target(decay_target, params)
        )

    def update_fn(updates, state, params=None):
        _validate.check_update_call("decoupled_weight_decay", updates, params)
        target = _state_target(decay_target, state, params)
        lr = _numerics.value_at(learning_rate, state.count)
        wd = _numerics.value_at(weight_decay, state.count)
        # Made once per compute dtype, for all the leaves computed in it.
        scalars = functools.cache(
            functools.partial(_decay_scalars, lr, wd, coupling, peak_learning_rate)
        )
        decayed = functools.partial(_decayed_step, coupling, cautious, scalars)
        plain = functools.partial(_plain_step, scalars)
        trees = (updates, params) if target is None else (updates, params, target)
        new = masks.map_masked(masks.resolve_mask(mask, params), decayed, plain, *trees)
        return new, DecoupledWeightDecayState(optax.safe_increment(state.count), target)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_decay_target(decay_target: Any) -> None:
    """Refuses a decay target that is neither a known name nor a non-empty pytree."""
    if isinstance(decay_target, str):
        _validate.check_choice("decay_target", decay_target, DECAY_TARGETS)
    elif not jax.tree.leaves(decay_target):
        raise TypeError(
            f"decay_target must be one of {DECAY_TARGETS} or a pytree of arrays with the "
            f"params' structure and shapes; got {decay_target!r}."
        )


def _initial_target(decay_target: Any, params: Any) -> Any:
    """The target stored by ``init``: None (toward zero), or a copy of the params or tree."""
    if isinstance(decay_target, str):
        return None if decay_target == "zero" else jax.tree.map(jnp.copy, params)
    _validate.check_same_structure("decay_target", decay_target, params, "the params")
    return jax.tree.map(jnp.array, decay_target)  # a copy: donated params leave it intact


def _state_target(decay_target: Any, state: DecoupledWeightDecayState, params: Any) -> Any:
    """The state's target, checked against the params; refuses a state that lacks one."""
    if isinstance(decay_target, str) and decay_target == "zero":
        return None
    target = state.target
    if target is None:
        raise ValueError(
            "decoupled_weight_decay(decay_target=...) got a state without a target: build "
            "the state with this transformation's init."
        )
    _validate.check_same_structure("decay_target", target, params, "the params")
    return target


def _check_peak_learning_rate(
    peak_learning_rate: Any, decay_coupling: str, learning_rate: ScalarOrSchedule
) -> None:
    """Refuses a peak the coupling does not use, and a missing one that it needs.

    ``"schedule"`` and ``"adamc"`` use it, and need it when ``learning_rate`` is a schedule.
    """
    if peak_learning_rate is not None:
        if decay_coupling not in _PEAK_COUPLINGS:
            raise ValueError(
                "peak_learning_rate is used only with decay_coupling='schedule' or 'adamc'; "
                f"got peak_learning_rate={peak_learning_rate!r} with "
                f"decay_coupling={decay_coupling!r}."
            )
        _validate.check_scalar(
            "peak_learning_rate", peak_learning_rate, low=0.0, low_inclusive=False
        )
    elif decay_coupling in _PEAK_COUPLINGS and _numerics.is_schedule(learning_rate):
        raise ValueError(
            "peak_learning_rate must be given (in (0, inf)) when "
            f"decay_coupling={decay_coupling!r} and learning_rate is a schedule: the decay "
            "follows learning_rate(t) / peak_learning_rate."
        )


def _effective_coupling(decay_coupling: str, peak_learning_rate: Any) -> str:
    """The coupling the step applies: without a peak, ``"schedule"`` is ``"none"``, and
    ``"adamc"`` is ``"lr"``.

    Without ``peak_learning_rate`` the multiplier learning rate / peak is taken as 1, which
    makes the step that of ``"none"`` (``"schedule"``) or ``"lr"`` (``"adamc"``).
    """
    if peak_learning_rate is None:
        return {"schedule": "none", "adamc": "lr"}.get(decay_coupling, decay_coupling)
    return decay_coupling


class _DecayScalars(NamedTuple):
    """One step's scalars in one compute dtype."""

    lr: jax.Array  # the learning rate, eta_t
    # lambda_t; divided by eta_peak with "schedule", times eta_t / eta_peak with "adamc"
    decay: jax.Array


def _decay_scalars(
    lr: Any, wd: Any, coupling: str, peak_learning_rate: Any, dtype: Any
) -> _DecayScalars:
    """The learning rate and decay factor of a step (values at its count) in ``dtype``."""
    decay = jnp.asarray(wd, dtype)
    if coupling == "schedule":
        decay = decay / jnp.asarray(peak_learning_rate, dtype)
    elif coupling == "adamc":
        decay = decay * (jnp.asarray(lr, dtype) / jnp.asarray(peak_learning_rate, dtype))
    return _DecayScalars(jnp.asarray(lr, dtype), decay)


def _decayed_step(
    coupling: str,
    cautious: bool,
    scalars: Callable[[Any], _DecayScalars],
    u: jax.Array,
    p: jax.Array,
    ref: jax.Array | None = None,
) -> jax.Array:
    """``-(eta u + d c (w - w_ref))`` in the param's dtype: a leaf that decays."""
    c = _numerics.compute_dtype(u.dtype, p.dtype, *([] if ref is None else [ref.dtype]))
    s, uc, pc = scalars(c), u.astype(c), p.astype(c)
    x = pc if ref is None else pc - ref.astype(c)
    decay = s.decay * x
    if cautious:
        decay = jnp.where(_numerics.signs_agree(uc, x, ties=True), decay, jnp.zeros_like(decay))
    if coupling == "none":
        step = s.lr * uc + decay
    else:  # "lr", and "schedule" and "adamc" with the decay already scaled by the peak
        step = s.lr * (uc + decay)
    return (-step).astype(p.dtype)


def _plain_step(
    scalars: Callable[[Any], _DecayScalars], u: jax.Array, p: jax.Array, ref: Any = None
) -> jax.Array:
    """``-eta u`` in the param's dtype: a leaf that does not decay."""
    del ref
    c = _numerics.compute_dtype(u.dtype, p.dtype)
    return (-scalars(c).lr * u.astype(c)).astype(p.dtype)
