"""adamw_jax.tuning.Population and loop_train: members are sweep's members and their solo
runs, one compiled call per step, frozen members touch nobody, compaction and checkpoints
keep every member, the searches run on loop-style code, and bad input is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_trees_bitwise_equal, mlp_loop

import adamw_jax
from adamw_jax import tuning

TESTS = Path(__file__).resolve().parent
KEY = jax.random.key(7)
CONFIGS = tuning.grid(learning_rate=[3e-3, 3e-2], weight_decay=[0.0, 0.1])


@pytest.fixture(scope="module")
def loop():
    return mlp_loop(20)


def _solo(loop, config, seeds, seed, batches):
    """The member trained alone: jitted init once, then the jitted step on each batch."""
    hparams = tuning.as_hparams(config)
    state = jax.jit(loop.init)(hparams, tuning.seed_keys(KEY, seeds)[seed])
    step = jax.jit(loop.step)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch, hparams)
        losses.append(metrics["loss"])
    return state, np.asarray(losses)


def _run(pop, batches):
    return np.stack([pop.step(b)["loss"] for b in batches], axis=1)  # (members, steps)


def _member(pop, i):
    return jax.tree.map(lambda x: x[i], pop.state)


# ---------------------------------------------------------------- members and solo runs
def test_members_start_from_sweeps_keys_and_are_close_to_their_solo_runs(loop):
    pop = tuning.Population(loop.init, loop.step, CONFIGS, key=KEY, seeds=2)
    assert pop.size == 8 and pop.seed.tolist() == [0, 1] * 4
    assert pop.configs == [c for c in CONFIGS for _ in range(2)]
    for i, (config, seed) in enumerate(zip(pop.configs, pop.seed, strict=True)):
        start = jax.jit(loop.init)(tuning.as_hparams(config), tuning.seed_keys(KEY, 2)[seed])
        assert_trees_bitwise_equal(_member(pop, i), start)  # element-wise: bitwise
    batches = loop.batches(20)
    losses = _run(pop, batches)
    for i, (config, seed) in enumerate(zip(pop.configs, pop.seed, strict=True)):
        state, solo = _solo(loop, config, 2, seed, batches)
        np.testing.assert_allclose(losses[i], solo, rtol=1e-6)
        chex.assert_trees_all_close(_member(pop, i), state, rtol=1e-5, atol=1e-7)
        assert not np.array_equal(losses[i], losses[i - 1])


def test_a_one_member_population_runs_its_solo_run(loop):
    batches = loop.batches(20)
    pop = tuning.Population(loop.init, loop.step, CONFIGS[3:], key=KEY, seeds=2)
    pop.stop(0)
    pop.compact()  # seed 1 alone: a one-member population runs the unbatched program
    losses = _run(pop, batches)
    state, solo = _solo(loop, CONFIGS[3], 2, 1, batches)
    np.testing.assert_array_equal(losses[0], solo)
    assert_trees_bitwise_equal(_member(pop, 0), state)


def test_one_compiled_call_per_population_size(loop):
    traces = []

    def step(state, batch, hparams):
        traces.append(1)
        return loop.step(state, batch, hparams)

    pop = tuning.Population(loop.init, step, CONFIGS, key=KEY)
    for batch in loop.batches(5):
        metrics = pop.step(batch)
    assert len(traces) == 1
    assert {k: v.shape for k, v in metrics.items()} == {"loss": (4,)}
    pop.stop(2)
    pop.compact()
    for batch in loop.batches(5):
        pop.step(batch)
    assert len(traces) == 2
    # Another population of the same functions and size reuses the compiled step.
    tuning.Population(loop.init, step, CONFIGS, key=jax.random.key(8)).step(batch)
    assert len(traces) == 2


def test_per_member_batches_give_each_member_its_own(loop):
    pop = tuning.Population(loop.init, loop.step, CONFIGS[:2], key=KEY)
    own = [loop.batches(10), loop.batches(20)[10:]]
    for t in range(10):
        pop.step(
            jax.tree.map(lambda a, b: jnp.stack([a, b]), own[0][t], own[1][t]), per_member=True
        )
    for i in range(2):
        state, _ = _solo(loop, CONFIGS[i], 1, 0, own[i])
        chex.assert_trees_all_close(_member(pop, i), state, rtol=1e-5, atol=1e-7)
    shared = tuning.Population(loop.init, loop.step, CONFIGS[:2], key=KEY)
    _run(shared, own[0])
    assert not np.allclose(_member(pop, 1)[0]["w1"], _member(shared, 1)[0]["w1"])


def test_map_evaluates_every_member(loop):
    pop = tuning.Population(loop.init, loop.step, CONFIGS, key=KEY)
    _run(pop, loop.batches(5))
    full = pop.map(loop.evaluate)
    expected = [float(loop.evaluate(_member(pop, i))["full_loss"]) for i in range(4)]
    np.testing.assert_allclose(full["full_loss"], expected, rtol=1e-6)
    scaled = pop.map(lambda state, s: {"s": s * state[0]["b1"].sum()}, 2.0)
    np.testing.assert_allclose(
        scaled["s"], [2 * float(_member(pop, i)[0]["b1"].sum()) for i in range(4)], rtol=1e-6
    )


# ----------------------------------------------------------- frozen members, compaction
def test_a_diverging_member_is_frozen_and_leaves_the_others_bitwise_untouched(loop):
    calm = tuning.grid(learning_rate=[3e-3, 3e-2, 1e-2], weight_decay=[0.1])
    wild = [*calm[:2], {"learning_rate": 1e30, "weight_decay": 0.1}]
    batches = loop.batches(20)
    pops = [tuning.Population(loop.init, loop.step, c, key=KEY) for c in (calm, wild)]
    runs = [_run(p, batches) for p in pops]
    np.testing.assert_array_equal(runs[1][:2], runs[0][:2])
    assert_trees_bitwise_equal(
        jax.tree.map(lambda x: x[:2], pops[1].state), jax.tree.map(lambda x: x[:2], pops[0].state)
    )
    assert pops[0].active.all() and pops[1].active.tolist() == [True, True, False]
    stopped_at = np.flatnonzero(np.isnan(runs[1][2]))[0]
    assert 0 < stopped_at < 20 and np.isnan(runs[1][2, stopped_at:]).all()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_member(pops[1], 2)))


def test_stop_and_compact_keep_the_survivors_identities_and_states(loop):
    batches = loop.batches(10)
    pop = tuning.Population(loop.init, loop.step, CONFIGS, key=KEY, seeds=2)
    _run(pop, batches[:5])
    pop.stop(1)
    pop.stop(6)
    at_stop = _member(pop, 6)
    metrics = pop.step(batches[5])
    assert (
        np.isnan(metrics["loss"][[1, 6]]).all()
        and np.isfinite(np.delete(metrics["loss"], [1, 6])).all()
    )
    assert_trees_bitwise_equal(_member(pop, 6), at_stop)
    pop.compact()
    assert pop.size == 6 and pop.index.tolist() == [0, 2, 3, 4, 5, 7] and pop.active.all()
    assert pop.seed.tolist() == [0, 0, 1, 0, 1, 1] and pop.configs[4] == CONFIGS[2]
    assert pop.steps == 6
    reference = tuning.Population(loop.init, loop.step, CONFIGS, key=KEY, seeds=2)
    _run(reference, batches[:6])
    assert_trees_bitwise_equal(_member(pop, 5), _member(reference, 7))
    survivors = _run(pop, batches[6:])
    np.testing.assert_allclose(survivors, _run(reference, batches[6:])[pop.index], rtol=1e-6)


# ------------------------------------------------------------------------- checkpoints
def test_a_restored_population_continues_bitwise(loop, tmp_path):
    batches = loop.batches(10)
    pop = tuning.Population(loop.init, loop.step, CONFIGS, key=KEY)
    _run(pop, batches[:4])
    pop.stop(2)
    pop.save(tmp_path / "pop")
    with pytest.raises(FileExistsError, match="path must not exist"):
        pop.save(tmp_path / "pop")
    restored = tuning.Population.restore(tmp_path / "pop", loop.init, loop.step)
    assert restored.configs == pop.configs and restored.active.tolist() == [True, True, False, True]
    assert restored.steps == 4 and restored.seed.tolist() == pop.seed.tolist()
    np.testing.assert_array_equal(_run(restored, batches[4:]), _run(pop, batches[4:]))
    assert_trees_bitwise_equal(restored.state, pop.state)


def test_restore_refuses_an_init_of_other_shapes(loop, tmp_path):
    pop = tuning.Population(loop.init, loop.step, CONFIGS, key=KEY)
    pop.save(tmp_path / "pop")

    def wider(hparams, key):
        params, _ = loop.init(hparams, key)
        params = {**params, "b1": jnp.zeros(33)}
        return params, adamw_jax.adamw(1e-3).init(params)

    with pytest.raises(ValueError, match="init must build the saved state"):
        tuning.Population.restore(tmp_path / "pop", wider, loop.step)


# ------------------------------------------------------------------------ Flax states
def test_flax_nnx_model_and_optimizer_train_unchanged():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(16, 32, rngs=rngs)
            self.out = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    def init(hparams, key):
        model = MLP(nnx.Rngs(key))
        tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=hparams["weight_decay"])
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    def step(state, batch, hparams):
        model, optimizer = state
        loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
        optimizer.update(model, grads)
        return (model, optimizer), {"loss": loss}

    @nnx.jit
    def solo_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    batches = mlp_loop(10).batches(10)
    pop = tuning.Population(init, step, CONFIGS, key=KEY)
    losses = _run(pop, batches)
    for i, config in enumerate(CONFIGS):  # the model trained alone, the usual NNX way
        model, optimizer = init(tuning.as_hparams(config), tuning.seed_keys(KEY, 1)[0])
        solo = [float(solo_step(model, optimizer, *b)) for b in batches]
        np.testing.assert_allclose(losses[i], solo, rtol=1e-5)
    assert losses[:, -1].std() > 0


def test_linen_train_state_trains_unchanged():
    import flax.linen as nn
    from flax.training import train_state

    model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(4)])

    def init(hparams, key):
        tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=hparams["weight_decay"])
        params = model.init(key, jnp.zeros((1, 16)))
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def step(state, batch, hparams):
        def loss_fn(params):
            logits = state.apply_fn(params, batch[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss}

    batches = mlp_loop(10).batches(10)
    pop = tuning.Population(init, step, CONFIGS, key=KEY)
    losses = _run(pop, batches)
    solo_step = jax.jit(lambda s, b: step(s, b, None))
    for i, config in enumerate(CONFIGS):
        hparams = tuning.as_hparams(config)
        state = init(hparams, tuning.seed_keys(KEY, 1)[0])
        solo = []
        for b in batches:
            state, metrics = solo_step(state, b)
            solo.append(float(metrics["loss"]))
        np.testing.assert_allclose(losses[i], solo, rtol=1e-5)
    assert losses[:, -1].std() > 0


# ---------------------------------------------------------------- searches on loop code
def test_sweep_over_a_loop_equals_sweep_over_the_scan_and_solo_runs(loop):
    batches = loop.batches(20)
    looped = tuning.loop_train(
        loop.init, loop.step, batches=lambda: iter(batches), steps=20, evaluate=loop.evaluate
    )
    scan = tuning.sweep(loop.train, CONFIGS, key=KEY, seeds=2, progress=False)
    vmapped = tuning.sweep(looped, CONFIGS, key=KEY, seeds=2, progress=False)
    np.testing.assert_allclose(vmapped.metrics["full_loss"], scan.metrics["full_loss"], rtol=1e-5)
    alone = tuning.sweep(looped, CONFIGS, key=KEY, seeds=2, members_per_call=1, progress=False)
    for c, config in enumerate(CONFIGS):
        for s in range(2):
            state, _ = _solo(loop, config, 2, s, batches)
            expected = float(loop.evaluate(state)["full_loss"])
            np.testing.assert_allclose(alone.metrics["full_loss"][c, s], expected, rtol=1e-6)


def test_the_searches_drive_a_loop(loop):
    batches = loop.batches(20)
    looped = tuning.loop_train(
        loop.init, loop.step, batches=lambda: iter(batches), steps=20, evaluate=loop.evaluate
    )
    lrs, wds = [1e-3, 1e-2, 1e-1], [0.0, 0.1]
    searched = tuning.separable_search(
        looped, lrs, wds, key=KEY, metric="full_loss", progress=False
    )
    grid = tuning.sweep(
        loop.train, tuning.grid(learning_rate=lrs, weight_decay=wds), key=KEY, progress=False
    )
    assert searched.evaluations == 4
    for config, value in zip(searched.configs, searched.metrics["full_loss"][:, 0], strict=True):
        np.testing.assert_allclose(
            value, grid.metrics["full_loss"][grid.configs.index(config), 0], rtol=1e-5
        )
    pytest.importorskip("optuna")
    space = {"learning_rate": tuning.log_range(1e-3, 1e-1)}
    found = tuning.optuna_search(
        looped,
        space,
        n_trials=4,
        batch=2,
        key=KEY,
        metric="full_loss",
        fixed={"weight_decay": 0.1},
        progress=False,
    )
    again = tuning.sweep(loop.train, found.configs, key=KEY, progress=False)
    np.testing.assert_allclose(found.metrics["full_loss"], again.metrics["full_loss"], rtol=1e-5)


def test_a_member_frozen_in_a_loop_sweep_is_a_failure(loop):
    batches = loop.batches(20)
    looped = tuning.loop_train(
        loop.init, loop.step, batches=lambda: iter(batches), steps=20, evaluate=loop.evaluate
    )
    configs = [
        {"learning_rate": 1e-2, "weight_decay": 0.0},
        {"learning_rate": 1e30, "weight_decay": 0.1},
    ]
    with pytest.warns(RuntimeWarning, match="1 of 2 members"):
        results = tuning.sweep(looped, configs, key=KEY, progress=False)
    assert [f.config for f in results.failures] == [1]
    assert results.best("full_loss")[0] == configs[0]


# ---------------------------------------------------------------------- several devices
@pytest.mark.slow  # an 8-device worker process, as in test_sharding and test_tuning
def test_members_split_over_eight_devices_are_their_solo_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_population_sharding_worker.py"), str(tmp_path)],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = np.load(tmp_path / "population.npz")
    assert int(out["device_count"]) == 8
    # One member per device runs its solo program on its own leaves: bitwise.
    np.testing.assert_array_equal(out["mesh1"], out["solo"])
    np.testing.assert_array_equal(out["mesh1_state"], out["solo_state"])
    # Two members per device are vmapped: close in the calm configurations (lr <= 0.3, the
    # first twelve members), not bitwise; lr 1 and 3 are chaotic.
    np.testing.assert_allclose(out["mesh2"][:12], out["solo2"][:12], rtol=1e-5)
    assert not np.array_equal(out["mesh1"][0], out["mesh1"][1])


# ------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_by_name(loop):
    def shaped_by_hparams(hparams, key):
        return jnp.zeros(int(hparams["learning_rate"] * 1000))

    with pytest.raises(TypeError, match="init must return a state whose shapes"):
        tuning.Population(shaped_by_hparams, loop.step, CONFIGS, key=KEY)

    def growing(state, batch, hparams):
        (params, opt), metrics = loop.step(state, batch, hparams)
        return ({**params, "b1": jnp.concatenate([params["b1"], params["b1"]])}, opt), metrics

    pop = tuning.Population(loop.init, growing, CONFIGS, key=KEY)
    batch = loop.batches(1)[0]
    with pytest.raises(TypeError, match=r"step must return .* init's structure, shapes"):
        pop.step(batch)

    def per_example(state, batch, hparams):
        state, _ = loop.step(state, batch, hparams)
        return state, {"loss": jnp.zeros(batch[1].shape)}

    pop = tuning.Population(loop.init, per_example, CONFIGS, key=KEY)
    with pytest.raises(TypeError, match="step's metric 'loss' must be a real scalar per member"):
        pop.step(batch)
    pop = tuning.Population(loop.init, loop.step, CONFIGS, key=KEY)
    stacked = jax.tree.map(lambda x: jnp.stack([x] * 3), batch)
    with pytest.raises(
        ValueError, match=r"batch with per_member=True must have a leading member axis of length 4"
    ):
        pop.step(stacked, per_member=True)
    with pytest.raises(TypeError, match="per_member"):
        pop.step(batch, per_member="yes")
    with pytest.raises(ValueError, match=r"member must be in \[0, 3\]"):
        pop.stop(4)
    with pytest.raises(TypeError, match="step must be a function"):
        tuning.Population(loop.init, None, CONFIGS, key=KEY)
    with pytest.raises(ValueError, match="configs must hold at least one"):
        tuning.Population(loop.init, loop.step, [], key=KEY)
    with pytest.raises(ValueError, match="steps must be"):
        tuning.loop_train(loop.init, loop.step, batches=lambda: [], steps=0)
    short = tuning.loop_train(loop.init, loop.step, batches=lambda: iter(loop.batches(3)), steps=5)
    with pytest.raises(ValueError, match=r"batches.. must yield at least steps=5 batches"):
        tuning.sweep(short, CONFIGS, key=KEY, progress=False)
    pop.stop(0), pop.stop(1), pop.stop(2), pop.stop(3)
    with pytest.raises(ValueError, match="compact needs at least one active member"):
        pop.compact()
