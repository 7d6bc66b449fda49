"""AdamW for JAX: Adam's moment scaling and decoupled weight decay as Optax transformations."""

from adamw_jax import compat, fused, masks, quantize, schedules, sharding, stability
from adamw_jax._packing import PackedMoments
from adamw_jax._trees import state_nbytes
from adamw_jax.alias import adam, adamw
from adamw_jax.decay import (
    AddDecayedWeightsState,
    DecoupledWeightDecayState,
    add_decayed_weights,
    decoupled_weight_decay,
)
from adamw_jax.fused import FusedAdamW, fused_adamw
from adamw_jax.moments import ScaleByAdamState, convert_state, scale_by_adam
from adamw_jax.precision import LowPrecisionUpdateState, low_precision_update
from adamw_jax.quantize import QuantizedArray, QuantizedStorage
from adamw_jax.stability import SkipSpikesState, cautious, skip_spikes

__version__ = "0.1.0"

__all__ = [
    "AddDecayedWeightsState",
    "DecoupledWeightDecayState",
    "FusedAdamW",
    "LowPrecisionUpdateState",
    "PackedMoments",
    "QuantizedArray",
    "QuantizedStorage",
    "ScaleByAdamState",
    "SkipSpikesState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "cautious",
    "compat",
    "convert_state",
    "decoupled_weight_decay",
    "fused",
    "fused_adamw",
    "low_precision_update",
    "masks",
    "quantize",
    "scale_by_adam",
    "schedules",
    "sharding",
    "skip_spikes",
    "stability",
    "state_nbytes",
]
