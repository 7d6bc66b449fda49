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
from adamw_jax.tuning import _heatmap
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
        """One row per training run: the configuration's hyperparameters, then the ``config``
        and ``seed`` indices, then every metric (for ``pandas.DataFrame`` or CSV)."""
        return [
            {
                **config,
                "config": c,
                "seed": s,
                **{k: float(v[c, s]) for k, v in self.metrics.items()},
            }
            for c, config in enumerate(self.configs)
            for s in range(self.seeds)
        ]

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes :meth:`to_records` as CSV (``.csv``) or JSON (``.json``); returns the path.

        Floats are written in full (Python's shortest exact form, NaN as ``nan`` or
        ``NaN``), so :meth:`load` reads back the same bits."""
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

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Results:
        """Reads what :meth:`save` wrote: the same configurations and metrics, bit for bit,
        failures included (``wall_time`` is not saved and reads as 0).

        In each record the names before ``config`` are the hyperparameters and the names
        after ``seed`` the metrics, as :meth:`to_records` orders them.
        """
        path = pathlib.Path(path)
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                records = list(csv.DictReader(f))
        elif path.suffix == ".json":
            records = json.loads(path.read_text())
        else:
            raise ValueError(f"path must end in .csv or .json; got {str(path)!r}.")
        return _from_records(records, str(path))

    def heatmap(
        self,
        x: str,
        y: str,
        metric: str,
        *,
        mode: str = "min",
        path: str | pathlib.Path | None = None,
        ax: Any = None,
    ) -> Any:
        """Draws the seed-averaged ``metric`` over hyperparameters ``x`` and ``y``.

        One cell per pair of values evaluated, coloured by :meth:`mean` (from the best value
        to the 90th percentile away from it: cells beyond take the end colour); a star marks the
        best configuration (:meth:`best`), a cross each configuration with a failed seed,
        and cells nothing was evaluated at stay blank (a search is not a grid). An axis is
        log where its values are positive and span a decade or more, symlog (linear from 0
        to the smallest positive value) where one of them is 0, linear otherwise. With
        ``x="learning_rate", y="weight_decay"`` it is the decoupling paper's Figure 2.

        Args:
          x: the hyperparameter along the horizontal axis.
          y: the hyperparameter along the vertical axis.
          metric: one of the metrics.
          mode: ``"min"`` or ``"max"``: which end of ``metric`` is best.
          path: where to save the figure (any format matplotlib writes, e.g. ``.png``), or
            None.
          ax: a matplotlib ``Axes`` to draw on, or None for a new figure's.

        Returns:
          The matplotlib ``Axes``. Needs matplotlib (``pip install 'adamw_jax[tune]'``).
        """
        _validate.check_choice("mode", mode, ("min", "max"))
        names = sorted(self.configs[0])
        for arg, name in (("x", x), ("y", y)):
            if name not in self.configs[0]:
                raise KeyError(f"{arg} must be one of the hyperparameters {names}; got {name!r}.")
        means = self.mean(metric)
        best = None
        if np.isfinite(means).any():
            config, _ = self.best(metric, mode)
            best = (config[x], config[y])
        xs = [c[x] for c in self.configs]
        ys = [c[y] for c in self.configs]
        ax = _heatmap.draw(ax, (x, y, metric), xs, ys, means, best, mode)
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        return ax


def _from_records(records: list[dict[str, Any]], where: str) -> Results:
    if not records or "config" not in records[0] or "seed" not in records[0]:
        raise ValueError(f"path {where!r} holds no records written by Results.save.")
    keys = list(records[0])
    hparams = keys[: keys.index("config")]
    metrics = keys[keys.index("seed") + 1 :]
    configs = max(int(r["config"]) for r in records) + 1
    seeds = max(int(r["seed"]) for r in records) + 1
    values = {k: np.full((configs, seeds), np.nan) for k in metrics}
    found: list[Config | None] = [None] * configs
    for r in records:
        c, s = int(r["config"]), int(r["seed"])
        found[c] = {k: float(r[k]) for k in hparams}
        for k in metrics:
            values[k][c, s] = float(r[k])
    if any(c is None for c in found) or len(records) != configs * seeds:
        raise ValueError(f"path {where!r} misses records: expected {configs} x {seeds}.")
    return Results(configs=found, metrics=values)


def concatenate(parts: Sequence[Results]) -> Results:
    """The results of several sweeps, one after the other."""
    parts = [p for p in parts if p.configs]
    return Results(
        configs=[c for p in parts for c in p.configs],
        metrics={k: np.concatenate([p.metrics[k] for p in parts]) for k in parts[0].metrics},
        wall_time=sum(p.wall_time for p in parts),
    )
