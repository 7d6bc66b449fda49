"""The stability demonstrations run end to end in their ``--quick`` modes and show their effects.

The three demos share one process here, so the plain AdamW step (the clean and corrupted
spike runs, the pre-training, the AdamW runs of ``cautious``) is compiled once.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from _helpers import load_example

pytestmark = pytest.mark.slow  # the stability demos end to end

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEMOS = ("spikes", "finetune", "cautious")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    demos = load_example("stability_demos")
    out = tmp_path_factory.mktemp("stability")
    # optax's schedules mix int32 steps with Python floats: refused under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        return {
            name: demos.main([name, "--quick", "--no-progress", "--out", str(out)])
            for name in DEMOS
        }


def _check_png(path: str) -> None:
    png = Path(path).read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1200, 450)  # figsize (12, 4.5) at 100 dpi
    assert len(png) > 20_000  # curves, labels and legends, not an empty canvas


@pytest.mark.parametrize("name", DEMOS)
def test_each_demo_writes_its_png_and_json(results, name):
    result = results[name]
    assert result["png"].endswith(f"stability_{name}.png")
    _check_png(result["png"])
    saved = json.loads(Path(result["json"]).read_text())
    assert saved["runs"].keys() == result["runs"].keys()
    assert saved["setup"]["steps"] == result["setup"]["steps"] == 200
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))  # every figure, as run


def test_spikes_skipping_catches_the_corrupted_batches_and_limits_the_damage(results):
    r = results["spikes"]
    bad, runs = r["corrupted_steps"], r["runs"]
    assert len(bad) == 4 and min(bad) >= 120  # 5% of steps 120-200
    clean, corrupted = runs["clean"], runs["corrupted"]
    # Before the first corrupted batch the two runs are the same run, bit for bit ...
    first = bad[0] - 1
    assert clean["losses"][:first] == corrupted["losses"][:first]
    # ... and the corrupted batches are real spikes: their loss is far above the clean one.
    for step in bad:
        assert corrupted["losses"][step - 1] > clean["losses"][step - 1] + 0.5
    # The loss metric catches every corrupted batch and nothing else (measured: 4 of 4, 0).
    on_loss = runs["corrupted + skip (loss)"]
    assert on_loss["skipped_steps"] == bad
    assert (on_loss["caught"], on_loss["clean_skipped"]) == (len(bad), 0)
    # Unprotected, the corrupted run ends worst (measured: +0.012 over clean; skipping on
    # the loss, +0.004).
    assert corrupted["val_loss"] > clean["val_loss"] + 0.005
    assert corrupted["val_loss"] > on_loss["val_loss"] + 0.004


def test_finetune_decay_toward_init_keeps_part_a_and_decay_toward_zero_does_not(results):
    r = results["finetune"]
    pre = r["pretrained"]
    assert pre["val_A"] < pre["val_B"] - 0.5  # pre-trained on A: the parts really differ
    zero, init = r["runs"]["zero 30"], r["runs"]["init 30"]
    # Pulled toward the pre-trained weights: A is kept (measured -0.007), B adapts (-0.135).
    assert abs(init["val_A"] - pre["val_A"]) < 0.05
    assert init["val_B"] < pre["val_B"] - 0.05
    # Pulled toward zero as hard: the pre-trained model is lost (A +0.68) and B gets worse.
    assert zero["val_A"] > pre["val_A"] + 0.3
    assert zero["val_B"] > init["val_B"] + 0.1
    for run in (zero, init):  # the curves start from the pre-trained model
        assert run["curve_A"][0] == pytest.approx(pre["val_A"], abs=1e-6)


def test_cautious_variants_train_two_seeds_each_and_differ(results):
    demos = load_example("stability_demos")
    runs = results["cautious"]["runs"].values()
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in demos.CAUTIOUS_VARIANTS for s in (0, 1)
    )
    vocab = len(demos.lm.CharData(demos.lm.load_text()).chars)
    final = {(r["variant"], r["seed"]): r["val_loss"] for r in runs}
    for (variant, seed), loss in final.items():
        assert math.log(vocab) - 2.3 > loss > 1.0, (variant, seed, loss)  # learned, not NaN
    for seed in (0, 1):  # each flag changes the run (measured: +0.002 and -0.06 here)
        adamw = final[("AdamW", seed)]
        assert final[("cautious weight decay", seed)] != adamw
        assert abs(final[("cautious updates", seed)] - adamw) > 1e-3
    assert final[("AdamW", 0)] != final[("AdamW", 1)]  # two seeds, two runs
    assert np.all(np.diff([r["eval_steps"] for r in runs], axis=0) == 0)


def test_unknown_demo_is_refused(capsys):
    with pytest.raises(SystemExit):
        load_example("stability_demos").parse_args(["spike"])
    assert "invalid choice: 'spike'" in capsys.readouterr().err
