"""AdamW for JAX: Adam's moment scaling and decoupled weight decay as Optax transformations."""

from adamw_jax import compat, masks, schedules, sharding
from adamw_jax.alias import adam, adamw
from adamw_jax.decay import (
    AddDecayedWeightsState,
    DecoupledWeightDecayState,
    add_decayed_weights,
    decoupled_weight_decay,
)
from adamw_jax.moments import ScaleByAdamState, scale_by_adam

__version__ = "0.1.0"

__all__ = [
    "AddDecayedWeightsState",
    "DecoupledWeightDecayState",
    "ScaleByAdamState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "compat",
    "decoupled_weight_decay",
    "masks",
    "scale_by_adam",
    "schedules",
    "sharding",
]
