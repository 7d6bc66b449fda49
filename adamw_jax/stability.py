"""Training stability: skip the steps whose gradient norm or loss spikes, and cautious updates."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamw_jax import _numerics, _validate

__all__ = ["SkipSpikesState", "cautious", "skip_spikes"]

METRICS = ("grad_norm", "loss")
# The std is floored at this fraction of |mean|: a metric that has not varied (variance 0)
# does not make the next step's float32 rounding a spike.
_RELATIVE_STD_FLOOR = 1e-6
# The smallest kept fraction a cautious direction is divided by (the official code's and
# timm's clamp): a leaf whose every sign disagrees gets a zero direction, not 0 / 0.
_MIN_KEPT_FRACTION = 1e-3
# skip_spikes' default bound on a run of skipped spikes: as many steps as the default
# warmup, the accepted steps the statistics need before they judge a spike.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 20


class SkipSpikesState(NamedTuple):
    """State of :func:`skip_spikes`.

    Attributes:
      inner_state: the wrapped transformation's state (unchanged by a skipped step).
      mean: running mean of the metric over the accepted steps.
      var: running variance of the metric over the accepted steps.
      accepted: steps accepted, int32 (saturating).
      skipped: steps skipped (spikes and non-finite metrics), int32 (saturating).
      last_z: the latest step's z-score against the statistics before it (0 before any
        step is accepted; NaN or inf for a non-finite metric).
      consecutive: spikes skipped since the last accepted step, int32 (saturating;
        non-finite metrics do not count).
      restarts: steps accepted by ``max_consecutive_skips`` (each restarted the
        statistics), int32 (saturating).
      steps: the steps seen, skipped or accepted, int32 (saturating).
      last_skipped_step: the latest skipped step's number, counted as ``steps`` counts
        (from 1); 0 while no step has been skipped. int32.
    """

    inner_state: Any
    mean: jax.Array
    var: jax.Array
    accepted: jax.Array
    skipped: jax.Array
    last_z: jax.Array
    consecutive: jax.Array
    restarts: jax.Array
    steps: jax.Array
    last_skipped_step: jax.Array


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    threshold: float = 6.0,
    window: int = 100,
    warmup: int = 20,
    metric: str = "grad_norm",
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips the steps whose gradient norm (or loss) spikes above its recent statistics.

    Each step's metric :math:`x_t`, the global norm of the incoming updates (the gradients)
    or the loss given as ``update(..., value=loss)`` (the convention of
    ``optax.contrib.reduce_on_plateau``), is compared with a running mean :math:`\mu` and
    variance :math:`\sigma^2` of the accepted steps' metrics:

    .. math::

      z_t = \frac{x_t - \mu}{\max(\sigma,\ 10^{-6} |\mu|)}, \qquad
      \text{skip} \iff x_t \notin \mathbb{R} \ \lor\
        (n \ge n_{warmup} \land z_t > \tau)

    where :math:`n` counts the accepted steps. A skipped step returns zero updates and
    leaves the inner state bitwise unchanged (so the inner step count, and schedules, do
    not advance); only accepted steps update the statistics, with weight
    :math:`a = 1 / \min(n + 1, \text{window})`:

    .. math::

      \delta = x_t - \mu, \qquad \mu \leftarrow \mu + a \delta, \qquad
      \sigma^2 \leftarrow (1 - a)(\sigma^2 + a \delta^2)

    that is the exact mean and (population) variance of all accepted steps while fewer
    than ``window`` have been accepted, then exponential moving averages with timescale
    ``window`` steps. A smooth trend moves the statistics along with it (a linear ramp
    gives :math:`z \approx 1`); a lasting jump of more than ``threshold`` standard
    deviations (a new data mixture, a change of loss scale) would be skipped for as long
    as it lasts, so ``max_consecutive_skips`` bounds a run of skips: once that many
    spikes have been skipped in a row (no step accepted in between), the next spike is
    accepted and restarts the statistics from its own metric, as at the first step
    (:math:`\mu = x_t`, :math:`\sigma^2 = 0`, :math:`n = 1`), so the ``warmup - 1``
    steps after it are accepted while the statistics re-learn the new level. The
    default, 20, is the default ``warmup``: longer than the bursts of bad batches
    skipping is for (a few steps), and short enough that a lasting change costs at most
    20 skipped steps instead of stalling the run (choose it above the longest burst to
    be skipped: a burst that long is taken for a new level). Only upward spikes are
    skipped. On stationary noise the default threshold skips no step of a Gaussian-like
    metric (a high-dimensional gradient norm; 0 of 40,000 steps) and about 1e-4
    (log-normal) to 4e-4 (Student t, 5 degrees of freedom) of heavy-tailed ones.
    The inner update is computed on every step and discarded on a skipped one (tree
    selects with ``jnp.where``, as ``optax.apply_if_finite``), so it works under
    ``jax.jit``, ``jax.vmap``, ``optax.MultiSteps`` and ``optax.inject_hyperparams``
    (``threshold``, ``window``, ``warmup`` and ``max_consecutive_skips`` may be traced).
    The statistics are kept in float32, or in the params' dtype when wider.

    The state counts what happened (``steps``, ``accepted``, ``skipped``,
    ``consecutive``, ``restarts``, ``last_skipped_step``), on the device: read them every
    so many steps, not every step, to see a run of skips without a host sync per step
    (the Stability tools page shows a loop that logs them).

    Args:
      inner: the transformation to protect, e.g. ``adamw_jax.adamw(...)``; it receives
        the same arguments, extra ones (``value``) included.
      threshold: :math:`\tau`, in [0, inf): how many standard deviations above the mean a
        spike is.
      window: the statistics' timescale in accepted steps, an int in [1, inf).
      warmup: accepted steps before any step can be skipped as a spike, an int in
        [2, inf) (a variance needs two samples); non-finite metrics are skipped from the
        first step.
      metric: ``"grad_norm"`` (the global L2 norm of the updates ``skip_spikes``
        receives) or ``"loss"`` (``update`` then requires ``value=loss``, a scalar).
      max_consecutive_skips: an int in [1, inf), 20 by default: the most spikes
        skipped in a row; the next one is accepted and restarts the statistics (counted
        in ``restarts``). None removes the bound (a lasting jump of the metric is then
        skipped for good). Non-finite metrics are always skipped and neither count nor
        end a run of skips.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SkipSpikesState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adamw_jax
      >>> tx = adamw_jax.skip_spikes(optax.sgd(0.1), warmup=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> for g in (1.0, 1.1, 0.9, 1.0, 50.0):
      ...     updates, state = tx.update({"w": g * jnp.ones(2)}, state, params)
      >>> updates["w"], int(state.skipped), int(state.accepted)
      (Array([0., 0.], dtype=float32), 1, 4)
      >>> int(state.steps), int(state.last_skipped_step)
      (5, 5)

      A lasting jump, bounded to two skips in a row; the third step at the new level is
      accepted and restarts the statistics:

      >>> tx = adamw_jax.skip_spikes(optax.sgd(0.1), warmup=2, max_consecutive_skips=2)
      >>> state = tx.init(params)
      >>> for g in (1.0, 1.1, 0.9, 50.0, 50.0, 50.0, 51.0):
      ...     updates, state = tx.update({"w": g * jnp.ones(2)}, state, params)
      >>> updates["w"], int(state.skipped), int(state.restarts), int(state.accepted)
      (Array([-5.1, -5.1], dtype=float32), 2, 1, 2)

    References:
      Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", JMLR 2023
      (restarting around loss spikes). Molybog et al., "A Theory on Adam Instability in
      Large-Scale Machine Learning", arXiv:2304.09871, 2023.
    """
    _check_skip_spikes_args(inner, threshold, window, warmup, metric, max_consecutive_skips)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        zero = jnp.zeros([], _statistics_dtype(params))
        count = jnp.zeros([], jnp.int32)
        return SkipSpikesState(
            inner.init(params), zero, zero, count, count, zero, count, count, count, count
        )

    def update_fn(updates, state, params=None, **extra_args):
        x = _metric_value(metric, updates, extra_args, state.mean.dtype)
        z = _z_score(x, state)
        finite = jnp.isfinite(x)
        spike = finite & (state.accepted >= warmup) & (z > threshold)
        restart = jnp.zeros([], bool)
        if max_consecutive_skips is not None:
            restart = spike & (state.consecutive >= max_consecutive_skips)
        skip = ~finite | (spike & ~restart)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        inner_state = jax.tree.map(
            lambda old, new: jnp.where(skip, old, new), state.inner_state, new_inner
        )
        return new_updates, _next_state(state, inner_state, x, z, skip, restart, window)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_skip_spikes_args(
    inner: Any, threshold: Any, window: Any, warmup: Any, metric: Any, max_skips: Any
) -> None:
    """Refuses a non-transformation ``inner`` and each hyperparameter out of its range."""
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation; got {inner!r} of type "
            f"{type(inner).__name__}."
        )
    _validate.check_scalar("threshold", threshold, low=0.0)
    _validate.check_int("window", window, low=1)
    _validate.check_int("warmup", warmup, low=2)
    _validate.check_choice("metric", metric, METRICS)
    if max_skips is not None:
        _validate.check_int("max_consecutive_skips", max_skips, low=1)


def _statistics_dtype(params: Any) -> jnp.dtype:
    """float32, or the widest real dtype of the params' floating leaves when wider."""
    dtypes = [jnp.result_type(p) for p in jax.tree.leaves(params)]
    dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.inexact)]
    return jnp.finfo(_numerics.compute_dtype(*dtypes)).dtype


def _metric_value(metric: str, updates: Any, extra_args: dict, dtype: Any) -> jax.Array:
    """This step's metric in ``dtype``: the updates' global norm, or the loss passed in."""
    if metric == "grad_norm":
        _validate.check_updates_given("skip_spikes", updates)
        squares = [jnp.sum(jnp.square(jnp.abs(u).astype(dtype))) for u in jax.tree.leaves(updates)]
        return jnp.sqrt(sum(squares, jnp.zeros([], dtype)))
    value = extra_args.get("value")
    if value is None:
        raise ValueError(
            "skip_spikes(metric='loss') needs the loss: call update(updates, state, params, "
            "value=loss)."
        )
    if jnp.ndim(value) != 0:
        raise ValueError(f"skip_spikes got value of shape {jnp.shape(value)}; it must be a scalar.")
    return jnp.asarray(value).astype(dtype)


def _z_score(x: jax.Array, state: SkipSpikesState) -> jax.Array:
    """``(x - mean) / std``, with the std floored; 0 before any step was accepted."""
    tiny = jnp.finfo(x.dtype).tiny
    scale = jnp.maximum(jnp.sqrt(state.var), _RELATIVE_STD_FLOOR * jnp.abs(state.mean))
    z = (x - state.mean) / jnp.maximum(scale, tiny)
    return jnp.where((state.accepted == 0) & jnp.isfinite(x), jnp.zeros_like(z), z)


def _updated_statistics(
    x: jax.Array, state: SkipSpikesState, window: Any
) -> tuple[jax.Array, jax.Array]:
    """The mean and variance once ``x`` is accepted (weight 1 / min(n + 1, window))."""
    n = jnp.minimum(optax.safe_increment(state.accepted), jnp.asarray(window, jnp.int32))
    a = 1 / n.astype(x.dtype)
    delta = x - state.mean
    return state.mean + a * delta, (1 - a) * (state.var + a * delta * delta)


def _next_state(
    state: SkipSpikesState,
    inner_state: Any,
    x: jax.Array,
    z: jax.Array,
    skip: jax.Array,
    restart: jax.Array,
    window: Any,
) -> SkipSpikesState:
    """The state after a step: skipped, accepted, or accepted with the statistics restarted.

    A skipped step keeps the statistics; an accepted one updates them; a restart sets them
    to those of the single sample ``x`` (mean ``x``, variance 0, one accepted step).
    """
    mean, var = _updated_statistics(x, state, window)
    one = jnp.ones([], jnp.int32)
    accepted = jnp.where(restart, one, optax.safe_increment(state.accepted))
    spike_skip = skip & jnp.isfinite(x)  # non-finite metrics leave the run count alone
    consecutive = jnp.where(skip, state.consecutive, jnp.zeros_like(state.consecutive))
    steps = optax.safe_increment(state.steps)
    return SkipSpikesState(
        inner_state,
        jnp.where(skip, state.mean, jnp.where(restart, x, mean)),
        jnp.where(skip, state.var, jnp.where(restart, jnp.zeros_like(var), var)),
        jnp.where(skip, state.accepted, accepted),
        jnp.where(skip, optax.safe_increment(state.skipped), state.skipped),
        z,
        jnp.where(spike_skip, optax.safe_increment(state.consecutive), consecutive),
        jnp.where(restart, optax.safe_increment(state.restarts), state.restarts),
        steps,
        jnp.where(skip, steps, state.last_skipped_step),
    )


def cautious(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""Cautious updates: keeps the direction only where it agrees in sign with the gradient.

    Wraps a scaling transformation (e.g. :func:`adamw_jax.scale_by_adam`) so that it sees
    both the raw gradient :math:`g` (its input) and the direction :math:`u` the inner
    transformation makes of it, and returns, per leaf,

    .. math::

      \phi = \mathbb{1}[\operatorname{sign} u = \operatorname{sign} g \ne 0], \qquad
      u \leftarrow \frac{\phi \odot u}{\max(\operatorname{mean}(\phi),\ 10^{-3})}

    (for complex leaves :math:`\phi = \mathbb{1}[\operatorname{Re}(u \bar g) > 0]`).
    Components that would move against the current gradient are zeroed and the rest scaled
    up by the kept fraction, as the paper's code does; the floor of :math:`10^{-3}` on the
    fraction (the official code's clamp) makes a leaf whose signs all disagree take a
    zero step rather than 0/0. Chain it where the inner transformation sits: after any
    gradient processing (clipping) and before the learning rate and the weight decay,
    and the inner transformation must return a direction to be subtracted (not yet
    negated). The state is the inner transformation's own, so a cautious optimizer's
    checkpoints are interchangeable with the plain one's.

    Args:
      inner: the scaling transformation, e.g. ``adamw_jax.scale_by_adam()``; its updates
        must have the structure and shapes of its input.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adamw_jax
      >>> tx = adamw_jax.cautious(optax.identity())  # the direction is the gradient itself
      >>> params = {"w": jnp.zeros(4)}
      >>> updates, _ = tx.update({"w": jnp.array([1.0, -2.0, 0.0, 3.0])}, tx.init(params))
      >>> updates["w"]  # the zero is dropped, the three others are scaled by 4 / 3
      Array([ 1.3333334, -2.6666667,  0.       ,  4.       ], dtype=float32)

    References:
      Liang, Chen, Liu & Liu, "Cautious Optimizers: Improving Training with One Line of
      Code", arXiv:2411.16085, 2024.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation; got {inner!r} of type "
            f"{type(inner).__name__}."
        )
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_updates_given("cautious", updates)
        direction, state = inner.update(updates, state, params, **extra_args)
        _validate.check_same_structure(
            "the inner transformation's updates", direction, updates, "the gradients"
        )
        return jax.tree.map(_cautious_leaf, direction, updates), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _cautious_leaf(u: jax.Array, g: jax.Array) -> jax.Array:
    """``u`` where it agrees with ``g``, divided by the kept fraction; 0 elsewhere."""
    c = _numerics.compute_dtype(u.dtype, g.dtype)
    uc = u.astype(c)
    keep = _numerics.signs_agree(uc, g.astype(c), ties=False)
    real = jnp.finfo(c).dtype
    fraction = jnp.maximum(jnp.mean(keep.astype(real)), jnp.asarray(_MIN_KEPT_FRACTION, real))
    return jnp.where(keep, uc / fraction.astype(c), jnp.zeros_like(uc)).astype(u.dtype)
