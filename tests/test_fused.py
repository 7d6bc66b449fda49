"""The fused step: the C++ kernel agrees with adamw's XLA code, and the fallback works."""

from __future__ import annotations

import functools
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from _helpers import assert_trees_bitwise_equal, assert_trees_close_to_leaf_scale, run_steps

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


def _eager_grads(params, t):
    """Step ``t``'s gradients, of the shapes of ``params`` (not their values)."""
    key = jax.random.fold_in(jax.random.PRNGKey(1), t)
    return {k: (1.0 + t % 3) * jax.random.normal(key, p.shape) for k, p in params.items()}


# The same gradients from one compiled program per tree (t traced): a dispatch per step
# where eager ops take two per leaf, for the long runs on _params(). The trees of many
# leaves below take _eager_grads, whose ops compile once per leaf shape, not per tree.
_grads = jax.jit(_eager_grads)


def _run(opt, steps, params=None, grad_fn=_grads):
    params = _params() if params is None else params
    state = opt.init(params)
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    for t in range(steps):
        params, state = step(params, grad_fn(params, t), state)
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
    "nesterov_algoperf": {
        "nesterov": True,
        "nesterov_bias_correction": "algoperf",
        "b1": 0.8,
        "weight_decay": 0.3,
    },
    "none": {"decay_coupling": "none", "weight_decay": 1e-3},
    "schedule": {
        "learning_rate": optax.linear_schedule(3e-2, 1e-3, 150),
        "decay_coupling": "schedule",
        "peak_learning_rate": 3e-2,
        "weight_decay": 0.1,
    },
    "adamc": {
        "learning_rate": optax.linear_schedule(3e-2, 1e-3, 150),
        "decay_coupling": "adamc",
        "peak_learning_rate": 3e-2,
        "weight_decay": 0.5,
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
    got, _ = _run(opt, 30, params, _eager_grads)  # donates params
    want = reference.adamw_trajectory(
        start,
        lambda w, t: {k: np.asarray(v) for k, v in _eager_grads(start, t - 1).items()},
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
        ({"mu_dtype": "int8", "nu_dtype": jnp.float32}, {"w": jnp.ones((64, 80))}),
        ({"mu_dtype": jnp.float16}, {"w": jnp.ones((4, 3))}),
        ({}, {"w": jnp.ones((4, 3), jnp.bfloat16)}),
        ({"mask": {"w": jnp.array([[True, False, True]] * 4)}}, {"w": jnp.ones((4, 3))}),
    ],
    ids=["int8_with_float32", "float16_moments", "bf16_params", "elementwise_mask"],
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
        return {f"p{i:03d}": jnp.full((3 + i % 5,), 1.0 + i / 100, jnp.float32) for i in range(150)}

    params = fresh()
    mask = {k: i % 3 != 0 for i, k in enumerate(params)}
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.5, "mask": mask}
    kernel = fused.fused_adamw(**kwargs, backend="kernel")
    xla = fused.fused_adamw(**kwargs, backend="xla")
    assert kernel.kernel_used(params, params, kernel.init(params))
    grads = [_eager_grads(params, t) for t in range(5)]  # the same for every run

    def given(p, t):
        return grads[t]

    got = _run(kernel, 5, fresh(), given)
    want = _run(xla, 5, fresh(), given)
    assert_trees_close_to_leaf_scale(got, want, ulps=8)
    plain = _run(fused.fused_adamw(1e-2, weight_decay=0.0, backend="kernel"), 5, fresh(), given)
    decayed = [k for k in mask if mask[k]]
    # the mask took effect: masked-out leaves match the undecayed run, decayed ones do not
    for k in mask:
        same = bool(jnp.all(got[0][k] == plain[0][k]))
        assert same == (k not in decayed), k


# Low-bit moments: the kernel decodes, updates and re-encodes them block by block and must
# give the XLA path's codes and scales bit for bit (the same code books, block bounds and
# hashed stochastic rounding, the same float32 roundings and fused products).
def _lowbit_params():
    rng = np.random.default_rng(2)
    shapes = {
        "rows": (4, 512),  # rows of whole blocks
        "padded": (4, 250),  # rows that end in a shorter block (padded by the XLA path)
        "odd": (3, 333),  # an odd row length: the last int4 byte holds one code
        "bias": (33,),  # under min_quantize_size: float32 moments
        "scalar": (),
    }
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _lowbit_run(opt, grads):
    params = _lowbit_params()
    state = opt.init(params)
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    for g in grads:
        params, state = step(params, g, state)
    return params, state


LOWBIT_CONFIGS = {
    "int8": {"mu_dtype": "int8", "nu_dtype": "int8", "mask": masks.by_ndim(2)},
    "int4_amsgrad_nesterov": {
        "mu_dtype": "int4",
        "nu_dtype": "int4",
        "amsgrad": True,
        "nesterov": True,
        "decay_coupling": "none",
        "block_size": 64,
    },
}


@needs_kernel
@pytest.mark.parametrize("name", list(LOWBIT_CONFIGS))
def test_lowbit_kernel_matches_xla_codes_bit_for_bit_over_200_steps(name):
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.1, "min_quantize_size": 64}
    kwargs |= LOWBIT_CONFIGS[name]
    kernel = fused.fused_adamw(**kwargs, backend="kernel")
    xla = fused.fused_adamw(**kwargs, backend="xla")
    params = _lowbit_params()
    assert kernel.kernel_used(params, params, kernel.init(params))
    rng = np.random.default_rng(3)
    grads = [  # gradients of changing scale, so that codes and scales keep moving
        {
            k: (0.5 + t % 4) * rng.standard_normal(np.shape(p)).astype(np.float32)
            for k, p in params.items()
        }
        for t in range(200)
    ]
    (p_kernel, s_kernel), (p_xla, s_xla) = _lowbit_run(kernel, grads), _lowbit_run(xla, grads)
    assert_trees_bitwise_equal(s_kernel, s_xla)  # codes, scales, float32 moments, counts
    assert_trees_close_to_leaf_scale(p_kernel, p_xla, ulps=8)
    mu = s_kernel[0].mu["padded"]
    assert len(np.unique(np.asarray(mu.codes))) > 8  # the codes spread over the book
    assert float(jnp.max(jnp.abs(p_kernel["rows"] - _lowbit_params()["rows"]))) > 0.1


def _kernel_call(kinds, moments, block_size=4):
    """One (2, 8) leaf through the kernel's FFI target with the given moment buffers."""
    x = jnp.ones((2, 8), jnp.float32)
    hyper = jnp.ones([len(fused._KernelHyper._fields)], jnp.float32)
    return fused._aliased_call(
        fused._TARGET,
        [[x, x, *moments]],
        lambda start, stop: [hyper, np.ones([1], np.uint8), np.asarray(kinds, np.uint8)],
        amsgrad=np.int64(0),
        nesterov=np.int64(0),
        coupling=np.int64(1),
        block_size=np.int64(block_size),
    )


@needs_kernel
def test_kernel_refuses_bad_buffers_with_a_clear_error():
    f32, scales = jnp.zeros((2, 8), jnp.float32), jnp.zeros((2, 2), jnp.float32)
    m8, v8 = jnp.zeros((2, 8), jnp.int8), jnp.zeros((2, 8), jnp.uint8)
    packed = jnp.zeros((2, 4), jnp.uint8)
    jax.block_until_ready(_kernel_call([2, 2], [m8, scales, v8, scales]))  # a valid call
    bad = [
        ([2, 2], [f32, scales, v8, scales], "does not match its kind"),
        ([2, 2], [m8, scales, v8, jnp.zeros((2, 3))], "one float32 scale per block"),
        ([2, 3], [m8, scales, packed, scales], "both int8 or both int4"),
        ([3, 3], [packed, jnp.zeros((2, 3)), packed, jnp.zeros((2, 3))], "even block_size"),
        ([2, 0], [m8, scales, f32], "both int8 or both int4"),
        ([7, 7], [f32, f32], "unknown moment kind"),
    ]
    for kinds, moments, message in bad:
        block = 3 if message == "even block_size" else 4
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(_kernel_call(kinds, moments, block))


@needs_kernel
def test_mixed_lowbit_moments_take_the_xla_path():
    # int8 with int4, or a quantized moment with a float one: XLA's code fuses other
    # products there, so the kernel leaves such steps to it (and backend="kernel" says so)
    params = {"w": jnp.ones((8, 64))}
    for nu_dtype in ("int4", jnp.float32):
        kwargs = {"mu_dtype": "int8", "nu_dtype": nu_dtype, "block_size": 16}
        opt = fused.fused_adamw(1e-2, **kwargs, min_quantize_size=16)
        state = opt.init(params)
        assert not opt.kernel_used(params, params, state)
        with pytest.raises(ValueError, match="does not apply"):
            fused.fused_adamw(1e-2, **kwargs, min_quantize_size=16, backend="kernel").step(
                params, params, state
            )
    both = fused.fused_adamw(1e-2, mu_dtype="int4", nu_dtype="int4", min_quantize_size=16)
    assert both.kernel_used(params, params, both.init(params))


# --------------------------------------------------------------------------------------
# The optimizer as an Optax transformation: optax.chain, flax.nnx.Optimizer (test_nnx.py),
# Flax Linen's TrainState.


def _run_update(tx, steps, params=None):
    """``steps`` jitted Optax-protocol steps (update, then apply_updates) on ``_grads``."""
    params = _params() if params is None else params
    state = tx.init(params)

    @jax.jit
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):  # the gradients of _run's, computed outside the step as there
        params, state = step(params, _grads(params, t), state)
    return params, state


@needs_kernel
@pytest.mark.parametrize("name", ["default", "amsgrad", "mask_callable", "int8"])
def test_update_is_adamws_and_lands_near_the_fused_step_over_100_steps(name):
    """``update`` + ``apply_updates`` is adamw's, bit for bit, and near ``step``'s params.

    ``update`` runs adamw's XLA code (the kernel cannot pay in the Optax protocol); ``step``
    runs the kernel, which agrees with that code to a few ulps
    (test_kernel_matches_xla_over_200_steps).
    """
    extra = {"mu_dtype": "int8", "nu_dtype": "int8", "min_quantize_size": 64}
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.1, **CONFIGS.get(name, extra)}
    opt = fused.fused_adamw(**kwargs, backend="kernel")
    via_update = _run_update(opt, 100)
    assert_trees_bitwise_equal(via_update, _run_update(adamw_jax.adamw(**kwargs), 100))
    via_step = _run(opt, 100)
    assert_trees_close_to_leaf_scale(via_update, via_step, ulps=8)
    assert float(jnp.max(jnp.abs(via_step[0]["w"] - _params()["w"]))) > 0.1


def test_update_needs_the_params_and_the_updates():
    opt = fused.fused_adamw(1e-2)
    params = _params()
    with pytest.raises(ValueError, match="needs the params"):
        opt.update(params, opt.init(params))
    with pytest.raises(ValueError, match="got updates=None"):
        opt.update(None, opt.init(params), params)


@needs_kernel
def test_in_optax_chain_over_100_steps():
    """Clipping, then the fused optimizer: the same chain with ``adamw``, bit for bit."""
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.1, "mask": masks.by_ndim(2)}
    opt = fused.fused_adamw(**kwargs, backend="kernel")
    params = _params()
    assert opt.kernel_used(params, params, opt.init(params))
    got, got_state = _run_update(optax.chain(optax.clip_by_global_norm(50.0), opt), 100)
    want, want_state = _run_update(
        optax.chain(optax.clip_by_global_norm(50.0), adamw_jax.adamw(**kwargs)), 100
    )
    assert_trees_bitwise_equal((got, got_state), (want, want_state))  # update is adamw's
    assert float(jnp.max(jnp.abs(got["w"] - _params()["w"]))) > 0.1


@needs_kernel
def test_in_linen_train_state_over_100_steps():
    """``TrainState.apply_gradients`` with the fused optimizer: adamw's run, bit for bit,
    and the fused step's to a few ulps."""
    from flax.training import train_state

    opt = fused.fused_adamw(1e-2, weight_decay=0.1, backend="kernel")

    @jax.jit
    def train_step(ts, grads):
        return ts.apply_gradients(grads=grads)

    ts = train_state.TrainState.create(apply_fn=None, params=_params(), tx=opt)
    for t in range(100):
        ts = train_step(ts, _grads(ts.params, t))
    via_step, step_state = _run(opt, 100)
    assert int(ts.step) == 100
    assert_trees_close_to_leaf_scale((ts.params, ts.opt_state), (via_step, step_state), ulps=8)
    adamw_ts = train_state.TrainState.create(
        apply_fn=None, params=_params(), tx=adamw_jax.adamw(1e-2, weight_decay=0.1)
    )
    for t in range(100):
        adamw_ts = train_step(adamw_ts, _grads(adamw_ts.params, t))
    assert_trees_bitwise_equal((ts.params, ts.opt_state), (adamw_ts.params, adamw_ts.opt_state))


# --------------------------------------------------------------------------------------
# One signature: every option of adamw reaches the fused step, or is refused by name.

# A value other than the default for each of adamw's parameters (learning_rate: another
# one). A parameter added to adamw fails test_every_adamw_option_... until it has one here.
NON_DEFAULT = {
    "learning_rate": optax.linear_schedule(2e-2, 1e-3, 10),
    "b1": 0.8,
    "b2": 0.99,
    "eps": 1e-6,
    "eps_root": 1e-10,
    "mu_dtype": jnp.bfloat16,
    "weight_decay": 0.3,
    "mask": masks.by_ndim(2),
    "nesterov": True,
    "nesterov_bias_correction": "algoperf",
    "decay_coupling": "none",
    "peak_learning_rate": 0.5,  # with decay_coupling="schedule", below
    "amsgrad": True,
    "nu_dtype": jnp.bfloat16,
    "block_size": 64,
    "min_quantize_size": 64,
    "param_update": "compensated",
    "moment_layout": "packed",
    "cautious": True,
    "cautious_weight_decay": True,
    "decay_target": "init",
}
# Options that only act together with another one.
PARTNERS = {
    "peak_learning_rate": {"decay_coupling": "schedule"},
    "block_size": {"mu_dtype": "int8", "nu_dtype": "int8", "min_quantize_size": 64},
    "min_quantize_size": {"mu_dtype": "int8", "nu_dtype": "int8"},
    "nesterov_bias_correction": {"nesterov": True},
}


def test_fused_adamw_takes_adamws_signature_and_backend():
    ours = inspect.signature(fused.fused_adamw).parameters
    theirs = inspect.signature(adamw_jax.adamw).parameters
    assert list(ours) == [*theirs, "backend"]
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
        assert ours[name].annotation == p.annotation, name


@pytest.mark.parametrize("name", list(inspect.signature(adamw_jax.adamw).parameters))
def test_every_adamw_option_reaches_the_fused_step_or_is_refused_by_name(name):
    assert set(NON_DEFAULT) == set(inspect.signature(adamw_jax.adamw).parameters)
    kwargs = {"learning_rate": 1e-2, **PARTNERS.get(name, {}), name: NON_DEFAULT[name]}
    params = {k: v for k, v in _params().items() if k != "empty"}
    want, want_state = _run_update(adamw_jax.adamw(**kwargs), 5, params)
    moved = _run_update(adamw_jax.adamw(**{**kwargs, name: _default(name)}), 5, params)[0]
    assert jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), want, moved))
    auto = fused.fused_adamw(**kwargs)
    got, got_state = _run(auto, 5, jax.tree.map(jnp.array, params))  # _run donates
    assert_trees_close_to_leaf_scale(got, want, ulps=8)
    assert_trees_close_to_leaf_scale(got_state, want_state, ulps=8)
    try:
        kernel = fused.fused_adamw(**kwargs, backend="kernel")
        got, _ = _run(kernel, 5, jax.tree.map(jnp.array, params))
    except ValueError as err:
        assert name in str(err)
    else:
        assert_trees_close_to_leaf_scale(got, want, ulps=8)


def _default(name):
    default = inspect.signature(adamw_jax.adamw).parameters[name].default
    return 1e-2 if default is inspect.Parameter.empty else default


# Leaf sizes at the kernel's edges: empty leaves (one with no rows, one with rows of
# length 0), one-element leaves, odd lengths (an int4 row ending in half a byte, rows
# ending in a short block), and the leaves of exactly one call (64) and one more (65).
EDGE_SHAPES = [(), (1,), (1, 1), (0, 4), (4, 0), (3, 5), (2, 7), (9,), (5, 33), (2, 130)]
EDGE_STORAGES = {
    "float32": {},
    "bfloat16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16, "amsgrad": True},
    "int8": {"mu_dtype": "int8", "nu_dtype": "int8", "block_size": 8},
    "int4": {"mu_dtype": "int4", "nu_dtype": "int4", "block_size": 8, "nesterov": True},
}


def _edge_params(num_leaves: int) -> dict:
    rng = np.random.default_rng(num_leaves)
    shapes = [EDGE_SHAPES[i % len(EDGE_SHAPES)] for i in range(num_leaves)]
    return {
        f"p{i:03d}": jnp.asarray(rng.standard_normal(s), jnp.float32) for i, s in enumerate(shapes)
    }


@functools.cache
def _edge_optimizers(storage: str):
    """The storage's kernel and XLA optimizers, and the XLA step jitted once for all cases."""
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.1, "min_quantize_size": 0}
    kwargs |= EDGE_STORAGES[storage]
    xla = fused.fused_adamw(**kwargs, backend="xla")
    return fused.fused_adamw(**kwargs, backend="kernel"), xla, jax.jit(xla.step)


def _entry(tree, key: str, name: str):
    """``tree`` with each dict in it (the params' dicts) cut to its entry ``key``, as ``name``."""
    return jax.tree.map(
        lambda x: {name: x[key]} if isinstance(x, dict) else x,
        tree,
        is_leaf=lambda x: isinstance(x, dict),
    )


def _leaf_by_leaf(storage: str, params: dict, grads: list) -> dict:
    """The XLA steps of each leaf alone on its gradients (one tree a step): per leaf, its run.

    The XLA step has no arithmetic across leaves (its scalars come from the counts), so a
    leaf alone takes the steps it takes in the tree. Alone, under the name ``"leaf"``, each
    leaf shape compiles once for the 64- and 65-leaf cases, where each case's whole tree
    would be one program of dozens of leaves (quantized: a few tenths of a second each).
    """
    _, xla, step = _edge_optimizers(storage)
    runs = {}
    for key, p in params.items():
        leaf = {"leaf": p}
        state = xla.init(leaf)
        for g in grads:
            leaf, state = step(leaf, {"leaf": g[key]}, state)
        runs[key] = _entry((leaf, state), "leaf", key)
    return runs


@needs_kernel
@pytest.mark.parametrize("num_leaves", [64, 65])
@pytest.mark.parametrize("storage", list(EDGE_STORAGES))
def test_edge_leaf_sizes_and_the_call_boundary(storage, num_leaves):
    """Every leaf quantized (min_quantize_size=0), the empty and one-element ones too.

    The 64 or 65 leaves take each kernel step together (one call, or two); each leaf's
    params and moments are then compared with the XLA code's for it (``_leaf_by_leaf``).
    """
    kernel, _, _ = _edge_optimizers(storage)
    params = _edge_params(num_leaves)
    assert kernel.kernel_used(params, params, kernel.init(params))
    grads = [_eager_grads(params, t) for t in range(4)]
    got = _run(kernel, 4, _edge_params(num_leaves), lambda p, t: grads[t])
    for key, want in _leaf_by_leaf(storage, _edge_params(num_leaves), grads).items():
        got_leaf = _entry(got, key, key)
        assert_trees_close_to_leaf_scale(got_leaf[0], want[0], ulps=8)
        if storage in ("int8", "int4"):  # codes and scales bit for bit
            assert_trees_bitwise_equal(got_leaf[1], want[1])
        else:
            assert_trees_close_to_leaf_scale(got_leaf[1], want[1], ulps=8)
    moved = [k for k, p in params.items() if p.size and not jnp.array_equal(got[0][k], p)]
    assert len(moved) == sum(1 for p in params.values() if p.size)
