"""Helpers shared by the test modules: runs of N steps, tree comparisons, checkpoint round trips.

Runs (each returns a :class:`Run`):

- :func:`run_steps`: N updates of a transformation, one Python call each (eager, or each
  step jitted), on the gradients ``grad_fn(params, t)``.
- :func:`run_scan`: N updates inside one jitted ``lax.scan`` over per-step inputs.
- :func:`run_side_by_side`: two transformations fed the same gradients in one scan.

Examples: :func:`load_example` imports ``examples/<name>.py`` as a module.

Comparisons: closeness and value equality use chex directly, as Optax's tests do
(``chex.assert_trees_all_close(a, b, rtol=..., atol=...)``,
``chex.assert_trees_all_equal(a, b)``). Two checks chex has no assertion for live here:
:func:`assert_trees_bitwise_equal` (bits, not values: ``-0.0 != 0.0``) and
:func:`assert_trees_close_to_leaf_scale` (a tolerance in ulps of each leaf's largest value).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax
from adamw_jax import schedules


class Run(NamedTuple):
    """The end of a run: final params and state, and what each step gave (see the runner)."""

    params: Any
    state: Any
    per_step: Any


def run_steps(
    tx: optax.GradientTransformation,
    params: Any,
    grad_fn: Callable[[Any, int], Any],
    steps: int,
    *,
    jit: bool = False,
) -> Run:
    """``steps`` updates of ``tx`` from ``tx.init(params)``, one Python call per step.

    Step ``t`` (0, 1, ...) takes the gradients ``grad_fn(params, t)`` (computed eagerly, ``t``
    a Python int), calls ``tx.update(grads, state, params)`` and applies the updates with
    ``optax.apply_updates``. With ``jit`` the update and its application are one jitted
    function, compiled once. ``per_step`` is the list of every step's updates.
    """

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    if jit:
        step = jax.jit(step)
    state = tx.init(params)
    per_step = []
    for t in range(steps):
        params, state, updates = step(params, state, grad_fn(params, t))
        per_step.append(updates)
    return Run(params, state, per_step)


def run_scan(
    tx: optax.GradientTransformation,
    params: Any,
    grad_fn: Callable[[Any, Any], Any],
    xs: Any,
    *,
    has_aux: bool = False,
) -> Run:
    """Updates of ``tx`` from ``tx.init(params)`` as one jitted ``lax.scan`` (init included).

    ``xs`` is scanned over its leading axis (a pytree of arrays, e.g. one gradient or noise
    sample per step), or an int ``n`` for the step indices ``jnp.arange(n, dtype=int32)``.
    Each step takes the gradients ``grad_fn(params, x)`` (traced), calls
    ``tx.update(grads, state, params)`` and applies the updates. With ``has_aux``,
    ``grad_fn`` returns ``(grads, aux)`` and ``per_step`` is ``aux`` stacked over the steps
    (e.g. each step's loss); otherwise ``per_step`` is None.
    """
    if isinstance(xs, int):
        xs = jnp.arange(xs, dtype=jnp.int32)

    def step(carry, x):
        params, state = carry
        grads, aux = grad_fn(params, x) if has_aux else (grad_fn(params, x), None)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), aux

    @jax.jit
    def run(params, xs):
        (params, state), per_step = jax.lax.scan(step, (params, tx.init(params)), xs)
        return Run(params, state, per_step)

    return run(params, xs)


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


def _bits(x: Any) -> np.ndarray:
    """The leaf's bytes as unsigned integers (one per element where the width allows)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.ascontiguousarray(np.asarray(x))
    if x.dtype.itemsize in (1, 2, 4, 8):
        return x.view(np.dtype(f"u{x.dtype.itemsize}"))
    return np.frombuffer(x.tobytes(), np.uint8)


def assert_trees_bitwise_equal(*trees: Any) -> None:
    """Asserts the trees are the same bits: structure, shapes, dtypes and every byte.

    ``chex.assert_trees_all_equal`` compares values (``-0.0 == 0.0``, NaN equals NaN); this
    compares each leaf's bytes, with chex, after chex has checked shapes and dtypes.
    """
    chex.assert_trees_all_equal_shapes_and_dtypes(*trees)
    chex.assert_trees_all_equal(*(jax.tree.map(_bits, tree) for tree in trees), strict=True)


def assert_trees_close_to_leaf_scale(actual: Any, desired: Any, ulps: int = 8) -> None:
    """Each floating leaf within ``ulps`` float32 ulps of the desired leaf's largest magnitude.

    An absolute tolerance per leaf, ``ulps * spacing(max |desired|)``, which
    ``chex.assert_trees_all_close`` (one ``atol`` for all leaves) cannot express. Empty
    leaves are skipped; integer leaves (step counts) are compared the same way, which for
    values below 2**21 means exactly. Both trees must be finite.
    """
    chex.assert_trees_all_equal_structs(actual, desired)
    chex.assert_tree_all_finite((actual, desired))
    pairs = zip(jax.tree.leaves_with_path(actual), jax.tree.leaves(desired), strict=True)
    for (path, a), b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.size == 0:
            continue
        tol = ulps * float(np.spacing(np.float32(np.max(np.abs(b)))))
        where = jax.tree_util.keystr(path)  # named in chex's message
        chex.assert_trees_all_close({where: a}, {where: b}, rtol=0.0, atol=tol)


def checkpoint_round_trip(state, path):
    """Saves ``state`` with orbax and restores it; asserts the copy is bitwise exact, returns it."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, jax.eval_shape(lambda: state))
    assert_trees_bitwise_equal(restored, state)
    return restored


# ------------------------------------------------------------ training runs for sweeps
def mlp_params(key: jax.Array) -> dict[str, jax.Array]:
    """The small MLP's parameters (16 -> 32 -> 4): both weight matrices cut from one normal
    draw, which XLA on CPU compiles in about half the time of two draws (and a vmapped init
    in a quarter)."""
    draw = jax.random.normal(key, (16 * 32 + 32 * 4,)) * 0.5
    return {
        "w1": draw[: 16 * 32].reshape(16, 32),
        "b1": jnp.zeros(32),
        "w2": draw[16 * 32 :].reshape(32, 4),
    }


def mlp_train(steps: int, coupling: str = "lr") -> Callable:
    """``train(hparams, key)`` for tuning sweeps: a small tanh MLP on fixed random data,
    ``steps`` full-batch steps of ``adamw_jax.adamw`` with a warm-up cosine schedule of
    peak ``hparams["learning_rate"]``; every other name in ``hparams`` (weight_decay, b1,
    b2, eps) is passed to adamw. Returns the final training loss and the weight norm."""

    x = jax.random.normal(jax.random.key(11), (96, 16))
    y = jax.random.randint(jax.random.key(12), (96,), 0, 4)

    def loss_fn(params):
        hidden = jnp.tanh(x @ params["w1"] + params["b1"])
        logits = hidden @ params["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train(hparams, key):
        params = mlp_params(key)
        peak = hparams["learning_rate"]
        lr = schedules.warmup_cosine(peak, warmup_steps=5, decay_steps=steps)
        others = {k: v for k, v in hparams.items() if k != "learning_rate"}
        if coupling == "schedule":
            others.update(decay_coupling="schedule", peak_learning_rate=peak)
        tx = adamw_jax.adamw(lr, **others)

        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return {"loss": loss_fn(params), "w_norm": jnp.sqrt(jnp.sum(params["w1"] ** 2))}

    return train


def elementwise_train(steps: int) -> Callable:
    """``train(hparams, key)`` whose model has no matrix products: a sum of independent
    non-convex 1-D losses (chaotic at large learning rates), so a vmapped member runs
    exactly the arithmetic of its solo run except for the optimizer's own handling of
    batched hyperparameters. ``hparams`` are adamw's (learning_rate is a schedule's peak)."""

    targets = jax.random.normal(jax.random.key(21), (64,))

    def loss_fn(w):
        return jnp.sum(w**4 - 3.0 * targets * w**2 + jnp.sin(5.0 * w))

    def train(hparams, key):
        w = jax.random.normal(key, (64,))
        lr = schedules.warmup_cosine(hparams["learning_rate"], warmup_steps=3, decay_steps=steps)
        tx = adamw_jax.adamw(lr, **{k: v for k, v in hparams.items() if k != "learning_rate"})

        def step(carry, _):
            w, state = carry
            updates, state = tx.update(jax.grad(loss_fn)(w), state, w)
            return (optax.apply_updates(w, updates), state), None

        (w, _), _ = jax.lax.scan(step, (w, tx.init(w)), None, length=steps)
        return {"loss": loss_fn(w), "w_sum": jnp.sum(w)}

    return train


class LeastSquares(NamedTuple):
    """A least-squares problem ``0.5 * mean ||x @ kernel + bias - y||^2`` (float64 NumPy).

    Attributes:
      params: the initial ``{"kernel", "bias"}``.
      x, y: the inputs and targets.
    """

    params: dict
    x: np.ndarray
    y: np.ndarray

    def numpy_grads(self, params: dict, t: int = 0) -> dict:
        """The gradient at ``params`` in float64 NumPy (``t`` is ignored: full batch)."""
        del t
        residual = self.x @ params["kernel"] + params["bias"] - self.y
        return {"kernel": self.x.T @ residual / len(self.x), "bias": residual.mean(0)}

    def jax_grads(self, params: dict, t: Any = None) -> dict:
        """The same gradient in JAX, in the params' dtype (``t`` is ignored)."""
        del t
        x, y = (jnp.asarray(a, params["kernel"].dtype) for a in (self.x, self.y))
        residual = x @ params["kernel"] + params["bias"] - y
        return {"kernel": x.T @ residual / len(x), "bias": residual.mean(0)}


def least_squares(seed: int = 0, n: int = 64, d: int = 16, k: int = 4) -> LeastSquares:
    """A :class:`LeastSquares` problem with ``n`` examples, ``d`` inputs and ``k`` outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, k)) + 0.1 * rng.standard_normal((n, k))
    params = {"kernel": 0.5 * rng.standard_normal((d, k)), "bias": rng.standard_normal(k)}
    return LeastSquares(params, x, y)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """Imports ``examples/<name>.py`` as a module (once), without putting examples/ on sys.path."""
    module_name = f"_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while building
        spec.loader.exec_module(module)
    return sys.modules[module_name]


class LoopStyle(NamedTuple):
    """A training run written as a loop: ``init(hparams, key)``, ``step(state, batch,
    hparams)``, ``batches(steps)`` (the minibatches, a list of ``(x, y)``), ``evaluate(state)``
    and ``train(hparams, key)``: the same run as one scan over ``batches(steps)``."""

    init: Callable
    step: Callable
    batches: Callable
    evaluate: Callable
    train: Callable


def mlp_loop(steps: int, batch_size: int = 32) -> LoopStyle:
    """:class:`LoopStyle` for a small tanh MLP on fixed random data, ``adamw_jax.adamw`` with
    the traced ``learning_rate`` and ``weight_decay``; metrics are the batch loss (per step)
    and the full-data loss (``evaluate``)."""
    x = jax.random.normal(jax.random.key(21), (96, 16))
    y = jax.random.randint(jax.random.key(22), (96,), 0, 4)

    def loss_fn(params, xb, yb):
        logits = jnp.tanh(xb @ params["w1"] + params["b1"]) @ params["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def optimizer(hparams):
        return adamw_jax.adamw(hparams["learning_rate"], weight_decay=hparams["weight_decay"])

    def init(hparams, key):
        params = mlp_params(key)
        return params, optimizer(hparams).init(params)

    def step(state, batch, hparams):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer(hparams).update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    def batches(n):
        order = np.random.default_rng(5).integers(0, 96, (n, batch_size))
        return [(x[i], y[i]) for i in order]

    def evaluate(state):
        return {"full_loss": loss_fn(state[0], x, y)}

    stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches(steps))

    def train(hparams, key):
        def body(state, batch):
            return step(state, batch, hparams)[0], None

        state, _ = jax.lax.scan(body, init(hparams, key), stacked)
        return evaluate(state)

    return LoopStyle(init, step, batches, evaluate, train)


@contextlib.contextmanager
def persistent_compilation_cache(path: str | Path) -> Iterator[None]:
    """JAX's persistent compilation cache in ``path`` while the block runs, then none again.

    A program traced again (a new closure of the same function, an example's ``main`` run a
    second time, another search strategy over the same ``train``) is the same XLA module:
    it is loaded from ``path`` instead of compiled again. The executable is the one the first
    compilation produced, so results are bit for bit those of a fresh compilation.
    """
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    compilation_cache.set_cache_dir(str(path))
    compilation_cache.reset_cache()  # the cache's use is decided once, at the next compile
    try:
        yield
    finally:
        compilation_cache.set_cache_dir(previous)
        compilation_cache.reset_cache()
