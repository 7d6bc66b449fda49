"""skip_spikes and cautious: against NumPy transcriptions, and under jit, vmap and wrappers."""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_trees_bitwise_equal, checkpoint_round_trip
from reference import adamw_trajectory, max_rel_err, skip_spikes_trajectory

import adamw_jax

DIM = 50
SPIKES = [40, 41, 150, 300]  # steps whose gradient noise is 100 times larger
WARMUP_SPIKE = 5  # 10 times larger, but in the warmup: accepted
NAN_STEP, INF_STEP = 200, 250


def spiky_noise(steps: int, seed: int = 0) -> np.ndarray:
    """Gradient noise ``(steps, DIM)``: standard normal, with spikes and non-finite steps."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(steps, DIM))
    noise[SPIKES] *= 100.0
    noise[WARMUP_SPIKE] *= 10.0
    noise[NAN_STEP, 3] = np.nan
    noise[INF_STEP, 7] = np.inf
    return noise


def run_recorded(tx, params, grad_fn, noise, values=None):
    """A jitted scan of ``skip_spikes`` ``tx`` on the gradients ``grad_fn(params, noise_t)``.

    With ``values``, step t passes ``value=values[t]``. Returns the final params and state,
    and per step the z-score and whether the step was skipped.
    """
    with_value = values is not None
    values = jnp.zeros(len(noise)) if values is None else values

    def step(carry, x):
        params, state = carry
        n, value = x
        kwargs = {"value": value} if with_value else {}
        updates, new = tx.update(grad_fn(params, n), state, params, **kwargs)
        params = optax.apply_updates(params, updates)
        return (params, new), (new.last_z, new.skipped > state.skipped)

    @jax.jit
    def run(params, noise, values):
        return jax.lax.scan(step, (params, tx.init(params)), (noise, values))

    (params, state), (z, skipped) = run(params, noise, values)
    return params, state, np.asarray(z), np.asarray(skipped)


def test_grad_norm_decisions_match_numpy_transcription_float64():
    """SGD on a quadratic: the same skips, z-scores, statistics and params over 400 steps."""
    steps, lr = 400, 0.05
    noise = spiky_noise(steps)
    rng = np.random.default_rng(1)
    w0, curv = rng.normal(size=DIM), rng.uniform(0.5, 1.5, DIM)
    w, norms = w0.copy(), []
    for t in range(steps):  # the transcription, step by step: norms depend on the params
        g = curv * w + noise[t]
        with np.errstate(invalid="ignore"):
            norms.append(np.sqrt(np.sum(g * g)))
        if not skip_spikes_trajectory(norms)[0][-1]:
            w = w - lr * g
    skips, zs, mean, var = skip_spikes_trajectory(norms)
    assert sorted(np.flatnonzero(skips)) == sorted([*SPIKES, NAN_STEP, INF_STEP])
    with jax.enable_x64(True):
        tx = adamw_jax.skip_spikes(optax.sgd(lr))
        curv_j = jnp.asarray(curv)
        params, state, z, skipped = run_recorded(
            tx, jnp.asarray(w0), lambda p, n: curv_j * p + n, jnp.asarray(noise)
        )
    np.testing.assert_array_equal(skipped, skips)
    finite = np.isfinite(zs)
    np.testing.assert_allclose(z[finite], zs[finite], rtol=1e-9, atol=1e-12)
    assert np.isnan(z[NAN_STEP]) and z[INF_STEP] == np.inf
    assert max_rel_err({"w": np.asarray(params)}, {"w": w}) < 1e-9
    np.testing.assert_allclose([float(state.mean), float(state.var)], [mean, var], rtol=1e-9)
    assert int(state.skipped) == 6 and int(state.accepted) == steps - 6


def test_loss_decisions_match_numpy_transcription_with_adamw_inside_float64():
    """metric="loss": AdamW takes exactly the accepted steps' gradients, in order."""
    steps = 500
    rng = np.random.default_rng(2)
    w0, curv = {"w": rng.normal(size=DIM)}, {"w": rng.uniform(0.5, 1.5, DIM)}
    noise = rng.normal(size=(steps, DIM))
    loss = 3.0 * np.exp(-np.arange(steps) / 200.0) + 0.05 * rng.normal(size=steps)
    loss[[60, 61, 62, 333]] += 2.0
    loss[400] = np.nan
    kwargs = dict(threshold=4.0, window=50, warmup=10)
    skips, zs, mean, var = skip_spikes_trajectory(loss, **kwargs)
    assert sorted(np.flatnonzero(skips)) == [60, 61, 62, 333, 400]
    accepted = np.flatnonzero(~skips)
    hp = dict(learning_rate=1e-2, weight_decay=0.1)
    want = adamw_trajectory(
        w0, lambda w, j: {"w": curv["w"] * w["w"] + noise[accepted[j - 1]]}, len(accepted), **hp
    )
    with jax.enable_x64(True):
        tx = adamw_jax.skip_spikes(adamw_jax.adamw(**hp), metric="loss", **kwargs)
        c = jnp.asarray(curv["w"])
        params, state, z, skipped = run_recorded(
            tx,
            {"w": jnp.asarray(w0["w"])},
            lambda p, n: {"w": c * p["w"] + n},
            jnp.asarray(noise),
            jnp.asarray(loss),
        )
    np.testing.assert_array_equal(skipped, skips)
    finite = np.isfinite(zs)
    np.testing.assert_allclose(z[finite], zs[finite], rtol=1e-9, atol=1e-12)
    assert max_rel_err(jax.tree.map(np.asarray, params), want) < 1e-9
    np.testing.assert_allclose([float(state.mean), float(state.var)], [mean, var], rtol=1e-9)
    adam_state = state.inner_state[0]
    assert int(adam_state.count) == len(accepted)  # the inner count did not advance on skips


PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full(4, 0.5)}


def _grads(scale, seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {
        "w": scale * jax.random.normal(keys[0], (3, 4)),
        "b": scale * jax.random.normal(keys[1], (4,)),
    }


@functools.cache
def _thirty_clean_steps():
    """``skip_spikes(adamw)``'s jitted update, and the params and state after 30 clean steps.

    Shared by the spike tests (each feeds its own bad gradient to the same program).
    """
    tx = adamw_jax.skip_spikes(adamw_jax.adamw(1e-2, weight_decay=0.1))
    step = jax.jit(tx.update)
    params, state = PARAMS, tx.init(PARAMS)
    for t in range(30):
        updates, state = step(_grads(1.0, t), state, params)
        params = optax.apply_updates(params, updates)
    return step, params, state


@pytest.mark.parametrize("bad", [1e3, np.nan, np.inf, -np.inf], ids=["spike", "nan", "inf", "-inf"])
def test_a_spike_changes_nothing_and_is_counted(bad):
    step, params, state = _thirty_clean_steps()
    assert int(state.accepted) == 30 and int(state.skipped) == 0
    spike = jax.tree.map(lambda g: g.at[0].set(bad * jnp.abs(g[0]) + bad), _grads(1.0, 99))
    updates, new_state = step(spike, state, params)
    assert_trees_bitwise_equal(updates, jax.tree.map(jnp.zeros_like, params))
    assert_trees_bitwise_equal(new_state.inner_state, state.inner_state)
    assert_trees_bitwise_equal(
        (new_state.mean, new_state.var, new_state.accepted), (state.mean, state.var, state.accepted)
    )
    assert int(new_state.skipped) == 1
    assert not float(new_state.last_z) <= 6.0  # above the threshold, or NaN
    updates, after = step(_grads(1.0, 100), new_state, params)  # the next clean step updates
    assert int(after.accepted) == 31 and int(after.skipped) == 1
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_non_finite_metrics_are_skipped_from_the_first_step():
    tx = adamw_jax.skip_spikes(optax.sgd(0.1), metric="loss")
    state = tx.init(PARAMS)
    for value in (jnp.nan, jnp.inf, 1.0, jnp.nan):
        updates, state = tx.update(_grads(1.0, 0), state, PARAMS, value=jnp.float32(value))
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    assert (int(state.skipped), int(state.accepted), float(state.mean)) == (3, 1, 1.0)


@pytest.mark.parametrize("metric", ["grad_norm", "loss"])
def test_stationary_noise_is_never_skipped(metric):
    """2000 clean steps of stationary noise with the defaults: no step is skipped.

    False-skip rates measured with the transcription (defaults; 20 seeds x 2000 steps =
    40,000 steps each; the largest z after the warmup in brackets): the norm of
    50-dimensional Gaussian gradients 0 (4.6); Gaussian losses 0 (4.4); the norm of
    1-dimensional ones, a half-normal, 2 (6.4), 5e-5; log-normal losses (sigma 0.25) 4
    (7.6), 1e-4; heavy-tailed losses (Student t, 5 degrees of freedom) 16 (12.9), 4e-4.
    """
    steps = 2000
    rng = np.random.default_rng(3)
    noise = jnp.asarray(rng.normal(size=(steps, DIM)), jnp.float32)
    values = jnp.asarray(1.0 + 0.1 * rng.normal(size=steps), jnp.float32)
    tx = adamw_jax.skip_spikes(adamw_jax.adamw(1e-3), metric=metric)
    _, state, _, skipped = run_recorded(
        tx, jnp.zeros(DIM), lambda p, n: n, noise, values if metric == "loss" else None
    )
    assert int(state.skipped) == 0 and not skipped.any()
    assert int(state.accepted) == steps


def test_vmap_runs_independent_optimizers():
    tx = adamw_jax.skip_spikes(optax.sgd(0.1), warmup=5)
    noise = np.random.default_rng(4).normal(size=(3, 60, DIM))
    noise[:, 30] *= 100.0  # a spike in every run
    noise[1, 50] *= 100.0  # and one in one run only
    params = jnp.zeros((3, DIM))
    states = jax.vmap(tx.init)(params)
    step = jax.jit(jax.vmap(tx.update))
    for t in range(60):
        updates, states = step(jnp.asarray(noise[:, t], jnp.float32), states, params)
        params = params + updates
    for run in range(3):
        one, state, _, _ = run_recorded(
            tx, jnp.zeros(DIM), lambda p, n: n, jnp.asarray(noise[run], jnp.float32)
        )
        chex.assert_trees_all_close(params[run], one, rtol=1e-6, atol=1e-6)
        assert int(states.skipped[run]) == int(state.skipped)
    assert int(states.skipped[1]) == int(states.skipped[0]) + 1


@jax.numpy_dtype_promotion("standard")  # optax.MultiSteps mixes int32 and float32
def test_inside_multisteps_a_spiking_micro_batch_skips_the_whole_step():
    tx = optax.MultiSteps(adamw_jax.skip_spikes(optax.sgd(0.1), warmup=3), every_k_schedule=2)
    step = jax.jit(tx.update)
    params, state = PARAMS, tx.init(PARAMS)
    for t in range(10):
        updates, state = step(_grads(1.0, t), state, params)
        params = optax.apply_updates(params, updates)
    inner = state.inner_opt_state
    assert (int(inner.accepted), int(inner.skipped)) == (5, 0)
    before = params
    for g in (_grads(1.0, 50), _grads(1e3, 51)):  # one micro-batch spikes: the mean does
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    assert_trees_bitwise_equal(params, before)
    assert (int(state.inner_opt_state.accepted), int(state.inner_opt_state.skipped)) == (5, 1)


def test_threshold_can_be_injected_and_changed():
    factory = optax.inject_hyperparams(adamw_jax.skip_spikes)
    tx = factory(optax.sgd(0.1), threshold=6.0, warmup=3)
    step = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for t in range(5):
        _, state = step(_grads(1.0, t), state, PARAMS)
    updates, skipped = step(_grads(1e3, 9), state, PARAMS)
    assert int(skipped.inner_state.skipped) == 1
    state.hyperparams["threshold"] = jnp.asarray(1e9, jnp.float32)
    updates, accepted = step(_grads(1e3, 9), state, PARAMS)  # same compiled step
    assert int(accepted.inner_state.skipped) == 0 and int(accepted.inner_state.accepted) == 6
    assert float(jnp.abs(updates["w"]).max()) > 1.0


def test_state_round_trips_through_orbax_and_resumes_bitwise(tmp_path):
    tx = adamw_jax.skip_spikes(adamw_jax.adamw(1e-2), warmup=5)
    step = jax.jit(tx.update)
    params, state = PARAMS, tx.init(PARAMS)
    for t in range(12):
        updates, state = step(_grads(1e3 if t == 9 else 1.0, t), state, params)
        params = optax.apply_updates(params, updates)
    assert int(state.skipped) == 1
    restored = checkpoint_round_trip(state, tmp_path / "ckpt")
    a, _ = step(_grads(1.0, 20), state, params)
    b, _ = step(_grads(1.0, 20), restored, params)
    assert_trees_bitwise_equal(a, b)


def skip_spikes_with_restarts(metrics, *, max_consecutive_skips, threshold, window, warmup):
    """``skip_spikes(max_consecutive_skips=k)``' decisions on a sequence of metrics, float64.

    As ``reference.skip_spikes_trajectory``, plus a count ``run`` of the spikes skipped since
    the last accepted step: a spike with ``run >= k`` is accepted and restarts the
    statistics (mean x, variance 0, n = 1); non-finite metrics are skipped and leave ``run``
    alone. Returns per step (skipped, z, run, restarts) as arrays, and the final mean, var.
    """
    mean = var = 0.0
    n = run = restarts = 0
    rows = []
    tiny = np.finfo(np.float64).tiny
    for x in np.asarray(metrics, np.float64):
        finite = bool(np.isfinite(x))
        with np.errstate(invalid="ignore", over="ignore"):
            scale = max(np.sqrt(var), 1e-6 * abs(mean), tiny)
            z = 0.0 if n == 0 and finite else (x - mean) / scale
        spike = finite and n >= warmup and z > threshold
        restart = spike and run >= max_consecutive_skips
        skip = not finite or (spike and not restart)
        if restart:
            mean, var, n, run, restarts = x, 0.0, 1, 0, restarts + 1
        elif not skip:
            a = 1.0 / min(n + 1, window)
            d = x - mean
            mean, var, n, run = mean + a * d, (1 - a) * (var + a * d * d), n + 1, 0
        elif finite:
            run += 1
        rows.append((skip, z, run, restarts))
    skips, zs, runs, restart_counts = (np.array(c) for c in zip(*rows, strict=True))
    return skips, zs, runs, restart_counts, mean, var


def level_shift_losses(steps: int, seed: int) -> np.ndarray:
    """A noisy loss that jumps for good twice, with short spikes and non-finite steps."""
    rng = np.random.default_rng(seed)
    loss = 1.0 + 0.05 * rng.normal(size=steps)
    loss[150:] += 1.0  # a lasting jump: 20 standard deviations
    loss[400:] += 3.0  # and another
    loss[[60, 61, 62, 300, 301]] += 2.0  # short bursts, shorter than the bound: skipped
    loss[[80, 153, 155]] = np.nan  # non-finite, also inside the first jump's run of skips
    loss[500] = np.inf
    return loss


def test_max_consecutive_skips_matches_numpy_transcription_float64():
    """Decisions, z-scores, run counts, restarts, statistics and params over 600 steps."""
    steps, lr = 600, 0.1
    kwargs = dict(threshold=6.0, window=50, warmup=10, max_consecutive_skips=5)
    loss = level_shift_losses(steps, seed=5)
    skips, zs, runs, restarts, mean, var = skip_spikes_with_restarts(loss, **kwargs)
    noise = np.random.default_rng(6).normal(size=(steps, DIM))
    with jax.enable_x64(True):
        tx = adamw_jax.skip_spikes(optax.sgd(lr), metric="loss", **kwargs)

        def step(carry, x):
            params, state = carry
            g, value = x
            updates, new = tx.update(g, state, params, value=value)
            row = (new.last_z, new.skipped > state.skipped, new.consecutive, new.restarts)
            return (optax.apply_updates(params, updates), new), (*row, new.last_skipped_step)

        run = jax.jit(lambda p, xs: jax.lax.scan(step, (p, tx.init(p)), xs))
        (params, state), (z, skipped, consecutive, restart_count, last_skipped) = run(
            jnp.zeros(DIM), (jnp.asarray(noise), jnp.asarray(loss))
        )
    # The transcription sees what the test is about: both jumps restart, the bursts do not.
    assert restarts[-1] == 2 and runs.max() == 5
    assert skips[[60, 61, 62, 300, 301, 80, 500]].all() and skips.sum() == 7 + 2 * 5 + 2
    np.testing.assert_array_equal(np.asarray(skipped), skips)
    np.testing.assert_array_equal(np.asarray(consecutive), runs)
    np.testing.assert_array_equal(np.asarray(restart_count), restarts)
    numbers = np.arange(1, steps + 1)  # steps count from 1
    np.testing.assert_array_equal(
        np.asarray(last_skipped), np.maximum.accumulate(np.where(skips, numbers, 0))
    )
    assert int(state.steps) == steps and int(state.skipped) == skips.sum()
    finite = np.isfinite(zs)
    np.testing.assert_allclose(np.asarray(z)[finite], zs[finite], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([float(state.mean), float(state.var)], [mean, var], rtol=1e-9)
    want = -lr * noise[~skips].sum(axis=0)  # SGD took exactly the accepted steps' gradients
    np.testing.assert_allclose(np.asarray(params), want, rtol=1e-9, atol=1e-12)
    # A bound no run reaches changes nothing: the same decisions as without it.
    no_bound = dict(kwargs, max_consecutive_skips=steps)
    plain = {k: v for k, v in kwargs.items() if k != "max_consecutive_skips"}
    np.testing.assert_array_equal(
        skip_spikes_with_restarts(loss[:140], **no_bound)[0],
        skip_spikes_trajectory(loss[:140], **plain)[0],
    )


@pytest.mark.parametrize("bound", [None, 8])
def test_a_lasting_jump_is_skipped_for_good_unless_bounded(bound):
    """Without the bound every step after a jump is skipped; with it, ``bound`` of them."""
    steps, jump = 400, 100
    rng = np.random.default_rng(7)
    loss = 2.0 + 0.02 * rng.normal(size=steps)
    loss[jump:] += 0.5  # 25 standard deviations, for good (say, a new data mixture)
    tx = adamw_jax.skip_spikes(optax.sgd(0.1), metric="loss", max_consecutive_skips=bound)
    noise = jnp.asarray(rng.normal(size=(steps, DIM)), jnp.float32)
    _, state, z, skipped = run_recorded(
        tx, jnp.zeros(DIM), lambda p, n: n, noise, jnp.asarray(loss, jnp.float32)
    )
    assert not skipped[:jump].any()
    if bound is None:  # the weakness the option removes
        assert skipped[jump:].all() and int(state.skipped) == steps - jump
        return
    assert skipped[jump : jump + bound].all() and not skipped[jump + bound :].any()
    assert (int(state.skipped), int(state.restarts), int(state.consecutive)) == (bound, 1, 0)
    assert int(state.accepted) == steps - jump - bound  # counted again from the restart
    assert abs(float(state.mean) - 2.5) < 0.01  # the statistics follow the new level
    assert np.abs(z[-100:]).max() < 6.0


def test_a_lasting_rise_of_the_gradient_norm_recovers_within_the_default_bound():
    """A lasting 1.5x rise of the gradient norm at step 200 of 1000, all defaults.

    Unbounded, the 800 steps after the rise would all be skipped. With the default bound,
    ``bound`` steps are skipped, the next is accepted and restarts the statistics, and no
    later step is skipped; the counters say so exactly.
    """
    steps, rise = 1000, 200
    bound = inspect.signature(adamw_jax.skip_spikes).parameters["max_consecutive_skips"].default
    assert bound == adamw_jax.stability.DEFAULT_MAX_CONSECUTIVE_SKIPS == 20
    rng = np.random.default_rng(8)
    noise = rng.normal(size=(steps, 1000))  # norms 31.6 +- 0.7: the rise is 22 std out
    noise[rise:] *= 1.5
    with jax.enable_x64(True):
        tx = adamw_jax.skip_spikes(optax.sgd(0.1))
        _, state, z, skipped = run_recorded(tx, jnp.zeros(1000), lambda p, n: n, jnp.asarray(noise))
    norms = np.sqrt(np.sum(noise * noise, axis=1))
    want = skip_spikes_with_restarts(
        norms, max_consecutive_skips=bound, threshold=6.0, window=100, warmup=20
    )
    np.testing.assert_array_equal(skipped, want[0])
    assert not skipped[:rise].any() and skipped[rise : rise + bound].all()
    assert not skipped[rise + bound :].any()  # recovered: the 21st step at the new level on
    assert float(z[rise]) > 6.0 and np.abs(z[-100:]).max() < 6.0
    counters = (state.steps, state.skipped, state.consecutive, state.restarts)
    assert [int(c) for c in counters] == [steps, bound, 0, 1]
    assert int(state.last_skipped_step) == rise + bound  # steps number from 1
    assert int(state.accepted) == steps - rise - bound  # counted again from the restart


def test_non_finite_metrics_never_end_or_lengthen_a_run_of_skips():
    tx = adamw_jax.skip_spikes(optax.sgd(0.1), metric="loss", warmup=3, max_consecutive_skips=2)
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    values = [1.0, 1.1, 0.9, 1.0, 9.0, np.nan, np.inf, 9.0, np.nan, 9.0]
    history = []
    for value in values:
        updates, state = step(_grads(1.0, 0), state, PARAMS, value=jnp.float32(value))
        history.append((int(state.consecutive), int(state.restarts)))
    # 9.0 is skipped twice (NaN and inf in between do not count), the third 9.0 restarts.
    assert history[4:] == [(1, 0), (1, 0), (1, 0), (2, 0), (2, 0), (0, 1)]
    assert (int(state.steps), int(state.last_skipped_step)) == (10, 9)  # the last NaN
    assert float(jnp.abs(updates["w"]).max()) > 0 and float(state.mean) == 9.0
    assert int(state.skipped) == 5 and int(state.accepted) == 1
    for _ in range(5):  # a lasting NaN is never accepted, however long
        updates, state = step(_grads(1.0, 0), state, PARAMS, value=jnp.float32(np.nan))
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    assert (int(state.restarts), int(state.consecutive)) == (1, 0)
    assert (int(state.steps), int(state.last_skipped_step), int(state.skipped)) == (15, 15, 10)


def test_max_consecutive_skips_can_be_injected():
    factory = optax.inject_hyperparams(adamw_jax.skip_spikes)
    tx = factory(optax.sgd(0.1), warmup=3, metric="loss", max_consecutive_skips=1)
    step = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for value in (1.0, 1.1, 0.9, 9.0):
        _, state = step(_grads(1.0, 0), state, PARAMS, value=jnp.float32(value))
    assert int(state.inner_state.consecutive) == 1
    state.hyperparams["max_consecutive_skips"] = jnp.asarray(2, jnp.int32)
    _, longer = step(_grads(1.0, 0), state, PARAMS, value=jnp.float32(9.0))
    assert (int(longer.inner_state.skipped), int(longer.inner_state.restarts)) == (2, 0)
    _, restarted = step(_grads(1.0, 0), longer, PARAMS, value=jnp.float32(9.0))
    assert (int(restarted.inner_state.skipped), int(restarted.inner_state.restarts)) == (2, 1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(threshold=-1.0), ValueError, r"threshold must be in \[0.0, inf\); got -1.0"),
        (dict(threshold=float("nan")), ValueError, "threshold must be in"),
        (dict(threshold="6"), TypeError, "threshold must be"),
        (dict(window=0), ValueError, r"window must be in \[1, inf\); got 0"),
        (dict(window=10.0), TypeError, r"window must be an int in \[1, inf\)"),
        (dict(window=True), TypeError, "window must be an int"),
        (dict(warmup=1), ValueError, r"warmup must be in \[2, inf\); got 1"),
        (dict(metric="gradnorm"), ValueError, r"metric must be one of \('grad_norm', 'loss'\)"),
        (
            dict(max_consecutive_skips=0),
            ValueError,
            r"max_consecutive_skips must be in \[1, inf\); got 0",
        ),
        (dict(max_consecutive_skips=5.0), TypeError, "max_consecutive_skips must be an int"),
        (dict(max_consecutive_skips=True), TypeError, "max_consecutive_skips must be an int"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        adamw_jax.skip_spikes(optax.sgd(0.1), **kwargs)


def test_inner_must_be_a_transformation_and_loss_must_be_given():
    for factory in (adamw_jax.skip_spikes, adamw_jax.cautious):
        with pytest.raises(TypeError, match=r"inner must be an optax\.GradientTransformation"):
            factory(lambda g: g)
    tx = adamw_jax.skip_spikes(optax.sgd(0.1), metric="loss")
    with pytest.raises(ValueError, match="needs the loss"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="must be a scalar"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS, value=jnp.ones(2))


# cautious


def test_cautious_keeps_agreeing_signs_and_rescales_per_leaf():
    g = {"a": jnp.array([1.0, -2.0, 3.0, 0.5]), "b": jnp.array([1.0, 1.0])}
    direction = {"a": jnp.array([2.0, 1.0, 1.0, -1.0]), "b": jnp.array([-1.0, -1.0])}
    inner = optax.GradientTransformation(
        lambda p: optax.EmptyState(), lambda u, s, p=None: (direction, s)
    )
    got, _ = adamw_jax.cautious(inner).update(g, optax.EmptyState())
    # a: two of four agree, scaled by 2; b: none agree, a zero step (the floor), not NaN.
    chex.assert_trees_all_equal(
        got, {"a": jnp.array([4.0, 0.0, 2.0, 0.0]), "b": jnp.array([0.0, 0.0])}
    )


def test_cautious_sees_zeros_as_disagreeing_and_keeps_tiny_values():
    tx = adamw_jax.cautious(optax.identity())
    g = {"a": jnp.array([0.0, 1e-30, -1e-30, 1.0])}  # the product of 1e-30s would underflow
    got, _ = tx.update(g, tx.init(g))
    chex.assert_trees_all_close(got["a"], jnp.array([0.0, 1e-30, -1e-30, 1.0]) * 4 / 3)


def test_cautious_adamw_keeps_the_state_of_adamw():
    plain, careful = adamw_jax.adamw(1e-2), adamw_jax.adamw(1e-2, cautious=True)
    chex.assert_trees_all_equal_structs(plain.init(PARAMS), careful.init(PARAMS))
    updates, _ = careful.update(_grads(1.0, 0), careful.init(PARAMS), PARAMS)
    chex.assert_tree_all_finite(updates)


def test_cautious_under_jit_and_vmap_matches_eager():
    tx = adamw_jax.cautious(adamw_jax.scale_by_adam())
    g = _grads(1.0, 3)
    eager, _ = tx.update(g, tx.init(g))
    jitted, _ = jax.jit(tx.update)(g, tx.init(g))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
    batched = jax.tree.map(lambda x: jnp.stack([x, -x]), g)
    out, _ = jax.vmap(tx.update)(batched, jax.vmap(tx.init)(batched))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], out), eager, rtol=1e-6)


@pytest.mark.parametrize("name", ["cautious", "cautious_weight_decay"])
def test_cautious_flags_must_be_bools(name):
    with pytest.raises(TypeError, match=f"{name} must be a bool; got 1"):
        adamw_jax.adamw(1e-2, **{name: 1})
    with pytest.raises(TypeError, match="cautious must be a bool; got 'yes'"):
        adamw_jax.decoupled_weight_decay(1e-3, cautious="yes")
