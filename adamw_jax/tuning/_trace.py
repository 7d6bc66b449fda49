"""``train`` traced before anything is compiled: the names it reads and returns checked,
and the fingerprint of its computation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adamw_jax.tuning import _population
from adamw_jax.tuning._population import Population, Train


class Traced(NamedTuple):
    """What tracing ``train`` once with abstract inputs tells."""

    jaxpr: Any  # the member's ClosedJaxpr
    metrics: tuple[str, ...]  # the names of train's metrics


def trace(train: Train, pop: Population, wanted: Sequence[str] = ()) -> Traced:
    """Traces one member on abstract inputs (no compilation, nothing run).

    Raises a KeyError naming the configurations' names when ``train`` reads a
    hyperparameter that none gives, and one naming ``train``'s metrics when a name of
    ``wanted`` is not among them.
    """
    hparams = {name: jax.ShapeDtypeStruct((), jnp.float32) for name in pop.hparams}
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    try:
        closed, out = jax.make_jaxpr(_population.member_fn(train, pop), return_shape=True)(
            hparams, seed
        )
    except KeyError as err:
        name = err.args[0] if err.args else None
        if not isinstance(name, str) or name in pop.hparams:
            raise
        raise KeyError(
            f"train reads the hyperparameter {name!r}, which no configuration gives; the "
            f"configurations give {sorted(pop.hparams)}."
        ) from None
    names = tuple(out) if isinstance(out, Mapping) else ()
    for metric in wanted:
        if names and metric not in names:
            raise KeyError(
                f"metric must be one of train's metrics {sorted(names)}; got {metric!r}."
            )
    return Traced(closed, names)
