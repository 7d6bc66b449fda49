"""add_decayed_weights and decoupled_weight_decay, with masks and schedules."""

import inspect

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


def _fromage_decay(count):
    """``optax.fromage``'s scheduled coefficient ``1 / sqrt(1 + lr_t^2) - 1``, negative."""
    lr = 0.5 / (1.0 + count.astype(jnp.float32))
    return 1.0 / jnp.sqrt(1.0 + lr**2) - 1.0


@pytest.mark.parametrize(
    "weight_decay, mask",
    [
        (1 / (1 + 0.3**2) ** 0.5 - 1, None),  # optax.fromage(0.3)'s coefficient
        (-0.2, {"enc": {"w": True, "b": False}, "dec": True}),
        (_fromage_decay, None),
        (0.1, True),  # optax.lars' default mask
        (0.1, False),
        (-0.1, True),
    ],
    ids=["fromage", "negative-masked", "negative-schedule", "mask-True", "mask-False", "neg-True"],
)
def test_negative_coefficients_and_single_bool_masks_are_optaxs(weight_decay, mask):
    """50 steps, the params moving with the updates; each step's updates equal Optax's."""
    ours = adamw_jax.add_decayed_weights(weight_decay, mask)
    theirs = optax.add_decayed_weights(weight_decay, mask)
    params, s_ours, s_theirs = PARAMS, ours.init(PARAMS), theirs.init(PARAMS)
    for _ in range(50):
        got, s_ours = ours.update(GRADS, s_ours, params)
        with jax.numpy_dtype_promotion("standard"):  # Optax mixes Python floats and arrays
            want, s_theirs = theirs.update(GRADS, s_theirs, params)
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0.0)
        params = jax.tree.map(lambda p, u: p - 0.1 * u, params, want)
    if mask is False:
        chex.assert_trees_all_equal(got, GRADS)


def test_decoupled_decay_still_refuses_a_negative_coefficient():
    with pytest.raises(ValueError, match=r"^weight_decay must be in \[0.0, inf\); got -0.1"):
        adamw_jax.decoupled_weight_decay(0.1, -0.1)
    with pytest.raises(ValueError, match=r"^weight_decay must be in \(-inf, inf\); got nan"):
        adamw_jax.add_decayed_weights(float("nan"))


def test_decoupled_decay_requires_a_learning_rate_as_adamw_does():
    for factory in (adamw_jax.decoupled_weight_decay, adamw_jax.adamw):
        parameter = inspect.signature(factory).parameters["learning_rate"]
        assert parameter.default is inspect.Parameter.empty, factory
        with pytest.raises(TypeError, match="learning_rate"):
            factory()


def test_add_decayed_weights_follows_a_schedule():
    tx = adamw_jax.add_decayed_weights(lambda count: 0.1 * (count.astype(jnp.float32) + 1))
    state = tx.init(PARAMS)
    for t in range(3):
        got, state = tx.update(GRADS, state, PARAMS)
        np.testing.assert_allclose(np.asarray(got["dec"]), 0.5 + 0.1 * (t + 1) * -2.0, rtol=1e-6)


@pytest.mark.parametrize(
    "coupling, expected_decay",
    [
        ("lr", 0.1 * 0.2),
        ("schedule", (0.1 / 0.4) * 0.2),
        ("none", 0.2),
        ("adamc", 0.1 * 0.1 / 0.4 * 0.2),
    ],
)
def test_decoupled_step_per_coupling(coupling, expected_decay):
    peak = 0.4 if coupling in ("schedule", "adamc") else None
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
    for tx in (adamw_jax.decoupled_weight_decay(0.1), adamw_jax.add_decayed_weights(0.1)):
        with pytest.raises(ValueError, match="needs the params"):
            tx.update(GRADS, tx.init(PARAMS))


def test_updates_that_do_not_fit_the_params_are_refused():
    tx = adamw_jax.decoupled_weight_decay(0.1)
    with pytest.raises(ValueError, match="tree structure"):
        tx.update({"dec": GRADS["dec"]}, tx.init(PARAMS), PARAMS)
    bad = {**GRADS, "dec": jnp.ones(5)}
    with pytest.raises(ValueError, match=r"\['dec'\] have shape \(5,\)"):
        tx.update(bad, tx.init(PARAMS), PARAMS)


# Cautious weight decay and decay toward a target.

SIGNED = {"enc": {"w": jnp.array([[1.0, -1.0, 2.0], [-2.0, 0.0, 3.0]]), "b": jnp.ones(3)}}
DIRECTION = {"enc": {"w": jnp.array([[1.0, 1.0, -1.0], [-1.0, 1.0, 0.0]]), "b": -jnp.ones(3)}}


@pytest.mark.parametrize("coupling", ["lr", "schedule", "none"])
def test_cautious_decay_only_where_update_and_weight_agree(coupling):
    peak = 0.4 if coupling == "schedule" else None
    d = {"lr": 0.1 * 0.2, "schedule": (0.1 / 0.4) * 0.2, "none": 0.2}[coupling]
    tx = adamw_jax.decoupled_weight_decay(
        0.1, 0.2, decay_coupling=coupling, peak_learning_rate=peak, cautious=True
    )
    got, _ = tx.update(DIRECTION, tx.init(SIGNED), SIGNED)
    # w: signs agree at (0,0), (1,0); ties (w = 0 at (1,1), u = 0 at (1,2)) decay; b: none.
    agree = {"enc": {"w": jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), "b": jnp.zeros(3)}}
    want = jax.tree.map(lambda u, p, c: -0.1 * u - d * c * p, DIRECTION, SIGNED, agree)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0.0)


def test_decay_toward_init_and_toward_a_tree():
    p0 = jax.tree.map(lambda p: p + 1.0, SIGNED)
    for target, ref in (("init", p0), (jax.tree.map(lambda p: 0.5 * p, SIGNED), None)):
        tx = adamw_jax.decoupled_weight_decay(0.1, 0.3, decay_coupling="none", decay_target=target)
        ref = target if ref is None else ref
        got, state = tx.update(DIRECTION, tx.init(p0), SIGNED)
        want = jax.tree.map(lambda u, p, r: -0.1 * u - 0.3 * (p - r), DIRECTION, SIGNED, ref)
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_equal(state.target, ref)


def test_decay_target_init_stores_one_copy_of_the_params():
    params = {"w": jnp.ones((100, 10)), "b": jnp.ones(10, jnp.bfloat16)}
    plain = adamw_jax.state_nbytes(adamw_jax.adamw(1e-3).init(params))
    toward_init = adamw_jax.state_nbytes(adamw_jax.adamw(1e-3, decay_target="init").init(params))
    assert toward_init - plain == adamw_jax.state_nbytes(params)


def test_masks_apply_with_a_target_and_cautious_decay():
    mask = {"enc": {"w": False, "b": True}}
    tx = adamw_jax.decoupled_weight_decay(
        0.1, 0.3, mask=mask, decay_target="init", cautious=True, decay_coupling="none"
    )
    p0 = jax.tree.map(jnp.zeros_like, SIGNED)
    got, _ = jax.jit(tx.update)(DIRECTION, tx.init(p0), SIGNED)
    np.testing.assert_allclose(got["enc"]["w"], -0.1 * DIRECTION["enc"]["w"])  # masked out
    np.testing.assert_allclose(got["enc"]["b"], 0.1 * jnp.ones(3))  # u < 0 < w - w_ref: none


def test_decay_targets_that_do_not_fit_the_params_are_refused():
    partial = {"enc": {"w": SIGNED["enc"]["w"]}}
    bad_structure = adamw_jax.decoupled_weight_decay(0.1, decay_target=partial)
    with pytest.raises(ValueError, match="decay_target have a different tree structure"):
        bad_structure.init(SIGNED)
    bad_shape = adamw_jax.decoupled_weight_decay(
        0.1, decay_target={"enc": {"w": jnp.ones(6), "b": jnp.ones(3)}}
    )
    with pytest.raises(ValueError, match=r"decay_target at \['enc'\]\['w'\] have shape \(6,\)"):
        bad_shape.init(SIGNED)
    with pytest.raises(ValueError, match=r"decay_target must be one of \('zero', 'init'\)"):
        adamw_jax.decoupled_weight_decay(0.1, decay_target="initial")
    with pytest.raises(TypeError, match="decay_target must be one of"):
        adamw_jax.adamw(1e-3, decay_target=None)


def test_a_state_without_the_target_is_refused():
    tx = adamw_jax.decoupled_weight_decay(0.1, decay_target="init")
    with pytest.raises(ValueError, match="state without a target"):
        tx.update(DIRECTION, adamw_jax.DecoupledWeightDecayState(jnp.zeros([], jnp.int32)), SIGNED)


def test_decay_target_state_checkpoints(tmp_path):
    from _helpers import checkpoint_round_trip

    tx = adamw_jax.adamw(1e-2, decay_target="init", cautious_weight_decay=True, cautious=True)
    state = tx.init(SIGNED)
    _, state = tx.update(DIRECTION, state, SIGNED)
    checkpoint_round_trip(state, tmp_path / "ckpt")


# AdamC: the decay of normalized layers scaled by lr_t / lr_peak (per step lr_t^2 / peak * wd).

ADAMC_STEPS = 300


def adamc_problem():
    """Params of a small normalized network (matrices, a norm scale, a bias) and gradients."""
    rng = np.random.default_rng(7)
    shapes = {"dense": (6, 4), "out": (4, 3), "norm_scale": (4,), "bias": (3,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    noise = {k: rng.standard_normal((ADAMC_STEPS, *s)) for k, s in shapes.items()}
    return params, noise


def warmup_cosine(peak, warmup=30):
    """Linear warmup to ``peak`` over ``warmup`` steps, then a cosine to 0 at ADAMC_STEPS.

    Computed in JAX's default float (float64 under x64), unlike Optax's float32 schedules.
    """

    def schedule(count):
        s = jnp.asarray(count, float)
        frac = jnp.clip((s - warmup) / (ADAMC_STEPS - warmup), 0.0, 1.0)
        return jnp.where(s < warmup, peak * s / warmup, peak * 0.5 * (1 + jnp.cos(jnp.pi * frac)))

    return schedule


def run_adamc(tx, params, noise, dtype):
    """Final params after ADAMC_STEPS steps of ``tx`` on gradients 0.5 w + noise_t."""
    from _helpers import run_scan

    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731

    def grads(w, n_t):
        return jax.tree.map(lambda x, n: 0.5 * x + n, w, n_t)

    with jax.numpy_dtype_promotion("standard"):  # Optax's inject_hyperparams needs it
        run = run_scan(tx, cast(params), grads, cast(noise))
    return {k: np.asarray(v) for k, v in run.params.items()}


def adamc_reference(params, noise, **kwargs):
    from reference import adamw_trajectory

    def grad_fn(w, t):
        return {k: 0.5 * w[k] + noise[k][t - 1] for k in w}

    return adamw_trajectory(params, grad_fn, ADAMC_STEPS, **kwargs)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-9), (jnp.float32, 1e-4)])
def test_adamc_coupling_matches_the_numpy_reference_with_a_mask(dtype, rtol):
    from reference import max_rel_err

    params, noise = adamc_problem()
    peak, wd = 3e-2, 0.5
    mask = adamw_jax.masks.by_ndim(2)  # the matrices: the layers a normalization follows
    tx = adamw_jax.adamw(
        warmup_cosine(peak), weight_decay=wd, mask=mask, decay_coupling="adamc",
        peak_learning_rate=peak,
    )  # fmt: skip
    with jax.enable_x64(dtype == jnp.float64):
        got = run_adamc(tx, params, noise, dtype)
    explicit = {k: np.ndim(v) >= 2 for k, v in params.items()}
    hp = dict(weight_decay=wd, mask=explicit, peak_learning_rate=peak, b2=0.999)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        schedule = warmup_cosine(peak)  # evaluated by the reference at each step
        want = adamc_reference(params, noise, learning_rate=schedule, decay_coupling="adamc", **hp)
        lr_coupled = adamc_reference(params, noise, learning_rate=schedule, **hp)
    assert max_rel_err(got, want) < rtol
    # The coupling matters on the matrices only: "lr" decays them far more as lr anneals.
    assert max_rel_err({"dense": lr_coupled["dense"]}, {"dense": want["dense"]}) > 1e-2
    for k in ("norm_scale", "bias"):
        np.testing.assert_allclose(want[k], lr_coupled[k], rtol=1e-12)


def test_adamc_matches_levanters_construction():
    # Levanter's AdamC: weight decay wd * lr_t / lr_max added to Adam's direction before the
    # learning rate, lr_t injected per step.
    params, noise = adamc_problem()
    peak, wd = 3e-2, 0.5
    mask = {k: np.ndim(v) >= 2 for k, v in params.items()}

    def levanter_style(learning_rate):
        return optax.chain(
            optax.scale_by_adam(jnp.float64(0.9), jnp.float64(0.999)),
            optax.add_decayed_weights(wd * learning_rate / peak, mask),
            optax.scale(-learning_rate),
        )

    anchor = optax.inject_hyperparams(levanter_style)(learning_rate=warmup_cosine(peak))
    ours = adamw_jax.adamw(
        warmup_cosine(peak), weight_decay=wd, mask=mask, decay_coupling="adamc",
        peak_learning_rate=peak,
    )  # fmt: skip
    with jax.enable_x64(True):
        got = run_adamc(ours, params, noise, jnp.float64)
        want = run_adamc(anchor, params, noise, jnp.float64)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)


def test_adamc_needs_the_peak_with_a_schedule_and_is_lr_without_one():
    with pytest.raises(ValueError, match=r"peak_learning_rate must be given.*'adamc'"):
        adamw_jax.adamw(warmup_cosine(1e-2), decay_coupling="adamc")
    with pytest.raises(ValueError, match="only with decay_coupling='schedule' or 'adamc'"):
        adamw_jax.adamw(1e-2, decay_coupling="lr", peak_learning_rate=1e-2)
    adamc = adamw_jax.decoupled_weight_decay(0.1, 0.2, decay_coupling="adamc")
    lr = adamw_jax.decoupled_weight_decay(0.1, 0.2, decay_coupling="lr")
    got, _ = adamc.update(GRADS, adamc.init(PARAMS), PARAMS)
    want, _ = lr.update(GRADS, lr.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal(got, want)
