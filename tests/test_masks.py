"""Masks by name and by rank, on plain dicts, Linen params and NNX state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx, struct

import adamw_jax
from adamw_jax import masks


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 8)(tokens)
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.norm(self.embed(tokens)))


def test_by_name_on_linen_params():
    params = LinenNet().init(jax.random.key(0), jnp.zeros(2, jnp.int32))
    mask = masks.by_name()(params)
    assert mask == {
        "params": {
            "Embed_0": {"embedding": False},
            "LayerNorm_0": {"bias": False, "scale": False},
            "Dense_0": {"kernel": True, "bias": False},
        }
    }


def test_include_and_exclude():
    params = {"attn": {"q": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "mlp": {"w": jnp.ones((2, 2))}}
    assert masks.by_name(exclude=(), include=r"^attn/")(params) == {
        "attn": {"q": True, "bias": True},
        "mlp": {"w": False},
    }
    assert masks.by_name(exclude="mlp|bias")(params) == {
        "attn": {"q": True, "bias": False},
        "mlp": {"w": False},
    }


def test_by_name_rejects_bad_patterns():
    with pytest.raises(ValueError, match="exclude holds an invalid regex"):
        masks.by_name(exclude=("(",))
    with pytest.raises(TypeError, match="include"):
        masks.by_name(include=[3])


def test_by_ndim():
    params = {"k": jnp.ones((2, 3)), "b": jnp.ones(3), "s": jnp.ones(()), "c": jnp.ones((1, 2, 3))}
    assert masks.by_ndim()(params) == {"k": True, "b": False, "s": False, "c": True}
    assert masks.by_ndim(1)(params) == {"k": True, "b": True, "s": False, "c": True}
    with pytest.raises(ValueError, match="min_ndim"):
        masks.by_ndim(-1)
    with pytest.raises(TypeError, match="min_ndim"):
        masks.by_ndim(2.0)


def test_by_name_inside_nnx_optimizer():
    """With zero gradients only the kernel decays; embeddings, norms and biases stay put."""
    model = NnxNet(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(
        model, adamw_jax.adamw(0.1, weight_decay=0.5, mask=masks.by_name()), wrt=nnx.Param
    )
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    for _ in range(3):
        optimizer.update(model, zeros)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(
        after["head"]["kernel"], before["head"]["kernel"] * 0.95**3, rtol=1e-6
    )
    for path in [("head", "bias"), ("norm", "scale"), ("norm", "bias"), ("embed", "embedding")]:
        np.testing.assert_array_equal(after[path[0]][path[1]], before[path[0]][path[1]])


def test_nnx_training_step_under_jit():
    model = NnxNet(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, adamw_jax.adamw(1e-2, mask=masks.by_ndim()), wrt=nnx.Param)
    tokens, target = jnp.arange(6) % 11, jax.nn.one_hot(jnp.arange(6) % 3, 3)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy(model(tokens), target).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_describe_lists_every_leaf():
    params = LinenNet().init(jax.random.key(0), jnp.zeros(2, jnp.int32))
    table = masks.describe(masks.by_name(), params)
    lines = table.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "decays"]
    assert len(lines) == 1 + 5 + 1
    kernel = next(line for line in lines if "kernel" in line)
    assert kernel.split()[-1] == "yes" and "(8, 3)" in kernel
    embedding = next(line for line in lines if "embedding" in line)
    assert embedding.split()[-1] == "no"
    assert lines[-1] == "1 of 5 leaves decay (24 of 131 parameters)"


def test_describe_with_prefix_mask_and_none():
    params = {"a": {"x": jnp.ones(2), "y": jnp.ones(3)}, "b": jnp.ones(4)}
    assert masks.describe({"a": False, "b": True}, params).endswith(
        "1 of 3 leaves decay (4 of 9 parameters)"
    )
    assert masks.describe(None, params).endswith("3 of 3 leaves decay (9 of 9 parameters)")


def test_describe_on_nnx_state():
    model = NnxNet(nnx.Rngs(0))
    table = masks.describe(masks.by_name(), nnx.state(model, nnx.Param))
    paths = [line.split()[0] for line in table.splitlines()[1:-1]]
    assert paths == ["embed/embedding", "head/bias", "head/kernel", "norm/bias", "norm/scale"]
    assert table.endswith("1 of 5 leaves decay (24 of 131 parameters)")


# One path format: slash-joined keys, as MaxText and Levanter write their patterns.


@struct.dataclass
class Block:
    attn: dict
    mlp: dict


def _transformer_like():
    layer = lambda: {"attn": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}  # noqa: E731
    return {"layers": [layer(), layer()], "embed": {"embedding": jnp.ones((3, 2))}}


def test_paths_are_slash_joined_keys_indices_and_attribute_names():
    params = {
        "layers": [{"attn": {"kernel": jnp.ones(1)}}],
        "block": Block(attn={"q": jnp.ones(1)}, mlp={"w": jnp.ones(1)}),
        "pair": (jnp.ones(1), jnp.ones(1)),
    }
    assert [path for path, _ in masks.named_leaves(params)] == [
        "block/attn/q",
        "block/mlp/w",
        "layers/0/attn/kernel",
        "pair/0",
        "pair/1",
    ]
    linen = LinenNet().init(jax.random.key(0), jnp.zeros(2, jnp.int32))
    assert "params/Dense_0/kernel" in [path for path, _ in masks.named_leaves(linen)]


@pytest.mark.parametrize(
    "exclude, decaying",
    [
        (["bias$"], {"layers/0/attn/kernel", "layers/1/attn/kernel", "embed/embedding"}),
        ([".*/bias", "embedding"], {"layers/0/attn/kernel", "layers/1/attn/kernel"}),
        (["layers/0/attn/kernel", "bias$"], {"layers/1/attn/kernel", "embed/embedding"}),
    ],
)
def test_maxtext_and_levanter_style_patterns_match(exclude, decaying):
    params = _transformer_like()
    flags = jax.tree.leaves(masks.by_name(exclude=exclude)(params))
    paths = [path for path, _ in masks.named_leaves(params)]
    assert {path for path, flag in zip(paths, flags, strict=True) if flag} == decaying


def test_a_pattern_that_matches_no_leaf_is_refused_at_init():
    params = _transformer_like()
    for kwargs, name in (
        (dict(exclude=[r"bias$", "biass"]), "exclude"),
        (dict(include="mlp"), "include"),
    ):
        tx = adamw_jax.adamw(1e-3, mask=masks.by_name(**kwargs))
        with pytest.raises(
            ValueError, match=rf"the {name} pattern '(biass|mlp)' matches no"
        ) as err:
            tx.init(params)
        assert "'embed/embedding', 'layers/0/attn/bias'" in str(err.value)
    # The default patterns are generic: a model without biases or norms still works.
    no_bias = {"w": jnp.ones((2, 2))}
    assert masks.by_name()(no_bias) == {"w": True}
    assert masks.by_name(exclude=masks.DEFAULT_EXCLUDE)(no_bias) == {"w": True}


def test_nnx_paths_are_the_same_outside_and_inside_the_optimizer():
    """describe on nnx.state shows the paths the mask sees at init and update in nnx.Optimizer."""
    model = NnxNet(nnx.Rngs(0))
    seen = []

    def recording(params):
        seen.append([path for path, _ in masks.named_leaves(params)])
        return masks.by_name(exclude=["bias$", "scale$", "embedding$"])(params)

    optimizer = nnx.Optimizer(model, adamw_jax.adamw(0.1, mask=recording), wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    table = masks.describe(recording, nnx.state(model, nnx.Param))
    described = [line.split()[0] for line in table.splitlines()[1:-1]]
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2] == described  # init, update, here
    assert not any(".value" in path for path in described)


def test_a_bool_tree_made_from_nnx_state_works_in_nnx_optimizer():
    """jax.tree.map over nnx.state keeps the Variables; the pure state inside lacks them."""
    runs = {}
    for name in ("bool tree", "by_ndim"):
        model = NnxNet(nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        mask = (
            jax.tree.map(lambda p: p.ndim == 2, state) if name == "bool tree" else masks.by_ndim()
        )
        optimizer = nnx.Optimizer(
            model, adamw_jax.adamw(0.1, weight_decay=0.5, mask=mask), wrt=nnx.Param
        )
        zeros = jax.tree.map(jnp.zeros_like, state)
        for _ in range(3):
            optimizer.update(model, zeros)
        runs[name] = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    before = nnx.to_pure_dict(nnx.state(NnxNet(nnx.Rngs(0)), nnx.Param))
    chex.assert_trees_all_equal(runs["bool tree"], runs["by_ndim"])
    np.testing.assert_allclose(
        runs["by_ndim"]["head"]["kernel"], before["head"]["kernel"] * 0.95**3, rtol=1e-6
    )
    np.testing.assert_array_equal(runs["bool tree"]["head"]["bias"], before["head"]["bias"])


@pytest.mark.parametrize(
    "mask, message",
    [
        (
            {"head": True, "norm": False},
            "the params have 'embed/embedding', which the mask does not",
        ),
        (
            {"head": True, "norm": False, "embed": False, "tail": True},
            "the mask has 'tail', which is no path of the params",
        ),
    ],
)
def test_a_mask_that_does_not_fit_names_the_first_differing_path(mask, message):
    model = NnxNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"mask does not match the params: {message}") as err:
        nnx.Optimizer(model, adamw_jax.adamw(0.1, mask=mask), wrt=nnx.Param)
    assert "PyTreeDef" not in str(err.value) and len(str(err.value)) < 400


def test_masked_leaves_match_adamw_behaviour():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = adamw_jax.adamw(0.1, weight_decay=1.0, mask=masks.by_ndim())
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1)
    np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)
