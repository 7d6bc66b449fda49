"""Helpers on arrays shared by the moment storage formats and layouts."""

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """``x``'s sharding when its type carries one (explicit mesh axes), else None.

    Under a mesh whose axes are ``jax.sharding.AxisType.Explicit`` a sharded array's
    sharding is part of its type (``float32[4,16@x]``); arrays made for it (a state's
    zeros, a reshaped buffer) must carry the same type as the step's outputs.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(entry is None for entry in spec):
        return None
    return sharding


def replicated(sharding: NamedSharding) -> NamedSharding:
    """The fully replicated sharding on ``sharding``'s mesh."""
    return NamedSharding(sharding.mesh, PartitionSpec())


def last_axis_shards(x: jax.Array) -> int:
    """How many ways an explicit sharding splits ``x``'s last axis (1 when it does not)."""
    sharding = explicit_sharding(x)
    if sharding is None or not jax.numpy.ndim(x):
        return 1
    spec = tuple(sharding.spec) + (None,) * (jax.numpy.ndim(x) - len(sharding.spec))
    entry = spec[jax.numpy.ndim(x) - 1]
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sharding.mesh.shape[name] for name in names)
