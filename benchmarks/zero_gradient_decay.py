"""A bfloat16 second moment under zero gradients, with and without the step-count salt.

    python benchmarks/zero_gradient_decay.py

100 steps of Gaussian gradients on 2048 entries, then 700 steps of zero gradients. Prints,
for ``adamw(nu_dtype=jnp.bfloat16)``, the share of second-moment entries that never changed
during the zero-gradient steps and the moment's mean over float32's. The "unsalted" row
swaps in the hash without the step count (the rounding before the fix) to show what the
salt is for.
"""

import jax
import jax.numpy as jnp
import numpy as np

import adamw_jax
from adamw_jax import _numerics

NOISY_STEPS, ZERO_STEPS, SIZE = 100, 700, 2048


def _second_moments(tx, grads, params):
    """The stored second moment after the noisy steps and after the zero-gradient ones."""
    state = tx.init(params)
    step = jax.jit(lambda g, s: tx.update(g, s, params)[1])
    for g in grads[:NOISY_STEPS]:
        state = step(g, state)
    before = np.asarray(state[0].nu, np.float64)
    for g in grads[NOISY_STEPS:]:
        state = step(g, state)
    return before, np.asarray(state[0].nu, np.float64)


def main() -> None:
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=(NOISY_STEPS, SIZE))
    grads = jnp.asarray(np.concatenate([noisy, np.zeros((ZERO_STEPS, SIZE))]), jnp.float32)
    params = jnp.zeros(SIZE, jnp.float32)
    _, reference = _second_moments(adamw_jax.adamw(1e-3), grads, params)
    salted = _numerics.hash_bits
    for label, hash_bits in [("salted", salted), ("unsalted", lambda b, salt=None: salted(b))]:
        _numerics.hash_bits = hash_bits
        before, after = _second_moments(adamw_jax.adamw(1e-3, nu_dtype=jnp.bfloat16), grads, params)
        unchanged, ratio = np.mean(after == before), after.mean() / reference.mean()
        print(
            f"{label:9s} entries unchanged over {ZERO_STEPS} zero-gradient steps: "
            f"{unchanged:.0%}; mean v / float32's: {ratio:.3f}"
        )
    _numerics.hash_bits = salted


if __name__ == "__main__":
    main()
