"""Tests of adamw_jax.sharding: state placed like the params, ZeRO-1, multi-process training.

The multi-device checks need 8 CPU devices, which JAX only creates if
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before its backend starts;
this process has started it already, so they run in fresh processes
(``_sharding_worker.py``, ``_distributed_worker.py``) and are asserted here. The checks of
the matching logic itself run in this process on a one-device mesh.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adamw_jax
from adamw_jax import sharding

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TOL = 1e-6


def _env(device_count: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    env = dict(
        os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={device_count}"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.pop("JAX_PLATFORMS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_worker(script: str, out: Path, timeout: int) -> None:
    """Runs ``tests/<script> OUT`` in a fresh process with 8 CPU devices."""
    proc = subprocess.run(
        [sys.executable, str(TESTS / script), str(out)],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> tuple[dict, Path]:
    """Runs the 8-device worker once; its measurements and its output folder."""
    out = tmp_path_factory.mktemp("sharding")
    _run_worker("_sharding_worker.py", out, timeout=180)
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.slow
def test_worker_sees_eight_devices(eight_devices):
    results, _ = eight_devices
    assert results["device_count"] == 8


@pytest.mark.slow
def test_sharded_steps_match_unsharded(eight_devices):
    results, _ = eight_devices
    dtypes = ["float32", "bfloat16", "int8"]
    assert results["moment_dtypes"] == dtypes
    diffs = results["agreement_max_abs_diff"]
    assert set(diffs) == {f"{c}/{d}" for c in ("lr", "schedule", "none") for d in dtypes}
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"sharded and unsharded AdamW differ after 50 steps: {bad}"


@pytest.mark.slow
def test_moments_are_sharded_like_their_params(eight_devices):
    results, _ = eight_devices
    quantized = 0
    for case, leaves in results["moment_vs_param_sharding"].items():
        for name, moments in leaves.items():
            for moment in moments:  # mu, nu
                assert moment["same"], (case, name, moment)
                quantized += moment["quantized"]
    # int8 moments were placed as QuantizedArrays (codes and scales), not plain arrays:
    # mu and nu of 3 leaves, for 3 couplings.
    assert quantized == 18
    # A step jitted without out_shardings keeps them there too.
    assert results["propagated_moment_sharding_kept"]


@pytest.mark.slow
def test_optimizer_step_has_no_collectives(eight_devices):
    results, _ = eight_devices
    found = results["collectives"]
    for mesh in ("1d_data", "2d_data_model"):
        cases = {k: v for k, v in found.items() if k.startswith(mesh + "/")}
        assert cases and all(v == [] for v in cases.values()), cases
    # The detector does see collectives where they are needed (ZeRO-1 gathers updates).
    controls = {k: v for k, v in found.items() if k.startswith("zero1_control/")}
    assert controls and all("all-gather" in v for v in controls.values()), controls


@pytest.mark.slow
def test_zero1_holds_one_eighth_of_the_moments_per_device(eight_devices):
    results, _ = eight_devices
    z = results["zero1"]
    assert z["max_abs_diff"] <= TOL
    assert z["params_still_replicated"]
    per_device = z["moment_bytes_per_device"]
    assert sorted(per_device) == [str(i) for i in range(8)]
    # An eighth of every moment, plus a full copy of the moments of the scalar param.
    scalar = z["scalar_moment_bytes"]
    split = z["moment_bytes_total"] - scalar
    assert scalar == 8 and split % 8 == 0
    assert all(b == split // 8 + scalar for b in per_device.values()), per_device
    # The whole state adds two int32 step counts on every device.
    one_device = z["state_bytes_one_device"]["0"]
    assert one_device == z["moment_bytes_total"] + 8
    assert all(b == split // 8 + scalar + 8 for b in z["state_bytes_per_device"].values())
    assert all(b == one_device for b in z["state_bytes_per_device_replicated"].values())
    assert z["moment_specs"]["w"] == "P('data', None)"
    assert z["moment_specs"]["scale"] == "P()"
    # Leaves with no dimension divisible by 8 stay as their param; others split the first one.
    assert z["odd_shape_specs"] == {"odd": "P()", "late": "P(None, 'data')"}
    # bf16 and int8 moments: same trajectory, and 1/8 of their bytes per device too.
    for dtype in ["bfloat16", "int8"]:
        zd = z[dtype]
        assert zd["max_abs_diff"] <= TOL, (dtype, zd)
        split = zd["moment_bytes_total"] - zd["scalar_moment_bytes"]
        assert split % 8 == 0, (dtype, zd)
        expected = split // 8 + zd["scalar_moment_bytes"]
        assert set(zd["moment_bytes_per_device"].values()) == {expected}, (dtype, zd)


@pytest.mark.slow
def test_int8_scales_follow_whole_blocks(eight_devices):
    """Scales are split like the codes only where every shard holds whole blocks of 8."""
    results, _ = eight_devices
    assert results["int8_blocks"] == {
        "model_aligned": ["P(None, 'model')", "P(None, 'model')"],
        "model_ragged": ["P(None, 'model')", "P(None, None)"],
        "zero_first_dim": ["P('data', None)", "P('data', None)"],
        "zero_last_dim_aligned": ["P(None, 'data')", "P(None, 'data')"],
        "zero_last_dim_ragged": ["P()", "P(None, None)"],
    }


@pytest.mark.slow
def test_int4_moments_shard_like_their_params(eight_devices):
    """4-bit codes (last axis halved) split like their params where every shard holds whole
    bytes and blocks of 8; the same trajectory sharded, and split 8 ways under ZeRO-1."""
    results, _ = eight_devices
    r = results["int4"]
    assert r["max_abs_diff"] <= TOL and r["zero1_max_abs_diff"] <= TOL, r
    assert r["w_mu"] == ["QuantizedArray4", "P(None, 'model')", "P(None, 'model')"]
    split = r["zero1"]["moment_bytes_total"] - r["zero1"]["scalar_moment_bytes"]
    assert set(r["zero1"]["moment_bytes_per_device"].values()) == {
        split // 8 + r["zero1"]["scalar_moment_bytes"]
    }
    assert r["model_aligned"] == ["P(None, 'model')", "P(None, 'model')", [16, 32]]
    assert r["model_ragged"] == ["P(None, 'model')", "P(None, None)", [16, 30]]
    # 3 of a row's 6 elements per shard: a byte would span two shards, so the codes' last
    # axis is kept whole (so are the scales: the row is one block).
    assert r["model_odd_bytes"] == ["P(None, None)", "P(None, None)", [16, 3]]
    assert r["zero_last_dim_aligned"] == ["P(None, 'data')", "P(None, 'data')", [3, 32]]
    assert r["zero_last_dim_ragged"] == ["P()", "P(None, None)", [3, 16]]


@pytest.mark.slow
def test_abstract_init_matches_concrete(eight_devices):
    results, _ = eight_devices
    for zero_axis, checks in results["abstract"].items():
        assert all(checks.values()), (zero_axis, checks)


@pytest.mark.slow
def test_single_device_params_get_their_device_not_the_default(eight_devices):
    """Params on device 5 without a mesh: every state leaf, step counts included, goes there.

    Device 5 is not the default device, where plain ``jax.jit(tx.init)`` puts the state.
    """
    single = eight_devices[0]["single_device"]
    assert single["param_device"] == 5
    assert single["shardings_are_the_params"]
    assert single["state_devices"] == [5] and single["state_leaves"] == 8
    assert single["plain_jit_init_devices"] == [0]  # the check can see a wrong placement


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(eight_devices, tmp_path):
    _, out = eight_devices
    single = np.load(out / "single_process.npz")
    result_path = tmp_path / "two_processes.npz"
    port = _free_port()
    env = _env(4)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "_distributed_worker.py"),
                str(port),
                str(i),
                str(result_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.perf_counter() - start
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    multi = np.load(result_path)
    assert sorted(multi.files) == sorted(single.files)
    chex.assert_trees_all_close(dict(multi), dict(single), rtol=0.0, atol=TOL)
    print(f"two-process jax.distributed run: {elapsed:.1f} s")


# ---- the matching itself, in this process, on a one-device mesh -------------------------


@pytest.fixture
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


@pytest.fixture
def params(mesh) -> dict[str, jax.Array]:
    specs = {"w": P(None, "model"), "emb": P("data", None), "b": P("model"), "s": P()}
    shapes = {"w": (4, 6), "emb": (8, 4), "b": (6,), "s": ()}
    return {
        k: jax.device_put(jnp.ones(shapes[k], jnp.float32), NamedSharding(mesh, specs[k]))
        for k in specs
    }


def _check_placement(tx, params, state_sh):
    """Every state leaf shaped like a param of the same name has its sharding; others P()."""
    state = jax.eval_shape(tx.init, params)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    shardings = jax.tree.leaves(state_sh)
    assert len(leaves) == len(shardings)
    matched = 0
    for (path, leaf), sh in zip(leaves, shardings, strict=True):
        last = path[-1]
        name = getattr(last, "key", None)
        if name in params and leaf.shape == params[name].shape:
            assert sh == params[name].sharding, jax.tree_util.keystr(path)
            matched += 1
        else:
            assert sh.spec == P(), jax.tree_util.keystr(path)
    return matched


@pytest.mark.parametrize(
    "make_tx, expected_matches",
    [
        (lambda: adamw_jax.adamw(1e-3), 8),
        (lambda: adamw_jax.adamw(1e-3, amsgrad=True, mu_dtype=jnp.bfloat16), 12),
        (lambda: optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-3), 8),
        (lambda: optax.MultiSteps(adamw_jax.adamw(1e-3), 4), 12),
        (lambda: optax.chain(optax.clip_by_global_norm(1.0), adamw_jax.adam(1e-3, l2=1e-4)), 8),
        # masked: "b" and "s" are MaskedNodes in the inner state; matched by key path.
        (
            lambda: optax.masked(
                adamw_jax.adamw(1e-3), {"w": True, "emb": True, "b": False, "s": False}
            ),
            4,
        ),
    ],
)
def test_state_leaves_matched_through_wrappers(params, make_tx, expected_matches):
    tx = make_tx()
    assert _check_placement(tx, params, sharding.state_shardings(tx, params)) == expected_matches
    # sharding.init gives tx.init's state, each leaf placed by the same rule.
    state = sharding.init(tx, params)
    chex.assert_trees_all_equal(state, tx.init(params))
    placed = jax.tree.map(lambda x: x.sharding, state)
    assert _check_placement(tx, params, placed) == expected_matches


def test_params_as_a_single_array(mesh):
    w = jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P("data")))
    state_sh = sharding.state_shardings(adamw_jax.adamw(1e-3), w)
    assert state_sh[0].mu == w.sharding and state_sh[0].nu == w.sharding
    assert state_sh[0].count.spec == P() and state_sh[1].count.spec == P()


def test_leaf_of_another_shape_is_replicated(params):
    """A state leaf matched to a param but laid out differently (here flattened)."""

    def init_fn(p):
        return {"flat": jax.tree.map(lambda x: jnp.zeros(x.size, x.dtype), p), "same": p}

    tx = optax.GradientTransformation(init_fn, lambda u, s, p=None: (u, s))
    state_sh = sharding.state_shardings(tx, params)
    # Matrices flatten to another shape: replicated. Vectors keep their shape and sharding.
    assert state_sh["flat"]["w"].spec == P() and state_sh["flat"]["emb"].spec == P()
    assert state_sh["flat"]["b"] == params["b"].sharding
    assert state_sh["same"]["w"] == params["w"].sharding


def test_zero_axis_splits_first_free_dimension(params):
    state_sh = sharding.state_shardings(adamw_jax.adamw(1e-3), params, zero_axis="data")
    mu = state_sh[0].mu
    assert mu["w"].spec == P("data", "model")  # dim 0 was free
    assert mu["emb"] == params["emb"].sharding  # already split over "data"
    assert mu["b"] == params["b"].sharding  # its only dimension is taken
    assert mu["s"].spec == P()
    assert state_sh[0].count.spec == P()


def test_bad_arguments(params, mesh):
    tx = adamw_jax.adamw(1e-3)
    with pytest.raises(ValueError, match=r"zero_axis must be one of the mesh axes.*'batch'"):
        sharding.state_shardings(tx, params, zero_axis="batch")
    with pytest.raises(ValueError, match="params carry no sharding"):
        sharding.state_shardings(tx, {"w": np.ones(3, np.float32)})
    other = Mesh(np.array(jax.devices()[:1]), ("x",))
    mixed = {
        "a": jax.device_put(jnp.ones(2), NamedSharding(mesh, P())),
        "b": jax.device_put(jnp.ones(2), NamedSharding(other, P())),
    }
    with pytest.raises(ValueError, match="one mesh"):
        sharding.state_shardings(tx, mixed)
    single = {"w": jax.device_put(jnp.ones(2), jax.devices()[0])}
    with pytest.raises(ValueError, match="zero_axis='data' needs params placed with a Named"):
        sharding.state_shardings(tx, single, zero_axis="data")


@pytest.mark.slow
def test_sharded_training_example_runs():
    """examples/sharded_training.py --quick on 8 CPU devices: state bytes shrink, loss drops."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sharded_training.py"), "--quick", "--zero"],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "8 devices (cpu), mesh {'data': 4, 'model': 2}" in out, out
    per_device = {
        m.group(1).strip(): int(m.group(2).replace(",", ""))
        for m in re.finditer(r"optimizer state per device, (.+?)\s+([\d,]+) bytes", out)
    }
    replicated = per_device["one device (or replicated)"]
    sharded = per_device["sharded like the params"]
    zero = per_device["ZeRO-1 over 'data'"]
    assert zero < sharded < replicated, per_device
    held = re.search(r"this run holds ([\d,]+)\.\.([\d,]+) bytes per device", out)
    assert held and int(held.group(2).replace(",", "")) == zero, out
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) bits/char", out).groups())
    assert last < first - 0.2, out


@pytest.fixture(scope="module")
def explicit_runs(tmp_path_factory) -> dict:
    """Runs the explicit/auto-mesh worker once (8 devices); its results by case."""
    out = tmp_path_factory.mktemp("explicit")
    _run_worker("_explicit_sharding_worker.py", out, timeout=300)
    return json.loads((out / "explicit.json").read_text())


EXPLICIT_CASES = [
    "tree",
    "tree_amsgrad",
    "packed",
    "packed_amsgrad",
    "bfloat16",
    "float16",
    "int8",
    "int4",
    "torch_adamw",
    "keras_adamw",
]


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("case", EXPLICIT_CASES)
def test_moments_are_born_with_their_params_sharding_type(explicit_runs, case, axis_type):
    """init's state has the types update returns, so a lax.scan loop runs; same numbers."""
    assert explicit_runs["devices"] == 8
    run = explicit_runs[f"{case}/{axis_type}"]
    assert "error" not in run, run.get("error")
    assert run["types_init"] == run["types_out"]
    assert run["max_rel_diff"] <= TOL
    if axis_type == "Explicit" and not case.startswith("packed"):
        # w is sharded P("x", "y"): its moment (or codes) carries that in its type.
        expected = "16@x,128@y" if case == "int4" else "16@x,256@y"  # 4-bit: 2 per byte
        assert expected in run["moment_type"], run["moment_type"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_blocks_that_would_span_explicit_shards_are_refused(explicit_runs, dtype):
    refused = explicit_runs[f"{dtype}_blocks_span_shards/Explicit"]
    assert "ValueError" in refused.get("error", ""), refused
    assert "block_size=32" in refused["error"] and "shards of 16" in refused["error"]
    assert f"mu_dtype='{dtype}'" in refused["error"]
    # Under auto axes the compiler moves data as needed: the same run works.
    auto = explicit_runs[f"{dtype}_blocks_span_shards/Auto"]
    assert auto["types_init"] == auto["types_out"] and auto["max_rel_diff"] <= TOL


def _specs_by_tree_map_params(tx, params):
    specs = jax.tree.map(lambda p: p.sharding.spec, params)
    return optax.tree_utils.tree_map_params(
        tx,
        lambda _, spec: spec,
        tx.init(params),
        specs,
        transform_non_params=lambda _: P(),
    )


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: adamw_jax.adamw(1e-3),
        lambda: adamw_jax.adamw(1e-3, amsgrad=True, mu_dtype=jnp.bfloat16),
        lambda: adamw_jax.adam(1e-3, l2=1e-4),
        lambda: adamw_jax.compat.torch_adamw(1e-3),
    ],
)
def test_optax_tree_map_params_on_tree_layouts_agrees_with_state_shardings(params, make_tx):
    """What MaxText-style code builds with Optax's helper is what state_shardings gives."""
    tx = make_tx()
    by_optax = _specs_by_tree_map_params(tx, params)
    ours = jax.tree.map(lambda s: s.spec, sharding.state_shardings(tx, params))
    assert jax.tree.structure(by_optax) == jax.tree.structure(ours)
    assert jax.tree.leaves(by_optax) == jax.tree.leaves(ours)


@pytest.mark.parametrize(
    ("options", "node"),
    [
        ({"mu_dtype": "int8", "nu_dtype": "int8", "min_quantize_size": 4}, "QuantizedArray"),
        ({"moment_layout": "packed"}, "PackedMoments"),
    ],
)
def test_optax_tree_map_params_fails_clearly_where_moments_are_not_param_shaped(
    params, options, node
):
    """A moment that is not one array shaped like its param cannot take the param's spec.

    Optax's helper then raises a structure error naming our node type; the documented
    way is ``sharding.state_shardings``, which places every part of such a moment.
    """
    tx = adamw_jax.adamw(1e-3, **options)
    with pytest.raises(ValueError, match=node):
        _specs_by_tree_map_params(tx, params)
    placed = sharding.state_shardings(tx, params)
    state = tx.init(params)
    assert jax.tree.structure(placed) == jax.tree.structure(state)
