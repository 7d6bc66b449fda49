"""adamw and adam against an independent NumPy transcription and against Optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import adamw_trajectory, max_rel_err

import adamw_jax
from adamw_jax import masks

SHAPES = {"a": (3, 4), "b": (5,), "c": (), "d": (2, 3, 2)}
GRAD_SCALE = {"a": 1.0, "b": 1e-3, "c": 10.0, "d": 0.1}


def problem(steps: int, seed: int = 0):
    """Initial params, per-leaf curvature and a gradient-noise sequence (float64 NumPy)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curv = {k: rng.uniform(0.1, 2.0, size=s) for k, s in SHAPES.items()}
    noise = {k: GRAD_SCALE[k] * rng.normal(size=(steps, *s)) for k, s in SHAPES.items()}
    return params, curv, noise


def run_jax(tx, params, curv, noise, dtype):
    """Runs tx on the gradients curv * w + noise_t inside one jitted scan."""
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731
    params, curv, noise = cast(params), cast(curv), cast(noise)

    @jax.jit
    def run(params, noise):
        def step(carry, n_t):
            w, state = carry
            grads = jax.tree.map(lambda c, x, n: c * x + n, curv, w, n_t)
            updates, state = tx.update(grads, state, w)
            return (optax.apply_updates(w, updates), state), None

        (w, _), _ = jax.lax.scan(step, (params, tx.init(params)), noise)
        return w

    return jax.tree.map(np.asarray, run(params, noise))


def run_reference(params, curv, noise, **hp):
    def grad_fn(w, t):
        return {k: curv[k] * w[k] + noise[k][t - 1] for k in w}

    steps = len(noise["a"])
    return adamw_trajectory(params, grad_fn, steps, **hp)


def cosine(peak, steps):
    def schedule(count):
        frac = jnp.minimum(jnp.asarray(count, float), steps) / steps  # float64 under x64
        return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


LR = 1e-2
CONFIGS = {
    "lr": dict(weight_decay=0.1),
    "lr-mask": dict(weight_decay=0.1, mask={"a": True, "b": False, "c": False, "d": True}),
    "lr-schedules": dict(learning_rate=cosine(LR, 500), weight_decay=cosine(0.2, 400)),
    "schedule-const-lr": dict(weight_decay=0.01, decay_coupling="schedule"),
    "schedule": dict(
        learning_rate=cosine(LR, 500),
        weight_decay=0.02,
        decay_coupling="schedule",
        peak_learning_rate=LR,
    ),
    "none": dict(weight_decay=1e-3, decay_coupling="none"),
    "none-scheduled-wd": dict(weight_decay=cosine(2e-3, 500), decay_coupling="none"),
    "amsgrad": dict(weight_decay=0.1, amsgrad=True),
    "nesterov": dict(weight_decay=0.1, nesterov=True),
    "everything": dict(
        learning_rate=cosine(LR, 500),
        weight_decay=0.05,
        decay_coupling="schedule",
        peak_learning_rate=2 * LR,
        mask={"a": True, "b": True, "c": False, "d": False},
        amsgrad=True,
        nesterov=True,
        eps_root=1e-10,
    ),
}


def _tx_args(cfg):
    kwargs = dict(cfg)
    kwargs.setdefault("learning_rate", LR)
    return kwargs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adamw_matches_numpy_reference_float64(name):
    cfg = _tx_args(CONFIGS[name])
    params, curv, noise = problem(500)
    with jax.enable_x64(True):  # schedules too are evaluated in float64 on both sides
        got = run_jax(adamw_jax.adamw(**cfg), params, curv, noise, jnp.float64)
        want = run_reference(params, curv, noise, **cfg)
    assert max_rel_err(got, want) < 1e-9
    assert max_rel_err(params, want) > 1e-3  # the params did move


@pytest.mark.parametrize("name", ["lr", "lr-mask", "schedule", "none", "amsgrad", "everything"])
def test_adamw_matches_numpy_reference_float32(name):
    cfg = _tx_args(CONFIGS[name])
    params, curv, noise = problem(500)
    got = run_jax(adamw_jax.adamw(**cfg), params, curv, noise, jnp.float32)
    want = run_reference(params, curv, noise, **cfg)
    assert max_rel_err(got, want) < 1e-4


def test_reference_disagrees_when_coupling_differs():
    """The comparison can fail: the couplings give measurably different trajectories."""
    params, curv, noise = problem(500)
    cfg = dict(learning_rate=cosine(LR, 500), weight_decay=0.05, peak_learning_rate=LR)
    with jax.enable_x64(True):
        got = run_jax(
            adamw_jax.adamw(**cfg, decay_coupling="schedule"), params, curv, noise, jnp.float64
        )
        want = run_reference(
            params, curv, noise, **{**cfg, "weight_decay": 0.05 * LR, "peak_learning_rate": None}
        )
    assert max_rel_err(got, want) > 1e-3


def test_masks_by_ndim_matches_explicit_mask():
    params, curv, noise = problem(100)
    explicit = {k: len(s) >= 2 for k, s in SHAPES.items()}
    with jax.enable_x64(True):
        got = run_jax(
            adamw_jax.adamw(LR, weight_decay=0.3, mask=masks.by_ndim(2)),
            params,
            curv,
            noise,
            jnp.float64,
        )
    want = run_reference(params, curv, noise, learning_rate=LR, weight_decay=0.3, mask=explicit)
    assert max_rel_err(got, want) < 1e-9


@pytest.mark.parametrize("masked", [False, True])
def test_adamw_lr_coupling_matches_optax_adamw(masked):
    params, curv, noise = problem(1000, seed=1)
    mask = {"a": True, "b": False, "c": True, "d": False} if masked else None
    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, 1000)
    kwargs = dict(learning_rate=sched, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.2, mask=mask)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):  # Optax needs it
        got = run_jax(adamw_jax.adamw(**kwargs), params, curv, noise, jnp.float64)
        want = run_jax(optax.adamw(**kwargs), params, curv, noise, jnp.float64)
    assert max_rel_err(got, want) < 1e-9


def test_nesterov_matches_optax_nadamw():
    params, curv, noise = problem(500, seed=2)
    kwargs = dict(learning_rate=1e-2, weight_decay=0.05)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        got = run_jax(adamw_jax.adamw(**kwargs, nesterov=True), params, curv, noise, jnp.float64)
        want = run_jax(optax.nadamw(**kwargs), params, curv, noise, jnp.float64)
    assert max_rel_err(got, want) < 1e-9


def test_amsgrad_matches_optax_scale_by_amsgrad_chain():
    params, curv, noise = problem(500, seed=3)
    reference = optax.chain(
        optax.scale_by_amsgrad(b1=0.9, b2=0.99),
        optax.add_decayed_weights(0.05),
        optax.scale_by_learning_rate(1e-2),
    )
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        got = run_jax(
            adamw_jax.adamw(1e-2, b2=0.99, weight_decay=0.05, amsgrad=True),
            params,
            curv,
            noise,
            jnp.float64,
        )
        want = run_jax(reference, params, curv, noise, jnp.float64)
    assert max_rel_err(got, want) < 1e-9


def test_adam_l2_matches_optax_chain_and_reference():
    params, curv, noise = problem(500, seed=4)
    reference = optax.chain(
        optax.add_decayed_weights(0.3),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(1e-2),
    )
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        got = run_jax(adamw_jax.adam(1e-2, l2=0.3), params, curv, noise, jnp.float64)
        want = run_jax(reference, params, curv, noise, jnp.float64)
    assert max_rel_err(got, want) < 1e-9
    numpy_want = run_reference(params, curv, noise, learning_rate=1e-2, weight_decay=0.0, l2=0.3)
    assert max_rel_err(got, numpy_want) < 1e-9


def test_adam_l2_is_not_adamw():
    """The L2 penalty goes through the moments, so Adam+L2 and AdamW really differ."""
    params, curv, noise = problem(300, seed=5)
    with jax.enable_x64(True):
        l2 = run_jax(adamw_jax.adam(1e-2, l2=0.3), params, curv, noise, jnp.float64)
        decoupled = run_jax(
            adamw_jax.adamw(1e-2, weight_decay=0.3), params, curv, noise, jnp.float64
        )
    assert max_rel_err(l2, decoupled) > 1e-2
