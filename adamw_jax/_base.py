"""The types of the library's public signatures (as Optax's ``base`` module holds its own).

Each is a named alias (``typing_extensions.TypeAliasType``), so that ``help()`` and
``inspect.signature`` print its name instead of the expanded ``Union``. The one exception
is :data:`ScalarOrSchedule`, which *is* ``optax.ScalarOrSchedule``: Optax's own tests tell
a factory that takes a learning-rate schedule by that annotation.
"""

from typing import Any

import chex
import jax
import optax
from typing_extensions import TypeAliasType

# A learning rate: a number, a scalar array, or a schedule (a callable step count -> value).
# Optax's alias itself, so that code inspecting signatures (as Optax's tests do, comparing
# an annotation with optax.ScalarOrSchedule) sees what is accepted.
ScalarOrSchedule = optax.ScalarOrSchedule
# Any other hyperparameter that may follow a schedule (weight decay, an L2 coefficient): a
# number, a scalar array, or a callable step count -> value.
Hyperparameter = TypeAliasType("Hyperparameter", float | jax.Array | optax.Schedule)
# A hyperparameter given as a number or a scalar array (Optax annotates its betas so).
ScalarOrArray = TypeAliasType("ScalarOrArray", chex.Numeric)
# A moment's storage: None (the params' dtype), a floating dtype (jnp.bfloat16, "bfloat16"),
# "int8" or "int4" (blockwise low-bit codes).
MomentDtype = TypeAliasType("MomentDtype", Any)
# Which leaves decay: None (all), a bool pytree like the params (or a prefix of it), or a
# callable params -> such a pytree.
Mask = TypeAliasType("Mask", Any)
# What the decay pulls toward: "zero", "init", or a pytree like the params.
DecayTarget = TypeAliasType("DecayTarget", Any)
# The parameters of PyTorch's AdamW that adamw_jax spells otherwise (or does not have): a
# keyword given a value is refused with a TypeError naming adamw_jax's spelling.
PyTorchKeyword = TypeAliasType("PyTorchKeyword", None)
