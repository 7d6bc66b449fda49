"""Words spoken by one espeak-ng voice, through the library's C API (ctypes, stdlib only).

``keywords_data.py`` runs this script once per speaker, in a fresh process::

  python espeak_voice.py LIBRARY DATA_DIR VERSION VOICE SPEED PITCH WORD [WORD ...]

``LIBRARY`` and ``DATA_DIR`` are ``libespeak-ng`` and its ``espeak-ng-data`` (the
``espeakng-loader`` wheel ships both), ``VERSION`` the espeak-ng version they must be,
``VOICE`` is ``accent+variant``, ``SPEED`` in words per minute (80-450) and ``PITCH`` on
espeak-ng's 0-99 scale. Standard output receives, for each word in turn, its number of
samples (uint32, little-endian) and its int16 samples at 22.05 kHz, silence included.
An error goes to standard error, with exit status 1.

Why a process per speaker: the library keeps synthesizer state (pitch phase, filter
memory) from one call to the next, even across ``espeak_Terminate``, so a word in a long
process depends on every word spoken before it. A fresh process that speaks one speaker's
words in a fixed order makes each speaker a pure function of its voice, speed and pitch.
The random generator (breathy and whispered voices) is seeded before every word, since
``espeak_Initialize`` seeds it from the clock.
"""

from __future__ import annotations

import array
import ctypes
import os
import struct
import sys

AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synthesize in the calling thread
INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exiting the process
SAMPLE_RATE = 22_050  # Hz, espeak-ng's output
RATE, PITCH = 1, 3  # espeak_PARAMETER
POS_CHARACTER = 1  # espeak_POSITION_TYPE
CHARS_UTF8 = 1  # espeak_Synth's flags
RAND_SEED = 0

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _bind(path: str) -> ctypes.CDLL:
    """``libespeak-ng`` with the signatures of the functions used here."""
    lib = ctypes.CDLL(path)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    return lib


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"espeak-ng: {call} returned {status}")


def speak(
    library: str, data_dir: str, version: str, voice: str, speed: int, pitch: int, words
) -> list[bytes]:
    """The int16 samples (native byte order) of each word, one synthesizer call per word."""
    variant = voice.partition("+")[2]
    if not os.path.isfile(os.path.join(data_dir, "voices", "!v", variant)):
        raise RuntimeError(f"espeak-ng: no voice variant {variant!r} in {data_dir}")
    lib = _bind(library)
    rate = lib.espeak_Initialize(
        AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir.encode(), INITIALIZE_DONT_EXIT
    )
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng: espeak_Initialize returned {rate}, not {SAMPLE_RATE}")
    found = lib.espeak_Info(None).decode()
    if found != version:
        raise RuntimeError(f"espeak-ng {version} expected; {library} is {found}")
    chunks: list[bytes] = []

    def collect(wav, n_samples, events):
        if n_samples > 0:
            chunks.append(ctypes.string_at(wav, 2 * n_samples))
        return 0  # continue

    callback = _CALLBACK(collect)  # kept alive until the last call
    lib.espeak_SetSynthCallback(callback)
    _check(lib.espeak_SetVoiceByName(voice.encode()), f"espeak_SetVoiceByName({voice!r})")
    _check(lib.espeak_SetParameter(RATE, speed, 0), f"espeak_SetParameter(rate, {speed})")
    _check(lib.espeak_SetParameter(PITCH, pitch, 0), f"espeak_SetParameter(pitch, {pitch})")
    spoken = []
    for word in words:
        text = word.encode()
        chunks.clear()
        _check(lib.espeak_ng_SetRandSeed(RAND_SEED), "espeak_ng_SetRandSeed")
        status = lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        _check(status, f"espeak_Synth({word!r})")
        spoken.append(b"".join(chunks))
    return spoken


def main(argv: list[str]) -> int:
    if len(argv) < 7:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 1
    library, data_dir, version, voice, speed, pitch, *words = argv
    try:
        spoken = speak(library, data_dir, version, voice, int(speed), int(pitch), words)
    except (RuntimeError, OSError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    for samples in spoken:
        out.write(struct.pack("<I", len(samples) // 2))
        pcm = array.array("h", samples)
        if sys.byteorder == "big":
            pcm.byteswap()  # the stream is little-endian
        out.write(pcm.tobytes())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
