"""Helpers shared by several test modules: side-by-side runs and checkpoint round trips."""

import jax
import jax.numpy as jnp
import numpy as np


def shrinking_gradients(steps: int, shape: tuple[int, ...], seed: int, max_rate: float):
    """Gradients ``(steps, *shape)`` whose entries shrink, each by ``exp(-rate)`` over the run.

    Each entry has its own scale (log-normal) and rate (uniform in [0, max_rate]): what makes
    a stored second moment need to decay relative to its neighbours.
    """
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.normal(0.0, 1.0, shape))
    rate = rng.uniform(0.0, max_rate, shape)
    t = np.arange(steps)[:, None, None] / steps
    return jnp.asarray(sigma * np.exp(-rate * t) * rng.standard_normal((steps, *shape)))


def run_side_by_side(tx_a, tx_b, grads):
    """Feeds both transformations the same gradients (one scan over ``grads``' first axis).

    Returns the final states and, per step, the ratio of the updates' norms (a over b).
    """

    def step(states, g):
        u_a, s_a = tx_a.update(g, states[0])
        u_b, s_b = tx_b.update(g, states[1])
        return (s_a, s_b), jnp.linalg.norm(u_a) / jnp.linalg.norm(u_b)

    init = (tx_a.init(grads[0]), tx_b.init(grads[0]))
    (s_a, s_b), ratios = jax.jit(lambda g: jax.lax.scan(step, init, g))(grads)
    return s_a, s_b, np.asarray(ratios)


def checkpoint_round_trip(state, path):
    """Saves ``state`` with orbax and restores it; asserts the copy is exact and returns it."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return restored


def assert_trees_equal(a, b):
    """Asserts two pytrees have equal leaves, bit for bit."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
