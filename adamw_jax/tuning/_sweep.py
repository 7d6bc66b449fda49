"""Sweeps: a list of configurations trained as one population, and the checks of its inputs.

:class:`Evaluator` holds one compiled runner and the record of what it trained; the
searches evaluate their proposals through it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from adamw_jax import _validate
from adamw_jax.tuning import _population
from adamw_jax.tuning._population import Train
from adamw_jax.tuning._results import Results, concatenate
from adamw_jax.tuning._space import Config, check_values


def as_hparams(config: Mapping[str, float]) -> dict[str, jax.Array]:
    """A configuration as ``train`` receives it in a sweep: a dict of float32 scalars.

    ``jax.jit(train)(tuning.as_hparams(config), tuning.seed_keys(key, seeds)[s])`` is the
    sweep's member for ``config`` and seed ``s``, trained alone.
    """
    return {k: jnp.asarray(v, jnp.float32) for k, v in config.items()}


def _check_configs(configs: Any) -> list[Config]:
    if isinstance(configs, Mapping) or not isinstance(configs, Sequence):
        raise TypeError(f"configs must be a list of dicts name -> number; got {configs!r}.")
    if not configs:
        raise ValueError("configs must hold at least one configuration; got an empty list.")
    names = None
    for i, config in enumerate(configs):
        if not isinstance(config, Mapping) or not config:
            raise TypeError(
                f"configs[{i}] must be a non-empty dict name -> number; got {config!r}."
            )
        if names is None:
            names = set(config)
        elif set(config) != names:
            raise ValueError(
                f"configs must all have the same names: configs[0] has {sorted(names)}, "
                f"configs[{i}] has {sorted(config)}."
            )
        for name, value in config.items():
            check_values(f"configs[{i}][{name!r}]", [value])
    return [{k: float(v) for k, v in c.items()} for c in configs]


def _check_members_per_call(members_per_call: Any, mesh: Mesh | None) -> None:
    if members_per_call is None:
        return
    if isinstance(members_per_call, bool) or not isinstance(members_per_call, (int, np.integer)):
        raise TypeError(
            f"members_per_call must be a positive int or None; got {members_per_call!r}."
        )
    if members_per_call < 1:
        raise ValueError(f"members_per_call must be in [1, inf) or None; got {members_per_call}.")
    if mesh is not None and members_per_call % mesh.size:
        raise ValueError(
            f"members_per_call must be a multiple of the mesh's {mesh.size} devices; got "
            f"{members_per_call}."
        )


def _check_key(key: Any) -> None:
    typed = _population.is_typed_key(key)
    raw = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    if not ((typed and np.ndim(key) == 0) or raw):
        raise TypeError(f"key must be one PRNG key (jax.random.key(seed)); got {key!r}.")


def _bar_class(progress: Any) -> Any:
    """tqdm's bar class when ``progress`` asks for a bar, else None.

    ``None`` means a bar when tqdm (an optional extra) is installed; ``True`` requires it.
    """
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None; got {progress!r}.")
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm  # an optional extra, only for the bar
    except ImportError as err:
        if progress is None:
            return None
        raise ImportError(
            "progress=True needs tqdm, an optional extra: pip install 'adamw_jax[tune]' "
            "(or pip install tqdm); or pass progress=False or None."
        ) from err
    return tqdm


def sweep(
    train: Train,
    configs: Sequence[Mapping[str, float]],
    *,
    key: jax.Array,
    seeds: int = 1,
    members_per_call: int | None = None,
    mesh: Mesh | None = None,
    progress: bool | None = None,
) -> Results:
    r"""Trains every configuration, ``seeds`` times each, as one population.

    Member ``(c, s)`` is ``train(as_hparams(configs[c]), seed_keys(key, seeds)[s])``: every
    configuration sees the same seed keys, so configurations differ only in their
    hyperparameters. Members run in calls of ``members_per_call``: one compiled member in a
    loop when it is 1 (without a mesh), else ``jax.vmap(train)`` over a chunk, one compiled
    program for every chunk (the last one is padded).

    **Reproducing a member.** With ``members_per_call=1`` (the default on CPU) a member is
    bitwise equal to ``jax.jit(train)`` run alone on its inputs. A vmapped member runs the
    same optimizer arithmetic (adamw_jax's update is bitwise equal under batched
    hyperparameters), but XLA computes a model's batched matrix products with other kernels
    than unbatched ones, so a member with matrix products differs from its solo run by a
    few ulps per step, which a chaotic training run can amplify; a member run alone on a
    device of the mesh (one member per device) is again bitwise equal.

    Args:
      train: ``train(hparams, key) -> {name: scalar}``, a whole training run, traceable by
        ``jax.jit`` and ``jax.vmap``: ``hparams`` maps each configuration's names to
        float32 scalars. Or a training loop from :func:`loop_train`, whose members run as
        a :class:`Population` per call.
      configs: a non-empty list of dicts name -> finite number, all with the same names.
      key: a PRNG key; the seed keys are ``jax.random.split(key, seeds)``.
      seeds: seeds per configuration, an int in [1, inf).
      members_per_call: members per compiled call, an int in [1, inf) (with a mesh, a
        multiple of its size), or None: one member per device on CPU (where a vmapped
        population is no faster than the loop), up to 64 per device on GPU and TPU. Larger
        chunks use more memory; the chunk bounds it.
      mesh: a ``jax.sharding.Mesh`` to split the member axis over (all its axes, so every
        device runs its share of each chunk, across hosts with ``jax.distributed``), or
        None.
      progress: a tqdm bar over members: True (tqdm is an optional extra,
        ``pip install 'adamw_jax[tune]'``), False, or None: a bar when tqdm is installed.

    Returns:
      :class:`Results`. A member whose metric is NaN or infinite does not stop the sweep:
      it is listed in ``Results.failures`` (and a warning says how many), and
      :meth:`Results.best` leaves its configuration out.
    """
    configs = _check_configs(configs)
    evaluate = Evaluator(
        train,
        key=key,
        seeds=seeds,
        members_per_call=members_per_call,
        mesh=mesh,
        progress=progress,
    )
    return evaluate(configs)


def _run(runner, pop, configs, chunk, mesh, tqdm, start) -> Results:
    """Runs a population with a compiled runner; the metrics as Results, timed from
    ``start``. ``tqdm`` is the bar class, or None for no bar."""
    bar = (
        None
        if tqdm is None
        else tqdm(total=len(pop.seed), unit="member", desc="sweep", leave=False)
    )
    on_chunk_done = (lambda n: None) if bar is None else bar.update
    try:
        flat = _population.run(runner, pop, chunk, mesh, on_chunk_done)
    finally:
        if bar is not None:
            bar.close()
    seeds = len(pop.seed) // len(configs)
    results = Results(
        configs=configs,
        metrics={k: v.reshape(len(configs), seeds) for k, v in flat.items()},
        wall_time=time.perf_counter() - start,
    )
    if results.failures:
        failed = sorted({(f.config, f.seed) for f in results.failures})
        warnings.warn(
            f"{len(failed)} of {results.evaluations} members returned a non-finite metric "
            f"(configuration, seed): {failed[:10]}; see Results.failures.",
            RuntimeWarning,
            stacklevel=4,  # the caller of sweep or of a search
        )
    return results


class PopulationTrain:
    """A ``train`` that runs each call's members itself (a training loop: see
    :func:`adamw_jax.tuning.loop_train`) instead of being traced as one function."""

    def runner(
        self, members_per_call: int | None, mesh: Mesh | None, pop: _population.Population
    ) -> tuple[int, Any]:
        """Members per call and ``runner(hparams, seed) -> metrics`` for a call's chunk."""
        raise NotImplementedError


class Evaluator:
    """Sweeps that share one compiled runner, and the record of what they evaluated."""

    def __init__(self, train, *, key, seeds, members_per_call, mesh, progress):
        _validate.check_int("seeds", seeds, low=1)
        _check_members_per_call(members_per_call, mesh)
        _check_key(key)
        self.train, self.key, self.seeds = train, key, int(seeds)
        self.members_per_call, self.mesh = members_per_call, mesh
        self.tqdm = _bar_class(progress)
        self.runner = None
        self.chunk = None
        self.parts: list[Results] = []

    def __call__(self, configs: list[Config]) -> Results:
        """Trains ``configs``; returns their results (and keeps them)."""
        pop = _population.population(configs, self.key, self.seeds)
        start = time.perf_counter()
        if self.runner is None and isinstance(self.train, PopulationTrain):
            self.chunk, self.runner = self.train.runner(self.members_per_call, self.mesh, pop)
        if self.runner is None:
            self.chunk = self.members_per_call or _population.default_members_per_call(
                len(pop.seed), self.mesh
            )
            self.runner = _population.compile_runner(self.train, self.chunk, self.mesh, pop)
        part = _run(self.runner, pop, configs, self.chunk, self.mesh, self.tqdm, start)
        self.parts.append(part)
        return part

    def unseen(self, configs: list[Config]) -> list[Config]:
        """The configurations not trained yet, in order, without repeats."""
        seen = {_identity(c) for part in self.parts for c in part.configs}
        new = []
        for c in configs:
            if _identity(c) not in seen:
                seen.add(_identity(c))
                new.append(c)
        return new

    def results(self) -> Results:
        """Everything trained so far, in order."""
        return concatenate(self.parts)


def _identity(config: Config) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(config.items()))


def check_fixed(fixed: Any, searched: Sequence[str]) -> dict[str, float]:
    if fixed is None:
        return {}
    if not isinstance(fixed, Mapping):
        raise TypeError(f"fixed must be a dict name -> number or None; got {fixed!r}.")
    clash = set(fixed) & set(searched)
    if clash:
        raise ValueError(f"fixed must not name a searched hyperparameter; got {sorted(clash)}.")
    return {k: check_values(f"fixed[{k!r}]", [v])[0] for k, v in fixed.items()}
