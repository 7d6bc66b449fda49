"""add_decayed_weights and decoupled_weight_decay, with masks and schedules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax

PARAMS = {"enc": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}, "dec": jnp.full(4, -2.0)}
GRADS = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), PARAMS)


@pytest.mark.parametrize(
    "mask",
    [None, {"enc": {"w": True, "b": False}, "dec": True}, {"enc": False, "dec": True}],
    ids=["all", "leafwise", "prefix"],
)
def test_add_decayed_weights_is_a_drop_in_for_optax(mask):
    ours = adamw_jax.add_decayed_weights(0.3, mask)
    theirs = optax.add_decayed_weights(0.3, mask)
    got, _ = ours.update(GRADS, ours.init(PARAMS), PARAMS)
    want, _ = theirs.update(GRADS, theirs.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal(got, want)


def test_add_decayed_weights_follows_a_schedule():
    tx = adamw_jax.add_decayed_weights(lambda count: 0.1 * (count.astype(jnp.float32) + 1))
    state = tx.init(PARAMS)
    for t in range(3):
        got, state = tx.update(GRADS, state, PARAMS)
        np.testing.assert_allclose(np.asarray(got["dec"]), 0.5 + 0.1 * (t + 1) * -2.0, rtol=1e-6)


@pytest.mark.parametrize(
    "coupling, expected_decay",
    [("lr", 0.1 * 0.2), ("schedule", (0.1 / 0.4) * 0.2), ("none", 0.2)],
)
def test_decoupled_step_per_coupling(coupling, expected_decay):
    peak = 0.4 if coupling == "schedule" else None
    tx = adamw_jax.decoupled_weight_decay(
        0.1, 0.2, decay_coupling=coupling, peak_learning_rate=peak
    )
    got, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    want = jax.tree.map(lambda g, p: -0.1 * g - expected_decay * p, GRADS, PARAMS)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0.0)


def test_schedule_coupling_follows_the_multiplier_only():
    lr = lambda count: 0.05 * (1.0 + jnp.cos(jnp.pi * jnp.float32(count) / 10.0))  # noqa: E731
    tx = adamw_jax.decoupled_weight_decay(
        lr, 0.3, decay_coupling="schedule", peak_learning_rate=0.1
    )
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    state = tx.init(PARAMS)
    for t in range(10):
        got, state = tx.update(zeros, state, PARAMS)
        d = float(lr(jnp.float32(t))) / 0.1 * 0.3
        np.testing.assert_allclose(np.asarray(got["dec"]), d * 2.0, rtol=1e-5)


def test_schedule_coupling_with_constant_lr_decays_by_weight_decay():
    """lr_t / peak = 1 for a constant lr, even lr = 0 (no 0/0)."""
    for lr in (0.0, 0.1):
        tx = adamw_jax.decoupled_weight_decay(lr, 0.25, decay_coupling="schedule")
        got, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
        np.testing.assert_allclose(np.asarray(got["dec"]), -lr * 0.5 + 0.25 * 2.0, rtol=1e-6)


def test_traced_bool_mask_is_applied_with_where():
    mask = {"enc": {"w": jnp.array(True), "b": jnp.array(False)}, "dec": jnp.array(True)}
    tx = adamw_jax.decoupled_weight_decay(0.1, 0.5, mask=mask)
    got, _ = jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.asarray(got["enc"]["b"]), -0.05)
    np.testing.assert_allclose(np.asarray(got["dec"]), -0.1 * (0.5 + 0.5 * -2.0))


def test_masks_that_do_not_fit_the_params_are_refused():
    tx = adamw_jax.decoupled_weight_decay(0.1, 0.5, mask={"enc": True, "other": False})
    with pytest.raises(ValueError, match="mask does not match the params"):
        tx.update(GRADS, tx.init(PARAMS), PARAMS)


def test_params_are_required():
    for tx in (adamw_jax.decoupled_weight_decay(), adamw_jax.add_decayed_weights(0.1)):
        with pytest.raises(ValueError, match="needs the params"):
            tx.update(GRADS, tx.init(PARAMS))


def test_updates_that_do_not_fit_the_params_are_refused():
    tx = adamw_jax.decoupled_weight_decay()
    with pytest.raises(ValueError, match="tree structure"):
        tx.update({"dec": GRADS["dec"]}, tx.init(PARAMS), PARAMS)
    bad = {**GRADS, "dec": jnp.ones(5)}
    with pytest.raises(ValueError, match=r"\['dec'\] have shape \(5,\)"):
        tx.update(bad, tx.init(PARAMS), PARAMS)
