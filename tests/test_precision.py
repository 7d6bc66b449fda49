"""Tests of adamw_jax.precision: updates that survive bfloat16 parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import run_scan

import adamw_jax

STEPS = 1000


def _train(tx, dtype, zero_grads=False):
    """STEPS AdamW steps (lr=1e-3, wd=1e-2) on a least-squares problem; the final weights."""
    ka, kw, kt = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (128, 32))
    w0 = (1.0 + jax.random.uniform(kw, (32, 16))).astype(dtype)  # in [1, 2): ulp 2**-7
    y = a @ (0.5 * jax.random.normal(kt, (32, 16)))

    def loss(w):
        return jnp.mean((a @ w.astype(jnp.float32) - y) ** 2)

    def grad(w, _):
        return jnp.zeros_like(w) if zero_grads else jax.grad(loss)(w)

    w = run_scan(tx, w0, grad, STEPS).params
    return np.asarray(w.astype(jnp.float32)), np.asarray(w0.astype(jnp.float32))


def _norm(w):
    return float(np.linalg.norm(w))


@pytest.mark.parametrize("zero_grads", [True, False], ids=["decay_only", "least_squares"])
def test_bf16_params_keep_decay_and_small_updates(zero_grads):
    def tx(param_update=None):
        # float32 moments: by default they would follow the params into bfloat16.
        return adamw_jax.adamw(
            1e-3,
            weight_decay=1e-2,
            param_update=param_update,
            mu_dtype=jnp.float32,
            nu_dtype=jnp.float32,
        )

    ref, w0 = _train(tx(), jnp.float32, zero_grads)
    plain, w0_bf16 = _train(tx(), jnp.bfloat16, zero_grads)
    if zero_grads:
        # Per-step decay 1e-5 is below bfloat16's resolution: plain bf16 never moves, while
        # float32 decays by 1 - (1 - 1e-5)**1000 ~ 1%.
        np.testing.assert_array_equal(plain, w0_bf16)
        np.testing.assert_allclose(_norm(ref), (1 - 1e-5) ** STEPS * _norm(w0), rtol=1e-4)
    else:
        assert abs(_norm(plain) - _norm(ref)) > 0.05 * _norm(ref)  # plain bf16 is lost
    for method in ("compensated", "stochastic_rounding"):
        kept, _ = _train(tx(method), jnp.bfloat16, zero_grads)
        assert abs(_norm(kept) - _norm(ref)) <= 0.01 * _norm(ref), method
        # Finer than the 1% requirement: at least 80% of fp32's change in norm is kept.
        change_ref, change = _norm(ref) - _norm(w0), _norm(kept) - _norm(w0_bf16)
        assert abs(change - change_ref) <= 0.2 * abs(change_ref), (method, change, change_ref)


def test_compensated_state_and_float32_leaves_pass_through():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3)}
    tx = adamw_jax.low_precision_update("compensated")
    state = tx.init(params)
    assert state.compensation["w"].shape == (4, 3)
    assert state.compensation["w"].dtype == jnp.bfloat16
    assert state.compensation["b"].shape == ()
    updates = {"w": jnp.full((4, 3), 1e-3, jnp.bfloat16), "b": jnp.full(3, 1e-3)}
    out, state = jax.jit(tx.update)(updates, state, params)
    np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(updates["b"]))
    new = optax.apply_updates(params, out)
    # 1 + 1e-3 rounds back to 1 in bfloat16; the remainder waits in the buffer.
    np.testing.assert_array_equal(np.asarray(new["w"], np.float32), 1.0)
    np.testing.assert_allclose(np.asarray(state.compensation["w"], np.float32), 1e-3, rtol=1e-2)


def test_stochastic_rounding_is_unbiased_and_keyed_by_step():
    params = jnp.ones(20000, jnp.bfloat16)
    tx = adamw_jax.low_precision_update("stochastic_rounding", seed=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u1, state = update(jnp.full(20000, 1e-3, jnp.bfloat16), state, params)
    u2, _ = update(jnp.full(20000, 1e-3, jnp.bfloat16), state, params)
    # ulp(1) in bfloat16 is 2**-7: P(round up) = 1e-3 / 2**-7 = 0.128.
    landed = np.asarray(optax.apply_updates(params, u1), np.float32)
    assert set(np.unique(landed)) <= {1.0, 1.0 + 2.0**-7}
    np.testing.assert_allclose(landed.mean() - 1.0, 1e-3, rtol=0.1)
    assert not np.array_equal(np.asarray(u1), np.asarray(u2))  # a new key each step


def test_bad_param_update():
    with pytest.raises(ValueError, match="param_update"):
        adamw_jax.adamw(1e-3, param_update="kahan")
    with pytest.raises(ValueError, match="method"):
        adamw_jax.low_precision_update("round")
