"""Schedules and formulas: the AdamW paper's warm restarts (AdamWR) and normalized decay,
schedules whose peak may be traced (a hyperparameter of a sweep), and the EMA timescale with
the starting weight decay it suggests."""

import decimal
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _validate

__all__ = [
    "cosine_warm_restarts",
    "ema_timescale",
    "normalized_weight_decay",
    "weight_decay_for_timescale",
]

_INT32_MAX = int(np.iinfo(np.int32).max)
# Restart boundaries are computed in decimal arithmetic with this many significant digits,
# and a boundary closer than _SNAP to an integer step is taken to be that step.
_DIGITS = 60
_SNAP = decimal.Decimal("1e-30")


def _check_period(first_period: Any) -> int:
    _validate.check_int("first_period", first_period, low=1, high=_INT32_MAX, static=True)
    return int(first_period)


def _restart_table(first_period: int, period_mult: float) -> dict[str, np.ndarray]:
    """The cycles that start within int32 steps: where each starts and how long it lasts.

    Boundaries :math:`B_i = \\sum_{j<i} T_0 \\mu^j` are accumulated in decimal arithmetic
    from the decimal that ``period_mult`` prints as (1.1 means 11/10, not the nearest
    binary fraction), so integer boundaries such as 21 for ``(10, 1.1)`` come out exact.
    """
    ctx = decimal.Context(prec=_DIGITS)
    mult = decimal.Decimal(repr(float(period_mult)))
    boundary, period = decimal.Decimal(0), decimal.Decimal(first_period)
    first_steps, bases, offsets, starts, periods = [], [], [], [], []
    while boundary <= _INT32_MAX:
        nearest = boundary.to_integral_value(rounding=decimal.ROUND_HALF_EVEN)
        if abs(boundary - nearest) < _SNAP:
            boundary = nearest
        base = int(boundary.to_integral_value(rounding=decimal.ROUND_FLOOR))
        offset = ctx.subtract(boundary, decimal.Decimal(base))
        first_steps.append(base if offset == 0 else base + 1)  # the first integer step >= B_i
        bases.append(base)
        offsets.append(float(offset))
        starts.append(float(boundary))
        periods.append(float(period))
        boundary = ctx.add(boundary, period)
        period = ctx.multiply(period, mult)
    return {
        "first_step": np.asarray(first_steps, np.int64).clip(max=_INT32_MAX).astype(np.int32),
        "base": np.asarray(bases, np.int32),
        "offset": np.asarray(offsets, np.float64),
        "start": np.asarray(starts, np.float64),
        "period": np.asarray(periods, np.float64),
    }


def cosine_warm_restarts(
    peak_value: float,
    first_period: int,
    period_mult: float = 1.0,
    min_value: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
    r"""Cosine annealing with warm restarts (SGDR), the schedule of AdamWR.

    The steps are split into cycles of lengths :math:`T_i = T_0 \mu^i` (``first_period``
    :math:`T_0`, ``period_mult`` :math:`\mu`); cycle :math:`i` starts at
    :math:`B_i = \sum_{j<i} T_j`. At step :math:`t` in cycle :math:`i`, with
    :math:`T_{cur} = t - B_i \in [0, T_i)`:

    .. math::

      \eta_t = \eta_{min} + \tfrac{1}{2} (\eta_{max} - \eta_{min})
               \left(1 + \cos\left(\pi \, T_{cur} / T_i\right)\right)

    so every cycle starts at ``peak_value`` and decays towards ``min_value``; the first step
    at or after each :math:`B_i` is a restart. With a fractional :math:`\mu` the boundaries
    fall between steps (e.g. ``(10, 1.5)``: 0, 10, 25, 47.5, ...), and step 48 then has
    :math:`T_{cur} = 0.5`. Boundaries are computed exactly on the host from the decimal
    ``period_mult`` prints as (1.1 is 11/10), and the position in the cycle is found with
    integer arithmetic, so restarts land on the right step even near ``2**31`` steps.

    Args:
      peak_value: :math:`\eta_{max}`, in [0, inf): the value at every restart.
      first_period: :math:`T_0`, the first cycle's length in steps, an int in
        [1, 2**31 - 1].
      period_mult: :math:`\mu`, in [1, inf): each cycle is this much longer than the
        previous one (1: equal cycles; 2: the paper's doubling).
      min_value: :math:`\eta_{min}`, in [0, peak_value].

    Returns:
      A schedule ``step -> value`` (an optax schedule): jittable, vmappable, for integer or
      float steps; negative steps give ``peak_value``. The value is float32, or float64
      when ``jax_enable_x64`` is on.

    Example:
      >>> from adamw_jax import schedules
      >>> sched = schedules.cosine_warm_restarts(1.0, first_period=4, period_mult=2.0)
      >>> [round(float(sched(t)), 3) for t in (0, 2, 4, 8, 11, 12)]  # restarts at 0, 4, 12
      [1.0, 0.5, 1.0, 0.5, 0.038, 1.0]

    References:
      Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts",
      ICLR 2017.
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019 (AdamWR).
    """
    _validate.check_scalar("peak_value", peak_value, low=0.0)
    period0 = _check_period(first_period)
    _validate.check_scalar("period_mult", period_mult, low=1.0)
    _validate.check_scalar(
        "min_value", min_value, low=0.0, high=float(peak_value), high_inclusive=True
    )
    table = None if float(period_mult) == 1.0 else _restart_table(period0, float(period_mult))

    @jax.jit
    def schedule(step):
        step = jnp.asarray(step)
        dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
        if jnp.issubdtype(step.dtype, jnp.integer):
            t = jnp.clip(step, 0, _INT32_MAX).astype(jnp.int32)
            if table is None:
                position = (t % period0).astype(dtype)
                length = jnp.asarray(period0, dtype)
            else:
                i = jnp.searchsorted(table["first_step"], t, side="right") - 1
                since_base = (t - jnp.asarray(table["base"])[i]).astype(dtype)
                position = since_base - jnp.asarray(table["offset"], dtype)[i]
                length = jnp.asarray(table["period"], dtype)[i]
        else:
            t = jnp.maximum(step.astype(dtype), 0)
            if table is None:
                position = t - jnp.floor(t / period0) * period0
                length = jnp.asarray(period0, dtype)
            else:
                starts = jnp.asarray(table["start"], dtype)
                i = jnp.searchsorted(starts, t, side="right") - 1
                position = t - starts[i]
                length = jnp.asarray(table["period"], dtype)[i]
        cosine = 0.5 * (1 + jnp.cos(jnp.asarray(math.pi, dtype) * (position / length)))
        lo, hi = jnp.asarray(min_value, dtype), jnp.asarray(peak_value, dtype)
        return lo + (hi - lo) * cosine

    return schedule


def normalized_weight_decay(
    lambda_norm: float, batch_size: int, dataset_size: int, epochs: float
) -> float:
    r"""The weight decay for a run, from the paper's normalized weight decay.

    .. math::

      \lambda = \lambda_{norm} \sqrt{\frac{b}{B \, T}}

    with batch size :math:`b`, :math:`B` training points per epoch and :math:`T` epochs
    (:math:`B T / b` is the number of steps). A good :math:`\lambda_{norm}` (the paper finds
    about 0.025 to 0.05 for its image models) then transfers across run lengths and batch
    sizes, where a raw :math:`\lambda` must be retuned.

    Args:
      lambda_norm: :math:`\lambda_{norm}`, in [0, inf).
      batch_size: :math:`b`, in (0, inf).
      dataset_size: :math:`B`, training points per epoch, in (0, inf).
      epochs: :math:`T`, in (0, inf) (may be fractional, or the epochs of one restart
        cycle with warm restarts, as in AdamWR).

    Returns:
      :math:`\lambda`, as a Python float.

    Example:
      >>> from adamw_jax import schedules
      >>> schedules.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000,
      ...                                   epochs=200)  # 0.05 * sqrt(128 / 1e7)
      0.00017888543819998318

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, App. B.
    """
    _validate.check_scalar("lambda_norm", lambda_norm, low=0.0)
    _validate.check_scalar("batch_size", batch_size, low=0.0, low_inclusive=False)
    _validate.check_scalar("dataset_size", dataset_size, low=0.0, low_inclusive=False)
    _validate.check_scalar("epochs", epochs, low=0.0, low_inclusive=False)
    return float(lambda_norm) * math.sqrt(float(batch_size) / (float(dataset_size) * float(epochs)))


def ema_timescale(learning_rate: float, weight_decay: float) -> float:
    r"""The number of steps AdamW's weights average over: :math:`\tau = 1 / (\eta \lambda)`.

    With ``decay_coupling="lr"`` each step multiplies the weights by
    :math:`1 - \eta\lambda`, so they are an exponential moving average of recent updates
    with timescale

    .. math::

      \tau_{iter} = \frac{1}{\eta \lambda} \text{ steps}, \qquad
      \tau_{epoch} = \tau_{iter} / M \text{ epochs (M steps per epoch)}.

    Wang & Aitchison find the best :math:`\tau_{epoch}` roughly constant across model and
    dataset sizes, between one epoch and the whole run.

    Args:
      learning_rate: :math:`\eta`, in (0, inf).
      weight_decay: :math:`\lambda`, in (0, inf).

    Returns:
      :math:`\tau` in steps, a Python float.

    Example:
      >>> from adamw_jax import schedules
      >>> schedules.ema_timescale(1e-3, 0.1)  # 1 / (1e-3 * 0.1)
      10000.0

    References:
      Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset
      size", ICML 2025 (arXiv:2405.13698).
    """
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, low_inclusive=False)
    _validate.check_scalar("weight_decay", weight_decay, low=0.0, low_inclusive=False)
    return 1.0 / (float(learning_rate) * float(weight_decay))


def weight_decay_for_timescale(learning_rate: float, tau: float) -> float:
    r"""The weight decay that gives an EMA timescale of ``tau`` steps: the inverse of
    :func:`ema_timescale`.

    .. math::

      \lambda = \frac{1}{\eta \, \tau}

    Args:
      learning_rate: :math:`\eta`, in (0, inf).
      tau: :math:`\tau`, the wanted timescale in steps, in (0, inf) (for a timescale in
        epochs, multiply it by the steps per epoch first).

    Returns:
      :math:`\lambda`, a Python float.

    Example:
      >>> from adamw_jax import schedules
      >>> schedules.weight_decay_for_timescale(1e-3, tau=10 * 390)  # 10 epochs of 390 steps
      0.25641025641025644

    References:
      Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset
      size", ICML 2025 (arXiv:2405.13698).
    """
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, low_inclusive=False)
    _validate.check_scalar("tau", tau, low=0.0, low_inclusive=False)
    return 1.0 / (float(learning_rate) * float(tau))


def scale_schedule(schedule: Callable[[Any], Any], peak: Any) -> Callable[[Any], jax.Array]:
    r"""A schedule with a traced peak: ``step -> peak * schedule(step)``.

    Optax's schedules check their arguments with Python comparisons, so they refuse a
    traced peak (a member-varying learning rate). Build the schedule's shape with peak 1
    and scale it here.

    Args:
      schedule: a schedule with peak 1, e.g.
        ``optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps)``.
      peak: the peak value: a number or a traced scalar.

    Returns:
      A schedule whose values are ``peak`` times ``schedule``'s, in ``peak``'s dtype.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamw_jax import schedules
      >>> lr = schedules.scale_schedule(optax.linear_schedule(1.0, 0.0, 10), jnp.float32(0.5))
      >>> float(lr(5))
      0.25
    """
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable step -> value; got {schedule!r}.")
    peak = jnp.asarray(peak)
    if peak.ndim != 0 or not jnp.issubdtype(peak.dtype, jnp.floating):
        raise TypeError(f"peak must be a real float scalar; got {peak.dtype}{peak.shape}.")

    def scaled(step):
        return peak * jnp.asarray(schedule(step), peak.dtype)

    return scaled


def warmup_cosine(
    peak: Any, *, warmup_steps: int, decay_steps: int, end_fraction: float = 0.0
) -> Callable[[Any], jax.Array]:
    r"""Linear warm-up from 0 to a (traced) ``peak``, then cosine decay to
    ``end_fraction * peak``.

    .. math::

      \eta_t = \text{peak} \cdot \begin{cases} t / T_w & t < T_w \\
      f + (1 - f)\,\tfrac12\bigl(1 + \cos(\pi\,\tfrac{t - T_w}{T - T_w})\bigr) & t \ge T_w
      \end{cases}

    Args:
      peak: the peak learning rate: a number or a traced scalar.
      warmup_steps: :math:`T_w`, an int in [0, decay_steps).
      decay_steps: :math:`T`, the step at which the decay ends, an int in [1, inf).
      end_fraction: :math:`f`, the final value as a fraction of the peak, in [0, 1].
    """
    _validate.check_int("decay_steps", decay_steps, low=1)
    _validate.check_int("warmup_steps", warmup_steps, low=0)
    if warmup_steps >= decay_steps:
        raise ValueError(
            f"warmup_steps must be in [0, decay_steps={decay_steps}); got {warmup_steps}."
        )
    _validate.check_scalar("end_fraction", end_fraction, low=0.0, high=1.0, high_inclusive=True)
    warmup, total, end = int(warmup_steps), int(decay_steps), float(end_fraction)

    def shape(step):
        t = jnp.asarray(step, jnp.float32)
        rising = t / jnp.float32(max(warmup, 1))
        progress = jnp.clip((t - warmup) / jnp.float32(total - warmup), 0.0, 1.0)
        falling = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * progress))
        return jnp.where(t < warmup, rising, falling)

    return scale_schedule(shape, jnp.asarray(peak, jnp.float32))


def suggest_weight_decay(
    learning_rate: float,
    *,
    steps: int | None = None,
    dataset_size: float | None = None,
    batch_size: float | None = None,
    timescale: float = 0.25,
    decay_coupling: str = "lr",
) -> float:
    r"""A starting weight decay from the EMA view of weight decay.

    With decoupled decay each step shrinks the weights by the factor :math:`1 - d_t`, so
    they are an exponential moving average of recent updates over
    :math:`\tau_{iter} = 1/d` steps. Wang & Aitchison find that the best :math:`\tau` is a
    roughly fixed fraction of training whatever the model and data size; Bergsma et al.
    write it per epoch of the training set, :math:`\tau = B/(\eta\lambda D)` (batch size
    :math:`B`, :math:`D` examples or tokens trained on), and fit how its best value moves
    with the tokens per parameter. This returns the :math:`\lambda` that makes
    :math:`\tau_{iter}` the fraction ``timescale`` of the run's :math:`T` steps:

    .. math::

      \lambda = \frac{1}{\eta \cdot \text{timescale} \cdot T}\ \ (\texttt{"lr"}), \qquad
      \lambda = \frac{1}{\text{timescale} \cdot T}\ \ (\texttt{"schedule"}, \texttt{"none"})

    (with ``decay_coupling="lr"`` the per-step decay is :math:`d = \eta\lambda`; with
    ``"schedule"`` it is :math:`\lambda` at the peak and ``"none"`` always
    :math:`\lambda`), where :math:`T` is ``steps``, or ``dataset_size / batch_size``.
    It is a starting point for a search, not its result: the best fraction depends on the
    task (:func:`adamw_jax.tuning.separable_search` refines it).

    Args:
      learning_rate: the (peak) learning rate :math:`\eta`, in (0, inf).
      steps: the run's length :math:`T` in steps, an int in [1, inf); or give
        ``dataset_size`` and ``batch_size`` instead.
      dataset_size: :math:`D`, the examples (or tokens) the whole run trains on, in
        (0, inf).
      batch_size: :math:`B`, examples (or tokens) per step, in (0, inf).
      timescale: the wanted :math:`\tau_{iter}/T`, in (0, inf). The default 0.25 lies in
        the range both papers report for their tasks; it is not universal.
      decay_coupling: the convention of the optimizer the value is for: ``"lr"``
        (``adamw``'s default), ``"schedule"`` (the paper's :math:`\lambda`) or ``"none"``.

    Returns:
      :math:`\lambda`, a Python float.

    Example:
      >>> from adamw_jax import schedules
      >>> schedules.suggest_weight_decay(1e-3, steps=10_000, timescale=0.1)  # 1/(1e-3 * 1000)
      1.0

    References:
      Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset
      size", ICML 2025 (arXiv:2405.13698).
      Bergsma et al., "Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
      Pre-training", 2025 (arXiv:2505.13738).
    """
    _validate.check_choice("decay_coupling", decay_coupling, ("lr", "schedule", "none"))
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, low_inclusive=False)
    _validate.check_scalar("timescale", timescale, low=0.0, low_inclusive=False)
    total_steps = _run_length(steps, dataset_size, batch_size)
    tau = float(timescale) * total_steps
    if decay_coupling == "lr":
        return weight_decay_for_timescale(float(learning_rate), tau)
    return 1.0 / tau


def _run_length(steps: Any, dataset_size: Any, batch_size: Any) -> float:
    """The run's length in steps, from ``steps`` or from ``dataset_size / batch_size``."""
    if steps is not None:
        if dataset_size is not None or batch_size is not None:
            raise ValueError("give either steps, or dataset_size and batch_size, not both.")
        _validate.check_int("steps", steps, low=1)
        return float(steps)
    if dataset_size is None or batch_size is None:
        raise ValueError("give steps, or both dataset_size and batch_size.")
    _validate.check_scalar("dataset_size", dataset_size, low=0.0, low_inclusive=False)
    _validate.check_scalar("batch_size", batch_size, low=0.0, low_inclusive=False)
    return float(dataset_size) / float(batch_size)
