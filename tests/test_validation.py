"""Every construction-time rule: the error type, and a message naming argument, value, range."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax

RANGE_RULES = [
    ("learning_rate", -1e-3, r"\[0.0, inf\)"),
    ("b1", 1.0, r"\[0.0, 1.0\)"),
    ("b1", -0.1, r"\[0.0, 1.0\)"),
    ("b2", 1.5, r"\[0.0, 1.0\)"),
    ("eps", -1e-8, r"\[0.0, inf\)"),
    ("eps_root", -1.0, r"\[0.0, inf\)"),
    ("weight_decay", -0.01, r"\[0.0, inf\)"),
    ("b2", math.nan, r"\[0.0, 1.0\)"),
    ("learning_rate", math.inf, r"\[0.0, inf\)"),
    ("weight_decay", np.float32(-2.0), r"\[0.0, inf\)"),
    ("eps", jnp.array(-1.0), r"\[0.0, inf\)"),
]


@pytest.mark.parametrize("name, value, accepted", RANGE_RULES)
def test_out_of_range_hyperparameters(name, value, accepted):
    with pytest.raises(ValueError, match=rf"^{name} must be in {accepted}; got .*") as info:
        adamw_jax.adamw(**{name: value})
    assert repr(value) in str(info.value) or str(float(value)) in str(info.value)


@pytest.mark.parametrize("name", ["b1", "b2", "eps", "eps_root", "learning_rate"])
def test_adam_checks_the_same_rules(name):
    with pytest.raises(ValueError, match=name):
        adamw_jax.adam(**{name: -1.0})


def test_l2_is_checked_under_its_own_name():
    with pytest.raises(ValueError, match=r"^l2 must be in \[0.0, inf\); got -0.5"):
        adamw_jax.adam(l2=-0.5)


@pytest.mark.parametrize("value", ["0.1", [0.1], (0.1,), None, True, jnp.ones(2)])
def test_wrong_types(value):
    error = ValueError if isinstance(value, jax.Array) else TypeError
    with pytest.raises(error, match="learning_rate"):
        adamw_jax.adamw(learning_rate=value)


def test_schedules_are_accepted_where_documented_only():
    adamw_jax.adamw(learning_rate=optax.constant_schedule(1e-3), weight_decay=lambda t: 0.1)
    with pytest.raises(TypeError, match="b1 must be a number, not a callable"):
        adamw_jax.adamw(b1=lambda t: 0.9)


def test_decay_coupling_must_be_known():
    with pytest.raises(ValueError, match=r"decay_coupling must be one of \('lr', 'schedule', "):
        adamw_jax.adamw(decay_coupling="paper")


def test_schedule_coupling_needs_the_peak_for_a_schedule():
    sched = optax.cosine_decay_schedule(1e-3, 100)
    with pytest.raises(ValueError, match=r"peak_learning_rate must be given \(in \(0, inf\)\)"):
        adamw_jax.adamw(sched, decay_coupling="schedule")
    adamw_jax.adamw(sched, decay_coupling="schedule", peak_learning_rate=1e-3)
    adamw_jax.adamw(1e-3, decay_coupling="schedule")  # constant lr: the multiplier is 1


def test_peak_learning_rate_rules():
    with pytest.raises(ValueError, match=r"^peak_learning_rate must be in \(0.0, inf\); got 0.0"):
        adamw_jax.adamw(decay_coupling="schedule", peak_learning_rate=0.0)
    with pytest.raises(ValueError, match="only with decay_coupling='schedule'"):
        adamw_jax.adamw(decay_coupling="lr", peak_learning_rate=1e-3)


@pytest.mark.parametrize("flag", ["amsgrad", "nesterov"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        adamw_jax.adamw(**{flag: "yes"})


def test_mask_must_be_a_tree_or_callable():
    with pytest.raises(TypeError, match="mask must be None, a pytree of bools"):
        adamw_jax.adamw(mask="bias")


def test_integer_and_boolean_params_are_refused():
    tx = adamw_jax.adamw()
    with pytest.raises(TypeError, match=r"params at \['step'\] has dtype int32"):
        tx.init({"w": jnp.ones(2), "step": jnp.int32(0)})
    with pytest.raises(TypeError, match=r"params at \['flag'\] has dtype bool"):
        tx.init({"w": jnp.ones(2), "flag": jnp.array(True)})


def test_integer_leaves_are_fine_when_masked_out_with_optax_masked():
    params = {"w": jnp.ones(2), "step": jnp.int32(7)}
    tx = optax.masked(adamw_jax.adamw(0.1), {"w": True, "step": False})
    state = tx.init(params)
    grads = {"w": jnp.ones(2), "step": jnp.int32(0)}
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert new["step"].dtype == jnp.int32 and int(new["step"]) == 7
    assert float(new["w"][0]) < 1.0


def test_updates_with_a_different_structure_are_refused():
    tx = adamw_jax.adamw()
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="updates have a different tree structure"):
        tx.update({"a": jnp.ones(2)}, state, params)
    with pytest.raises(ValueError, match=r"updates at \['b'\] have shape \(4,\)"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(4)}, state, params)


def test_traced_hyperparameters_are_not_checked_and_work():
    params = jnp.ones(3)

    @jax.jit
    def step(lr, wd):
        tx = adamw_jax.adamw(lr, weight_decay=wd)
        updates, _ = tx.update(jnp.zeros(3), tx.init(params), params)
        return updates

    np.testing.assert_allclose(np.asarray(step(0.5, 0.2)), -0.1, rtol=1e-6)


@pytest.mark.parametrize("mask", [True, False, jnp.array(True), np.bool_(False)])
def test_a_single_boolean_mask_is_refused(mask):
    with pytest.raises(TypeError, match="single boolean"):
        adamw_jax.adamw(mask=mask)


def test_callable_mask_under_inject_hyperparams_needs_static_args():
    """Without static_args Optax calls the mask on the step count; that must not pass silently."""
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    by_name = adamw_jax.masks.by_name()
    with pytest.raises(TypeError, match=r"static_args=\('mask',\)"):
        optax.inject_hyperparams(adamw_jax.adamw)(mask=by_name).init(params)
    tx = optax.inject_hyperparams(adamw_jax.adamw, static_args=("mask",))(
        learning_rate=0.1, weight_decay=0.5, mask=by_name
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["bias"]), 0.0)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.05)
