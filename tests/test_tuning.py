"""adamw_jax.tuning: sweeps equal solo runs, chunking and sharding change nothing, the
searches find known optima with the stated budgets, and bad input is refused by name."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import elementwise_train, mlp_train

from adamw_jax import tuning

TESTS = Path(__file__).resolve().parent
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def mlp():
    return mlp_train(60)


@pytest.fixture(scope="module")
def configs():
    return tuning.grid(learning_rate=[3e-3, 3e-2, 3.0], weight_decay=[0.0, 0.1])


@pytest.fixture(scope="module")
def loop_results(mlp, configs):
    return tuning.sweep(mlp, configs, key=KEY, seeds=2, members_per_call=1, progress=True)


def _solo(train, config, seeds, seed):
    key = tuning.seed_keys(KEY, seeds)[seed]
    return jax.jit(train)(tuning.as_hparams(config), key)


# --------------------------------------------------------------------- values and grids
def test_log_values_and_grid_follow_their_formulas():
    values = tuning.log_values(1e-4, 1e-1, 7)
    np.testing.assert_allclose(values, 10.0 ** np.linspace(-4, -1, 7), rtol=1e-12)
    assert tuning.linear_values(0.9, 0.99, 4) == pytest.approx([0.9, 0.93, 0.96, 0.99])
    configs = tuning.grid(learning_rate=[1, 2], weight_decay=[3, 4, 5])
    assert [(c["learning_rate"], c["weight_decay"]) for c in configs] == [
        (1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)
    ]  # fmt: skip
    assert all(isinstance(v, float) for c in configs for v in c.values())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: tuning.log_range(0.0, 1.0), ValueError, "low must be a finite number in"),
        (lambda: tuning.log_range(-1e-3, 1.0), ValueError, r"low .*\(0, inf\)"),
        (lambda: tuning.log_range(1.0, 0.5), ValueError, "low must be smaller than high"),
        (lambda: tuning.log_values(1e-3, 1.0, 1), ValueError, "num must be in"),
        (lambda: tuning.linear_range(0.0, math.inf), ValueError, "high must be a finite"),
        (lambda: tuning.grid(), ValueError, "at least one axis"),
        (lambda: tuning.grid(learning_rate=[]), ValueError, "learning_rate must hold at least"),
        (lambda: tuning.grid(weight_decay=[0.1, math.nan]), ValueError, "weight_decay must hold"),
        (lambda: tuning.grid(weight_decay=0.1), TypeError, "weight_decay must be a sequence"),
    ],
)
def test_spaces_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------- sweeps
def test_loop_members_are_bitwise_equal_to_solo_runs(mlp, configs, loop_results):
    results = loop_results
    assert results.metrics["loss"].shape == (len(configs), 2)
    assert results.evaluations == 2 * len(configs)
    for c, config in enumerate(configs):
        for s in range(2):
            solo = _solo(mlp, config, 2, s)
            assert results.metrics["loss"][c, s] == float(solo["loss"]), (config, s)
            assert results.metrics["w_norm"][c, s] == float(solo["w_norm"]), (config, s)
    # The seeds differ, and so do the configurations: nothing is broadcast by mistake.
    assert len(np.unique(results.metrics["loss"])) == results.evaluations


def test_vmapped_members_with_every_hyperparameter_batched_are_bitwise_solo_runs():
    """The optimizer's arithmetic does not change when its hyperparameters are batched:
    with no matrix products in the model, vmapped members equal solo runs bit for bit, in
    a chaotic configuration, with lr (a schedule's peak), weight decay, b1, b2 and eps all
    varying."""
    train = elementwise_train(80)
    configs = [
        {"learning_rate": 0.3, "weight_decay": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
        {"learning_rate": 0.05, "weight_decay": 1.0, "b1": 0.5, "b2": 0.95, "eps": 1e-3},
        {"learning_rate": 0.2, "weight_decay": 0.0, "b1": 0.0, "b2": 0.9, "eps": 1e-6},
    ]
    results = tuning.sweep(train, configs, key=KEY, members_per_call=3, progress=False)
    for c, config in enumerate(configs):
        solo = _solo(train, config, 1, 0)
        assert results.metrics["w_sum"][c, 0] == float(solo["w_sum"]), config
    nudged = {**configs[0], "b2": float(np.nextafter(np.float32(0.999), np.float32(0)))}
    assert float(_solo(train, nudged, 1, 0)["w_sum"]) != results.metrics["w_sum"][0, 0]


def test_vmapped_members_with_matrix_products_are_close_to_solo_runs(mlp, configs, loop_results):
    """XLA computes batched matrix products with other kernels than unbatched ones: a
    vmapped member of a model with matmuls is within 1e-6 (relative) of its solo run in
    calm configurations, not bitwise; at lr 3 training amplifies that into a visible
    difference, so the bitwise equalities of the loop and of one member per device are
    not luck."""
    vmapped = tuning.sweep(mlp, configs, key=KEY, seeds=2, members_per_call=4, progress=False)
    calm = [c for c, config in enumerate(configs) if config["learning_rate"] < 1.0]
    chaotic = [c for c, config in enumerate(configs) if config["learning_rate"] >= 1.0]
    for name in ("loss", "w_norm"):
        np.testing.assert_allclose(
            vmapped.metrics[name][calm], loop_results.metrics[name][calm], rtol=1e-6
        )
    w_norm, reference = vmapped.metrics["w_norm"][chaotic], loop_results.metrics["w_norm"][chaotic]
    assert np.max(np.abs(w_norm - reference) / reference) > 1e-4


def test_chunked_equals_one_call_and_padding_is_dropped():
    train = elementwise_train(30)
    configs = tuning.grid(learning_rate=[0.01, 0.1, 0.3], weight_decay=[0.0, 0.5])
    one_call = tuning.sweep(train, configs, key=KEY, seeds=2, members_per_call=12, progress=False)
    chunked = tuning.sweep(train, configs, key=KEY, seeds=2, members_per_call=5, progress=False)
    chex.assert_trees_all_equal(one_call.metrics, chunked.metrics)
    assert chunked.configs == configs


@pytest.mark.slow
def test_member_axis_split_over_eight_devices_equals_unsharded(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_tuning_sharding_worker.py"), str(tmp_path)],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = np.load(tmp_path / "tuning.npz")
    assert int(out["device_count"]) == 8
    # One member per device runs each member's own unbatched program: bitwise, even at lr 3.
    np.testing.assert_array_equal(out["mlp/mesh/loss"], out["mlp/loop/loss"])
    np.testing.assert_array_equal(out["elementwise/mesh2/loss"], out["elementwise/loop/loss"])
    # Two members per device are vmapped: close in the calm configurations (lr <= 0.1, the
    # first six), not bitwise; the last two (lr 3) are chaotic.
    np.testing.assert_allclose(out["mlp/mesh2/loss"][:6], out["mlp/loop/loss"][:6], rtol=1e-5)


def test_every_traced_hyperparameter_reaches_the_optimizer():
    """adamw with the paper's coupling, a traced peak in the schedule and in
    peak_learning_rate, equals the same optimizer built from Python floats."""
    train = mlp_train(10, coupling="schedule")
    config = {"learning_rate": 0.02, "weight_decay": 0.3, "b1": 0.8, "b2": 0.99, "eps": 1e-6}
    no_decay = {**config, "weight_decay": 0.0}
    swept = tuning.sweep(train, [config, no_decay], key=KEY, progress=False)
    key = tuning.seed_keys(KEY, 1)[0]
    with jax.numpy_dtype_promotion("standard"):
        reference = jax.jit(lambda k: train(config, k))(key)
    np.testing.assert_allclose(swept.metrics["loss"][0, 0], reference["loss"], rtol=1e-5)
    assert swept.metrics["w_norm"][1, 0] > swept.metrics["w_norm"][0, 0]


# --------------------------------------------------------------------- bad input, NaNs
def test_non_finite_metrics_are_reported_per_member_not_raised():
    def train(h, key):
        loss = jnp.where(h["learning_rate"] > 0.5, jnp.nan, h["learning_rate"] ** 2)
        return {"loss": loss + 0.0 * jax.random.uniform(key)}

    configs = [{"learning_rate": v} for v in (0.1, 0.9, 0.3)]
    with pytest.warns(RuntimeWarning, match="1 of 3 members returned a non-finite metric"):
        results = tuning.sweep(train, configs, key=KEY, progress=False)
    assert [(f.config, f.seed, f.metric) for f in results.failures] == [(1, 0, "loss")]
    assert results.best("loss") == ({"learning_rate": 0.1}, {"loss": pytest.approx(0.01)})
    assert results.best("loss", mode="max")[0] == {"learning_rate": 0.3}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"configs": []}, ValueError, "configs must hold at least one"),
        ({"configs": {"learning_rate": 0.1}}, TypeError, "configs must be a list of dicts"),
        (
            {"configs": [{"learning_rate": 0.1}, {"lr": 0.1}]},
            ValueError,
            r"configs must all have the same names.*configs\[1\]",
        ),
        ({"configs": [{"learning_rate": "0.1"}]}, TypeError, "configs.0..'learning_rate'."),
        ({"members_per_call": 0}, ValueError, "members_per_call must be in"),
        ({"members_per_call": 1.5}, TypeError, r"members_per_call must be an int in \[1, inf\)"),
        ({"members_per_call": True}, TypeError, r"members_per_call must be an int in \[1, inf\)"),
        ({"seeds": 0}, ValueError, "seeds must be in"),
        ({"key": 0}, TypeError, "key must be one PRNG key"),
        ({"progress": "yes"}, TypeError, "progress must be True, False or None"),
    ],
)
def test_sweep_refuses_bad_input(kwargs, error, match):
    def train(h, key):
        return {"loss": h["learning_rate"] ** 2}

    args = {"configs": [{"learning_rate": 0.1}], "key": KEY, "progress": False, **kwargs}
    configs = args.pop("configs")
    with pytest.raises(error, match=match):
        tuning.sweep(train, configs, **args)


@pytest.mark.parametrize(
    ("returned", "match"),
    [
        (lambda h: h["learning_rate"], "train must return a non-empty dict"),
        (
            lambda h: {"loss": jnp.ones(3) * h["learning_rate"]},
            "metric 'loss' must be a real scalar",
        ),
        (lambda h: {}, "train must return a non-empty dict"),
    ],
)
def test_train_must_return_a_dict_of_scalars(returned, match):
    with pytest.raises(TypeError, match=match):
        tuning.sweep(lambda h, k: returned(h), [{"learning_rate": 0.1}], key=KEY, progress=False)


def test_progress_bar_without_tqdm_is_refused_by_name_or_left_out(monkeypatch, configs):
    trained = []

    def train(h, key):
        trained.append(h)
        return {"loss": h["learning_rate"] ** 2 + h["weight_decay"]}

    expected = tuning.sweep(train, configs, key=KEY, progress=False)
    trained.clear()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(
        ImportError, match=r"progress=True needs tqdm.*pip install 'adamw_jax\[tune\]'"
    ):
        tuning.sweep(train, configs, key=KEY, progress=True)
    assert not trained  # refused before anything is traced
    # The default asks for a bar only where tqdm is installed.
    quiet = tuning.sweep(train, configs, key=KEY)
    np.testing.assert_array_equal(quiet.metrics["loss"], expected.metrics["loss"])


def test_import_adamw_jax_leaves_tuning_and_its_extras_unimported():
    # One fresh interpreter: what `import adamw_jax` loads, then what `adamw_jax.tuning` adds
    # (`from adamw_jax import tuning` imports adamw_jax first in any case).
    code = (
        "import sys; names = sys.argv[1:]; import adamw_jax; "
        "print([m in sys.modules for m in names]); from adamw_jax import tuning; "
        "print([m in sys.modules for m in names])"
    )
    names = ["adamw_jax.tuning", "tqdm", "optuna"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    after_adamw_jax, after_tuning = proc.stdout.strip().splitlines()
    assert after_adamw_jax == str([False] * len(names)), proc.stdout
    assert after_tuning == str([True, False, False]), proc.stdout


# ------------------------------------------------------------------------------ results
def test_results_records_and_files_round_trip(tmp_path, configs):
    train = elementwise_train(10)
    results = tuning.sweep(train, configs, key=KEY, seeds=2, progress=False)
    records = results.to_records()
    assert len(records) == results.evaluations == 12
    assert records[3] == {
        "config": 1,
        "seed": 1,
        **configs[1],
        "loss": results.metrics["loss"][1, 1],
        "w_sum": results.metrics["w_sum"][1, 1],
    }
    with results.save(tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in records]
    loaded = json.loads(results.save(tmp_path / "r.json").read_text())
    assert loaded == records
    with pytest.raises(ValueError, match=r"path must end in \.csv or \.json"):
        results.save(tmp_path / "r.txt")
    with pytest.raises(KeyError, match="metric must be one of"):
        results.best("accuracy")


# ----------------------------------------------------------------------------- searches
def _bowl(h, key):
    """A separable function of log10 lr and log10 wd, best at lr = 1e-2, wd = 1e-3."""
    lr, wd = jnp.log10(h["learning_rate"]), jnp.log10(h["weight_decay"])
    return {"loss": (lr + 2.0) ** 2 + 0.5 * (wd + 3.0) ** 2 + 0.0 * jax.random.uniform(key)}


def _valley(h, key):
    """Not separable: best along the diagonal log10 wd = -log10 lr - 5, lowest at lr 1e-2."""
    lr, wd = jnp.log10(h["learning_rate"]), jnp.log10(h["weight_decay"])
    return {"loss": (wd + lr + 5.0) ** 2 + 0.5 * (lr + 2.0) ** 2}


def test_separable_search_finds_a_separable_optimum_with_one_line_each():
    lrs, wds = tuning.log_values(1e-5, 1e-1, 9), tuning.log_values(1e-6, 1e-1, 11)
    results = tuning.separable_search(_bowl, lrs, wds, key=KEY, metric="loss", progress=False)
    best, metrics = results.best("loss")
    assert best == pytest.approx({"learning_rate": 1e-2, "weight_decay": 1e-3})
    assert metrics["loss"] == pytest.approx(0.0, abs=1e-9)
    assert results.evaluations == len(lrs) + len(wds) - 1  # the lines cross once
    full = tuning.sweep(_bowl, tuning.grid(learning_rate=lrs, weight_decay=wds), key=KEY,
                        progress=False)  # fmt: skip
    assert full.best("loss")[0] == best and results.evaluations <= full.evaluations / 3


def test_separable_search_needs_more_rounds_on_a_diagonal():
    lrs, wds = tuning.log_values(1e-4, 1.0, 17), tuning.log_values(1e-6, 1e-2, 17)
    kwargs = {"key": KEY, "metric": "loss", "progress": False}
    losses, evaluations = [], []
    for rounds in (1, 2, 3):
        results = tuning.separable_search(_valley, lrs, wds, rounds=rounds, **kwargs)
        losses.append(results.best("loss")[1]["loss"])
        evaluations.append(results.evaluations)
    # Coordinate search creeps along the valley: each round is better, and costs one lr
    # line and one decay line (less the configurations already evaluated).
    assert losses[0] > losses[1] > losses[2]
    assert evaluations[0] == len(lrs) + len(wds) - 1
    assert evaluations[0] < evaluations[1] < evaluations[2] < 3 * evaluations[0]
    start = {"learning_rate": 1e-2, "weight_decay": 1e-3}
    from_start = tuning.separable_search(_valley, lrs, wds, start=start, **kwargs)
    assert from_start.best("loss")[0] == pytest.approx(start)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": [0.0, 0.1]}, r"learning_rate must hold numbers in \(0, inf\)"),
        ({"weight_decay": [-0.1]}, r"weight_decay must hold numbers in \[0, inf\)"),
        ({"rounds": 0}, "rounds must be in"),
        ({"start": {"lr": 0.1}}, "start must be None or a dict"),
        ({"fixed": {"learning_rate": 0.1}}, "fixed must not name a searched"),
        ({"mode": "best"}, "mode must be one of"),
    ],
)
def test_separable_search_refuses_bad_input(kwargs, match):
    args = {"learning_rate": [1e-3, 1e-2], "weight_decay": [0.0, 0.1], **kwargs}
    lrs, wds = args.pop("learning_rate"), args.pop("weight_decay")
    with pytest.raises((ValueError, TypeError), match=match):
        tuning.separable_search(_bowl, lrs, wds, key=KEY, metric="loss", progress=False, **args)


def test_optuna_search_is_reproducible_and_finds_a_known_optimum():
    space = {
        "learning_rate": tuning.log_range(1e-5, 1.0),
        "weight_decay": tuning.log_range(1e-6, 1.0),
    }
    kwargs = {"n_trials": 40, "batch": 8, "metric": "loss", "progress": False}
    a = tuning.optuna_search(_bowl, space, key=KEY, **kwargs)
    b = tuning.optuna_search(_bowl, space, key=KEY, **kwargs)
    assert a.configs == b.configs and a.evaluations == 40
    c = tuning.optuna_search(_bowl, space, key=jax.random.key(8), **kwargs)
    assert c.configs != a.configs
    best, _ = a.best("loss")
    assert abs(math.log10(best["learning_rate"]) + 2) < 0.5
    assert abs(math.log10(best["weight_decay"]) + 3) < 0.7
    first_batch_best = a.mean("loss")[:8].min()
    assert a.best("loss")[1]["loss"] < first_batch_best  # the model improved on random


def test_optuna_search_refuses_bad_spaces_and_samplers():
    kwargs = {"n_trials": 2, "batch": 2, "key": KEY, "metric": "loss", "progress": False}
    with pytest.raises(TypeError, match=r"space\['learning_rate'\] must be tuning.log_range"):
        tuning.optuna_search(_bowl, {"learning_rate": (1e-3, 1e-1)}, **kwargs)
    with pytest.raises(ValueError, match="sampler must be None, 'tpe', 'gp'"):
        space = {"learning_rate": tuning.log_range(1e-3, 1e-1)}
        tuning.optuna_search(_bowl, space, sampler="random", fixed={"weight_decay": 1e-3}, **kwargs)


def test_optuna_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"pip install 'adamw_jax\[tune\]'"):
        tuning.optuna_search(_bowl, {"learning_rate": tuning.log_range(1e-3, 1e-1)}, n_trials=1,
                             batch=1, key=KEY, metric="loss")  # fmt: skip
