"""Test-wide settings: strict dtype promotion, so no silent float64/float32 mixing passes."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
