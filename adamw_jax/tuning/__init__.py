r"""Choosing the learning rate and weight decay.

AdamW's result depends above all on two numbers, the learning rate :math:`\eta` and the
weight decay :math:`\lambda`. This package trains many configurations as one population and
offers three ways to choose which:

* :func:`sweep` trains a list of configurations (:func:`grid` builds a full grid), each with
  one or more seeds, in vmapped chunks or one compiled member at a time, optionally with the
  member axis split over the devices of a mesh;
* :func:`separable_search` uses the decoupling paper's observation that with decoupled weight
  decay the best :math:`\lambda` hardly moves with :math:`\eta`: it searches the learning
  rate at a fixed decay, then the decay at the best learning rate — two lines instead of a
  plane;
* :func:`optuna_search` runs Bayesian optimization (Optuna's TPE, or GP) with each batch of
  trials evaluated as one population;

and :class:`Population` runs many configurations inside the user's own training loop
(``init``/``step`` functions and a Python data iterator; one compiled call per step for
every member), which :func:`loop_train` hands to the sweep and the searches;
:func:`adamw_jax.schedules.suggest_weight_decay` gives a starting :math:`\lambda` from
the EMA view of weight decay, with no training at all.

The training run is the user's: ``train(hparams, key)`` takes a dict of float32 scalars
(traced: every hyperparameter of :func:`adamw_jax.adamw` that can be an array — learning
rate or a schedule's peak, weight decay, ``b1``, ``b2``, ``eps`` — can vary between
members) and a PRNG key, runs a whole training (``lax.scan`` or ``fori_loop``), and returns
a dict of scalar metrics. Optax's schedules refuse a traced peak;
:func:`adamw_jax.schedules.scale_schedule` and :func:`adamw_jax.schedules.warmup_cosine`
build one.

Before compiling, ``train`` is traced once on abstract inputs, so a hyperparameter it reads
that no configuration gives, or a metric it does not return, is an error at once. With
``storage=`` a sweep or search records each member as it finishes and resumes after a kill,
and several processes can share it (Optuna's own storages for :func:`optuna_search`);
:meth:`Results.heatmap` draws a metric over two hyperparameters, and :meth:`Results.load`
reads what :meth:`Results.save` wrote.

``import adamw_jax`` does not import this package: write ``from adamw_jax import tuning``.

Example:
  >>> import jax, jax.numpy as jnp, optax, adamw_jax
  >>> from adamw_jax import tuning
  >>> def train(hparams, key):
  ...     tx = adamw_jax.adamw(hparams["learning_rate"], weight_decay=hparams["weight_decay"])
  ...     w = jax.random.normal(key, (4,))
  ...     def step(carry, _):
  ...         w, state = carry
  ...         g = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2))(w)
  ...         u, state = tx.update(g, state, w)
  ...         return (optax.apply_updates(w, u), state), None
  ...     (w, _), _ = jax.lax.scan(step, (w, tx.init(w)), None, length=50)
  ...     return {"loss": jnp.sum((w - 1.0) ** 2)}
  >>> configs = tuning.grid(learning_rate=tuning.log_values(1e-3, 1e-1, 3),
  ...                       weight_decay=[0.0, 0.1])
  >>> results = tuning.sweep(train, configs, key=jax.random.key(0), progress=False)
  >>> best_config, best_metrics = results.best("loss")
  >>> best_config["learning_rate"]
  0.1

References:
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset size",
  ICML 2025 (arXiv:2405.13698).
  Bergsma et al., "Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
  Pre-training", 2025 (arXiv:2505.13738).
  Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD 2019.
"""

from adamw_jax.tuning._loop import LoopTrain, Population, loop_train
from adamw_jax.tuning._optuna import optuna_search
from adamw_jax.tuning._population import seed_keys
from adamw_jax.tuning._results import Failure, Results
from adamw_jax.tuning._search import separable_search
from adamw_jax.tuning._space import (
    LinearRange,
    LogRange,
    grid,
    linear_range,
    linear_values,
    log_range,
    log_values,
)
from adamw_jax.tuning._sweep import as_hparams, sweep

__all__ = [
    "Failure",
    "LinearRange",
    "LogRange",
    "LoopTrain",
    "Population",
    "Results",
    "as_hparams",
    "grid",
    "linear_range",
    "linear_values",
    "log_range",
    "log_values",
    "loop_train",
    "optuna_search",
    "seed_keys",
    "separable_search",
    "sweep",
]
