"""The picture of a search: a metric over two hyperparameters, one cell per pair of values.

The axes are log where every value is positive and they span a decade or more, symlog
(linear between 0 and the smallest positive value, log above) where the other values are
positive and one is 0, linear otherwise. A cell's edges lie halfway between neighbouring
values on that scale, so each value sits at its cell's centre.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _import_matplotlib() -> Any:
    try:
        import matplotlib.figure  # an optional extra
    except ImportError as err:
        raise ImportError(
            "Results.heatmap needs matplotlib, an optional extra: pip install "
            "'adamw_jax[tune]' (or pip install matplotlib)."
        ) from err
    return matplotlib


def scale(values: np.ndarray) -> tuple[str, dict[str, Any]]:
    """The axis scale for these distinct sorted values, and its keyword arguments."""
    positive = values[values > 0]
    decades = len(positive) > 1 and positive.max() / positive.min() >= 10
    if decades and len(positive) == len(values):
        return "log", {}
    if decades and len(positive) == len(values) - 1 and values[0] == 0:
        return "symlog", {"linthresh": float(positive.min()), "linscale": 0.5}
    return "linear", {}


def _edges(values: np.ndarray, axis: Any) -> np.ndarray:
    """Cell edges halfway between neighbouring values in the axis's own coordinates."""
    transform = axis.get_transform()
    t = transform.transform(values.astype(float).reshape(-1, 1)).ravel()
    step = np.diff(t) if len(t) > 1 else np.array([1.0])
    inner = (t[:-1] + t[1:]) / 2
    edges = np.concatenate([[t[0] - step[0] / 2], inner, [t[-1] + step[-1] / 2]])
    return transform.inverted().transform(edges.reshape(-1, 1)).ravel()


def cells(xs: np.ndarray, ys: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, ...]:
    """The distinct values of each axis and the (len(y), len(x)) grid of ``means``, NaN
    where no configuration lies; raises when two configurations share a cell."""
    x_values, ix = np.unique(xs, return_inverse=True)
    y_values, iy = np.unique(ys, return_inverse=True)
    grid = np.full((len(y_values), len(x_values)), np.nan)
    filled = np.zeros(grid.shape, bool)
    for c, (i, j) in enumerate(zip(iy, ix, strict=True)):
        if filled[i, j]:
            raise ValueError(
                f"configurations share the cell ({xs[c]}, {ys[c]}): they differ in another "
                "hyperparameter; pass Results with one configuration per cell."
            )
        filled[i, j] = True
        grid[i, j] = means[c]
    return x_values, y_values, grid, filled


def color_range(values: np.ndarray, mode: str) -> tuple[float, float, str]:
    """The colour scale's ends and the colour bar's ``extend``: from the best value to the
    90th percentile away from it, so a few diverged cells do not flatten the rest (they
    take the end colour, and the bar's arrow says so)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0, "neither"
    low, high = float(finite.min()), float(finite.max())
    if mode == "min":
        clip = float(np.quantile(finite, 0.9))
        return low, max(clip, low + 1e-12), "max" if clip < high else "neither"
    clip = float(np.quantile(finite, 0.1))
    return min(clip, high - 1e-12), high, "min" if clip > low else "neither"


def draw(
    ax: Any,
    names: tuple[str, str, str],
    xs,
    ys,
    means,
    best: tuple[float, float] | None,
    mode: str,
) -> Any:
    """Draws the cells on ``ax`` (a new figure's when None); returns the axes."""
    if ax is None:
        ax = _import_matplotlib().figure.Figure(figsize=(6.4, 4.8)).add_subplot()
    else:
        _import_matplotlib()
    x_values, y_values, grid, filled = cells(np.asarray(xs), np.asarray(ys), np.asarray(means))
    for values, set_scale in ((x_values, ax.set_xscale), (y_values, ax.set_yscale)):
        name, kwargs = scale(values)
        set_scale(name, **kwargs)
    x_edges, y_edges = _edges(x_values, ax.xaxis), _edges(y_values, ax.yaxis)
    vmin, vmax, extend = color_range(grid, mode)
    cmap = "viridis_r" if mode == "min" else "viridis"  # the best end is bright either way
    mesh = ax.pcolormesh(
        x_edges, y_edges, np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax
    )
    ax.figure.colorbar(mesh, ax=ax, label=f"{names[2]} (mean over seeds)", extend=extend)
    failed_y, failed_x = np.nonzero(filled & ~np.isfinite(grid))
    if len(failed_x):
        ax.scatter(
            x_values[failed_x],
            y_values[failed_y],
            marker="x",
            c="crimson",
            s=60,
            label="failed (non-finite)",
        )
    if best is not None:
        ax.scatter(
            [best[0]],
            [best[1]],
            marker="*",
            c="white",
            edgecolors="black",
            s=260,
            label="best",
            zorder=3,
        )
    ax.set_xticks(x_values, [f"{v:.3g}" for v in x_values], rotation=45)
    ax.set_yticks(y_values, [f"{v:.3g}" for v in y_values])
    ax.minorticks_off()
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=2, frameon=False)
    return ax
