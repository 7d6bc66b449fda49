"""Property tests over random trees and hyperparameters."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from _helpers import run_steps
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adamw_jax

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)

shapes = hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4)
# XLA on CPU flushes subnormals to zero, so they are left out.
finite = st.floats(
    -1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)


@st.composite
def trees(draw):
    """A dict of 1-3 float32 leaves with random shapes and finite values."""
    n = draw(st.integers(1, 3))
    return {
        f"leaf{i}": draw(hnp.arrays(np.float32, draw(shapes), elements=finite)) for i in range(n)
    }


@st.composite
def hyperparameters(draw):
    coupling = draw(st.sampled_from(["lr", "schedule", "none"]))
    return dict(
        learning_rate=draw(st.floats(0.0, 1.0)),
        b1=draw(st.floats(0.0, 0.99)),
        b2=draw(st.floats(0.0, 0.999)),
        eps=draw(st.floats(1e-8, 1e-3)),
        weight_decay=draw(st.floats(0.0, 1.0)),
        decay_coupling=coupling,
        amsgrad=draw(st.booleans()),
        nesterov=draw(st.booleans()),
    )


@SETTINGS
@given(trees(), hyperparameters(), st.data())
def test_finite_in_finite_out(params, hp, data):
    grads = {
        k: data.draw(hnp.arrays(np.float32, v.shape, elements=finite)) for k, v in params.items()
    }
    new, state, _ = run_steps(adamw_jax.adamw(**hp), params, lambda *_: grads, 3)
    for leaf in jax.tree.leaves((new, state)):
        assert np.all(np.isfinite(np.asarray(leaf)))


@SETTINGS
@given(trees(), hyperparameters(), st.data())
def test_zero_learning_rate_and_decay_change_nothing(params, hp, data):
    grads = {
        k: data.draw(hnp.arrays(np.float32, v.shape, elements=finite)) for k, v in params.items()
    }
    hp = {**hp, "learning_rate": 0.0, "weight_decay": 0.0}
    new = run_steps(adamw_jax.adamw(**hp), params, lambda *_: grads, 3).params
    chex.assert_trees_all_equal(new, params)


@SETTINGS
@given(trees(), hyperparameters(), st.integers(1, 5))
def test_zero_gradients_shrink_by_the_decay_factor(params, hp, steps):
    lr, wd = hp["learning_rate"], hp["weight_decay"]
    d = {"lr": lr * wd, "schedule": wd, "none": wd}[hp["decay_coupling"]]
    with jax.enable_x64(True):
        params64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
        zeros = jax.tree.map(np.zeros_like, params64)
        new = run_steps(adamw_jax.adamw(**hp), params64, lambda *_: zeros, steps).params
        for k, v in params64.items():
            np.testing.assert_allclose(np.asarray(new[k]), v * (1 - d) ** steps, rtol=1e-12)


@SETTINGS
@given(trees(), hyperparameters(), st.data())
def test_masked_out_leaves_never_decay(params, hp, data):
    mask = {k: data.draw(st.booleans()) for k in params}
    zeros = jax.tree.map(jnp.zeros_like, params)
    hp = {**hp, "weight_decay": max(hp["weight_decay"], 0.1), "learning_rate": 0.5}
    new = run_steps(adamw_jax.adamw(**hp, mask=mask), params, lambda *_: zeros, 3).params
    for k, decays in mask.items():
        if not decays:
            np.testing.assert_array_equal(new[k], params[k])
        elif np.any(np.abs(params[k]) > 1e-30):  # else d * w is subnormal: flushed to 0 on CPU
            assert np.any(np.abs(new[k]) < np.abs(params[k]))
