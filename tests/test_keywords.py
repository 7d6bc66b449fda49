"""The keyword-spotting example: deterministic synthesized data split by speaker, log-mel
features of the documented shape, and a quick run that recognizes unseen speakers."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import load_example
from flax import nnx

pytestmark = pytest.mark.slow  # the speech data set and a training run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The quick run's bar on the test speakers: 10x chance (1 in 20 words). The quick run
# reaches 79.7-80.3% with either method on espeak-ng 1.52.0 (2 of its 15 test speakers
# whisper, a voice type no training speaker has); 50% leaves room for other CPUs' rounding,
# while a broken pipeline (labels misaligned with the clips, features of the wrong clips)
# is near chance.
QUICK_TEST_ACCURACY = 0.5


@pytest.fixture(scope="module")
def tk():
    return load_example("train_keywords")


@pytest.fixture(scope="module")
def quick(tk, tmp_path_factory):
    """``--quick`` once for the module: it synthesizes the quick data set into a fresh cache."""
    data_dir = tmp_path_factory.mktemp("keywords")
    out = data_dir / "curves.png"
    result = tk.main(["--quick", "--data-dir", str(data_dir), "--out", str(out), "--no-progress"])
    return {"result": result, "data_dir": data_dir, "out": out}


def test_same_seed_same_bytes(tk, quick):
    kd = tk.kd
    assert kd.make_speakers(0, 1) == kd.make_speakers(0, 1)
    assert kd.make_speakers(0, 1) != kd.make_speakers(1, 1)
    # The cached set was built by a thread pool; speakers synthesized again one by one give
    # the same bytes, and another seed different ones.
    cached = kd.load_or_build(quick["data_dir"], 0, 1)
    assert cached.audio.shape == (100 * 20, kd.SAMPLE_RATE)
    assert cached.audio.dtype == np.int16
    speakers = kd.make_speakers(0, 1)
    for index in (0, 57):
        again = kd.speaker_clips(speakers[index], index, 0)
        assert again.tobytes() == cached.audio[cached.speaker == index].tobytes()
        assert again.tobytes() != kd.speaker_clips(speakers[index], index, 1).tobytes()
    np.testing.assert_array_equal(cached.label[:40], np.tile(np.arange(20), 2))


def test_speaker_split_has_no_overlap(tk, quick):
    kd = tk.kd
    for per_variant in (1, 2):
        speakers = kd.make_speakers(0, per_variant)
        assert len(speakers) == 100 * per_variant
        assert len(set(speakers)) == len(speakers)
        voices = {s: {sp.variant for sp in speakers if sp.split == s} for s in kd.SPLITS}
        assert [len(voices[s]) for s in kd.SPLITS] == [70, 15, 15]
        assert not voices["train"] & voices["val"]
        assert not voices["train"] & voices["test"]
        assert not voices["val"] & voices["test"]
    data = kd.load_or_build(quick["data_dir"], 0, 1)
    masks = {s: data.split_mask(s) for s in kd.SPLITS}
    np.testing.assert_array_equal(sum(m.astype(int) for m in masks.values()), 1)  # a partition
    ids = {s: set(data.speaker[m].tolist()) for s, m in masks.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"]
    for s, m in masks.items():  # every speaker says every word once
        np.testing.assert_array_equal(np.bincount(data.label[m]), len(ids[s]))
    assert quick["result"]["data"]["speakers"] == {"train": 70, "val": 15, "test": 15}
    assert quick["result"]["data"]["clips"] == {"train": 1400, "val": 300, "test": 300}


def test_features_have_the_documented_shape_and_put_a_tone_in_its_band(tk):
    kd = tk.kd
    assert kd.FEATURE_SHAPE == (98, 40)
    t = np.arange(kd.SAMPLE_RATE) / kd.SAMPLE_RATE
    tone = np.round(8000 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.int16)
    noise = np.random.default_rng(0).integers(-3000, 3000, kd.SAMPLE_RATE).astype(np.int16)
    features = np.asarray(kd.log_mel(np.stack([tone, noise, np.zeros_like(tone)])))
    assert features.shape == (3, *kd.FEATURE_SHAPE)
    assert features.dtype == np.float32 and np.all(np.isfinite(features))
    # A 1 kHz tone: the loudest band in every frame is the one whose filter peaks nearest.
    bank = kd.mel_filterbank()
    freqs = np.fft.rfftfreq(kd.N_FFT, 1 / kd.SAMPLE_RATE)
    assert np.all(features[0].argmax(axis=1) == np.argmax(bank[np.argmin(abs(freqs - 1000))]))
    # The same spectrogram transcribed in NumPy (float64), for the noise clip.
    x = noise / 32768.0
    frames = np.stack([x[i * kd.HOP : i * kd.HOP + kd.FRAME] for i in range(kd.N_FRAMES)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(kd.FRAME) / kd.FRAME)
    power = np.abs(np.fft.rfft(frames * window, n=kd.N_FFT)) ** 2
    np.testing.assert_allclose(features[1], np.log(power @ bank + 1e-6), rtol=0, atol=1e-3)
    np.testing.assert_allclose(features[2], np.log(1e-6), rtol=1e-6)  # silence: the floor
    with pytest.raises(ValueError, match=r"audio must be \(n, 16000\)"):
        kd.log_mel(jnp.zeros((2, 8000), jnp.int16))


def test_conv1d_matches_lax_conv_with_same_padding(tk):
    """The model's convolution (shifted slices, one matrix product) is lax.conv's "SAME"."""
    rng = np.random.default_rng(0)
    dims = ("NWC", "WIO", "NWC")
    for size, stride, frames in [(5, 1, 98), (5, 2, 98), (5, 2, 49), (3, 2, 25), (4, 3, 10)]:
        abstract = nnx.eval_shape(lambda: tk.Conv1D(3, 4, size, stride, rngs=nnx.Rngs(0)))
        graphdef, shapes = nnx.split(abstract)
        params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
        x = rng.standard_normal((2, frames, 3)).astype(np.float32)
        got = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
        conv = nnx.merge(graphdef, params)
        kernel = np.asarray(conv.kernel[...]).reshape(size, 3, 4)
        expected = jax.lax.conv_general_dilated(
            x, kernel, (stride,), "SAME", dimension_numbers=dims
        )
        assert got.shape == (2, -(-frames // stride), 4)
        np.testing.assert_allclose(got, expected + conv.bias[...], rtol=1e-5, atol=1e-5)


def test_quick_run_recognizes_unseen_speakers(tk, quick):
    result = quick["result"]
    assert set(result) == {"AdamW", "Adam+L2", "grids", "data", "out"}
    for name in ("AdamW", "Adam+L2"):
        run = result[name]
        assert run["test_acc"] > QUICK_TEST_ACCURACY, (name, run["test_acc"])
        h = run["history"]
        assert h["step"][-1] == 300 and len(h["step"]) == 6
        assert h["train_loss"][-1] < 0.5 * h["train_loss"][0]
        confusion = run["confusion"]  # said x predicted, on the 15 test speakers
        np.testing.assert_array_equal(confusion.sum(axis=1), 15)
        assert np.trace(confusion) / confusion.sum() == pytest.approx(run["test_acc"])
        # Every test speaker says each word once: the mean over speakers is the accuracy.
        assert len(run["speaker_acc"]) == 15
        assert np.mean(list(run["speaker_acc"].values())) == pytest.approx(run["test_acc"])
    # Same init, batches and learning rate; the two couplings must still differ.
    assert result["AdamW"]["weight_norm"] != result["Adam+L2"]["weight_norm"]
    png = quick["out"].read_bytes()
    assert png[:8] == PNG_SIGNATURE
    assert struct.unpack(">II", png[16:24]) == (1200, 1000)  # figsize (12, 10) at 100 dpi
    assert len(png) > 50_000  # curves and two confusion matrices, not an empty canvas


def test_missing_espeak_is_named(tk, monkeypatch):
    kd = tk.kd
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    with pytest.raises(RuntimeError, match=r"espeakng-loader.*pip install adamw_jax\[examples\]"):
        kd.build(0, 1)


def test_synthesizer_is_the_pinned_one_with_every_variant(tk):
    kd = tk.kd
    library, data_dir = kd.espeak_library()
    variants = Path(data_dir) / "voices" / "!v"
    assert not [v for v in kd.VARIANTS if not (variants / v).is_file()]
    voice = load_example("espeak_voice")
    (word,) = voice.speak(library, data_dir, kd.ESPEAK_VERSION, "en+m1", 150, 50, ["go"])
    assert len(word) > 0.1 * kd.ESPEAK_RATE * 2  # int16 bytes: at least 0.1 s spoken
    with pytest.raises(RuntimeError, match=r"espeak-ng 1\.0\.0 expected; .* is 1\.52\.0"):
        voice.speak(library, data_dir, "1.0.0", "en+m1", 150, 50, ["go"])
    with pytest.raises(RuntimeError, match="no voice variant 'nobody'"):
        kd.speak_words(kd.Speaker("en", "nobody", 150, 50, "train"), ["go"])
    with pytest.raises(RuntimeError, match="espeak_SetVoiceByName"):
        kd.speak_words(kd.Speaker("xx-nowhere", "m1", 150, 50, "train"), ["go"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "250", "--eval-every", "100"], "--eval-every must divide --steps"),
        (["--per-variant", "9"], "--per-variant must be in [1, 8]"),
        (["--per-variant", "0"], "--per-variant must be in [1, 8]"),
        (["--quick", "--steps", "0"], "--steps must be >= 1"),
        (["--more-seeds", "1"], "--more-seeds must be 0 or >= 2"),
        (["--lr", "0"], "need learning rates > 0"),
        (["--out", "curves.jpg"], "--out must be a .png file or a directory"),
    ],
)
def test_bad_flags_are_refused_early(tk, argv, message, capsys):
    with pytest.raises(SystemExit):
        tk.parse_args(argv)
    assert message in capsys.readouterr().err
