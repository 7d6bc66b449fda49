"""A training process killed with SIGKILL at random moments (also mid-save) resumes exactly."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_trees_bitwise_equal

pytestmark = pytest.mark.slow  # SIGKILLed training processes

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


def read_until_step(proc: subprocess.Popen, target: int, deadline: float) -> list[str]:
    """Reads output until step ``target`` has been reported (or the end); returns the lines."""
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith("step ") and int(line.split()[1]) >= target:
            break
    return lines


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    rng = random.Random(1234)
    deadline = time.monotonic() + 150
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.npz"
    targets = sorted(rng.sample(range(2, STEPS - 3), 5))  # kill soon after these steps
    kills, resumed_from = 0, []
    try:
        for target in targets:
            proc = start(ckpt, out)
            lines = read_until_step(proc, target, deadline)
            resumed_from += [int(x.split()[1]) for x in lines if x.startswith("resumed ")]
            time.sleep(rng.uniform(0.0, 0.05))  # lands in the next step or its save
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += proc.returncode == -signal.SIGKILL
        assert not out.exists()  # no killed run got to the end
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
    assert kills == len(targets)  # every kill hit a running process
    assert len(resumed_from) == len(targets)  # each restart found a checkpoint to resume
    assert resumed_from == sorted(resumed_from)  # progress is never lost
    assert resumed_from[-1] < STEPS
    got, want = np.load(out), np.load(tmp_path / "plain.npz")
    assert sorted(got.files) == sorted(want.files)
    assert_trees_bitwise_equal(dict(got), dict(want))
