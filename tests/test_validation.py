"""Every construction-time rule: the error type, and a message naming argument, value, range."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import run_steps

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
        adamw_jax.adamw(**{"learning_rate": 1e-3, name: value})
    assert repr(value) in str(info.value) or str(float(value)) in str(info.value)


@pytest.mark.parametrize("name", ["b1", "b2", "eps", "eps_root", "learning_rate"])
def test_adam_checks_the_same_rules(name):
    with pytest.raises(ValueError, match=name):
        adamw_jax.adam(**{"learning_rate": 1e-3, name: -1.0})


def test_l2_is_checked_under_its_own_name():
    with pytest.raises(ValueError, match=r"^l2 must be in \[0.0, inf\); got -0.5"):
        adamw_jax.adam(1e-3, l2=-0.5)


@pytest.mark.parametrize("value", ["0.1", [0.1], (0.1,), None, True, jnp.ones(2)])
def test_wrong_types(value):
    error = ValueError if isinstance(value, jax.Array) else TypeError
    with pytest.raises(error, match="learning_rate"):
        adamw_jax.adamw(learning_rate=value)


def test_schedules_are_accepted_where_documented_only():
    adamw_jax.adamw(learning_rate=optax.constant_schedule(1e-3), weight_decay=lambda t: 0.1)
    with pytest.raises(TypeError, match="b1 must be a number, not a callable"):
        adamw_jax.adamw(1e-3, b1=lambda t: 0.9)


def test_decay_coupling_must_be_known():
    with pytest.raises(ValueError, match=r"decay_coupling must be one of \('lr', 'schedule', "):
        adamw_jax.adamw(1e-3, decay_coupling="paper")


def test_schedule_coupling_needs_the_peak_for_a_schedule():
    sched = optax.cosine_decay_schedule(1e-3, 100)
    with pytest.raises(ValueError, match=r"peak_learning_rate must be given \(in \(0, inf\)\)"):
        adamw_jax.adamw(sched, decay_coupling="schedule")
    adamw_jax.adamw(sched, decay_coupling="schedule", peak_learning_rate=1e-3)
    adamw_jax.adamw(1e-3, decay_coupling="schedule")  # constant lr: the multiplier is 1


def test_peak_learning_rate_rules():
    with pytest.raises(ValueError, match=r"^peak_learning_rate must be in \(0.0, inf\); got 0.0"):
        adamw_jax.adamw(1e-3, decay_coupling="schedule", peak_learning_rate=0.0)
    with pytest.raises(ValueError, match="only with decay_coupling='schedule'"):
        adamw_jax.adamw(1e-3, decay_coupling="lr", peak_learning_rate=1e-3)


@pytest.mark.parametrize("flag", ["amsgrad", "nesterov"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        adamw_jax.adamw(1e-3, **{flag: "yes"})


def test_mask_must_be_a_tree_or_callable():
    with pytest.raises(TypeError, match="mask must be None, a pytree of bools"):
        adamw_jax.adamw(1e-3, mask="bias")
    for dtype in (jnp.bfloat16, jnp.dtype("bfloat16")):  # callable (the class), not a mask
        with pytest.raises(TypeError, match="mask must be None, a pytree of bools"):
            adamw_jax.adamw(1e-3, mask=dtype)


def test_integer_and_boolean_params_are_refused():
    tx = adamw_jax.adamw(1e-3)
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
    tx = adamw_jax.adamw(1e-3)
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
        adamw_jax.adamw(1e-3, mask=mask)


def test_callable_mask_under_inject_hyperparams_needs_static_args():
    """Without static_args Optax calls the mask on the step count; that must not pass silently."""
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    by_name = adamw_jax.masks.by_name()
    with pytest.raises(TypeError, match=r"static_args=\('mask',\)"):
        optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=0.1, mask=by_name).init(params)
    tx = optax.inject_hyperparams(adamw_jax.adamw, static_args=("mask",))(
        learning_rate=0.1, weight_decay=0.5, mask=by_name
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["bias"]), 0.0)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.05)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: adamw_jax.adamw(1e-3),
        lambda: adamw_jax.adamw(1e-3, mu_dtype="int8", min_quantize_size=0),
        lambda: adamw_jax.adamw(1e-3, moment_layout="packed"),
        lambda: adamw_jax.adam(1e-3),
        lambda: adamw_jax.scale_by_adam(),
        lambda: adamw_jax.add_decayed_weights(1e-3),
        lambda: adamw_jax.decoupled_weight_decay(1e-3),
        lambda: adamw_jax.low_precision_update(),
        lambda: adamw_jax.compat.torch_adamw(),
        lambda: adamw_jax.compat.keras_adamw(),
    ],
)
def test_none_updates_are_refused_with_what_is_expected(make_tx):
    """Optax's adamw fails deep in a tree map on ``update(None, ...)``; we say what to pass."""
    tx = make_tx()
    params = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"updates=None: pass the gradients"):
        tx.update(None, tx.init(params), params)


def test_fused_step_refuses_none_gradients():
    opt = adamw_jax.fused_adamw(1e-3)
    params = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"fused_adamw's step got updates=None"):
        opt.step(params, None, opt.init(params))


# Dtypes, strings and callables that are not schedules, where a number or schedule belongs.

SCALAR_OR_SCHEDULE_ARGS = [
    (adamw_jax.adamw, "learning_rate"),
    (adamw_jax.adamw, "weight_decay"),
    (adamw_jax.adam, "learning_rate"),
    (adamw_jax.adam, "l2"),
    (adamw_jax.fused_adamw, "learning_rate"),
    (adamw_jax.fused_adamw, "weight_decay"),
    (adamw_jax.decoupled_weight_decay, "learning_rate"),
    (adamw_jax.decoupled_weight_decay, "weight_decay"),
    (adamw_jax.add_decayed_weights, "weight_decay"),
]
NOT_A_SCALAR_OR_SCHEDULE = {
    "bfloat16_class": jnp.bfloat16,
    "float32_class": jnp.float32,
    "numpy_float32_class": np.float32,
    "bfloat16_dtype": jnp.dtype("bfloat16"),
    "python_float_class": float,
    "string": "bfloat16",
    "two_argument_lambda": lambda step, extra: 0.1,
    "no_argument_lambda": lambda: 0.1,
    "keyword_only_function": lambda *, step: 0.1,
}


def _call_with(factory, name, value):
    kwargs = {name: value}
    if name != "learning_rate" and factory is not adamw_jax.add_decayed_weights:
        kwargs["learning_rate"] = 1e-3
    return factory(**kwargs)


@pytest.mark.parametrize("value", NOT_A_SCALAR_OR_SCHEDULE.values(), ids=NOT_A_SCALAR_OR_SCHEDULE)
@pytest.mark.parametrize(
    "factory, name", SCALAR_OR_SCHEDULE_ARGS, ids=lambda x: getattr(x, "__name__", x)
)
def test_dtypes_strings_and_non_schedules_are_refused_by_name(factory, name, value):
    # Optax's add_decayed_weights takes negative coefficients (optax.fromage passes one).
    accepted = r"\(-inf, inf\)" if factory is adamw_jax.add_decayed_weights else r"\[0.0, inf\)"
    with pytest.raises(TypeError, match=rf"^{name} must be a real number in {accepted}"):
        _call_with(factory, name, value)


class _CallableSchedule:
    def __call__(self, count):
        return 0.1 / (1.0 + jnp.asarray(count, jnp.float32))


SCHEDULES = {
    "optax": optax.constant_schedule(0.1),
    "lambda": lambda t: 0.1,
    "varargs": lambda *args: 0.1,
    "default_argument": lambda t, scale=1.0: 0.1 * scale,
    "jitted": jax.jit(lambda t: 0.1 * jnp.ones([])),
    "partial": functools.partial(lambda peak, t: peak, 0.1),
    "callable_object": _CallableSchedule(),
}


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES)
@pytest.mark.parametrize(
    "factory, name", SCALAR_OR_SCHEDULE_ARGS, ids=lambda x: getattr(x, "__name__", x)
)
def test_every_kind_of_schedule_is_accepted(factory, name, schedule):
    tx = _call_with(factory, name, schedule)
    if isinstance(tx, adamw_jax.FusedAdamW):
        return
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 0.5)}, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_a_dtype_for_a_non_schedule_argument_is_refused_by_name():
    with pytest.raises(TypeError, match=r"^b1 must be a real number in \[0.0, 1.0\) .*dtype"):
        adamw_jax.adamw(1e-3, b1=jnp.bfloat16)


# Structural arguments under optax.inject_hyperparams.

INJECT_PARAMS = {"big": jnp.linspace(-1.0, 1.0, 2048).reshape(32, 64), "small": jnp.ones(512)}


def _inject_grads(params, t):
    """The gradients at step ``t`` of the runs below: sin(3 w + t)."""
    return jax.tree.map(lambda x: jnp.sin(3.0 * x + t), params)


def _inject_run(tx, jit=True):
    """Three updates from INJECT_PARAMS (each jitted unless ``jit`` is False): params, state."""
    params, state, _ = run_steps(tx, INJECT_PARAMS, _inject_grads, 3, jit=jit)
    return params, state


def test_int8_options_under_inject_hyperparams_with_static_args():
    kwargs = dict(learning_rate=1e-3, mu_dtype="int8", nu_dtype="int8", min_quantize_size=1024)
    injected = optax.inject_hyperparams(
        adamw_jax.adamw, static_args=("min_quantize_size", "block_size")
    )(**kwargs)
    got, state = _inject_run(injected)
    want, _ = _inject_run(adamw_jax.adamw(**kwargs))
    # Not bitwise: with b1, b2, eps as traced arrays rather than constants XLA rounds some
    # products differently, and a one-ulp difference can move an int8 code.
    moved = float(jnp.max(jnp.abs(want["big"] - INJECT_PARAMS["big"])))
    chex.assert_trees_all_close(got, want, rtol=0.0, atol=0.03 * moved)
    adam_state = state.inner_state[0]
    # min_quantize_size=1024 took effect: the 2048-element leaf is quantized (the default,
    # 4096, would keep it float32), the 512-element one is not.
    assert isinstance(adam_state.mu["big"], adamw_jax.QuantizedArray)
    assert adam_state.mu["small"].dtype == jnp.float32
    assert moved > 1e-3


@pytest.mark.parametrize("name, value", [("min_quantize_size", 1024), ("block_size", 64)])
def test_traced_int8_options_ask_for_static_args(name, value):
    tx = optax.inject_hyperparams(adamw_jax.adamw)(
        learning_rate=1e-3, mu_dtype="int8", nu_dtype="int8", **{name: value}
    )
    with pytest.raises(
        TypeError, match=rf"^{name} must be a concrete int.*static_args=\('{name}',\)"
    ):
        _inject_run(tx)


def test_concrete_int8_options_from_inject_hyperparams_are_taken_as_ints():
    """Outside jit inject_hyperparams passes the int as a concrete 0-d array: that works."""
    kwargs = dict(learning_rate=1e-3, mu_dtype="int8", nu_dtype="int8", min_quantize_size=1024)
    got, state = _inject_run(optax.inject_hyperparams(adamw_jax.adamw)(**kwargs), jit=False)
    want, _ = _inject_run(adamw_jax.adamw(**kwargs), jit=False)
    chex.assert_trees_all_equal(got, want)
    assert isinstance(state.inner_state[0].mu["big"], adamw_jax.QuantizedArray)


def test_block_sizes_must_be_integers():
    adamw_jax.scale_by_adam(mu_dtype="int8", min_quantize_size=jnp.asarray(1024))
    adamw_jax.scale_by_adam(mu_dtype="int8", block_size=np.int32(64))
    with pytest.raises(TypeError, match=r"^min_quantize_size must be an int"):
        adamw_jax.scale_by_adam(mu_dtype="int8", min_quantize_size=jnp.asarray(1024.0))
    with pytest.raises(TypeError, match="block_size"):
        adamw_jax.scale_by_adam(mu_dtype="int8", block_size=jnp.asarray(64.0))


def test_dtype_class_under_inject_hyperparams_asks_for_static_args():
    """inject_hyperparams takes jnp.bfloat16 (a callable) for a schedule of the step count."""
    with pytest.raises(TypeError, match=r"^mu_dtype must be .*static_args=\('mu_dtype',\)"):
        _inject_run(optax.inject_hyperparams(adamw_jax.adamw)(1e-3, mu_dtype=jnp.bfloat16))
    with pytest.raises(TypeError, match=r"^mu_dtype must be .*static_args=\('mu_dtype',\)"):
        _inject_run(
            optax.inject_hyperparams(adamw_jax.adamw)(1e-3, mu_dtype=jnp.bfloat16), jit=False
        )
    tx = optax.inject_hyperparams(adamw_jax.adamw, static_args=("mu_dtype",))(
        learning_rate=1e-3, mu_dtype=jnp.bfloat16
    )
    got, state = _inject_run(tx)
    want, _ = _inject_run(adamw_jax.adamw(1e-3, mu_dtype=jnp.bfloat16))
    chex.assert_trees_all_equal(got, want)
    assert {x.dtype for x in jax.tree.leaves(state.inner_state[0].mu)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype, word", [(jnp.int8, "int8"), (np.int8, "int8"), (jnp.int4, "int4")])
def test_integer_moment_dtypes_point_to_the_string(name, dtype, word):
    """jnp.int8 is not blockwise storage: the error names the string to write instead."""
    with pytest.raises(ValueError, match=rf"^{name} must be .* write the string {name}='{word}'"):
        adamw_jax.adamw(1e-3, **{name: dtype})
