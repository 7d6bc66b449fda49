"""Storages of sweeps: an append-only file of every member's metrics, so that a killed
sweep resumes where it stopped and several processes can share one sweep.

The file holds JSON lines. The first names the call that writes it (:func:`identity`):
the search and its arguments, ``train``'s fingerprint, the seeds, the key and the names
of the hyperparameters and metrics. Each later line is one member: its configuration, its
seed and its metrics. A line is written whole, with one ``write`` and an ``fsync``, under
an exclusive ``flock`` of the file, and nothing is ever rewritten: a line a kill left torn
(no newline, or no JSON) is ignored, so its member is trained again.

Several processes train one sweep by claiming chunks of members: a process trains a chunk
only while it holds a POSIX record lock on that chunk's byte of the ``.lock`` file beside
the storage. The kernel drops the lock when its holder dies, so the claim of a killed
process never blocks the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from adamw_jax.tuning._space import Config

FORMAT = "adamw_jax.tuning storage, version 1"
# The fields of a storage's first line, and how an error names each when it differs.
FIELDS = {
    "search": "the search or its arguments (configs, lines, rounds, ...)",
    "train": "train (its computation, traced by jax.make_jaxpr)",
    "hparams": "the hyperparameter names",
    "metrics": "train's metric names",
    "seeds": "seeds",
    "key": "key",
    "members_per_call": "members_per_call",
}
MemberId = tuple[tuple[tuple[str, float], ...], int]  # (sorted config items, seed)


def member_id(config: Mapping[str, float], seed: int) -> MemberId:
    return tuple(sorted((k, float(v)) for k, v in config.items())), int(seed)


def fingerprint(closed_jaxpr: Any) -> str:
    """A hash of a traced computation: its jaxpr's text and the bytes of its constants.

    The text holds every operation, shape and dtype (a changed model, loss, step count or
    optimizer changes it) and no addresses or file positions, so the same ``train`` gives
    the same fingerprint in every process; the constants (data closed over) are hashed by
    value.
    """
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed_jaxpr.jaxpr))  # callbacks' addresses
    digest = hashlib.sha256(text.encode())
    for const in closed_jaxpr.consts:
        value = np.asarray(jax.random.key_data(const) if _is_key(const) else const)
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _is_key(value: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key)


def identity(
    search: Mapping[str, Any],
    *,
    train: str,
    hparams: Sequence[str],
    metrics: Sequence[str],
    seeds: int,
    key_data: np.ndarray,
    key_impl: Any,
    members_per_call: int | None,
) -> dict[str, Any]:
    """The first line of a storage: what identifies the call that writes it."""
    return {
        "format": FORMAT,
        "search": json.loads(json.dumps(dict(search))),  # tuples as lists, as read back
        "train": train,
        "hparams": sorted(hparams),
        "metrics": sorted(metrics),
        "seeds": int(seeds),
        "key": {
            "data": np.asarray(key_data).tolist(),
            "impl": None if key_impl is None else str(key_impl),
        },
        "members_per_call": members_per_call,
    }


def _parse(line: bytes) -> dict[str, Any] | None:
    """A whole line's JSON object, or None for a torn or garbled line."""
    if not line.endswith(b"\n"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Storage:
    """An open storage file; see the module's docstring for its format."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = pathlib.Path(path)
        if self.path.is_dir():
            raise ValueError(f"storage must be a file path, not a directory; got {str(path)!r}.")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"storage {str(path)!r} cannot be opened: {err}.") from err
        self.lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        with self._locked():
            lines = self._lines()
            if not lines:
                self._append([header])
            else:
                _check_header(_parse(lines[0]), header, self.path)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.lock_fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _lines(self) -> list[bytes]:
        with open(self.path, "rb") as f:
            return f.readlines()

    def _append(self, records: list[dict[str, Any]]) -> None:
        """Appends whole lines (after a newline closing a torn last line, if any) and syncs."""
        size = os.fstat(self.fd).st_size
        prefix = b""
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                prefix = b"" if f.read(1) == b"\n" else b"\n"
        data = prefix + b"".join(json.dumps(r).encode() + b"\n" for r in records)
        os.write(self.fd, data)
        os.fsync(self.fd)

    def members(self) -> dict[MemberId, dict[str, float]]:
        """Every member recorded so far: its id -> its metrics (the first record wins)."""
        with self._locked():
            lines = self._lines()
        found: dict[MemberId, dict[str, float]] = {}
        for line in lines[1:]:
            record = _parse(line)
            if record is None or "member" not in record:
                continue
            mid = member_id(record["member"]["config"], record["member"]["seed"])
            found.setdefault(mid, {k: float(v) for k, v in record["metrics"].items()})
        return found

    def record(self, members: list[tuple[Config, int, dict[str, float]]]) -> None:
        """Appends finished members: (configuration, seed, metrics) each."""
        records = [
            {"member": {"config": config, "seed": seed}, "metrics": metrics}
            for config, seed, metrics in members
        ]
        with self._locked():
            self._append(records)

    @contextlib.contextmanager
    def claim(self, name: str, *, wait: bool) -> Iterator[bool]:
        """Holds the claim on chunk ``name`` (True), or yields False when another process
        holds it and ``wait`` is False. The kernel drops a dead holder's claim."""
        offset = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.lockf(self.lock_fd, flags, 1, offset)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, offset)


def _check_header(found: dict[str, Any] | None, header: dict[str, Any], path: pathlib.Path):
    if found is None or found.get("format") != FORMAT:
        raise ValueError(
            f"storage {str(path)!r} is not a tuning storage (its first line is not "
            f"{FORMAT!r}); pass a new path or the storage of this same call."
        )
    differ = [field for field in FIELDS if not _same(found.get(field), header[field])]
    if differ:
        raise ValueError(
            f"storage {str(path)!r} was written by another call: "
            + "; ".join(
                f"{FIELDS[f]} differ ({difference(f, found.get(f), header[f])})" for f in differ
            )
            + ". Pass a new storage path for a new call, or this storage's own arguments."
        )


def difference(where: str, stored: Any, now: Any) -> str:
    """Where two JSON values first differ, and how."""
    if isinstance(stored, dict) and isinstance(now, dict):
        for k in [*now, *(k for k in stored if k not in now)]:  # the call's own order
            if not _same(stored.get(k), now.get(k)):
                return difference(f"{where}[{k!r}]", stored.get(k), now.get(k))
    if isinstance(stored, list) and isinstance(now, list):
        if len(stored) != len(now):
            return f"{where}: stored {len(stored)} entries, now {len(now)}"
        for i, (a, b) in enumerate(zip(stored, now, strict=True)):
            if not _same(a, b):
                return difference(f"{where}[{i}]", a, b)
    return f"{where}: stored {_short(stored)}, now {_short(now)}"


def _same(a: Any, b: Any) -> bool:
    """Equality of JSON values."""
    return a == b


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."
