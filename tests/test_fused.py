"""The fused step: the C++ kernel agrees with adamw's XLA code, and the fallback works."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from _helpers import assert_trees_close_to_leaf_scale, run_steps

import adamw_jax
from adamw_jax import fused, masks

KERNEL = fused.kernel_available()
needs_kernel = pytest.mark.skipif(
    not KERNEL and os.environ.get("ADAMW_JAX_NO_KERNEL") == "1",
    reason="built without the kernel on purpose (ADAMW_JAX_NO_KERNEL=1)",
)


def _params():
    rng = np.random.default_rng(0)
    return {
        "big": jnp.asarray(rng.standard_normal((300, 250)), jnp.float32),  # threaded path
        "w": jnp.asarray(rng.standard_normal((17, 33)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(33), jnp.float32),
        "s": jnp.asarray(0.5, jnp.float32),
        "empty": jnp.zeros((0, 4), jnp.float32),
    }


def _grads(params, t):
    key = jax.random.fold_in(jax.random.PRNGKey(1), t)
    return {k: (1.0 + t % 3) * jax.random.normal(key, p.shape) for k, p in params.items()}


def _run(opt, steps, params=None):
    params = _params() if params is None else params
    state = opt.init(params)
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    for t in range(steps):
        params, state = step(params, _grads(params, t), state)
    return params, state


def test_kernel_is_built():
    if os.environ.get("ADAMW_JAX_NO_KERNEL") == "1":
        assert not KERNEL
    else:
        assert KERNEL, "the C++ kernel did not build or load (pip install -e . builds it)"


CONFIGS = {
    "default": {},
    "amsgrad": {"amsgrad": True, "weight_decay": 1e-2},
    "nesterov": {"nesterov": True, "weight_decay": 0.3},
    "none": {"decay_coupling": "none", "weight_decay": 1e-3},
    "schedule": {
        "learning_rate": optax.linear_schedule(3e-2, 1e-3, 150),
        "decay_coupling": "schedule",
        "peak_learning_rate": 3e-2,
        "weight_decay": 0.1,
    },
    "bf16_moments": {
        "mu_dtype": jnp.bfloat16,
        "nu_dtype": jnp.bfloat16,
        "amsgrad": True,
        "weight_decay": 1e-2,
    },
    "mask_callable": {"mask": masks.by_ndim(2), "weight_decay": 0.2},
    "mask_traced": {
        "mask": {k: jnp.asarray(k != "b") for k in ("big", "w", "b", "s", "empty")},
        "weight_decay": 0.2,
        "eps": 0.0,
    },
}


@needs_kernel
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_matches_xla_over_200_steps(name):
    kwargs = {"learning_rate": 1e-2, **CONFIGS[name]}
    kernel = fused.fused_adamw(**kwargs, backend="kernel")
    xla = fused.fused_adamw(**kwargs, backend="xla")
    params = _params()
    assert kernel.kernel_used(params, params, kernel.init(params))
    assert not xla.kernel_used(params, params, xla.init(params))
    got, want = _run(kernel, 200), _run(xla, 200)
    assert_trees_close_to_leaf_scale(got, want, ulps=8)
    assert int(got[1][0].count) == int(want[1][0].count) == 200
    assert int(got[1][1].count) == 200
    # the run moved the params: agreement is not trivially between two unchanged trees
    assert float(jnp.max(jnp.abs(got[0]["w"].astype(jnp.float32) - _params()["w"]))) > 0.1


@needs_kernel
def test_kernel_matches_numpy_reference():
    params = {k: v for k, v in _params().items() if k in ("w", "b")}
    opt = fused.fused_adamw(1e-2, weight_decay=0.1, amsgrad=True, backend="kernel")
    start = {k: np.asarray(v) for k, v in params.items()}
    got, _ = _run(opt, 30, params)  # donates params
    want = reference.adamw_trajectory(
        start,
        lambda w, t: {k: np.asarray(v) for k, v in _grads(start, t - 1).items()},
        30,
        learning_rate=1e-2,
        weight_decay=0.1,
        amsgrad=True,
    )
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=2e-6)


@needs_kernel
def test_state_is_adamw_state_and_interchangeable():
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.05, "nesterov": True}
    opt, tx = fused.fused_adamw(**kwargs), adamw_jax.adamw(**kwargs)
    params = _params()
    assert jax.tree.structure(opt.init(params)) == jax.tree.structure(tx.init(params))
    fused_then_optax, state = _run(opt, 3)

    @jax.jit
    def tx_step(p, g, s):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p_mixed, p_plain, s_plain = fused_then_optax, params, tx.init(params)
    for t in range(6):
        if t >= 3:
            p_mixed, state = tx_step(p_mixed, _grads(p_mixed, t), state)
        p_plain, s_plain = tx_step(p_plain, _grads(p_plain, t), s_plain)
    assert_trees_close_to_leaf_scale(p_mixed, p_plain, ulps=8)


def test_fallback_when_kernel_unavailable(monkeypatch):
    monkeypatch.setattr(fused, "kernel_available", lambda: False)
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.1, "mask": masks.by_ndim(2)}
    opt, tx = fused.fused_adamw(**kwargs), adamw_jax.adamw(**kwargs)
    params = _params()
    assert not opt.kernel_used(params, params, opt.init(params))
    got, _ = _run(opt, 5)
    want = run_steps(tx, _params(), _grads, 5).params
    assert_trees_close_to_leaf_scale(got, want, ulps=8)
    with pytest.raises(ValueError, match="kernel_available"):
        fused.fused_adamw(1e-2, backend="kernel").step(params, params, opt.init(params))


@pytest.mark.parametrize(
    "kwargs, params",
    [
        ({"mu_dtype": "int8", "nu_dtype": "int8"}, {"w": jnp.ones((64, 80))}),
        ({"mu_dtype": jnp.float16}, {"w": jnp.ones((4, 3))}),
        ({}, {"w": jnp.ones((4, 3), jnp.bfloat16)}),
        ({"mask": {"w": jnp.array([[True, False, True]] * 4)}}, {"w": jnp.ones((4, 3))}),
    ],
    ids=["int8_moments", "float16_moments", "bf16_params", "elementwise_mask"],
)
def test_unsupported_inputs_take_the_xla_path(kwargs, params):
    opt = fused.fused_adamw(1e-2, **kwargs)
    tx = adamw_jax.adamw(1e-2, **kwargs)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    assert not opt.kernel_used(params, grads, state)
    got, _ = jax.jit(opt.step)(params, grads, state)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = optax.apply_updates(params, updates)
    assert_trees_close_to_leaf_scale(got, want, ulps=8)
    assert float(jnp.max(jnp.abs(got["w"].astype(jnp.float32) - 1.0))) > 1e-3
    with pytest.raises(ValueError, match="does not apply"):
        fused.fused_adamw(1e-2, **kwargs, backend="kernel").step(params, grads, state)


def test_bad_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="backend"):
        fused.fused_adamw(1e-2, backend="gpu")
    with pytest.raises(ValueError, match="learning_rate"):
        fused.fused_adamw(learning_rate=-1.0)


@needs_kernel
def test_many_leaves_split_over_calls_keep_their_masks():
    # more leaves than one custom call takes, with a mask that differs leaf by leaf
    def fresh():
        return {f"p{i:03d}": jnp.full((3 + i % 5,), 1.0 + i / 100) for i in range(150)}

    params = fresh()
    mask = {k: i % 3 != 0 for i, k in enumerate(params)}
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.5, "mask": mask}
    kernel = fused.fused_adamw(**kwargs, backend="kernel")
    xla = fused.fused_adamw(**kwargs, backend="xla")
    assert kernel.kernel_used(params, params, kernel.init(params))
    got = _run(kernel, 5, fresh())
    want = _run(xla, 5, fresh())
    assert_trees_close_to_leaf_scale(got, want, ulps=8)
    plain = _run(fused.fused_adamw(1e-2, weight_decay=0.0, backend="kernel"), 5, fresh())
    decayed = [k for k in mask if mask[k]]
    # the mask took effect: masked-out leaves match the undecayed run, decayed ones do not
    for k in mask:
        same = bool(jnp.all(got[0][k] == plain[0][k]))
        assert same == (k not in decayed), k
