"""The types of the library's public signatures (as Optax's ``base`` module holds its own)."""

from typing import Any

import chex
import optax

# Optax's own aliases, so that code inspecting signatures (as Optax's tests do, comparing an
# annotation with optax.ScalarOrSchedule) sees what is accepted.
# A hyperparameter given as a number or a scalar array (Optax annotates its betas so).
ScalarOrArray = chex.Numeric
# A number, a scalar array, or a schedule: a callable step count -> value.
ScalarOrSchedule = optax.ScalarOrSchedule
# A moment's storage: None (the params' dtype), a floating dtype (jnp.bfloat16, "bfloat16"),
# or "int8" (blockwise 8-bit codes).
MomentDtype = Any
# Which leaves decay: None (all), a bool pytree like the params (or a prefix of it), or a
# callable params -> such a pytree.
Mask = Any
