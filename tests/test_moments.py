"""scale_by_adam: moments, bias correction, dtypes, complex parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import run_scan, run_side_by_side, run_steps, shrinking_gradients

import adamw_jax


def numpy_scale_by_adam(grads, b1, b2, eps, eps_root, bias_correction):
    """Adam's update directions for a sequence of gradients, transcribed in NumPy."""
    m = np.zeros_like(grads[0])
    v = np.zeros(grads[0].shape)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g * np.conj(g)).real
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        out.append((m / c1) / (np.sqrt(v / c2 + eps_root) + eps))
    return out


@pytest.mark.parametrize("bias_correction", [True, False])
def test_directions_match_numpy_float64(bias_correction):
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(4, 3)) * 10.0 ** rng.uniform(-3, 1) for _ in range(50)]
    kw = dict(b1=0.8, b2=0.95, eps=1e-6, eps_root=1e-9)
    with jax.enable_x64(True):
        got = run_steps(
            adamw_jax.scale_by_adam(**kw, bias_correction=bias_correction),
            jnp.zeros(grads[0].shape, jnp.float64),
            lambda _, t: jnp.asarray(grads[t], jnp.float64),
            len(grads),
            jit=True,
        )
    want = numpy_scale_by_adam(grads, **kw, bias_correction=bias_correction)
    for a, b in zip(got.per_step, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)
    assert int(got.state.count) == 50


def test_first_step_is_exactly_bias_corrected():
    """At t=1 the corrected moments are g and g^2, so the direction is g / (|g| + eps)."""
    g = jnp.array([3.0, -0.5, 2e-3])
    tx = adamw_jax.scale_by_adam(eps=0.0)
    u, _ = tx.update(g, tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(np.asarray(u), np.sign(np.asarray(g)), rtol=2e-7)


@pytest.mark.parametrize("correction", ["optax", "algoperf"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_nesterov_bias_corrections_match_numpy(correction, bias_correction):
    rng = np.random.default_rng(4)
    grads = [rng.normal(size=(3, 2)) * 10.0 ** rng.uniform(-2, 1) for _ in range(30)]
    b1, b2, eps = 0.7, 0.95, 1e-6
    m, v, want = np.zeros((3, 2)), np.zeros((3, 2)), []
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        if correction == "algoperf":  # one more moment update, corrected once
            m_hat = (b1 * m + (1 - b1) * g) / c1
        else:
            c1_next = 1 - b1 ** (t + 1) if bias_correction else 1.0
            m_hat = b1 * m / c1_next + (1 - b1) * g / c1
        want.append(m_hat / (np.sqrt(v / c2) + eps))
    tx = adamw_jax.scale_by_adam(
        b1,
        b2,
        eps,
        nesterov=True,
        nesterov_bias_correction=correction,
        bias_correction=bias_correction,
    )
    with jax.enable_x64(True):
        got = run_steps(
            tx, jnp.zeros((3, 2)), lambda _, t: jnp.asarray(grads[t]), len(grads), jit=True
        )
    for a, b in zip(got.per_step, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)


def test_algoperf_first_nesterov_step_is_one_plus_b1_times_the_sign():
    # At t = 1: m_1 = (1 - b1) g, so AlgoPerf's look-ahead is (1 + b1) g; Optax's is
    # (1 + b1 / (1 + b1)) g.
    g = jnp.array([3.0, -0.5, 2e-3])
    for correction, factor in [("algoperf", 1.8), ("optax", 1 + 0.8 / 1.8)]:
        tx = adamw_jax.scale_by_adam(
            0.8, eps=0.0, nesterov=True, nesterov_bias_correction=correction
        )
        u, _ = tx.update(g, tx.init(jnp.zeros(3)))
        np.testing.assert_allclose(np.asarray(u), factor * np.sign(np.asarray(g)), rtol=2e-6)


def test_nesterov_bias_correction_is_refused_by_name():
    with pytest.raises(ValueError, match="nesterov_bias_correction"):
        adamw_jax.scale_by_adam(nesterov=True, nesterov_bias_correction="dozat")
    with pytest.raises(ValueError, match="needs nesterov=True"):
        adamw_jax.scale_by_adam(nesterov_bias_correction="algoperf")


def test_complex_params_use_squared_magnitude():
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=5) + 1j * rng.normal(size=5) for _ in range(20)]
    with jax.enable_x64(True):
        got = run_steps(
            adamw_jax.scale_by_adam(),
            jnp.zeros(grads[0].shape, jnp.complex128),
            lambda _, t: jnp.asarray(grads[t], jnp.complex128),
            len(grads),
            jit=True,
        )
    want = numpy_scale_by_adam(grads, 0.9, 0.999, 1e-8, 0.0, True)
    assert got.state.nu.dtype == jnp.float64  # the second moment is real
    assert got.state.mu.dtype == jnp.complex128
    for a, b in zip(got.per_step, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12)


def test_float64_params_compute_in_float64():
    with jax.enable_x64(True):
        tx = adamw_jax.scale_by_adam()
        state = tx.init(jnp.zeros(2, jnp.float64))
        g = jnp.array([1e-30, 1.0], jnp.float64)  # 1e-30**2 underflows float32
        u, state = tx.update(g, state)
        assert u.dtype == jnp.float64 and state.nu.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(u), [1e-30 / (1e-30 + 1e-8), 1 / (1 + 1e-8)])


def test_low_precision_state_dtypes():
    params = {"w": jnp.ones((3, 2)), "h": jnp.ones(4, jnp.bfloat16)}
    tx = adamw_jax.scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.float16, amsgrad=True)
    state = tx.init(params)
    assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.nu)} == {jnp.dtype(jnp.float16)}
    assert {x.dtype for x in jax.tree.leaves(state.nu_max)} == {jnp.dtype(jnp.float16)}
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state)
    assert updates["w"].dtype == jnp.float32 and updates["h"].dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert state.count.dtype == jnp.int32
    default = adamw_jax.scale_by_adam().init(params)
    assert default.mu["h"].dtype == jnp.bfloat16 and default.mu["w"].dtype == jnp.float32


def least_squares_loss(tx, steps=300, seed=0):
    """Minimizes ||A w - y||^2 / n with tx; returns the final loss."""
    key_a, key_w, key_n = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(key_a, (64, 16))
    y = a @ jax.random.normal(key_w, (16,)) + 0.1 * jax.random.normal(key_n, (64,))
    loss = lambda w: jnp.mean((a @ w - y) ** 2)  # noqa: E731
    w0 = jnp.zeros(16)
    w = run_scan(tx, w0, lambda w, _: jax.grad(loss)(w), steps).params
    return float(loss(w)), float(loss(w0))


def test_bf16_moments_reach_fp32_loss():
    fp32, start = least_squares_loss(adamw_jax.adamw(0.05, weight_decay=1e-4))
    bf16, _ = least_squares_loss(
        adamw_jax.adamw(0.05, weight_decay=1e-4, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    )
    assert fp32 < 0.05 * start  # the problem was actually solved
    assert abs(bf16 - fp32) <= 0.02 * fp32


@pytest.mark.parametrize("bad", ["float32x", jnp.int32, "int16", 3])
def test_bad_moment_dtype(bad):
    with pytest.raises(ValueError, match="nu_dtype"):
        adamw_jax.scale_by_adam(nu_dtype=bad)


def test_real_mu_dtype_for_complex_params_is_refused():
    tx = adamw_jax.scale_by_adam(mu_dtype=jnp.float32)
    with pytest.raises(ValueError, match="complex"):
        tx.init(jnp.zeros(2, jnp.complex64))


def test_count_saturates():
    top = jnp.int32(np.iinfo(np.int32).max)
    tx = adamw_jax.scale_by_adam()
    state = tx.init(jnp.zeros(2))._replace(count=top - 1)
    for _ in range(3):
        u, state = tx.update(jnp.ones(2), state)
        assert np.all(np.isfinite(np.asarray(u)))
    assert int(state.count) == int(top)
    assert state.count.dtype == jnp.int32


def test_amsgrad_keeps_the_running_max_of_corrected_v():
    tx = adamw_jax.scale_by_adam(b1=0.0, b2=0.5, eps=0.0, amsgrad=True)
    state = tx.init(jnp.zeros(1))
    _, state = tx.update(jnp.array([4.0]), state)  # v_hat = 16
    u, state = tx.update(jnp.array([1.0]), state)  # v_hat = (8 + .5) / .75 < 16
    np.testing.assert_allclose(np.asarray(state.nu_max), [16.0])
    np.testing.assert_allclose(np.asarray(u), [1.0 / 4.0])


def test_bfloat16_second_moment_tracks_float32_without_bias():
    """Rounded to nearest, a bfloat16 second moment whose gradients shrink cannot decay.

    With b2 = 0.999 each step changes v by about 0.1%, below half a bfloat16 step (0.2-0.4%):
    rounded to nearest, such entries round back to their old value and stay too large (here
    the mean log ratio to float32 reached +0.58, spread 0.27, and the update norm 0.87x).
    Stochastic rounding keeps the stored moment unbiased (-0.0002, spread 0.06, 0.999x).
    """
    b2 = 0.999
    grads = shrinking_gradients(steps=1500, shape=(16, 256), seed=7, max_rate=4.0)
    bf16 = adamw_jax.scale_by_adam(b2=b2, nu_dtype=jnp.bfloat16)
    fp32 = adamw_jax.scale_by_adam(b2=b2)
    s16, s32, ratios = run_side_by_side(bf16, fp32, grads)
    assert s16.nu.dtype == jnp.bfloat16
    log_ratio = np.log(np.asarray(s16.nu, np.float64) / np.asarray(s32.nu, np.float64))
    assert abs(np.mean(log_ratio)) <= 0.02
    assert np.std(log_ratio) <= 0.1
    assert np.all(np.abs(ratios - 1.0) <= 0.02)


def _second_moment_after(opt, grads, params):
    """The stored second moment, as float32, after one step per row of ``grads``."""
    state = opt.init(params)
    if isinstance(opt, adamw_jax.FusedAdamW):
        step = jax.jit(opt.step)
    else:

        @jax.jit
        def step(params, grads, state):
            updates, state = opt.update(grads, state, params)
            return jax.tree.map(lambda p, u: p + u, params, updates), state

    for g in grads:
        params, state = step(params, g, state)
    nu = state[0].nu
    if isinstance(nu, adamw_jax.PackedMoments):
        (nu,) = nu.buffers  # one leaf: its own buffer
    if isinstance(nu, adamw_jax.QuantizedArray):
        return np.square(np.asarray(adamw_jax.quantize.dequantize(nu), np.float64))
    return np.asarray(nu, np.float64)


@pytest.mark.parametrize(
    ("make", "entry_tolerance"),
    [
        (lambda: adamw_jax.adamw(1e-3, nu_dtype=jnp.bfloat16), 0.05),
        # int8 codes resolve the root to 2**-4 relative, so each entry of v to about 13%.
        (lambda: adamw_jax.adamw(1e-3, nu_dtype="int8", min_quantize_size=0), 0.2),
        (lambda: adamw_jax.adamw(1e-3, nu_dtype=jnp.bfloat16, moment_layout="packed"), 0.05),
        (lambda: adamw_jax.fused_adamw(1e-3, nu_dtype=jnp.bfloat16, backend="kernel"), 0.05),
    ],
    ids=["bfloat16", "int8", "bfloat16_packed", "bfloat16_fused_kernel"],
)
def test_stochastically_rounded_second_moment_decays_under_zero_gradients(make, entry_tolerance):
    """Entries that get no gradient (unused embedding rows) must decay like float32's.

    Stochastic rounding's bits are hashed from the value being rounded and the step count:
    without the count, an entry that once rounded back to its old value met the same bits,
    and the same decision, at every later step (bfloat16: 82% of entries stuck, the moment
    2x too large after 700 zero-gradient steps). int8 storage was spared (its block scales
    carry a uniform decay) and is held to the same guarantee.
    """
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(100, 2048)).astype(np.float32)
    grads = jnp.asarray(np.concatenate([noise, np.zeros((700, 2048), np.float32)]))
    params = jnp.zeros(2048, jnp.float32)
    reference = _second_moment_after(adamw_jax.adamw(1e-3), grads, params)
    stored = _second_moment_after(make(), grads, params)
    assert abs(stored.mean() / reference.mean() - 1) < 0.02
    # Entry by entry, the decay is not stuck: the stored values follow float32's.
    assert np.median(np.abs(np.log(stored / reference))) < entry_tolerance


# ----------------------------------------------------------------- a state's storage
def _storage_params():
    rng = np.random.default_rng(5)
    return {
        "w": jnp.asarray(rng.standard_normal((64, 300)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(7), jnp.float32),
    }


def _trained_state(tx, params, steps=12):
    def grads(t):
        key = jax.random.fold_in(jax.random.key(3), t)
        return jax.tree.map(lambda p: (1 + t % 3) * jax.random.normal(key, p.shape), params)

    state = tx.init(params)
    for t in range(steps):
        _, state = tx.update(grads(t), state, params)
    return state


MISFITS = [  # (state made with, optimizer configured with, what the message names)
    (
        {},
        {"mu_dtype": "int8"},
        r"\['w'\] is stored as an array of dtype float32.*mu_dtype='int8'.*8-bit codes",
    ),
    (
        {"mu_dtype": "int8", "nu_dtype": "int8"},
        {"nu_dtype": "int8"},
        r"\['w'\] is stored as 8-bit codes.*mu_dtype=None.*an array \(floating, not quantized\)",
    ),
    (
        {"nu_dtype": "int8"},
        {"nu_dtype": "int4"},
        r"\['w'\] is stored as 8-bit codes.*nu_dtype='int4'.*4-bit codes",
    ),
    (
        {"mu_dtype": "int4"},
        {"mu_dtype": "int8"},
        r"stored as 4-bit codes.*mu_dtype='int8'.*8-bit codes",
    ),
    (
        {"mu_dtype": "int8"},
        {"mu_dtype": "int8", "block_size": 64},
        r"block_size=256.*block_size=64",
    ),
    (
        {"mu_dtype": jnp.bfloat16},
        {"mu_dtype": jnp.float32},
        r"\['b'\] is stored as an array of dtype bfloat16.*dtype float32",
    ),
    (
        {},
        {"nu_dtype": jnp.bfloat16},
        r"\['b'\] is stored as an array of dtype float32.*nu_dtype=.*bfloat16",
    ),
    (
        {"moment_layout": "packed"},
        {},
        r'moment_layout="packed".*configured with moment_layout="tree"',
    ),
    ({}, {"moment_layout": "packed"}, r'configured with moment_layout="packed"'),
    (
        {"moment_layout": "packed", "mu_dtype": jnp.bfloat16},
        {"moment_layout": "packed", "mu_dtype": jnp.float32},
        r"packed buffer .* bfloat16.*float32",
    ),
]


@pytest.mark.parametrize("made, configured, message", MISFITS)
def test_a_state_stored_otherwise_is_refused_naming_both_formats(made, configured, message):
    """At trace time (under jit: no value is read), naming the leaf and both formats."""
    params = _storage_params()
    state = adamw_jax.adamw(1e-3, **made).init(params)
    tx = adamw_jax.adamw(1e-3, **configured)
    with pytest.raises(ValueError, match=message):
        jax.jit(tx.update)(params, state, params)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)  # its own state: fine
    assert jax.tree.structure(updates) == jax.tree.structure(params)


# The largest error of rounding x to nearest in each format, per element: the bound of the
# format's step around x, from x's magnitude and its block's scale s (quantize.quantize).
BOUNDS = {
    (8, True): lambda x, s: 2.0**-5 * np.abs(x) + 2.0**-11 * s,
    (8, False): lambda x, s: 2.0**-5 * np.abs(x) + 2.0**-19 * s,
    (4, True): lambda x, s: np.abs(x) / 6 + s / 16,
    (4, False): lambda x, s: np.abs(x) / 10 + s / 8,
}


def _block_scales(q):
    return np.repeat(np.asarray(q.scales), q.block_size, axis=-1)[..., : q.shape[-1]]


@pytest.mark.parametrize(
    "target",
    [
        {"mu_dtype": "int8", "nu_dtype": "int8"},
        {"mu_dtype": "int4", "nu_dtype": "int4"},
        {"mu_dtype": "int8", "nu_dtype": "int4", "block_size": 64},
        {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    ],
    ids=["int8", "int4", "int8-int4", "bf16"],
)
def test_convert_state_keeps_values_within_the_target_rounding(target):
    params = _storage_params()
    fp32 = adamw_jax.adamw(1e-3, amsgrad=True)
    state = _trained_state(fp32, params)
    tx = adamw_jax.adamw(1e-3, amsgrad=True, **target)
    converted = adamw_jax.convert_state(state, tx, params)
    assert jax.tree.structure(converted) == jax.tree.structure(tx.init(params))
    assert int(converted[0].count) == int(state[0].count) == 12
    adam, new = state[0], converted[0]
    for moment, second in ((adam.mu, False), (adam.nu, True), (adam.nu_max, True)):
        name = {id(adam.mu): "mu", id(adam.nu): "nu", id(adam.nu_max): "nu_max"}[id(moment)]
        stored = getattr(new, name)
        exact = np.asarray(moment["w"], np.float64)
        exact = np.sqrt(exact) if second else exact  # the second moment's root is stored
        q = stored["w"]
        if isinstance(q, adamw_jax.QuantizedArray):
            got = np.asarray(adamw_jax.quantize.dequantize(q), np.float64)
            bound = BOUNDS[q.bits, not second](exact, _block_scales(q))
        else:
            got = np.asarray(q, np.float64)
            got = np.sqrt(got) if second else got
            bound = 2.0**-8 * np.abs(exact)  # half a bfloat16 ulp (8 significant bits)
        err = np.abs(got - exact)
        assert np.all(err <= bound * (1 + 1e-6)), (name, float(np.max(err - bound)))
        assert np.max(err / np.maximum(bound, 1e-30)) > 0.1  # the format rounded something
        if isinstance(q, adamw_jax.QuantizedArray):  # the small leaf stays float32, as it was
            np.testing.assert_array_equal(np.asarray(stored["b"]), np.asarray(moment["b"]))
    # the converted state trains on, and converts back to float32 exactly as it decodes
    _, after = jax.jit(tx.update)(params, converted, params)
    back = adamw_jax.convert_state(converted, fp32, params)
    if isinstance(new.mu["w"], adamw_jax.QuantizedArray):
        want = np.asarray(adamw_jax.quantize.dequantize(new.mu["w"]))
        np.testing.assert_array_equal(np.asarray(back[0].mu["w"]), want)
    assert int(after[0].count) == 13


def test_convert_state_refuses_another_optimizer():
    params = _storage_params()
    state = adamw_jax.adamw(1e-3).init(params)
    with pytest.raises(ValueError, match="differ other than in their Adam moments"):
        adamw_jax.convert_state(state, adamw_jax.scale_by_adam(mu_dtype="int8"), params)
    with pytest.raises(ValueError, match="amsgrad"):
        adamw_jax.convert_state(state, adamw_jax.adamw(1e-3, amsgrad=True), params)
    with pytest.raises(ValueError, match='moment_layout="tree"'):
        adamw_jax.convert_state(state, adamw_jax.adamw(1e-3, moment_layout="packed"), params)
