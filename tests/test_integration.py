"""adamw inside the JAX/Optax toolbox: jit, vmap, chain, inject_hyperparams, MultiSteps, ..."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _helpers import run_scan, run_steps

import adamw_jax

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.linspace(0.5, 1.0, 4)}


def grads_at(t: int):
    key = jax.random.fold_in(jax.random.key(42), t)
    return jax.tree.map(lambda p: jax.random.normal(key, p.shape), PARAMS)


def test_jit_with_donation_matches_eager():
    tx = adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step_donated = jax.jit(step, donate_argnums=(0, 1))
    params, state = jax.tree.map(jnp.copy, PARAMS), tx.init(PARAMS)
    for t in range(20):
        params, state = step_donated(params, state, grads_at(t))
    want = run_steps(tx, PARAMS, lambda _, t: grads_at(t), 20)
    chex.assert_trees_all_close(params, want.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(state, want.state, rtol=1e-6, atol=1e-7)


def test_second_update_does_not_recompile():
    tx = adamw_jax.adamw(optax.cosine_decay_schedule(1e-2, 100), weight_decay=0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)  # a second trace raises
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, tx.init(PARAMS)
    with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix int and float
        for t in range(3):
            params, state = step(params, state, grads_at(t))


def test_vmap_over_independent_optimizers():
    """A batch of 4 runs with different params and gradients equals 4 separate runs."""
    tx = adamw_jax.adamw(1e-2, weight_decay=0.3, nesterov=True)
    scales = jnp.array([0.5, 1.0, 2.0, -1.0])
    batch = jax.tree.map(lambda p: scales.reshape(-1, *[1] * p.ndim) * p, PARAMS)
    states = jax.vmap(tx.init)(batch)

    @jax.jit
    @jax.vmap
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(10):
        grads = jax.tree.map(lambda g: scales.reshape(-1, *[1] * g.ndim) * g, grads_at(t))
        batch, states = step(batch, states, grads)
    for i, s in enumerate(np.asarray(scales)):
        alone = run_steps(
            tx,
            jax.tree.map(lambda p: s * p, PARAMS),
            lambda _, t: jax.tree.map(lambda g: s * g, grads_at(t)),
            10,
        )
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], batch), alone.params, rtol=1e-6, atol=1e-7
        )


def test_chain_after_clip_by_global_norm():
    tx = optax.chain(optax.clip_by_global_norm(0.5), adamw_jax.adamw(1e-2, weight_decay=0.1))
    grads = jax.tree.map(lambda *g: jnp.stack(g), *[grads_at(t) for t in range(10)])
    got = run_scan(tx, PARAMS, lambda _, g: g, grads).params

    def clipped(_, g):
        norm = optax.tree.norm(g)
        return jax.tree.map(lambda x: x * jnp.minimum(1.0, 0.5 / norm), g)

    want = run_scan(adamw_jax.adamw(1e-2, weight_decay=0.1), PARAMS, clipped, grads).params
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_changes_lr_and_wd_without_recompiling():
    tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-2, weight_decay=0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)  # a second trace raises
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    schedule = [(1e-2, 0.1), (5e-3, 0.0), (2e-2, 0.5)]
    params, state = PARAMS, tx.init(PARAMS)
    ref_params = PARAMS
    ref_state = adamw_jax.adamw(1.0).init(PARAMS)
    for t, (lr, wd) in enumerate(schedule):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        state.hyperparams["weight_decay"] = jnp.asarray(wd)
        params, state = step(params, state, grads_at(t))
        ref = adamw_jax.adamw(lr, weight_decay=wd)
        updates, ref_state = ref.update(grads_at(t), ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-7)


def test_multisteps_accumulates_gradients():
    k = 4
    tx = optax.MultiSteps(adamw_jax.adamw(1e-2, weight_decay=0.1), every_k_schedule=k)

    @jax.jit  # once: called eagerly, MultiSteps' lax.cond compiles anew at every call
    def step(grads, state, params):
        with jax.numpy_dtype_promotion("standard"):  # MultiSteps itself mixes int and float
            return tx.update(grads, state, params)

    params, state = PARAMS, tx.init(PARAMS)
    inner = adamw_jax.adamw(1e-2, weight_decay=0.1)
    ref_params, ref_state = PARAMS, inner.init(PARAMS)
    for outer in range(3):
        grads = [grads_at(outer * k + i) for i in range(k)]
        window_start = params
        for i, g in enumerate(grads):
            updates, state = step(g, state, params)
            params = optax.apply_updates(params, updates)
            if i < k - 1:  # no step until k gradients are in
                chex.assert_trees_all_equal(params, window_start)
        mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
        updates, ref_state = inner.update(mean, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-7)


def test_apply_if_finite_skips_nonfinite_steps():
    tx = optax.apply_if_finite(adamw_jax.adamw(1e-2, weight_decay=0.1), max_consecutive_errors=3)
    inner = adamw_jax.adamw(1e-2, weight_decay=0.1)
    params, state = PARAMS, tx.init(PARAMS)
    ref_params, ref_state = PARAMS, inner.init(PARAMS)
    step = jax.jit(tx.update)
    for t in range(6):
        g = grads_at(t)
        if t in (2, 3):
            g = {**g, "w": g["w"].at[0, 0].set(jnp.nan if t == 2 else jnp.inf)}
            before = (params, state.inner_state)
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        if t in (2, 3):
            chex.assert_trees_all_equal((params, state.inner_state), before)
        else:
            updates, ref_state = inner.update(g, ref_state, ref_params)
            ref_params = optax.apply_updates(ref_params, updates)
    assert int(state.total_notfinite) == 2
    chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-7)


def test_masked_wrapper_leaves_other_leaves_alone():
    tx = optax.masked(adamw_jax.adamw(0.1, weight_decay=0.5), {"w": True, "b": False})
    params = run_steps(tx, PARAMS, lambda _, t: grads_at(t), 5).params
    expected = PARAMS["b"]
    for t in range(5):  # optax.masked passes the raw gradient through on masked-out leaves
        expected = expected + grads_at(t)["b"]
    np.testing.assert_array_equal(params["b"], expected)
    assert not np.allclose(params["w"], PARAMS["w"])
