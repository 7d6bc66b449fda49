"""Weight decay: the L2-style ``add_decayed_weights`` and the decoupled decay of AdamW."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamw_jax import _numerics, _validate, masks
from adamw_jax._base import Mask, ScalarOrSchedule

DECAY_COUPLINGS = ("lr", "schedule", "none")


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights`: the step count, for a scheduled decay."""

    count: jax.Array


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: the step count, for schedules."""

    count: jax.Array


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0, mask: Mask = None
) -> optax.GradientTransformation:
    r"""Adds ``weight_decay * params`` to the updates (an L2 penalty's gradient).

    .. math::

      u \leftarrow u + \lambda_t\, w

    on the leaves ``mask`` selects. A drop-in for ``optax.add_decayed_weights`` that also
    accepts a schedule. Placed before :func:`adamw_jax.scale_by_adam` it is classic Adam
    with an L2 penalty; placed after it and before the learning rate it is AdamW.

    Args:
      weight_decay: :math:`\lambda_t`, in [0, inf): a number, a scalar array or a schedule.
      mask: None (all leaves), a bool pytree like the params (or a prefix of it), or a
        callable ``params -> bool pytree`` (see :mod:`adamw_jax.masks`).

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params``.

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
    _validate.check_scalar("weight_decay", weight_decay, low=0.0, allow_schedule=True)
    _validate.check_mask("mask", mask)

    def init_fn(params):
        del params
        return AddDecayedWeightsState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        _validate.check_updates_given("add_decayed_weights", updates)
        _validate.check_params_given("add_decayed_weights", params)
        _validate.check_same_structure("updates", updates, params, "the params")
        wd = _numerics.value_at(weight_decay, state.count)

        def decay(u, p):
            c = _numerics.compute_dtype(u.dtype, p.dtype)
            return (u.astype(c) + jnp.asarray(wd, c) * p.astype(c)).astype(u.dtype)

        new = masks.map_masked(
            masks.resolve_mask(mask, params), decay, lambda u, p: u, updates, params
        )
        return new, AddDecayedWeightsState(_numerics.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def decoupled_weight_decay(
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    mask: Mask = None,
    decay_coupling: str = "lr",
    peak_learning_rate: float | None = None,
) -> optax.GradientTransformation:
    r"""Applies the learning rate and decoupled weight decay to a scaled direction.

    Maps an update direction :math:`u` (e.g. from :func:`adamw_jax.scale_by_adam`) to the
    step :math:`-\eta_t u - d_t w`, where the decay :math:`d_t` depends on
    ``decay_coupling``:

    .. math::

      d_t = \begin{cases}
        \eta_t \lambda_t & \text{"lr" (PyTorch, Optax)} \\
        (\eta_t / \eta_{peak}) \lambda_t & \text{"schedule" (Loshchilov \& Hutter)} \\
        \lambda_t & \text{"none" (independent of the step size)}
      \end{cases}

    and :math:`d_t = 0` on leaves the mask leaves out. With ``"schedule"`` and a learning
    rate that is not a schedule, :math:`\eta_t / \eta_{peak} = 1` unless
    ``peak_learning_rate`` is given. The step is computed in float32 or the wider of the
    update's and the parameter's dtypes, and returned in the parameter's dtype (so a
    bfloat16 direction applied to float32 params loses nothing further).

    Args:
      learning_rate: :math:`\eta_t`, in [0, inf): a number, a scalar array or a schedule
        (a callable of the step count).
      weight_decay: :math:`\lambda_t`, in [0, inf): a number, a scalar array or a schedule;
        1e-4 by default, as ``optax.adamw``'s.
      mask: None (all leaves), a bool pytree like the params (or a prefix of it), or a
        callable ``params -> bool pytree`` (see :mod:`adamw_jax.masks`).
      decay_coupling: ``"lr"``, ``"schedule"`` or ``"none"``.
      peak_learning_rate: :math:`\eta_{peak}`, in (0, inf); only with ``"schedule"``, and
        required there when ``learning_rate`` is a schedule.

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

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    _validate.check_scalar("weight_decay", weight_decay, low=0.0, allow_schedule=True)
    _validate.check_choice("decay_coupling", decay_coupling, DECAY_COUPLINGS)
    _validate.check_mask("mask", mask)
    if peak_learning_rate is not None:
        if decay_coupling != "schedule":
            raise ValueError(
                "peak_learning_rate is used only with decay_coupling='schedule'; got "
                f"peak_learning_rate={peak_learning_rate!r} with "
                f"decay_coupling={decay_coupling!r}."
            )
        _validate.check_scalar(
            "peak_learning_rate", peak_learning_rate, low=0.0, low_inclusive=False
        )
    elif decay_coupling == "schedule" and _numerics.is_schedule(learning_rate):
        raise ValueError(
            "peak_learning_rate must be given (in (0, inf)) when decay_coupling='schedule' "
            "and learning_rate is a schedule: the decay follows learning_rate(t) / "
            "peak_learning_rate."
        )
    # With "schedule" and no peak the multiplier is 1: the same step as "none".
    coupling = (
        "none" if decay_coupling == "schedule" and peak_learning_rate is None else (decay_coupling)
    )

    def init_fn(params):
        del params
        return DecoupledWeightDecayState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        _validate.check_updates_given("decoupled_weight_decay", updates)
        _validate.check_params_given("decoupled_weight_decay", params)
        _validate.check_same_structure("updates", updates, params, "the params")
        lr = _numerics.value_at(learning_rate, state.count)
        wd = _numerics.value_at(weight_decay, state.count)

        scalars_by_dtype: dict = {}

        def scalars(c):
            """(learning rate, decay factor) in dtype ``c``, made once for all leaves."""
            if c not in scalars_by_dtype:
                lam = jnp.asarray(wd, c)
                if coupling == "schedule":
                    lam = lam / jnp.asarray(peak_learning_rate, c)
                scalars_by_dtype[c] = (jnp.asarray(lr, c), lam)
            return scalars_by_dtype[c]

        def plain(u, p):
            c = _numerics.compute_dtype(u.dtype, p.dtype)
            eta, _ = scalars(c)
            return (-eta * u.astype(c)).astype(p.dtype)

        def decayed(u, p):
            c = _numerics.compute_dtype(u.dtype, p.dtype)
            (eta, lam), uc, pc = scalars(c), u.astype(c), p.astype(c)
            if coupling == "none":
                step = eta * uc + lam * pc
            else:  # "lr", and "schedule" with lam already divided by the peak
                step = eta * (uc + lam * pc)
            return (-step).astype(p.dtype)

        new = masks.map_masked(masks.resolve_mask(mask, params), decayed, plain, updates, params)
        return new, DecoupledWeightDecayState(_numerics.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
