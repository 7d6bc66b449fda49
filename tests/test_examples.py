"""The examples run end to end in their fast modes, and checkpoints resume bit for bit."""

from __future__ import annotations

import csv
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_trees_bitwise_equal, load_example, persistent_compilation_cache

import adamw_jax

pytestmark = pytest.mark.slow  # the examples end to end

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _compile_each_program_once(tmp_path_factory):
    """A program built again is loaded, not compiled again: the char model's runs (each
    ``main`` jits its own step), the tuning strategies' members over the same ``train``."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


# --------------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_disjoint_and_complete():
    digits = load_example("train_digits")
    a, b = digits.load_splits(0), digits.load_splits(0)
    sizes = {k: len(v[1]) for k, v in a.items()}
    assert sum(sizes.values()) == 1797  # every image of load_digits, once
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    rows = {k: {x.tobytes() for x in v[0]} for k, v in a.items()}
    # Some digits images are exact duplicates of each other, so allow a handful of overlaps.
    assert len(rows["train"] & rows["test"]) < 10
    assert_trees_bitwise_equal(a, b)


def test_digits_quick_run_beats_chance_and_writes_png(tmp_path):
    digits = load_example("train_digits")
    out = tmp_path / "curves.png"
    result = digits.main(["--quick", "--out", str(out), "--no-progress"])
    assert set(result) == {"AdamW", "Adam+L2", "out"}
    for name in ("AdamW", "Adam+L2"):
        run = result[name]
        assert run["test_acc"] > 0.8, (name, run["test_acc"])  # chance is 0.1
        history = run["history"]
        assert history["step"][-1] == 150
        assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
        assert run["train_loss"] < math.log(10) / 4  # uniform guessing: ln 10
        assert run["weight_norm"] > 0 and run["wall_time"] > 0
    # Same coefficient, different coupling: the two runs must actually differ.
    assert result["AdamW"]["weight_norm"] != result["Adam+L2"]["weight_norm"]
    png = out.read_bytes()
    assert png[:8] == PNG_SIGNATURE
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1000, 400)  # figsize (10, 4) at 100 dpi
    assert len(png) > 10_000  # curves, labels and legends, not an empty canvas


def test_digits_out_directory_gets_the_png_inside(tmp_path):
    """``--out DIR`` (existing, or ending in a slash) writes DIR/digits_adamw.png."""
    digits = load_example("train_digits")
    # The quick run's model (hidden 64), two steps: its compiled programs serve again.
    tiny = ["--steps", "2", "--eval-every", "1", "--hidden", "64", "--no-progress"]
    result = digits.main([*tiny, "--out", str(tmp_path)])
    png = tmp_path / digits.PLOT_NAME
    assert digits.PLOT_NAME == "digits_adamw.png"
    assert result["out"] == str(png)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert digits.parse_args(["--out", f"{tmp_path}/new/"]).out == str(tmp_path / "new" / png.name)


@pytest.mark.parametrize("out", ["curves.jpg", "curves"])
def test_digits_out_that_is_neither_png_nor_directory_is_refused(out, tmp_path, capsys):
    digits = load_example("train_digits")
    with pytest.raises(SystemExit):
        digits.parse_args(["--out", str(tmp_path / out)])
    assert "--out must be a .png file or a directory" in capsys.readouterr().err


# ------------------------------------------------------------------- char transformer LM
@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """An uninterrupted run, and one interrupted at step 6 and resumed (checkpoints every 4)."""
    lm = load_example("char_transformer")
    base = ["--small", "--steps", "12", "--save-every", "4", "--no-progress"]
    full_dir = tmp_path_factory.mktemp("full")
    cut_dir = tmp_path_factory.mktemp("cut")
    # optax.MultiSteps divides by its int32 micro-step count and optax's schedules mix int32
    # steps with Python floats: both are rejected under the suite's strict dtype promotion.
    with jax.numpy_dtype_promotion("standard"):
        full = lm.main([*base, "--ckpt-dir", str(full_dir)])
        cut = lm.main([*base, "--ckpt-dir", str(cut_dir), "--stop-after", "6"])
        resumed = lm.main([*base, "--ckpt-dir", str(cut_dir), "--resume"])
    return {"full": full, "cut": cut, "resumed": resumed, "cut_dir": cut_dir, "base": base}


def test_char_transformer_loss_falls(lm_runs):
    lm = load_example("char_transformer")
    full = lm_runs["full"]
    vocab = lm.CharData(lm.load_text()).vocab_size
    losses = full["losses"]
    assert len(losses) == 12
    assert losses[0] > math.log(vocab) - 0.5  # starts near uniform guessing
    assert np.mean(losses[-3:]) < losses[0] - 0.8
    assert full["val_loss"] < math.log(vocab) - 0.8
    assert full["bpc"] == pytest.approx(full["val_loss"] / math.log(2))
    assert full["sample"].startswith("The ")
    assert len(full["sample"]) == len("The ") + lm.SMALL["sample_chars"]
    # 12 optimizer steps of 2 accumulated micro-batches each.
    assert int(full["state"]["step"]) == 24
    assert int(full["state"]["opt_state"].gradient_step) == 12


def test_char_transformer_resume_is_bitwise_identical(lm_runs):
    full, cut, resumed = lm_runs["full"], lm_runs["cut"], lm_runs["resumed"]
    assert cut["end_step"] == 6
    # The interruption came after step 6; the latest checkpoint is step 4: 5 and 6 rerun.
    assert (resumed["start_step"], resumed["end_step"]) == (4, 12)
    assert len(jax.tree.leaves(full["state"])) > 100  # params, moments, accumulator, counters
    assert_trees_bitwise_equal(resumed["state"], full["state"])
    # The steps the resumed run took saw the same batches: identical losses, to the bit.
    assert resumed["losses"] == full["losses"][4:]
    # ...and the comparison can fail: the interrupted state differs from the final one.
    with pytest.raises(AssertionError):
        assert_trees_bitwise_equal(cut["state"]["params"], full["state"]["params"])


def test_char_transformer_resume_with_other_optimizer_structure_raises(lm_runs):
    lm = load_example("char_transformer")
    argv = [*lm_runs["base"], "--ckpt-dir", str(lm_runs["cut_dir"]), "--resume", "--amsgrad"]
    expected = r"in the target but not in checkpoint \d+ .*nu_max\.\* \(\d+ leaves\)"
    with jax.numpy_dtype_promotion("standard"), pytest.raises(ValueError, match=expected):
        lm.main(argv)


def test_char_transformer_int8_moments_train_and_track_fp32(lm_runs):
    lm = load_example("char_transformer")
    with jax.numpy_dtype_promotion("standard"):
        int8 = lm.main(
            ["--small", "--steps", "12", "--save-every", "0", "--moments", "int8", "--no-progress"]
        )
    fp32 = lm_runs["full"]  # same seed and settings, float32 moments
    losses = int8["losses"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < losses[0] - 0.8  # the loss falls
    # 8-bit moments change the steps a little, not the course of training.
    np.testing.assert_allclose(losses, fp32["losses"], rtol=0, atol=0.01)
    assert int8["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.02)
    # The moments of every parameter leaf of >= 4096 elements are 8-bit codes, the rest float32.
    opt_state = int8["state"]["opt_state"]
    params = int8["state"]["params"]
    big = sum(x.size for x in jax.tree.leaves(params) if x.size >= 4096)
    assert 0 < big < sum(x.size for x in jax.tree.leaves(params))
    assert lm.quantized_params(opt_state) == big
    adam_state = opt_state.inner_opt_state[1][0]  # (clip, (scale_by_adam, decay))
    is_q = lambda x: isinstance(x, adamw_jax.QuantizedArray)  # noqa: E731
    mu = jax.tree.leaves(adam_state.mu, is_leaf=is_q)
    assert {str(x.codes.dtype) for x in mu if is_q(x)} == {"int8"}
    assert {str(x.dtype) for x in mu if not is_q(x)} == {"float32"}
    # Each quantized parameter's two moments take 1 byte each plus a float32 scale per block
    # (blocks of at least 32 elements here): at least 5.5 of fp32's 8 bytes saved.
    fp32_bytes = adamw_jax.state_nbytes(fp32["state"]["opt_state"].inner_opt_state)
    int8_bytes = adamw_jax.state_nbytes(opt_state.inner_opt_state)
    assert fp32_bytes - int8_bytes > 5.5 * big


def test_char_transformer_mixes_8_bit_first_and_4_bit_second_moments():
    lm = load_example("char_transformer")
    tx = lm.make_optimizer(lm.Config(moments="int8-int4"))
    params = {"dense": {"kernel": jnp.zeros((64, 128)), "bias": jnp.zeros(128)}}
    opt_state = jax.eval_shape(tx.init, params)
    adam_state = opt_state.inner_opt_state[1][0]  # (clip, (scale_by_adam, decay))
    mu, nu = adam_state.mu["dense"]["kernel"], adam_state.nu["dense"]["kernel"]
    assert isinstance(mu, adamw_jax.QuantizedArray) and mu.bits == 8
    assert isinstance(nu, adamw_jax.QuantizedArray) and nu.bits == 4
    assert adam_state.mu["dense"]["bias"].dtype == jnp.float32  # under min_quantize_size
    assert lm.quantized_params(opt_state) == 64 * 128
    assert "8,192 of 8,320 parameters quantized" in lm.describe_moments(
        "int8-int4", opt_state, 8320
    )


def _opt_tree(tx, params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}


def test_restore_helper_checks_structure_shapes_and_dtypes(tmp_path):
    lm = load_example("char_transformer")
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.ones(2)}}
    saved = _opt_tree(adamw_jax.adamw(1e-3), params)
    saved["opt_state"][0].mu["dense"]["kernel"] += 0.25  # something non-trivial to restore
    manager = lm.checkpoint_manager(tmp_path)
    lm.save_checkpoint(manager, 3, saved, {"data_position": 6})

    # Same configuration: restores every leaf exactly, and the metadata.
    fresh = _opt_tree(adamw_jax.adamw(1e-3), jax.tree.map(jnp.zeros_like, params))
    restored, meta = lm.restore_checkpoint(manager, 3, fresh)
    assert meta == {"data_position": 6}
    assert_trees_bitwise_equal(restored, saved)

    # AMSGrad keeps one more moment: missing from the checkpoint.
    with pytest.raises(ValueError, match=r"in the target but not in checkpoint 3.*nu_max"):
        lm.restore_checkpoint(manager, 3, _opt_tree(adamw_jax.adamw(1e-3, amsgrad=True), params))
    # Another moment dtype: orbax alone would cast silently.
    with pytest.raises(
        ValueError,
        match=r"mu\.dense\.kernel: saved \(3, 2\) float32, "
        r"target \(3, 2\) bfloat16",
    ):
        lm.restore_checkpoint(
            manager, 3, _opt_tree(adamw_jax.adamw(1e-3, mu_dtype=jnp.bfloat16), params)
        )
    # Another model size.
    wider = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(
        ValueError,
        match=r"params\.dense\.kernel: saved \(3, 2\) float32, "
        r"target \(4, 2\) float32",
    ):
        lm.restore_checkpoint(manager, 3, _opt_tree(adamw_jax.adamw(1e-3), wider))
    # Another chain (Adam + L2 has an extra state for the penalty): extra leaves on disk.
    with pytest.raises(ValueError, match="does not match"):
        lm.restore_checkpoint(manager, 3, _opt_tree(adamw_jax.adam(1e-3, l2=1e-2), params))
    manager.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--small", "--steps", "5"], "--steps > the 5 warmup steps"),
        (["--small", "--lr", "0"], "--lr > 0"),
        (["--save-every", "-1"], "--save-every >= 0"),
    ],
)
def test_char_transformer_refuses_bad_flags_early(argv, message, capsys):
    lm = load_example("char_transformer")
    with pytest.raises(SystemExit):
        lm.parse_args(argv)
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- tuning lr and decay
def test_tune_weight_decay_quick_run_is_consistent(tmp_path):
    tune = load_example("tune_weight_decay")
    out = tmp_path / "tune.png"
    result = tune.main(["--quick", "--out", str(out), "--no-progress"])
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert result["heatmap"].read_bytes()[:8] == PNG_SIGNATURE
    adamw, l2 = result["results"]["AdamW (paper λ)"], result["results"]["Adam + L2"]
    assert set(adamw) == {"grid", "separable", "optuna", "tau rule"}
    assert set(l2) == {"grid", "separable", "optuna"}  # the tau rule is for decoupled decay
    for found in (adamw, l2):
        grid, separable = found["grid"], found["separable"]
        assert grid.evaluations == 3 * 4 and separable.evaluations == 3 + 4 - 1
        assert found["optuna"].evaluations == separable.evaluations
        # Same seeds, same compiled member: a configuration has the same errors whichever
        # strategy trained it.
        for c, config in enumerate(separable.configs):
            g = grid.configs.index(config)
            assert separable.metrics["val_error"][c, 0] == grid.metrics["val_error"][g, 0]
        assert grid.best("val_error")[1]["val_error"] < 50.0  # chance is 90%
    for method, rows in result["summaries"].items():
        assert rows["grid"]["gap"] == 0.0, method
        assert rows["separable"]["gap"] >= 0.0, method  # its cells are the grid's
    with result["csv"].open() as f:
        rows = list(csv.DictReader(f))
    expected = sum(r.evaluations for found in (adamw, l2) for r in found.values())
    assert len(rows) == expected and {r["strategy"] for r in rows} == set(tune.STRATEGIES)


@pytest.mark.slow
def test_tune_nnx_loop_quick_run_is_consistent(tmp_path):
    tune = load_example("tune_nnx_loop")
    result = tune.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    results = result["results"]
    assert results.evaluations == (8 + 8 - 1) * 2  # two lines of 8 that cross once, 2 seeds
    assert result["heatmap"].read_bytes()[:8] == PNG_SIGNATURE
    _, metrics = results.best("val_error")
    assert metrics["val_error"] < 50.0  # chance is 90%
    lrs = {c["learning_rate"] for c in results.configs}
    wds = {c["weight_decay"] for c in results.configs}
    assert len(lrs) == 8 and len(wds) == 8
    # The decay line runs at the learning rate the first line found best.
    first_line = results.metrics["val_error"][:8].mean(axis=1)
    lr_best = results.configs[int(np.argmin(first_line))]["learning_rate"]
    assert all(c["learning_rate"] == lr_best for c in results.configs[8:])
