"""schedules: warm restarts against hand-computed cycles, decay formulas on worked numbers."""

import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax
from adamw_jax import schedules


def _cosine(step, start, period, peak=1.0, low=0.0):
    """The SGDR value at ``step`` in the cycle that starts at ``start`` and lasts ``period``."""
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (step - start) / period))


# (first_period, period_mult): [(step, cycle start, cycle length), ...], worked out by hand.
HAND_TABLE = {
    (7, 1.0): [(0, 0, 7), (6, 0, 7), (7, 7, 7), (13, 7, 7), (14, 14, 7), (700, 700, 7)],
    (4, 2.0): [
        (0, 0, 4),
        (3, 0, 4),
        (4, 4, 8),
        (5, 4, 8),
        (11, 4, 8),
        (12, 12, 16),
        (13, 12, 16),
        (27, 12, 16),
        (28, 28, 32),
        (59, 28, 32),
        (60, 60, 64),
    ],
    # Periods 10, 15, 22.5, 33.75, 50.625, 75.9375; starts 0, 10, 25, 47.5, 81.25, 131.875.
    (10, 1.5): [
        (9, 0, 10),
        (10, 10, 15),
        (24, 10, 15),
        (25, 25, 22.5),
        (47, 25, 22.5),
        (48, 47.5, 33.75),
        (81, 47.5, 33.75),
        (82, 81.25, 50.625),
        (131, 81.25, 50.625),
        (132, 131.875, 75.9375),
    ],
    # Periods 10, 11, 12.1, 13.31, 14.641, 16.1051; starts 0, 10, 21, 33.1, 46.41, 61.051.
    (10, 1.1): [
        (9, 0, 10),
        (10, 10, 11),
        (20, 10, 11),
        (21, 21, 12.1),
        (33, 21, 12.1),
        (34, 33.1, 13.31),
        (46, 33.1, 13.31),
        (47, 46.41, 14.641),
        (61, 46.41, 14.641),
        (62, 61.051, 16.1051),
    ],
}


@pytest.mark.parametrize("config", list(HAND_TABLE), ids=str)
def test_warm_restarts_at_and_around_every_boundary(config):
    first_period, mult = config
    sched = schedules.cosine_warm_restarts(2.0, first_period, mult, min_value=0.5)
    rows = HAND_TABLE[config]
    got = np.asarray(jax.jit(sched)(jnp.array([r[0] for r in rows], jnp.int32)))
    want = [_cosine(t, start, period, peak=2.0, low=0.5) for t, start, period in rows]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    for (t, start, _), value in zip(rows, got, strict=True):
        if t == start:  # a restart lands exactly on this step
            np.testing.assert_allclose(value, 2.0, rtol=1e-6)


def _brute_force(first_period, mult, steps):
    """Walks the cycles in exact rational arithmetic (``mult`` as the decimal it prints as)."""
    mult = Fraction(repr(mult))
    start, period, out = Fraction(0), Fraction(first_period), []
    for t in steps:
        while start + period <= t:
            start, period = start + period, period * mult
        out.append(_cosine(t, float(start), float(period)))
    return out


@pytest.mark.parametrize("config", [(1, 1.0), (5, 1.0), (3, 2.0), (7, 1.5), (10, 1.1), (2, 1.3)])
def test_warm_restarts_match_the_definition_on_every_step(config):
    steps = np.arange(400)
    got = np.asarray(schedules.cosine_warm_restarts(1.0, *config)(jnp.asarray(steps)))
    np.testing.assert_allclose(got, _brute_force(*config, steps), rtol=1e-5, atol=2e-6)


def test_warm_restarts_are_exact_at_huge_step_counts():
    doubling = schedules.cosine_warm_restarts(1.0, first_period=1, period_mult=2.0)
    t = 2**30 - 1  # cycles start at 2**k - 1
    got = np.asarray(doubling(jnp.array([t - 1, t, t + 2**28], jnp.int32)))
    # The last step of a 2**29-step cycle, the restart, a quarter into a 2**30-step cycle.
    np.testing.assert_allclose(got, [0.0, 1.0, _cosine(0.25, 0, 1)], atol=1e-6)
    assert got[1] == 1.0

    equal = schedules.cosine_warm_restarts(1.0, first_period=1000)
    last_restart = 2**31 - 1 - (2**31 - 1) % 1000
    got = np.asarray(equal(jnp.array([last_restart - 1, last_restart, 2**31 - 1], jnp.int32)))
    want = [_cosine(999, 0, 1000), 1.0, _cosine((2**31 - 1) % 1000, 0, 1000)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    # A fractional boundary near 2**31: the first step after it is 0 < t - B < 1 into a cycle.
    start, period = Fraction(0), Fraction(10)
    while start + period < 2**31 - 1:
        start, period = start + period, period * Fraction(3, 2)
    first, prev = math.ceil(start), period / Fraction(3, 2)
    assert first != start
    sched = schedules.cosine_warm_restarts(1.0, first_period=10, period_mult=1.5)
    got = np.asarray(sched(jnp.array([first - 1, first], jnp.int32)))
    want = [
        _cosine(float(first - 1 - (start - prev)), 0, float(prev)),  # end of the previous cycle
        _cosine(float(first - start), 0, float(period)),  # just after the restart
    ]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_warm_restarts_accept_float_and_python_steps_and_clamp_negative_ones():
    sched = schedules.cosine_warm_restarts(1.0, first_period=10, period_mult=1.5)
    ints = np.asarray(sched(jnp.arange(0, 60, dtype=jnp.int32)))
    floats = np.asarray(sched(jnp.arange(0, 60, dtype=jnp.float32)))
    np.testing.assert_allclose(floats, ints, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sched(47.75), _cosine(47.75, 47.5, 33.75), rtol=1e-6)
    np.testing.assert_array_equal(jax.vmap(sched)(jnp.arange(0, 60, dtype=jnp.int32)), ints)
    assert float(sched(-5)) == 1.0
    assert float(sched(25)) == 1.0


def test_warm_restarts_drive_an_optimizer_step_by_step():
    sched = schedules.cosine_warm_restarts(0.1, first_period=3, period_mult=2.0)
    tx = adamw_jax.adamw(sched, weight_decay=0.5, decay_coupling="lr")
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(10):
        updates, state = step({"w": jnp.zeros(2)}, state, params)
        # With zero gradients the step is the decay alone: -lr_t * wd * w.
        np.testing.assert_allclose(updates["w"], -_cosine(t, *_cycle(t), peak=0.1) * 0.5, rtol=1e-5)


def _cycle(t):
    start, period = 0, 3
    while start + period <= t:
        start, period = start + period, period * 2
    return start, period


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"peak_value": -1.0}, ValueError, "peak_value must be in [0.0, inf); got -1.0"),
        ({"first_period": 0}, ValueError, "first_period must be in [1, 2147483647]; got 0"),
        ({"first_period": 2.5}, TypeError, "first_period must be an int"),
        ({"first_period": True}, TypeError, "first_period must be an int"),
        ({"period_mult": 0.5}, ValueError, "period_mult must be in [1.0, inf); got 0.5"),
        ({"period_mult": math.inf}, ValueError, "period_mult must be in [1.0, inf)"),
        ({"min_value": 2.0}, ValueError, "min_value must be in [0.0, 1.0]; got 2.0"),
        ({"min_value": -0.1}, ValueError, "min_value must be in [0.0, 1.0]; got -0.1"),
    ],
)
def test_warm_restarts_refuse_bad_arguments(kwargs, error, message):
    args = {"peak_value": 1.0, "first_period": 10} | kwargs
    with pytest.raises(error, match=re.escape(message)):
        schedules.cosine_warm_restarts(**args)


def test_warm_restarts_are_an_optax_schedule():
    sched = schedules.cosine_warm_restarts(1e-2, first_period=5)
    tx = optax.sgd(sched)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    for t in range(7):
        updates, state = tx.update({"w": jnp.ones(3)}, state)
        np.testing.assert_allclose(updates["w"], -_cosine(t % 5, 0, 5, peak=1e-2), rtol=1e-5)


@pytest.mark.parametrize(
    "args, want",
    [
        ((1.0, 1, 4, 1), 0.5),  # sqrt(1 / 4)
        ((0.1, 100, 1000, 10), 0.01),  # 0.1 * sqrt(100 / 10_000)
        ((0.05, 128, 50_000, 100), 2.5298221281347e-4),  # 0.05 * sqrt(2.56e-5)
        ((0.0, 32, 1000, 5), 0.0),
    ],
)
def test_normalized_weight_decay_worked_numbers(args, want):
    assert schedules.normalized_weight_decay(*args) == pytest.approx(want, rel=1e-12)


def test_normalized_weight_decay_scales_as_the_paper_says():
    base = schedules.normalized_weight_decay(0.05, 128, 50_000, 100)
    # Four times the epochs (four times the steps) halves the decay; four times the batch
    # (a quarter of the steps) doubles it.
    assert schedules.normalized_weight_decay(0.05, 128, 50_000, 400) == pytest.approx(base / 2)
    assert schedules.normalized_weight_decay(0.05, 512, 50_000, 100) == pytest.approx(base * 2)


@pytest.mark.parametrize(
    "args, name",
    [
        ((-0.1, 128, 1000, 10), "lambda_norm"),
        ((0.1, 0, 1000, 10), "batch_size"),
        ((0.1, 128, -5, 10), "dataset_size"),
        ((0.1, 128, 1000, 0), "epochs"),
        ((0.1, 128, 1000, math.nan), "epochs"),
    ],
)
def test_normalized_weight_decay_refuses_bad_arguments(args, name):
    with pytest.raises(ValueError, match=f"{name} must be in"):
        schedules.normalized_weight_decay(*args)


def test_ema_timescale_worked_numbers_and_inverse():
    assert schedules.ema_timescale(1e-3, 0.1) == pytest.approx(10_000.0)
    assert schedules.ema_timescale(3e-4, 0.05) == pytest.approx(1 / 1.5e-5)
    assert schedules.weight_decay_for_timescale(1e-3, 10_000) == pytest.approx(0.1)
    assert schedules.weight_decay_for_timescale(6e-4, 5_000) == pytest.approx(1 / 3.0)
    for lr, wd in [(1e-3, 0.1), (2e-5, 3.0), (0.5, 1e-4)]:
        tau = schedules.ema_timescale(lr, wd)
        assert schedules.weight_decay_for_timescale(lr, tau) == pytest.approx(wd, rel=1e-12)


def test_ema_timescale_is_where_adamw_forgets_to_one_over_e():
    lr, wd = 0.05, 0.2
    tau = round(schedules.ema_timescale(lr, wd))  # 100 steps
    tx = adamw_jax.adamw(lr, weight_decay=wd)
    params = {"w": jnp.array([1.0, -3.0])}

    def body(carry, _):
        p, state = carry
        updates, state = tx.update({"w": jnp.zeros(2)}, state, p)
        return (optax.apply_updates(p, updates), state), None

    (final, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), length=tau))(params)
    ratio = np.asarray(final["w"]) / np.array([1.0, -3.0])
    np.testing.assert_allclose(ratio, (1 - 1 / tau) ** tau, rtol=1e-5)
    np.testing.assert_allclose(ratio, math.exp(-1), rtol=1 / tau)


@pytest.mark.parametrize(
    "fn, args, name",
    [
        (schedules.ema_timescale, (0.0, 0.1), "learning_rate"),
        (schedules.ema_timescale, (1e-3, -0.1), "weight_decay"),
        (schedules.weight_decay_for_timescale, (-1e-3, 100), "learning_rate"),
        (schedules.weight_decay_for_timescale, (1e-3, 0), "tau"),
        (schedules.weight_decay_for_timescale, (1e-3, math.inf), "tau"),
    ],
)
def test_timescale_functions_refuse_bad_arguments(fn, args, name):
    with pytest.raises(ValueError, match=f"{name} must be in"):
        fn(*args)


# ------------------------------------------- traced-peak schedules and the starting decay
def test_suggest_weight_decay_follows_the_timescale_formulas():
    assert schedules.suggest_weight_decay(1e-3, steps=10_000, timescale=0.1) == pytest.approx(1.0)
    by_data = schedules.suggest_weight_decay(2e-3, dataset_size=1e6, batch_size=100, timescale=0.5)
    assert by_data == pytest.approx(1.0 / (2e-3 * 0.5 * 1e4))
    paper = schedules.suggest_weight_decay(5.0, steps=800, decay_coupling="schedule")
    assert paper == pytest.approx(1.0 / (0.25 * 800))
    # The EMA timescale of the suggestion is the asked fraction of the run.
    wd = schedules.suggest_weight_decay(3e-4, steps=5000, timescale=0.2)
    assert schedules.ema_timescale(3e-4, wd) == pytest.approx(0.2 * 5000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give steps, or both dataset_size and batch_size"),
        ({"steps": 10, "batch_size": 4}, "not both"),
        ({"steps": 0}, "steps must be in"),
        ({"steps": 10, "timescale": 0.0}, r"timescale must be in \(0.0, inf\)"),
        ({"steps": 10, "decay_coupling": "paper"}, "decay_coupling must be one of"),
        ({"dataset_size": -1.0, "batch_size": 4}, "dataset_size must be in"),
    ],
)
def test_suggest_weight_decay_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.suggest_weight_decay(1e-3, **kwargs)


def test_warmup_cosine_matches_optax_and_takes_a_traced_peak():
    steps = jnp.arange(0, 120)
    ours = schedules.warmup_cosine(0.3, warmup_steps=10, decay_steps=100, end_fraction=0.1)(steps)
    with jax.numpy_dtype_promotion("standard"):
        reference = optax.warmup_cosine_decay_schedule(0.0, 0.3, 10, 100, 0.03)(steps)
    np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=1e-8)
    peaks = jnp.asarray([0.1, 0.2], jnp.float32)
    batched = jax.vmap(lambda p: schedules.warmup_cosine(p, warmup_steps=10, decay_steps=100)(50))(
        peaks
    )
    np.testing.assert_allclose(batched[1], 2 * batched[0], rtol=1e-6)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        schedules.warmup_cosine(0.1, warmup_steps=100, decay_steps=100)
    with pytest.raises(TypeError, match="peak must be a real float scalar"):
        schedules.scale_schedule(lambda t: 1.0, jnp.ones(2))
