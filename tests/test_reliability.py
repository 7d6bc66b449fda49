"""Reliability: fuzzed bad input, non-finite steps, long runs, mixed dtypes."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_trees_bitwise_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import adamw_jax

FUZZ = settings(max_examples=200, deadline=None, derandomize=True)

# Values of every kind a user might pass by mistake, plus good ones.
anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**400), 10**400),
    st.text(max_size=5),
    st.lists(st.floats(0, 1), max_size=2),
    st.tuples(st.floats(0, 1)),
    st.none(),
    st.booleans(),
    st.complex_numbers(max_magnitude=2),
    st.dictionaries(st.text(max_size=2), st.booleans(), max_size=2),
    st.sampled_from(
        [np.float32(0.5), np.float64(-1.0), np.int64(3), np.complex64(1j), np.bool_(True)]
    ),
    st.sampled_from([jnp.float32(0.1), jnp.array([0.1, 0.2]), jnp.array(2), jnp.array(True)]),
    st.sampled_from(["lr", "schedule", "none", "int8", jnp.bfloat16, jnp.int8, "float32"]),
)

ADAMW_ARGS = [
    "learning_rate",
    "b1",
    "b2",
    "eps",
    "eps_root",
    "weight_decay",
    "mask",
    "decay_coupling",
    "peak_learning_rate",
    "amsgrad",
    "nesterov",
    "mu_dtype",
    "nu_dtype",
]

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}


def _extreme(value) -> bool:
    """A number beyond 1e±12 in magnitude: up to three such make a step overflow float32."""
    try:
        x = abs(float(value))
    except OverflowError:
        return True
    except (TypeError, ValueError):
        return False
    return x != 0.0 and not 1e-12 <= x <= 1e12


@FUZZ
@given(st.dictionaries(st.sampled_from(ADAMW_ARGS), anything, min_size=1, max_size=3))
def test_constructor_fuzz(kwargs):
    """Every argument set either builds a working optimizer or names the bad argument.

    A working optimizer's step is finite, unless an accepted value is so large (or a peak
    learning rate so small) that the step itself lies beyond float32: learning_rate=3.4e38
    steps a param of 1 to -inf.
    """
    try:
        tx = adamw_jax.adamw(**{"learning_rate": 1e-3, **kwargs})
        state = tx.init(PARAMS)
        updates, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(name in message for name in kwargs), (kwargs, message)
        return
    if any(_extreme(v) for v in kwargs.values()):
        return
    new = optax.apply_updates(PARAMS, updates)
    for leaf in jax.tree.leaves((new, state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), kwargs


update_inputs = st.one_of(
    st.just({"w": jnp.ones((2, 3))}),
    st.just({"w": jnp.ones((2, 3)), "b": jnp.ones(4)}),
    st.just({"w": jnp.ones((3, 2)), "b": jnp.ones(3)}),
    st.just({"w": jnp.ones((2, 3), jnp.int32), "b": jnp.ones(3)}),
    st.just({"w": jnp.ones((2, 3)), "b": jnp.ones(3, bool)}),
    st.just({"w": jnp.ones((2, 3)), "b": jnp.ones(3), "extra": jnp.ones(1)}),
    st.just([jnp.ones((2, 3)), jnp.ones(3)]),
    st.just({"w": jnp.ones((2, 3)), "b": jnp.ones(3, jnp.bfloat16)}),
    st.just({"w": jnp.full((2, 3), 1e15), "b": jnp.full(3, -1e-30)}),
)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(update_inputs, st.booleans())
def test_update_fuzz(grads, pass_params):
    """Bad updates raise ValueError/TypeError naming the updates; good ones stay finite."""
    tx = adamw_jax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(PARAMS)
    try:
        updates, state = tx.update(grads, state, PARAMS if pass_params else None)
    except (ValueError, TypeError) as err:
        assert "updates" in str(err) or "params" in str(err), str(err)
        return
    new = optax.apply_updates(PARAMS, updates)
    for leaf in jax.tree.leaves((new, state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_nonfinite_steps_change_nothing_and_are_counted():
    inner = adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True)
    tx = optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, tx.init(PARAMS)
    ref_params, ref_state = PARAMS, inner.init(PARAMS)
    bad = [jnp.nan, jnp.inf, -jnp.inf]
    for t in range(9):
        grads = jax.tree.map(lambda p: jnp.cos(p * (t + 1)), PARAMS)
        if t % 3 == 1:
            grads = {**grads, "b": grads["b"].at[1].set(bad[t // 3])}
            before = (params, state.inner_state)
            params, state = step(params, state, grads)
            assert_trees_bitwise_equal((params, state.inner_state), before)
        else:
            params, state = step(params, state, grads)
            updates, ref_state = inner.update(grads, ref_state, ref_params)
            ref_params = optax.apply_updates(ref_params, updates)
    assert int(state.total_notfinite) == 3
    chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=0.0)


def test_step_count_saturates_without_wrapping():
    top = np.iinfo(np.int32).max
    tx = adamw_jax.adamw(optax.constant_schedule(1e-2), weight_decay=0.1)
    state = tx.init(PARAMS)
    state = jax.tree.map(
        lambda x: jnp.int32(top - 2) if x.dtype == jnp.int32 else x, state
    )  # every count in the chain
    params = PARAMS
    step = jax.jit(tx.update)
    for _ in range(5):
        updates, state = step(jax.tree.map(jnp.ones_like, params), state, params)
        params = optax.apply_updates(params, updates)
        counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
        assert all(int(c) >= top - 1 for c in counts)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    assert [int(c) for c in counts] == [top, top]
    # Bias correction at the saturated count is exactly 1: the direction is m / (sqrt(v) + eps).
    adam_state = state[0]
    u, _ = adamw_jax.scale_by_adam().update(jax.tree.map(jnp.ones_like, PARAMS), adam_state)
    m = jax.tree.map(lambda x: 0.9 * x + 0.1, adam_state.mu)
    v = jax.tree.map(lambda x: 0.999 * x + 0.001, adam_state.nu)
    want = jax.tree.map(lambda a, b: a / (jnp.sqrt(b) + 1e-8), m, v)
    chex.assert_trees_all_close(u, want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, "1e-3", [1e-3], None])
@pytest.mark.parametrize("name", ["learning_rate", "weight_decay", "eps", "b1", "b2"])
def test_each_bad_hyperparameter_names_itself(name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        adamw_jax.adamw(**{"learning_rate": 1e-3, name: value})


@pytest.mark.parametrize("amsgrad", [False, True])
def test_eps_zero_with_zero_gradients_gives_no_nan(amsgrad):
    tx = adamw_jax.adamw(1e-2, eps=0.0, weight_decay=0.1, amsgrad=amsgrad)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for g in (jnp.zeros(3), jnp.array([0.0, 2.0, 0.0]), jnp.zeros(3)):
        updates, state = tx.update({"w": g}, state, params)
        params = optax.apply_updates(params, updates)
    w = np.asarray(params["w"])
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w[[0, 2]], (1 - 1e-3) ** 3, rtol=1e-6)  # decay only
    assert w[1] < w[0]  # the leaf with a gradient moved


def test_eps_zero_is_also_safe_when_traced():
    tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-2, eps=0.0)
    params = {"w": jnp.ones(2)}
    updates, _ = jax.jit(tx.update)({"w": jnp.zeros(2)}, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_mixed_param_and_gradient_dtypes():
    """Computed in the wider dtype; the step comes back in the param's dtype."""
    params = {"w": jnp.linspace(-1.0, 1.0, 4)}
    tx = adamw_jax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(params)
    grads16 = {"w": jnp.array([0.5, -0.25, 1.0, 3.0], jnp.bfloat16)}
    updates, state = tx.update(grads16, state, params)
    assert updates["w"].dtype == jnp.float32 and state[0].mu["w"].dtype == jnp.float32
    want, _ = tx.update(
        jax.tree.map(lambda g: g.astype(jnp.float32), grads16), tx.init(params), params
    )
    np.testing.assert_array_equal(updates["w"], want["w"])
    with jax.enable_x64(True):
        grads64 = {"w": jnp.array([0.5, -0.25, 1.0, 3.0], jnp.float64)}
        updates, state = tx.update(grads64, tx.init(params), params)
        assert updates["w"].dtype == jnp.float32
        assert state[0].mu["w"].dtype == jnp.float32
