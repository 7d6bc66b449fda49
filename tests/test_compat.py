"""compat.torch_adamw and compat.keras_adamw against torch.optim.AdamW and keras AdamW.

Each parity test runs the framework and the port for 1000 steps from the same initial
parameters on the same gradient sequence (scales spanning 1e-3..10) and compares the final
parameters. The JAX side runs as one jitted ``lax.scan``. Run with ``-s`` to see the
measured errors. With ``ADAMW_JAX_REQUIRE_PARITY=1`` (set by ``.ci/run``) a missing torch or
keras fails these tests instead of skipping them.
"""

import functools
import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import run_scan

from adamw_jax import compat, schedules

STEPS = 1000
REQUIRE_PARITY = os.environ.get("ADAMW_JAX_REQUIRE_PARITY") == "1"
SHAPES = {"scalar": (), "bias": (7,), "kernel": (4, 5), "conv": (3, 2, 3)}
COMPLEX_SHAPE = (2, 3)
LR_SCHEDULE = schedules.cosine_warm_restarts(3e-2, first_period=50, period_mult=1.5, min_value=1e-4)


def _import(name: str):
    """Imports an optional framework; skips (or fails, when parity is required) without it."""
    if name == "keras":
        os.environ["KERAS_BACKEND"] = "jax"
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if REQUIRE_PARITY:
            pytest.fail(f"ADAMW_JAX_REQUIRE_PARITY=1 but {name} cannot be imported: {err}")
        pytest.skip(f"{name} is not installed")
    if name == "keras" and module.backend.backend() != "jax":
        message = f"keras runs on the {module.backend.backend()!r} backend, not 'jax'"
        if REQUIRE_PARITY:
            pytest.fail(message)
        pytest.skip(message)
    return module


@functools.cache
def _problem():
    """Initial params and a gradient sequence; a complex leaf for PyTorch's view_as_real."""
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = {
        k: rng.standard_normal((STEPS, *s)) * 10.0 ** rng.uniform(-3, 1, (STEPS, *s))
        for k, s in SHAPES.items()
    }
    params["complex"] = rng.standard_normal(COMPLEX_SHAPE) + 1j * rng.standard_normal(COMPLEX_SHAPE)
    scale = 10.0 ** rng.uniform(-3, 1, (STEPS, *COMPLEX_SHAPE))
    grads["complex"] = scale * (
        rng.standard_normal((STEPS, *COMPLEX_SHAPE))
        + 1j * rng.standard_normal((STEPS, *COMPLEX_SHAPE))
    )
    return params, grads


def _cast(tree, real_dtype):
    complex_dtype = np.result_type(real_dtype, np.complex64)
    return {
        k: v.astype(complex_dtype if np.iscomplexobj(v) else real_dtype) for k, v in tree.items()
    }


def _run_jax(tx, params, grads):
    """Final params (NumPy) after ``len(grads)`` steps of ``tx`` on ``grads``, one jitted scan."""
    params, grads = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads)
    out = run_scan(tx, params, lambda _, g: g, grads).params
    return {k: np.asarray(v) for k, v in out.items()}


def _rel_error(got, want):
    """Worst over leaves of max |got - want| / max |want|."""
    return max(
        float(np.max(np.abs(got[k] - want[k].astype(got[k].dtype))) / np.max(np.abs(want[k])))
        for k in want
    )


TORCH_CASES = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True, "weight_decay": 0.05},
    "schedule": {"lr": LR_SCHEDULE, "weight_decay": 0.1, "betas": (0.8, 0.99)},
}


def _lr_table(kwargs, x64: bool):
    """The per-step learning rates the port sees, for PyTorch's param group."""
    if "lr" not in kwargs:
        return None
    with jax.enable_x64(x64):
        return np.asarray(kwargs["lr"](jnp.arange(STEPS, dtype=jnp.int32))).tolist()


@functools.cache
def _run_torch(case: str, bits: int):
    torch = _import("torch")
    dtype = {32: torch.float32, 64: torch.float64}[bits]
    kwargs = dict(TORCH_CASES[case])
    lrs = _lr_table(kwargs, x64=bits == 64)
    if lrs is not None:
        kwargs["lr"] = lrs[0]
    params, grads = _cast(_problem()[0], np.float64), _cast(_problem()[1], np.float64)
    ps = {
        k: torch.tensor(v).to(dtype if not np.iscomplexobj(v) else dtype.to_complex())
        for k, v in params.items()
    }
    for p in ps.values():
        p.requires_grad_(True)
    gs = {k: torch.tensor(v).to(ps[k].dtype) for k, v in grads.items()}
    opt = torch.optim.AdamW(list(ps.values()), foreach=False, **kwargs)
    for t in range(STEPS):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[t]
        for k, p in ps.items():
            p.grad = gs[k][t]
        opt.step()
    return {k: p.detach().numpy() for k, p in ps.items()}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_adamw_matches_pytorch_in_float64(case):
    want = _run_torch(case, 64)
    params, grads = _problem()
    with jax.enable_x64(True):
        got = _run_jax(compat.torch_adamw(**TORCH_CASES[case]), params, grads)
    err = _rel_error(got, want)
    print(f"\ntorch float64 {case}: worst relative error after {STEPS} steps {err:.2e}")
    assert err < 1e-9
    moved = _rel_error(want, _cast(params, np.float64))
    assert moved > 1e-3  # the parameters did move: the comparison is not trivial


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_adamw_float32_is_closer_to_pytorch_than_its_precision_gap(case):
    want32, want64 = _run_torch(case, 32), _run_torch(case, 64)
    params, grads = _problem()
    got = _run_jax(
        compat.torch_adamw(**TORCH_CASES[case]),
        _cast(params, np.float32),
        _cast(grads, np.float32),
    )
    err, gap = _rel_error(got, want32), _rel_error(want32, want64)
    print(f"\ntorch float32 {case}: port vs torch {err:.2e}, torch f32 vs f64 {gap:.2e}")
    assert err < gap


KERAS_CASES = {
    "defaults": {},
    "exclude": {
        "learning_rate": 0.01,
        "weight_decay": 0.1,
        "exclude_from_weight_decay": ["bias", "scalar"],
    },
    "amsgrad_exclude": {
        "amsgrad": True,
        "weight_decay": 0.05,
        "epsilon": 1e-3,
        "exclude_from_weight_decay": ["bias"],
    },
}


def _run_keras(case: str, eager: bool, steps: int = STEPS, names: tuple = tuple(SHAPES)):
    """Keras' AdamW on float32 variables named like the param keys, for ``steps`` steps."""
    keras = _import("keras")
    kwargs = dict(KERAS_CASES[case])
    exclude = kwargs.pop("exclude_from_weight_decay", None)
    params, grads = _problem()
    variables = [keras.Variable(params[k].astype(np.float32), name=k) for k in names]
    opt = keras.optimizers.AdamW(**kwargs)
    if exclude:
        opt.exclude_from_weight_decay(var_names=exclude)
    opt.build(variables)
    gs = [jnp.asarray(grads[k][:steps], jnp.float32) for k in names]
    if eager:
        for t in range(steps):
            opt.apply([g[t] for g in gs], variables)
        return {k: np.asarray(v.value) for k, v in zip(names, variables, strict=True)}

    @jax.jit
    def run(trainable, optimizer_vars, gs):
        def body(carry, g):
            return opt.stateless_apply(carry[1], g, carry[0]), None

        (trainable, _), _ = jax.lax.scan(body, (trainable, optimizer_vars), gs)
        return trainable

    out = run([v.value for v in variables], [v.value for v in opt.variables], gs)
    return {k: np.asarray(v) for k, v in zip(names, out, strict=True)}


@functools.cache
def _run_keras_port(case, steps=STEPS, names=tuple(SHAPES)):
    params, grads = _problem()
    real = {k: params[k] for k in names}
    real_grads = {k: grads[k][:steps] for k in names}
    tx = compat.keras_adamw(**KERAS_CASES[case])
    return _run_jax(tx, _cast(real, np.float32), _cast(real_grads, np.float32)), real


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_keras_adamw_matches_keras_in_float32(case):
    want = _run_keras(case, eager=False)
    got, initial = _run_keras_port(case)
    err = _rel_error(got, want)
    print(f"\nkeras float32 {case} (jitted keras): worst relative error {err:.2e}")
    assert err < 1e-5
    assert _rel_error(want, _cast(initial, np.float32)) > 1e-3


def test_keras_adamw_matches_eager_keras():
    # Eager Keras runs op by op, unfused: a check that does not rest on both sides being
    # compiled alike. 200 steps on two variables (one excluded from decay) keep it quick;
    # the jitted comparisons run 1000 steps on all four.
    names = ("bias", "kernel")
    want = _run_keras("amsgrad_exclude", eager=True, steps=200, names=names)
    got, _ = _run_keras_port("amsgrad_exclude", steps=200, names=names)
    err = _rel_error(got, want)
    print(
        f"\nkeras float32 amsgrad_exclude (eager keras, 200 steps): worst relative error {err:.2e}"
    )
    assert err < 1e-5


def test_keras_exclusion_changes_the_trajectory():
    got, _ = _run_keras_port("exclude")
    kwargs = dict(KERAS_CASES["exclude"], exclude_from_weight_decay=None)
    params, grads = _problem()
    everything = _run_jax(
        compat.keras_adamw(**kwargs),
        _cast({k: params[k] for k in SHAPES}, np.float32),
        _cast({k: grads[k] for k in SHAPES}, np.float32),
    )
    assert _rel_error({"bias": got["bias"]}, {"bias": everything["bias"]}) > 1e-2
    np.testing.assert_array_equal(got["kernel"], everything["kernel"])


# Behaviour that needs no framework.


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (compat.torch_adamw, {"lr": -1.0}, "lr must be in [0.0, inf); got -1.0"),
        (compat.torch_adamw, {"betas": (1.0, 0.999)}, "betas[0] must be in [0.0, 1.0); got 1.0"),
        (compat.torch_adamw, {"betas": (0.9, -0.1)}, "betas[1] must be in [0.0, 1.0); got -0.1"),
        (compat.torch_adamw, {"eps": -1e-8}, "eps must be in [0.0, inf); got -1e-08"),
        (compat.torch_adamw, {"weight_decay": float("nan")}, "weight_decay must be in [0.0, inf)"),
        (compat.keras_adamw, {"learning_rate": -0.1}, "learning_rate must be in [0.0, inf)"),
        (compat.keras_adamw, {"weight_decay": -0.004}, "weight_decay must be in [0.0, inf)"),
        (compat.keras_adamw, {"beta_1": 1.5}, "beta_1 must be in [0.0, 1.0); got 1.5"),
        (compat.keras_adamw, {"beta_2": 1.0}, "beta_2 must be in [0.0, 1.0); got 1.0"),
        (compat.keras_adamw, {"epsilon": -1.0}, "epsilon must be in [0.0, inf); got -1.0"),
        (
            compat.keras_adamw,
            {"exclude_from_weight_decay": ["bias("]},
            "exclude_from_weight_decay=['bias('] does not form a valid pattern",
        ),
    ],
)
def test_bad_hyperparameters_are_refused_by_name(factory, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        factory(**kwargs)


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (compat.torch_adamw, {"betas": 0.9}),
        (compat.torch_adamw, {"amsgrad": 1}),
        (compat.torch_adamw, {"maximize": "yes"}),
        (compat.keras_adamw, {"amsgrad": None}),
        (compat.keras_adamw, {"exclude_from_weight_decay": [1]}),
    ],
)
def test_wrong_types_are_refused(factory, kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        factory(**kwargs)


@pytest.mark.parametrize("factory", [compat.torch_adamw, compat.keras_adamw])
def test_update_needs_params_with_the_same_structure(factory):
    tx = factory()
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match="structure"):
        tx.update({"v": jnp.ones(3)}, state, params)


def test_keras_adamw_refuses_complex_params():
    with pytest.raises(TypeError, match=re.escape("params at z are complex")):
        compat.keras_adamw().init({"z": jnp.ones(2, jnp.complex64)})


def test_torch_adamw_under_inject_hyperparams_takes_the_same_steps():
    params = {"w": np.linspace(-1.0, 1.0, 5, dtype=np.float32)}
    grads = {"w": np.array([[0.3, -2.0, 1e-3, 4.0, -0.5]] * 3, np.float32)}
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}
    plain = _run_jax(compat.torch_adamw(**kwargs), params, grads)
    injected = _run_jax(optax.inject_hyperparams(compat.torch_adamw)(**kwargs), params, grads)
    np.testing.assert_allclose(injected["w"], plain["w"], rtol=1e-6)
    assert np.all(plain["w"] != params["w"])


@pytest.mark.parametrize("t_mult", [1, 2, 3])
def test_cosine_warm_restarts_matches_pytorchs_scheduler_stepped_per_iteration(t_mult):
    torch = _import("torch")
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=7, T_mult=t_mult, eta_min=1e-3
    )
    want = []
    for _ in range(400):
        want.append(opt.param_groups[0]["lr"])  # the lr the next optimizer.step uses
        opt.step()
        sched.step()
    ours = schedules.cosine_warm_restarts(0.1, first_period=7, period_mult=t_mult, min_value=1e-3)
    got = np.asarray(ours(jnp.arange(400, dtype=jnp.int32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_torch_adamw_matches_pytorch_in_bfloat16():
    # PyTorch rounds every kernel's output to bfloat16 (the decayed weight included, so a
    # decay below bfloat16's resolution is lost); the port rounds at the same points.
    torch = _import("torch")
    steps, names = 300, ("bias", "kernel", "conv")
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    params, grads = _problem()
    ps = {k: torch.tensor(params[k]).to(torch.bfloat16).requires_grad_(True) for k in names}
    gs = {k: torch.tensor(grads[k][:steps]).to(torch.bfloat16) for k in names}
    initial = {k: p.detach().float().numpy() for k, p in ps.items()}
    opt = torch.optim.AdamW(list(ps.values()), foreach=False, **kwargs)
    for t in range(steps):
        for k, p in ps.items():
            p.grad = gs[k][t]
        opt.step()
    want = {k: p.detach().float().numpy() for k, p in ps.items()}
    got = _run_jax(
        compat.torch_adamw(**kwargs),
        {k: jnp.asarray(initial[k]).astype(jnp.bfloat16) for k in names},
        {k: jnp.asarray(gs[k].float().numpy()).astype(jnp.bfloat16) for k in names},
    )
    got = {k: v.astype(np.float32) for k, v in got.items()}
    err = _rel_error(got, want)
    print(f"\ntorch bfloat16 amsgrad, {steps} steps: worst relative error {err:.2e}")
    assert err < 1e-2  # about one bfloat16 ulp (bitwise equal when measured)
    assert _rel_error(want, initial) > 0.1
