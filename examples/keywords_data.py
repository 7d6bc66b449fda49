"""A keyword-spotting data set spoken by synthetic voices (espeak-ng), and its log-mel features.

The 20 words of the Speech Commands vocabulary ("zero" ... "nine", "yes", "no", "up",
"down", "left", "right", "on", "off", "stop", "go") are spoken by many synthetic speakers.
A speaker is an English accent of espeak-ng (8 of them) with a voice variant (100 timbres:
formants, pitch range, breathiness, roughness), a speaking rate and a pitch. Each clip is
one second at 16 kHz: the word at a random offset, a random gain, and white plus brown noise
at a random signal-to-noise ratio between 5 and 20 dB.

Speakers are split by variant: the variants of the test (and validation) speakers belong to
no training speaker, so the test set measures generalization to unseen voices. The accents
are shared between the splits (espeak-ng has only 8 English ones).

espeak-ng comes from the ``espeakng-loader`` wheel (its library and voice data), pinned in the
``examples`` extra: version 1.52.0 of espeak-ng, called through its C API by
``espeak_voice.py``, one fresh process per speaker. Everything is a pure function of the seed
and of that version (another version may pronounce differently): the same seed gives the
same bytes.
The audio is cached as an ``.npz`` file (64 MB per 2000 clips).

The features are log-mel spectrograms computed in JAX (:func:`log_mel`): a 25 ms Hann
window every 10 ms, a 512-point FFT, 40 mel bands from 20 Hz to 7.6 kHz, ``log(mel +
1e-6)``; ``(98, 40)`` (frames x bands) per one-second clip. JAX rather than NumPy because the
features are one batched, jitted program (framing, FFT, a matrix product with the filter
bank) that runs on the device that trains, GPU included, with no audio library to install.
"""

from __future__ import annotations

import concurrent.futures
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
)  # fmt: skip
SAMPLE_RATE = 16_000  # Hz; every clip is one second
ESPEAK_RATE = 22_050  # Hz, espeak-ng's output
ESPEAK_VERSION = "1.52.0"  # the espeak-ng of the pinned espeakng-loader wheel
# espeak-ng's English accents (its own voices; the MBROLA ones need extra packages).
ACCENTS = (
    "en", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp",
    "en-us", "en-us-nyc",
)  # fmt: skip
# espeak-ng's voice variants (espeak-ng-data/voices/!v): those of version 1.51, all still in
# 1.52.0, which adds "Reed", "ian" and "mike2"; those and "Mr serious" (a name with a space)
# are left out, so that the splits keep their 70/15/15 variants.
VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike",
    "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "UniRobot",
    "adam", "anika", "anikaRobot", "announcer", "antonio", "aunty", "belinda", "benjamin",
    "boris", "caleb", "croak", "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4",
    "f5", "fast", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john",
    "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1",
    "m2", "m3", "m4", "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "norbert",
    "pablo", "paul", "pedro", "quincy", "rob", "robert", "robosoft", "robosoft2", "robosoft3",
    "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby",
    "steph", "steph2", "steph3", "travis", "victor", "whisper", "whisperf", "zac",
)  # fmt: skip
SPLITS = ("train", "val", "test")
SPEED_RANGE = (130, 230)  # words per minute
PITCH_RANGE = (25, 75)  # espeak-ng's 0-99 scale
SNR_DB_RANGE = (5.0, 20.0)
GAIN_RANGE = (0.2, 0.9)  # peak amplitude of the word, before the noise

# Log-mel features.
FRAME, HOP, N_FFT, N_MELS = 400, 160, 512, 40  # 25 ms, 10 ms at 16 kHz
N_FRAMES = 1 + (SAMPLE_RATE - FRAME) // HOP  # 98
FEATURE_SHAPE = (N_FRAMES, N_MELS)
MEL_RANGE = (20.0, 7600.0)  # Hz
VERSION = 2  # bump when the synthesis changes: cached files carry it in their name

_SILENCE_DB = -50  # below the word's peak: the silence trimmed around a word
_VOICE_SCRIPT = Path(__file__).resolve().with_name("espeak_voice.py")


class Speaker(NamedTuple):
    """One synthetic speaker: espeak-ng's voice ``accent+variant``, rate and pitch."""

    accent: str
    variant: str
    speed: int
    pitch: int
    split: str  # "train", "val" or "test"


class Keywords(NamedTuple):
    """The clips: int16 audio ``(n, 16000)``, int32 labels and speaker indices ``(n,)``."""

    audio: np.ndarray
    label: np.ndarray
    speaker: np.ndarray
    speakers: tuple[Speaker, ...]

    def split_mask(self, split: str) -> np.ndarray:
        """Which clips belong to ``split`` ("train", "val" or "test")."""
        return np.array([self.speakers[s].split == split for s in self.speaker])


# ------------------------------------------------------------------------------- speakers
def make_speakers(
    seed: int, per_variant: int = 2, fractions: tuple[float, float] = (0.15, 0.15)
) -> tuple[Speaker, ...]:
    """``per_variant`` speakers for each variant, the variants split among train/val/test.

    ``fractions`` are the shares of the variants held out for validation and for test;
    each held-out share has at least one variant. The speakers of one variant get distinct
    accents and their own speed and pitch, all drawn from ``seed``.
    """
    if not 1 <= per_variant <= len(ACCENTS):
        raise ValueError(f"per_variant must be in [1, {len(ACCENTS)}]; got {per_variant}")
    if min(fractions) <= 0 or sum(fractions) >= 1:
        raise ValueError(f"fractions must be > 0 with a sum < 1; got {fractions}")
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(len(VARIANTS))
    n_val, n_test = (max(1, round(f * len(VARIANTS))) for f in fractions)
    split_of = {}
    for rank, v in enumerate(order):
        split_of[VARIANTS[v]] = (
            "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
        )
    speakers = []
    for variant in VARIANTS:
        for a in rng.choice(len(ACCENTS), size=per_variant, replace=False):
            speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
            pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
            speakers.append(Speaker(ACCENTS[a], variant, speed, pitch, split_of[variant]))
    return tuple(speakers)


# ------------------------------------------------------------------------------ synthesis
def espeak_library() -> tuple[str, str]:
    """The paths of ``libespeak-ng`` and of its ``espeak-ng-data``, from the espeakng-loader
    wheel; a clear error when it is not installed."""
    try:
        import espeakng_loader
    except ImportError as error:
        raise RuntimeError(
            "this example synthesizes its data set with espeak-ng from the package "
            "espeakng-loader, which is not installed: `pip install adamw_jax[examples]`"
        ) from error
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def _trim(audio: np.ndarray) -> np.ndarray:
    """``audio`` from its first to its last 10 ms block within 50 dB of its peak."""
    block = ESPEAK_RATE // 100  # 10 ms
    n = len(audio) // block
    envelope = np.abs(audio[: n * block]).reshape(n, block).max(axis=1)
    loud = np.flatnonzero(envelope > 10 ** (_SILENCE_DB / 20) * envelope.max())
    if not len(loud):
        raise RuntimeError("espeak-ng spoke a word as silence")
    return audio[loud[0] * block : (loud[-1] + 1) * block]


def speak_words(speaker: Speaker, words: Sequence[str] = WORDS) -> list[np.ndarray]:
    """Each word spoken by ``speaker`` (float32 at 22.05 kHz, silence trimmed).

    One process (``espeak_voice.py``) speaks the words, one synthesizer call per word, in
    the order given: the same words in the same order give the same samples.
    """
    library, data_dir = espeak_library()
    voice = f"{speaker.accent}+{speaker.variant}"
    command = [
        sys.executable,
        "-I",
        "-S",
        str(_VOICE_SCRIPT),
        library,
        data_dir,
        ESPEAK_VERSION,
        voice,
    ]
    command += [str(speaker.speed), str(speaker.pitch), *words]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{speaker}: {done.stderr.decode().strip()}")
    raw, pieces = done.stdout, []
    for _ in words:
        (n,) = struct.unpack_from("<I", raw)
        samples = np.frombuffer(raw[4 : 4 + 2 * n], "<i2").astype(np.float32) / 32768.0
        pieces.append(_trim(samples))
        raw = raw[4 + 2 * n :]
    return pieces


def _resample(buffer: np.ndarray) -> np.ndarray:
    """One second at 22.05 kHz to one second at 16 kHz: the spectrum cut at 8 kHz."""
    spectrum = np.fft.rfft(buffer.astype(np.float64))[: SAMPLE_RATE // 2 + 1]
    spectrum[-1] = spectrum[-1].real  # the Nyquist bin of a real signal
    return np.fft.irfft(spectrum, n=SAMPLE_RATE) * (SAMPLE_RATE / ESPEAK_RATE)


def make_clip(word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One second of int16 audio at 16 kHz: the word placed at random, gain, noise."""
    word = word[:ESPEAK_RATE]  # no word of this vocabulary lasts a second at these speeds
    buffer = np.zeros(ESPEAK_RATE)
    offset = int(rng.integers(0, ESPEAK_RATE - len(word) + 1))
    buffer[offset : offset + len(word)] = word
    clip = _resample(buffer)
    clip *= rng.uniform(*GAIN_RANGE) / max(np.abs(clip).max(), 1e-9)
    lo, hi = (round(x * SAMPLE_RATE / ESPEAK_RATE) for x in (offset, offset + len(word)))
    speech_rms = np.sqrt(np.mean(clip[lo:hi] ** 2))
    white = rng.standard_normal(SAMPLE_RATE)
    brown = np.cumsum(rng.standard_normal(SAMPLE_RATE))
    brown -= brown.mean()
    mix = rng.uniform()
    noise = mix * white / white.std() + (1 - mix) * brown / brown.std()
    noise /= noise.std()
    snr_db = rng.uniform(*SNR_DB_RANGE)
    clip += noise * speech_rms * 10 ** (-snr_db / 20)
    return np.round(np.clip(clip, -1.0, 1.0) * 32767).astype(np.int16)


def speaker_clips(speaker: Speaker, index: int, seed: int) -> np.ndarray:
    """The ``(20, 16000)`` int16 clips of speaker number ``index``: one per word, in the
    order of :data:`WORDS`, with offsets, gains and noise drawn from ``(seed, index)``."""
    rng = np.random.default_rng([seed, 1, index])
    return np.stack([make_clip(word, rng) for word in speak_words(speaker)])


def build(
    seed: int = 0,
    per_variant: int = 2,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> Keywords:
    """Synthesizes the data set: every word of :data:`WORDS` by every speaker.

    Args:
      seed: fixes the speakers, the word offsets, gains and noise (same seed, same bytes).
      per_variant: speakers per voice variant, in [1, 8]: ``100 * per_variant * 20`` clips.
      workers: speakers synthesized at once, each by its own process (None: the number
        of CPUs). The result does not depend on it.
      progress: a tqdm bar over the speakers.

    Raises:
      RuntimeError: espeakng-loader (the synthesizer) is not installed.
    """
    speakers = make_speakers(seed, per_variant)
    espeak_library()  # fails early, before any thread starts
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        clips = pool.map(speaker_clips, speakers, range(len(speakers)), [seed] * len(speakers))
        if progress:
            from tqdm.auto import tqdm

            clips = tqdm(clips, total=len(speakers), desc="espeak-ng", unit="speaker")
        audio = np.concatenate(list(clips))
    n = len(WORDS)
    label = np.tile(np.arange(n, dtype=np.int32), len(speakers))
    speaker = np.repeat(np.arange(len(speakers), dtype=np.int32), n)
    return Keywords(audio, label, speaker, speakers)


def load_or_build(
    cache_dir: str | Path, seed: int = 0, per_variant: int = 2, *, progress: bool = False
) -> Keywords:
    """:func:`build`, cached in ``cache_dir`` (one ``.npz`` per seed and size)."""
    path = Path(cache_dir) / f"keywords_v{VERSION}_seed{seed}_x{per_variant}.npz"
    speakers = make_speakers(seed, per_variant)
    if path.exists():
        with np.load(path) as f:
            return Keywords(f["audio"], f["label"], f["speaker"], speakers)
    data = build(seed, per_variant, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, audio=data.audio, label=data.label, speaker=data.speaker)
    os.replace(tmp, path)  # never a half-written cache file
    return data


# ------------------------------------------------------------------------------- features
def mel_filterbank() -> np.ndarray:
    """``(N_FFT // 2 + 1, N_MELS)`` triangular filters, evenly spaced on the HTK mel scale."""
    low, high = (2595.0 * np.log10(1.0 + f / 700.0) for f in MEL_RANGE)  # Hz -> mel
    edges = 700.0 * (10.0 ** (np.linspace(low, high, N_MELS + 2) / 2595.0) - 1.0)  # -> Hz
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).T.astype(np.float32)


@jax.jit
def _log_mel(audio: jax.Array) -> jax.Array:
    x = audio.astype(jnp.float32) / 32768.0
    index = HOP * jnp.arange(N_FRAMES)[:, None] + jnp.arange(FRAME)[None, :]
    frames = x[:, index] * jnp.hanning(FRAME + 1)[:-1].astype(jnp.float32)  # periodic Hann
    power = jnp.abs(jnp.fft.rfft(frames, n=N_FFT)) ** 2
    return jnp.log(power @ jnp.asarray(mel_filterbank()) + 1e-6)


def log_mel(audio: np.ndarray | jax.Array, batch: int = 256) -> jax.Array:
    """Log-mel spectrograms ``(n, 98, 40)`` float32 of int16 clips ``(n, 16000)``.

    Computed ``batch`` clips at a time (the last batch padded with silence, so that one
    compiled program serves every call), so that the spectra of a few thousand clips need
    not be in memory at once.
    """
    audio = np.asarray(audio)
    if audio.ndim != 2 or audio.shape[1] != SAMPLE_RATE:
        raise ValueError(f"audio must be (n, {SAMPLE_RATE}); got {audio.shape}")
    n = len(audio)
    padded = np.concatenate([audio, np.zeros((-n % batch, SAMPLE_RATE), audio.dtype)])
    parts = [_log_mel(jnp.asarray(padded[i : i + batch])) for i in range(0, n, batch)]
    return jnp.concatenate(parts)[:n]
