"""The 8-device measurements of ``test_sharding.py``, run in a fresh process.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only takes effect if it is set before
JAX starts its CPU backend, which the test process has already done; so the test runs
``python tests/_sharding_worker.py OUT_DIR`` with that flag, and this script writes what it
measured to ``OUT_DIR/results.json`` (and the single-process reference of the two-process
run to ``OUT_DIR/single_process.npz``). The assertions are in ``test_sharding.py``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adamw_jax
from adamw_jax import sharding

STEPS = 50
COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)")
COUPLINGS = ("lr", "schedule", "none")
SPECS_2D = {"emb": P("data", None), "w": P(None, "model"), "b": P("model"), "scale": P()}
MOMENT_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "int8": "int8"}


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _problem(specs: dict[str, P]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial params and the per-step gradient noise, as host arrays."""
    rng = np.random.default_rng(1)
    shapes = {"emb": (64, 16), "w": (16, 64), "b": (64,), "scale": ()}
    params = {k: rng.normal(size=shapes[k]).astype(np.float32) for k in specs}
    noise = {k: rng.normal(size=(STEPS, *shapes[k])).astype(np.float32) for k in specs}
    return params, noise


def _tx(coupling: str, dtype: Any) -> optax.GradientTransformation:
    def lr(t):
        return 1e-2 * jnp.minimum(1.0, (t.astype(jnp.float32) + 1.0) / 10.0)

    decay = {
        "weight_decay": 0.1 if coupling != "none" else 1e-3,
        "mask": adamw_jax.masks.by_ndim(2),
        "decay_coupling": coupling,
        "peak_learning_rate": 1e-2 if coupling == "schedule" else None,
    }
    if dtype in ("int8", "int4"):
        # adamw's chain, with blocks small enough for these small leaves (and whole blocks
        # in every shard of the meshes used here).
        adam = adamw_jax.scale_by_adam(
            mu_dtype=dtype, nu_dtype=dtype, block_size=8, min_quantize_size=64
        )
        return optax.chain(adam, adamw_jax.decoupled_weight_decay(lr, **decay))
    stored = MOMENT_DTYPES[dtype]
    return adamw_jax.adamw(lr, **decay, mu_dtype=stored, nu_dtype=stored)


def _grads(params, noise):
    """An elementwise gradient (no reduction, so every layout computes the same numbers)."""
    return jax.tree.map(lambda p, n: 0.5 * p + n, params, noise)


def _make_step(tx, out_shardings=None):
    def step(params, state, noise):
        updates, state = tx.update(_grads(params, noise), state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, out_shardings=out_shardings)


def _run(tx, host_params, host_noise, shardings=None, zero_axis=None):
    """``STEPS`` steps; unsharded on one device when ``shardings`` is None."""
    if shardings is None:
        params = jax.tree.map(jnp.asarray, host_params)
        state = tx.init(params)
        step = _make_step(tx)
        noise_at = lambda t: {k: jnp.asarray(v[t]) for k, v in host_noise.items()}  # noqa: E731
    else:
        params = jax.device_put(host_params, shardings)
        state = sharding.init(tx, params, zero_axis=zero_axis)
        state_sh = sharding.state_shardings(tx, params, zero_axis=zero_axis)
        step = _make_step(tx, out_shardings=(shardings, state_sh))
        noise_at = lambda t: jax.device_put({k: v[t] for k, v in host_noise.items()}, shardings)  # noqa: E731
    for t in range(STEPS):
        params, state = step(params, state, noise_at(t))
    return params, state


_REFERENCES: dict[tuple[str, str], Any] = {}


def _reference(coupling: str, dtype: str):
    """Final (params, state) of the unsharded run (one device), once per configuration."""
    key = (coupling, dtype)
    if key not in _REFERENCES:
        host_params, host_noise = _problem(SPECS_2D)
        _REFERENCES[key] = _run(_tx(coupling, dtype), host_params, host_noise)
    return _REFERENCES[key]


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def _state_bytes_per_device(state) -> dict[str, int]:
    """Bytes of the state's shards on each device."""
    per_device: dict[str, int] = {}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return per_device


def _moments(state) -> list[Any]:
    """The moment leaves (mu and nu) of an ``adamw`` state."""
    return jax.tree.leaves((state[0].mu, state[0].nu))


def _params_leaves_match(tree, params) -> bool:
    """Whether every leaf of ``tree`` is laid out as the param of the same name."""
    return all(m.sharding.is_equivalent_to(params[k].sharding, m.ndim) for k, m in tree.items())


def _placement(moment, param) -> dict[str, Any]:
    """A moment's sharding spec(s) and whether they are laid out as its param."""
    if isinstance(moment, adamw_jax.QuantizedArray):
        codes, scales = moment.codes.sharding, moment.scales.sharding
        return {
            "quantized": True,
            "spec": str(codes.spec),
            "scales_spec": str(scales.spec),
            "param_spec": str(param.sharding.spec),
            "same": codes == param.sharding
            and scales.is_equivalent_to(param.sharding, moment.scales.ndim),
        }
    return {
        "quantized": False,
        "spec": str(moment.sharding.spec),
        "param_spec": str(param.sharding.spec),
        "same": moment.sharding == param.sharding,
    }


def check_agreement(results: dict[str, Any]) -> None:
    """Sharded (2-D mesh) vs unsharded, all couplings and moment dtypes, STEPS steps."""
    mesh = _mesh((4, 2), ("data", "model"))
    shardings = {k: NamedSharding(mesh, s) for k, s in SPECS_2D.items()}
    host_params, host_noise = _problem(SPECS_2D)
    agreement, same_sharding = {}, {}
    for dtype in MOMENT_DTYPES:
        for coupling in COUPLINGS:
            tx = _tx(coupling, dtype)
            ref_params, _ = _reference(coupling, dtype)
            params, state = _run(tx, host_params, host_noise, shardings)
            name = f"{coupling}/{dtype}"
            agreement[name] = _max_diff(params, ref_params)
            same_sharding[name] = {
                k: [_placement(state[0].mu[k], params[k]), _placement(state[0].nu[k], params[k])]
                for k in params
            }
    results["agreement_max_abs_diff"] = agreement
    results["moment_vs_param_sharding"] = same_sharding

    # A jitted update step *without* out_shardings must keep the moments where they are too.
    tx = _tx("lr", "float32")
    params = jax.device_put(host_params, shardings)
    state = sharding.init(tx, params)
    new_params, new_state = _make_step(tx)(
        params, state, jax.device_put({k: v[0] for k, v in host_noise.items()}, shardings)
    )
    results["propagated_moment_sharding_kept"] = (
        _params_leaves_match(new_state[0].mu, params)
        and _params_leaves_match(new_state[0].nu, params)
        and _params_leaves_match(new_params, params)
    )

    # Plain jit of init, for contrast: where do its moments land?
    plain = jax.jit(tx.init)(params)
    results["plain_jit_init_w_devices"] = len(plain[0].mu["w"].sharding.device_set)
    results["plain_jit_init_w_shard_shape"] = list(
        plain[0].mu["w"].addressable_shards[0].data.shape
    )


def check_collectives(results: dict[str, Any]) -> None:
    """Collectives in the compiled optimizer step: none when moments sit with their params."""
    found = {}
    cases = {
        "1d_data": (
            _mesh((8,), ("data",)),
            {"emb": P("data", None), "w": P(None, "data"), "b": P("data"), "scale": P()},
            None,
        ),
        "2d_data_model": (
            _mesh((4, 2), ("data", "model")),
            {"emb": P("data", "model"), "w": P(None, "model"), "b": P("model"), "scale": P()},
            None,
        ),
        # Positive control: ZeRO-1 with replicated params must gather the updates.
        "zero1_control": (
            _mesh((8,), ("data",)),
            {"emb": P(), "w": P(), "b": P(), "scale": P()},
            "data",
        ),
    }
    for name, (mesh, specs, zero_axis) in cases.items():
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        host_params, _ = _problem(specs)
        params = jax.device_put(host_params, shardings)
        for dtype in MOMENT_DTYPES:
            tx = _tx("schedule", dtype)
            state = sharding.init(tx, params, zero_axis=zero_axis)
            state_sh = sharding.state_shardings(tx, params, zero_axis=zero_axis)

            def opt_step(p, s, g, tx=tx):
                updates, s = tx.update(g, s, p)
                return optax.apply_updates(p, updates), s

            compiled = (
                jax.jit(opt_step, out_shardings=(shardings, state_sh))
                .lower(params, state, params)
                .compile()
                .as_text()
            )
            found[f"{name}/{dtype}"] = sorted(set(COLLECTIVES.findall(compiled)))
    results["collectives"] = found


def _moment_bytes(state) -> dict[str, Any]:
    """Bytes of the moments: in all, of the scalar ones, and on each device."""
    per_device: dict[str, int] = {}
    for leaf in _moments(state):
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return {
        "moment_bytes_total": sum(m.nbytes for m in _moments(state)),
        "scalar_moment_bytes": sum(m.nbytes for m in _moments(state) if m.ndim == 0),
        "moment_bytes_per_device": per_device,
    }


def check_zero1(results: dict[str, Any]) -> None:
    """ZeRO-1: params replicated over 8 devices, moments split 8 ways; same trajectory."""
    mesh = _mesh((8,), ("data",))
    specs = {"emb": P(), "w": P(), "b": P(), "scale": P()}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    host_params, host_noise = _problem(specs)
    tx = _tx("lr", "float32")
    ref_params, ref_state = _reference("lr", "float32")
    params, state = _run(tx, host_params, host_noise, shardings, zero_axis="data")
    plain_state = sharding.init(tx, jax.device_put(host_params, shardings))
    odd = {
        "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32, sharding=NamedSharding(mesh, P())),
        "late": jax.ShapeDtypeStruct((3, 16), jnp.float32, sharding=NamedSharding(mesh, P())),
    }
    odd_sh = sharding.state_shardings(tx, odd, zero_axis="data")[0].mu
    results["zero1"] = {
        "odd_shape_specs": {k: str(v.spec) for k, v in odd_sh.items()},
        "max_abs_diff": _max_diff(params, ref_params),
        "moment_specs": {k: str(state[0].mu[k].sharding.spec) for k in specs},
        **_moment_bytes(state),
        "state_bytes_per_device": _state_bytes_per_device(state),
        "state_bytes_per_device_replicated": _state_bytes_per_device(plain_state),
        "state_bytes_one_device": _state_bytes_per_device(ref_state),
        "params_still_replicated": all(params[k].sharding.is_fully_replicated for k in params),
    }
    for dtype in list(MOMENT_DTYPES)[1:]:
        tx = _tx("lr", dtype)
        ref_params, _ = _reference("lr", dtype)
        params, state = _run(tx, host_params, host_noise, shardings, zero_axis="data")
        results["zero1"][dtype] = {"max_abs_diff": _max_diff(params, ref_params)}
        results["zero1"][dtype].update(_moment_bytes(state))


def check_int8_blocks(results: dict[str, Any]) -> None:
    """Where int8 moments' scales go when shards do or do not hold whole blocks (8)."""
    tx = _tx("lr", "int8")
    out = {}
    cases = {
        "model_aligned": ((4, 2), ("data", "model"), (16, 64), P(None, "model"), None),
        "model_ragged": ((4, 2), ("data", "model"), (16, 60), P(None, "model"), None),
        "zero_first_dim": ((8,), ("data",), (8, 24), P(), "data"),
        "zero_last_dim_aligned": ((8,), ("data",), (3, 64), P(), "data"),
        "zero_last_dim_ragged": ((8,), ("data",), (3, 32), P(), "data"),
    }
    for name, (mesh_shape, axes, shape, spec, zero_axis) in cases.items():
        mesh = _mesh(mesh_shape, axes)
        param = {"p": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))}
        mu = sharding.state_shardings(tx, param, zero_axis=zero_axis)[0].mu["p"]
        out[name] = [str(mu.codes.spec), str(mu.scales.spec)]
    results["int8_blocks"] = out


def check_int4(results: dict[str, Any]) -> None:
    """4-bit moments: sharded and ZeRO-1 steps vs unsharded; where packed codes go."""
    out: dict[str, Any] = {}
    mesh = _mesh((4, 2), ("data", "model"))
    shardings = {k: NamedSharding(mesh, s) for k, s in SPECS_2D.items()}
    host_params, host_noise = _problem(SPECS_2D)
    ref_params, _ = _reference("lr", "int4")
    params, state = _run(_tx("lr", "int4"), host_params, host_noise, shardings)
    out["max_abs_diff"] = _max_diff(params, ref_params)
    mu = state[0].mu["w"]
    out["w_mu"] = [
        f"{type(mu).__name__}{mu.bits}",
        str(mu.codes.sharding.spec),
        str(mu.scales.sharding.spec),
    ]
    zero_mesh = _mesh((8,), ("data",))
    specs = {"emb": P(), "w": P(), "b": P(), "scale": P()}
    zero_sh = {k: NamedSharding(zero_mesh, s) for k, s in specs.items()}
    ref_params, _ = _reference("lr", "int4")
    params, state = _run(_tx("lr", "int4"), host_params, host_noise, zero_sh, zero_axis="data")
    out["zero1_max_abs_diff"] = _max_diff(params, ref_params)
    out["zero1"] = _moment_bytes(state)
    tx = _tx("lr", "int4")
    cases = {
        "model_aligned": ((4, 2), ("data", "model"), (16, 64), P(None, "model"), None),
        "model_ragged": ((4, 2), ("data", "model"), (16, 60), P(None, "model"), None),
        "model_odd_bytes": ((4, 2), ("data", "model"), (16, 6), P(None, "model"), None),
        "zero_last_dim_aligned": ((8,), ("data",), (3, 64), P(), "data"),
        "zero_last_dim_ragged": ((8,), ("data",), (3, 32), P(), "data"),
    }
    for name, (mesh_shape, axes, shape, spec, zero_axis) in cases.items():
        case_mesh = _mesh(mesh_shape, axes)
        sh = NamedSharding(case_mesh, spec)
        param = {"p": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)}
        mu = sharding.state_shardings(tx, param, zero_axis=zero_axis)[0].mu["p"]
        abstract = sharding.init(tx, param, zero_axis=zero_axis)[0].mu["p"]
        out[name] = [str(mu.codes.spec), str(mu.scales.spec), list(abstract.codes.shape)]
    results["int4"] = out


def check_single_device(results: dict[str, Any]) -> None:
    """Params on one device, not the default one, without a mesh: where the state goes."""
    device = jax.devices()[5]
    params = jax.device_put({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, device)
    tx = adamw_jax.adamw(1e-3, amsgrad=True)
    shardings = jax.tree.leaves(sharding.state_shardings(tx, params))
    state = jax.tree.leaves(sharding.init(tx, params))

    def device_ids(leaves):
        return sorted({d.id for x in leaves for d in x.devices()})

    results["single_device"] = {
        "param_device": device.id,
        "shardings_are_the_params": all(s == params["w"].sharding for s in shardings),
        "state_devices": device_ids(state),
        "state_leaves": len(state),
        # For contrast, plain jit of init puts every leaf on the default device.
        "plain_jit_init_devices": device_ids(jax.tree.leaves(jax.jit(tx.init)(params))),
    }


def check_abstract(results: dict[str, Any]) -> None:
    """Abstract params (ShapeDtypeStruct with shardings) give the same placements."""
    mesh = _mesh((4, 2), ("data", "model"))
    specs = {"emb": P("data", None), "w": P(None, "model"), "b": P("model"), "scale": P()}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    host_params, _ = _problem(specs)
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=shardings[k])
        for k, v in host_params.items()
    }
    concrete = jax.device_put(host_params, shardings)
    out = {}
    for zero_axis in (None, "data"):
        tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-3)
        abstract_state = sharding.init(tx, abstract, zero_axis=zero_axis)
        concrete_state = sharding.init(tx, concrete, zero_axis=zero_axis)
        out[str(zero_axis)] = {
            "all_abstract": all(
                isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract_state)
            ),
            "same_structure": jax.tree.structure(abstract_state)
            == jax.tree.structure(concrete_state),
            "same_shardings": all(
                a.sharding == c.sharding and a.shape == c.shape and a.dtype == c.dtype
                for a, c in zip(
                    jax.tree.leaves(abstract_state), jax.tree.leaves(concrete_state), strict=True
                )
            ),
            "eval_shape_shapes_match": [
                x.shape for x in jax.tree.leaves(jax.eval_shape(tx.init, abstract))
            ]
            == [x.shape for x in jax.tree.leaves(concrete_state)],
        }
    results["abstract"] = out


def main(out_dir: str) -> None:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    results: dict[str, Any] = {"device_count": jax.device_count()}
    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 devices, got {jax.device_count()}: is XLA_FLAGS set?")
    results["moment_dtypes"] = list(MOMENT_DTYPES)
    seconds = {}
    checks = (check_agreement, check_collectives, check_zero1, check_int8_blocks, check_int4)
    for check in checks:
        start = time.perf_counter()
        check(results)
        seconds[check.__name__] = round(time.perf_counter() - start, 2)
    check_abstract(results)
    check_single_device(results)
    results["seconds"] = seconds

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _distributed_worker

    single = _distributed_worker.train(_mesh((4, 2), ("data", "model")))
    np.savez(os.path.join(out_dir, "single_process.npz"), **single)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
