"""The outcome of a sweep or search: every member's metrics, with the failed ones listed."""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from adamw_jax import _validate
from adamw_jax.tuning._space import Config


class Failure(NamedTuple):
    """A member whose metric was not finite."""

    config: int  # index into Results.configs
    seed: int
    metric: str
    value: float


@dataclasses.dataclass(frozen=True)
class Results:
    """The outcome of a sweep or search.

    Attributes:
      configs: the configurations, in the order they were evaluated.
      metrics: metric name -> NumPy array of shape ``(len(configs), seeds)``.
      wall_time: seconds the runs took, compilation included.
    """

    configs: list[Config]
    metrics: dict[str, np.ndarray]
    wall_time: float = 0.0

    @property
    def seeds(self) -> int:
        """Seeds per configuration."""
        return next(iter(self.metrics.values())).shape[1]

    @property
    def evaluations(self) -> int:
        """Training runs: configurations times seeds."""
        return len(self.configs) * self.seeds

    @property
    def failures(self) -> list[Failure]:
        """Every (configuration, seed, metric) whose value is NaN or infinite."""
        return [
            Failure(int(c), int(s), name, float(values[c, s]))
            for name, values in self.metrics.items()
            for c, s in zip(*np.nonzero(~np.isfinite(values)), strict=True)
        ]

    def mean(self, metric: str) -> np.ndarray:
        """``metric`` averaged over seeds, per configuration (NaN where any seed failed)."""
        if metric not in self.metrics:
            raise KeyError(f"metric must be one of {sorted(self.metrics)}; got {metric!r}.")
        values = self.metrics[metric]
        return np.where(np.isfinite(values).all(axis=1), values.mean(axis=1), np.nan)

    def best(self, metric: str, mode: str = "min") -> tuple[Config, dict[str, float]]:
        """The configuration with the best seed-averaged ``metric``, and its metrics.

        Args:
          metric: the name of one of ``train``'s metrics.
          mode: ``"min"`` or ``"max"``. Configurations with a failed seed are left out.

        Returns:
          ``(config, metrics)``: the configuration's dict, and every metric averaged over
          its seeds. Ties go to the configuration evaluated first.
        """
        _validate.check_choice("mode", mode, ("min", "max"))
        means = self.mean(metric)
        if not np.isfinite(means).any():
            raise ValueError(f"every configuration failed (non-finite {metric!r}).")
        score = np.where(np.isfinite(means), means if mode == "min" else -means, np.inf)
        index = int(np.argmin(score))
        return dict(self.configs[index]), {k: float(self.mean(k)[index]) for k in self.metrics}

    def to_records(self) -> list[dict[str, Any]]:
        """One row per training run: the configuration, ``config`` and ``seed`` indices and
        every metric (for ``pandas.DataFrame`` or CSV)."""
        return [
            {
                "config": c,
                "seed": s,
                **config,
                **{k: float(v[c, s]) for k, v in self.metrics.items()},
            }
            for c, config in enumerate(self.configs)
            for s in range(self.seeds)
        ]

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes :meth:`to_records` as CSV (``.csv``) or JSON (``.json``); returns the path."""
        path = pathlib.Path(path)
        records = self.to_records()
        if path.suffix == ".csv":
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
        elif path.suffix == ".json":
            path.write_text(json.dumps(records, indent=1, allow_nan=True))
        else:
            raise ValueError(f"path must end in .csv or .json; got {str(path)!r}.")
        return path


def concatenate(parts: Sequence[Results]) -> Results:
    """The results of several sweeps, one after the other."""
    parts = [p for p in parts if p.configs]
    return Results(
        configs=[c for p in parts for c in p.configs],
        metrics={k: np.concatenate([p.metrics[k] for p in parts]) for k in parts[0].metrics},
        wall_time=sum(p.wall_time for p in parts),
    )
