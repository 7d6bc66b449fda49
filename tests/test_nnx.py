"""Every moment storage and layout inside Flax NNX's ``nnx.Optimizer``.

``nnx.Optimizer`` hands ``init`` the params wrapped in ``nnx.Param`` variables, wraps each
state array in an ``OptState`` variable, hands ``update`` plain arrays, and rebuilds every
named tuple of the state as an ``nnx.State``. Each storage option must take two steps there,
eagerly, under ``nnx.jit`` and in tree mode (``graph=False``), and land on exactly the params
that the plain Optax-protocol loop reaches with the same gradients.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_trees_close_to_leaf_scale
from flax import nnx

import adamw_jax
from adamw_jax import compat

STORAGES = {
    "float32": {},
    "bfloat16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    "float16": {"mu_dtype": jnp.float16, "nu_dtype": jnp.float16},
    "int8": {"mu_dtype": "int8", "nu_dtype": "int8", "min_quantize_size": 64, "block_size": 32},
    "int8_amsgrad": {
        "mu_dtype": "int8",
        "nu_dtype": "int8",
        "min_quantize_size": 64,
        "block_size": 32,
        "amsgrad": True,
    },
    "int8_mu_bf16_nu": {"mu_dtype": "int8", "nu_dtype": jnp.bfloat16, "min_quantize_size": 64},
    "int4_amsgrad": {
        "mu_dtype": "int4",
        "nu_dtype": "int4",
        "min_quantize_size": 64,
        "block_size": 32,
        "amsgrad": True,
    },
    "packed": {"moment_layout": "packed"},
    "packed_amsgrad": {"moment_layout": "packed", "amsgrad": True},
    # The stability options: a target copy of the params in the state, cautious steps.
    "decay_to_init": {"decay_target": "init"},
    "cautious": {"cautious": True, "cautious_weight_decay": True},
}
X = jnp.linspace(-1.0, 1.0, 4 * 24).reshape(4, 24)


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(24, 16, rngs=rngs)  # a 384-element kernel: quantized
        self.out = nnx.Linear(16, 3, rngs=rngs)  # 48 elements: below min_quantize_size

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _loss(model):
    return jnp.sum(model(X) ** 2)


def _reference(tx, steps: int, jit: bool = False):
    """The params after ``steps`` plain Optax-protocol steps on the same model and loss.

    Jitted when the run it is compared with is (XLA may fuse a jitted step differently,
    which moves float32 results by an ulp).
    """
    graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    state = tx.init(params)

    def step(params, state):
        grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if jit:
        step = jax.jit(step)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def _train(tx, mode: str, steps: int):
    model = Net(nnx.Rngs(0))
    if mode == "tree_mode":
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param, graph=False)
    else:
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def step(model, optimizer):
        grads = nnx.grad(_loss)(model)
        optimizer.update(model, grads)

    if mode == "jit":
        step = nnx.jit(step)
    for _ in range(steps):
        step(model, optimizer)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer


def _storage_tx(storage: str) -> optax.GradientTransformation:
    return adamw_jax.adamw(1e-2, weight_decay=0.1, **STORAGES[storage])


@functools.cache
def _storage_reference(storage: str, jit: bool):
    """``_reference`` of the storage's two steps: the eager one serves eager and tree mode."""
    return _reference(_storage_tx(storage), steps=2, jit=jit)


@pytest.mark.parametrize("mode", ["eager", "jit", "tree_mode"])
@pytest.mark.parametrize("storage", STORAGES)
def test_every_storage_trains_in_nnx_optimizer(storage, mode):
    tx = _storage_tx(storage)
    params, optimizer = _train(tx, mode, steps=2)
    expected = _storage_reference(storage, jit=mode == "jit")
    chex.assert_trees_all_equal(params, expected)
    moved = jax.tree.map(lambda a, b: np.any(a != b), params, _reference(tx, steps=0))
    assert all(jax.tree.leaves(moved)), "every leaf should have moved in two steps"
    assert int(optimizer.step[...]) == 2


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: adamw_jax.adam(1e-2, mu_dtype="int8", l2=1e-3, min_quantize_size=64),
        lambda: compat.torch_adamw(1e-2),
        lambda: compat.keras_adamw(1e-2),
    ],
)
def test_other_optimizers_train_in_nnx_optimizer_under_jit(make_tx):
    tx = make_tx()
    params, _ = _train(tx, "jit", steps=2)
    chex.assert_trees_all_equal(params, _reference(tx, steps=2, jit=True))


@pytest.mark.parametrize("mode", ["jit", "tree_mode"])
def test_fused_adamw_trains_in_nnx_optimizer_over_30_steps(mode):
    """The fused optimizer in ``nnx.Optimizer``: adamw's run bit for bit, the fused step's
    to a few ulps.

    Its ``update`` is adamw's XLA update; its ``step`` the kernel, a few ulps from that
    code per step, which the gradients (through the loss) then carry on: the fused run is
    compared to 16 ulps of each leaf's scale after 30 steps.
    """
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.1}
    opt = adamw_jax.fused_adamw(**kwargs, backend="kernel")
    params, optimizer = _train(opt, mode, steps=30)
    assert int(optimizer.step[...]) == 30
    graphdef, p, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    p = nnx.to_pure_dict(p)
    state = opt.init(p)
    assert opt.kernel_used(p, p, state)

    @jax.jit
    def step(p, state):
        grads = jax.grad(lambda q: _loss(nnx.merge(graphdef, q, rest)))(p)
        return opt.step(p, grads, state)

    for _ in range(30):
        p, state = step(p, state)
    assert_trees_close_to_leaf_scale(params, p, ulps=16)
    chex.assert_trees_all_equal(params, _train(adamw_jax.adamw(**kwargs), mode, steps=30)[0])
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), params, _reference(opt, steps=0))
    assert min(jax.tree.leaves(moved)) > 1e-2


def test_fused_adamw_on_pure_params_matches_nnx_optimizer():
    """fused_adamw (init/step, not an Optax transformation) on the pure params: same result."""
    opt = adamw_jax.fused_adamw(1e-2, weight_decay=0.1, mu_dtype="int8", min_quantize_size=64)
    tx = adamw_jax.adamw(1e-2, weight_decay=0.1, mu_dtype="int8", min_quantize_size=64)
    params, _ = _train(tx, "jit", steps=2)
    graphdef, p, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    p = nnx.to_pure_dict(p)
    state = opt.init(p)

    @jax.jit
    def step(p, state):
        grads = jax.grad(lambda q: _loss(nnx.merge(graphdef, q, rest)))(p)
        return opt.step(p, grads, state)

    for _ in range(2):
        p, state = step(p, state)
    chex.assert_trees_all_equal(params, p)
