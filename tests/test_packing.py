"""The packed moment layout (``moment_layout="packed"``): same steps as the tree layout."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import checkpoint_round_trip, run_scan

import adamw_jax
from adamw_jax import _packing


def _params(dtype=jnp.float32, small=40):
    """A big leaf, a zero-size leaf, a scalar and ``small`` small leaves of mixed shapes."""
    keys = iter(jax.random.split(jax.random.key(0), small + 3))
    params = {
        "big": jax.random.normal(next(keys), (257, 256), dtype),  # >= PACK_BELOW elements
        "empty": jnp.zeros((0, 3), dtype),
        "scalar": jax.random.normal(next(keys), (), dtype),
    }
    for i in range(small):
        shape = [(3,), (2, 5), (7, 1, 2), (64,)][i % 4]
        params[f"s{i:02d}"] = jax.random.normal(next(keys), shape, dtype)
    return params


def _sine_grads(params, t, grad_dtype=None):
    """Gradients at step ``t``: sin(3 w + 0.37 t + leaf offset), cheap, varied, param-dependent.

    In the params' dtypes, or all in ``grad_dtype``.
    """
    leaves, treedef = jax.tree.flatten(params)
    grads = []
    for i, p in enumerate(leaves):
        phase = 0.37 * jnp.float32(t) + 0.5 * i
        g = jnp.sin(3.0 * p + phase.astype(p.dtype)) if p.size else p
        grads.append(g.astype(grad_dtype or p.dtype))
    return jax.tree.unflatten(treedef, grads)


CONFIGS = {
    "default": {},
    "amsgrad": {"amsgrad": True},
    "nesterov": {"nesterov": True},
    "eps_zero_eps_root": {"eps": 0.0, "eps_root": 1e-12},
    "bf16_mu_fp16_nu": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.float16},  # rounds
    "mask_schedule_coupling": {
        "mask": adamw_jax.masks.by_ndim(2),
        "decay_coupling": "none",
        "weight_decay": 1e-3,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_takes_the_tree_layouts_steps(name):
    kwargs = dict(CONFIGS[name])
    params = _params()
    tree = run_scan(adamw_jax.adamw(1e-2, **kwargs), params, _sine_grads, 200).params
    packed_tx = adamw_jax.adamw(1e-2, moment_layout="packed", **kwargs)
    packed, state, _ = run_scan(packed_tx, params, _sine_grads, 200)
    assert isinstance(state[0].mu, adamw_jax.PackedMoments)
    moved = 0.0
    for key in params:
        a, b, p0 = np.asarray(tree[key]), np.asarray(packed[key]), np.asarray(params[key])
        assert a.dtype == b.dtype and a.shape == b.shape
        # float32 through 200 steps: the two layouts may contract multiply-adds differently.
        if name == "bf16_mu_fp16_nu":  # and such a difference can flip a 16-bit rounding
            assert a.size == 0 or np.mean(np.isclose(b, a, rtol=2e-6, atol=2e-7)) >= 0.98, key
            np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-3, err_msg=key)
        else:
            np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-7, err_msg=key)
        moved = max(moved, float(np.max(np.abs(a - p0), initial=0.0)))
    assert moved > 0.1  # the runs went somewhere


def test_mixed_dtypes_and_complex_leaves():
    """bf16 gradients for f32 params, a bf16 param packed apart, and a complex leaf."""
    params = _params(small=6)
    params["half"] = jnp.linspace(-1.0, 1.0, 10, dtype=jnp.bfloat16)
    params["z"] = jnp.arange(6, dtype=jnp.float32).astype(jnp.complex64) * (1 - 1j)
    for grad_dtype in (None, jnp.bfloat16):
        if grad_dtype is not None:
            params.pop("z")  # a complex gradient has no bfloat16 counterpart
        grads = functools.partial(_sine_grads, grad_dtype=grad_dtype)
        tree = run_scan(adamw_jax.adamw(1e-2), params, grads, 50).params
        packed, state, _ = run_scan(
            adamw_jax.adamw(1e-2, moment_layout="packed"), params, grads, 50
        )
        for key in params:
            assert tree[key].dtype == packed[key].dtype == params[key].dtype
            tol = 1e-2 if params[key].dtype == jnp.bfloat16 else 2e-6
            np.testing.assert_allclose(
                np.asarray(packed[key].astype(jnp.complex64)),
                np.asarray(tree[key].astype(jnp.complex64)),
                rtol=tol,
                atol=tol / 10,
                err_msg=key,
            )
        # The bf16 leaf's moments (bf16, like its param) are packed apart from the f32 ones.
        leaves = list(jax.tree.leaves(params))
        half = [k for k in sorted(params)].index("half")
        groups = state[0].mu.groups
        for group, buffer in zip(groups, state[0].mu.buffers, strict=True):
            dtypes = {jnp.dtype(leaves[i].dtype) for i in group}
            assert len(dtypes) == 1 and buffer.dtype == dtypes.pop()
        assert any(half in g for g in groups)


def test_which_leaves_share_a_buffer():
    n = _packing.PACK_BELOW
    shapes = [(3,), (n,), (2, 2), (0,), (5,), (), (n - 1,)]
    assert _packing.plan(shapes, ["a"] * 7) == ((0, 2, 4, 5, 6), (1,), (3,))
    # Different storage dtypes never share; order follows each group's first leaf.
    keys = ["a", "a", "b", "a", "b", "a", "b"]
    assert _packing.plan(shapes, keys) == ((0, 5), (1,), (2, 4, 6), (3,))
    # At most MAX_LEAVES per buffer.
    many = [(2,)] * (2 * _packing.MAX_LEAVES + 3)
    sizes = [len(g) for g in _packing.plan(many, ["a"] * len(many))]
    assert sizes == [_packing.MAX_LEAVES, _packing.MAX_LEAVES, 3]
    # The state follows the plan: single leaves keep their shape, groups are 1-D.
    params = {"a": jnp.zeros(3), "b": jnp.zeros((n,)), "c": jnp.zeros((2, 2)), "d": jnp.zeros(())}
    state = adamw_jax.scale_by_adam(moment_layout="packed").init(params)
    assert state.mu.groups == ((0, 2, 3), (1,))
    assert [b.shape for b in state.mu.buffers] == [(8,), (n,)]
    assert state.mu.num_leaves == 4
    assert adamw_jax.state_nbytes(state) == adamw_jax.state_nbytes(
        adamw_jax.scale_by_adam().init(params)
    )


def test_second_update_does_not_recompile_and_state_round_trips(tmp_path):
    """One trace for every step, the first after a checkpoint round trip included.

    ``checkpoint_round_trip`` checks the restored buffers bit for bit; taking the next step
    without a new trace checks what that leaves out (weak types, shardings).
    """
    pytest.importorskip("orbax.checkpoint")
    tx = adamw_jax.adamw(1e-2, amsgrad=True, moment_layout="packed")
    params = _params(small=8)
    del params["empty"]  # orbax refuses to save zero-size arrays, in any layout

    @jax.jit
    @chex.assert_max_traces(n=1)  # a second trace raises
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    for _ in range(3):
        params, state = step(params, state, grads)
    restored = checkpoint_round_trip(state, tmp_path / "state")
    step(params, restored, grads)


def test_inject_hyperparams_with_packed_moments():
    tx = optax.inject_hyperparams(adamw_jax.adamw, static_args=("moment_layout",))(
        learning_rate=1e-2, moment_layout="packed"
    )
    params = _params(small=4)
    want = run_scan(adamw_jax.adamw(1e-2, moment_layout="packed"), params, _sine_grads, 5).params
    got, state, _ = run_scan(tx, params, _sine_grads, 5)
    assert isinstance(state.inner_state[0].mu, adamw_jax.PackedMoments)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_bad_layouts_and_mismatched_updates_are_refused():
    with pytest.raises(ValueError, match="moment_layout must be one of"):
        adamw_jax.adamw(1e-3, moment_layout="flat")
    with pytest.raises(ValueError, match=r'moment_layout="packed".*"int8"'):
        adamw_jax.adamw(1e-3, mu_dtype="int8", moment_layout="packed")
    with pytest.raises(ValueError, match=r'moment_layout="packed".*"int8"'):
        adamw_jax.scale_by_adam(nu_dtype="int8", moment_layout="packed")
    tx = adamw_jax.scale_by_adam(moment_layout="packed")
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="updates have 1 leaves, but"):
        tx.update({"a": jnp.zeros(3)}, state)
    with pytest.raises(ValueError, match=r"leaves \[0, 1\] have shapes"):
        tx.update({"a": jnp.zeros(4), "b": jnp.zeros((2, 2))}, state)
    # Nothing was consumed: the state still steps.
    updates, new_state = tx.update({"a": jnp.ones(3), "b": jnp.ones((2, 2))}, state)
    assert int(new_state.count) == 1 and updates["b"].shape == (2, 2)


def test_state_shardings_place_own_buffers_like_params_and_replicate_shared_ones():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(jax.devices()[:1], ("data",))
    n = _packing.PACK_BELOW
    params = {"big": jnp.ones((n // 4, 4)), "b": jnp.zeros(3), "c": jnp.zeros(5)}
    specs = {"big": P("data", None), "b": P(), "c": P("data")}
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    tx = adamw_jax.adamw(1e-3, moment_layout="packed")
    shardings = adamw_jax.sharding.state_shardings(tx, params)
    state = tx.init(params)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    assert state[0].mu.groups == ((0, 2), (1,))  # b and c share a buffer; big has its own
    for moment in (shardings[0].mu, shardings[0].nu):
        assert [s.spec for s in moment.buffers] == [P(), P("data", None)]
    placed = adamw_jax.sharding.init(tx, params)
    assert placed[0].nu.buffers[1].sharding.spec == P("data", None)
    zero = adamw_jax.sharding.state_shardings(tx, params, zero_axis="data")
    assert zero[0].mu.buffers[0].spec == P()


def test_flax_nnx_optimizer_with_packed_moments():
    """nnx.Optimizer hands init its Variable-wrapped params and update plain arrays."""
    from flax import nnx

    def train(layout):
        model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        tx = adamw_jax.adamw(1e-2, moment_layout=layout)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for _ in range(3):
            grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 3))) ** 2))(model)
            opt.update(model, grads)
        return model

    tree, packed = train("tree"), train("packed")
    np.testing.assert_allclose(packed.kernel[...], tree.kernel[...], rtol=1e-6)
    np.testing.assert_allclose(packed.bias[...], tree.bias[...], rtol=1e-6, atol=1e-7)


def test_fused_adamw_runs_packed_moments_through_xla():
    params = _params(small=5)
    del params["empty"]
    opt = adamw_jax.fused_adamw(1e-2, moment_layout="packed")
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    assert isinstance(state[0].mu, adamw_jax.PackedMoments)
    assert not opt.kernel_used(params, grads, state)
    got, _ = jax.jit(opt.step)(params, grads, state)
    tx = adamw_jax.adamw(1e-2, moment_layout="packed")
    updates, _ = tx.update(grads, tx.init(params), params)
    want = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not implement moment_layout"):
        adamw_jax.fused_adamw(1e-2, moment_layout="packed", backend="kernel")
