"""A training process killed with SIGKILL at random moments (also mid-save) resumes exactly."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).with_name("_killable_train.py")
STEPS = 20


def start(ckpt: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(ckpt), str(out), str(STEPS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def wait_for_first_step(proc: subprocess.Popen, deadline: float) -> list[str]:
    """Reads output until the first completed step (or the end); returns the lines read."""
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith("step "):
            break
    return lines


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    rng = random.Random(1234)
    deadline = time.monotonic() + 150
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.npz"
    kills, resumed_from = 0, []
    try:
        for _ in range(5):
            proc = start(ckpt, out)
            lines = wait_for_first_step(proc, deadline)
            resumed_from += [int(x.split()[1]) for x in lines if x.startswith("resumed ")]
            time.sleep(rng.uniform(0.0, 0.6))  # lands in a step or in a save
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += proc.returncode == -signal.SIGKILL
            assert not out.exists() or proc.returncode == 0
        final = start(ckpt, out)
        rest, _ = final.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert final.returncode == 0, rest
        resumed_from += [int(x.split()[1]) for x in rest.splitlines() if x.startswith("resumed ")]
        plain = start(tmp_path / "plain", tmp_path / "plain.npz")
        log, _ = plain.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert plain.returncode == 0, log
    finally:
        for p in [locals().get("proc"), locals().get("final"), locals().get("plain")]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert kills >= 3  # most kills hit a running process, not a finished one
    assert resumed_from and resumed_from == sorted(resumed_from)  # progress is never lost
    assert resumed_from[-1] < STEPS
    got, want = np.load(out), np.load(tmp_path / "plain.npz")
    assert sorted(got.files) == sorted(want.files)
    for name in want.files:
        assert got[name].tobytes() == want[name].tobytes(), name
