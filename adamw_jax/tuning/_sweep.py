"""Sweeps: a list of configurations trained as one population, and the checks of its inputs.

:class:`Evaluator` holds one compiled runner and the record of what it trained; the
searches evaluate their proposals through it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from adamw_jax import _validate
from adamw_jax.tuning import _population, _resume, _space, _storage, _trace
from adamw_jax.tuning._population import Train
from adamw_jax.tuning._results import Results, concatenate
from adamw_jax.tuning._space import Config, check_values


def as_hparams(config: Mapping[str, float]) -> dict[str, jax.Array]:
    """A configuration as ``train`` receives it in a sweep: a dict of float32 scalars.

    ``jax.jit(train)(tuning.as_hparams(config), tuning.seed_keys(key, seeds)[s])`` is the
    sweep's member for ``config`` and seed ``s``, trained alone.
    """
    return {k: jnp.asarray(v, jnp.float32) for k, v in config.items()}


def _check_members_per_call(members_per_call: Any, mesh: Mesh | None) -> None:
    if members_per_call is None:
        return
    _validate.check_int("members_per_call", members_per_call, low=1, static=True)
    if mesh is not None and members_per_call % mesh.size:
        raise ValueError(
            f"members_per_call must be a multiple of the mesh's {mesh.size} devices; got "
            f"{members_per_call}."
        )


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
    storage: str | os.PathLike | None = None,
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
      progress: a tqdm bar, over compilation ("compiling") and then the members: True
        (tqdm is an optional extra, ``pip install 'adamw_jax[tune]'``), False, or None: a
        bar when tqdm is installed.
      storage: a file path (created if missing) where each member's metrics are appended
        as it finishes, or None. Calling again with the same storage and arguments trains
        only the members not recorded yet (after a kill, say), and the results are bitwise
        those of an uninterrupted call; several processes given one storage (on a shared
        file system) split the members between them and each returns every member. A
        storage written by another call is refused, naming what differs.

    Returns:
      :class:`Results`. A member whose metric is NaN or infinite does not stop the sweep:
      it is listed in ``Results.failures`` (and a warning says how many), and
      :meth:`Results.best` leaves its configuration out.
    """
    configs = _space.check_configs(configs)
    evaluate = Evaluator(
        train,
        key=key,
        seeds=seeds,
        members_per_call=members_per_call,
        mesh=mesh,
        progress=progress,
        storage=storage,
        search={"function": "sweep", "configs": configs},
    )
    try:
        return evaluate(configs)
    finally:
        evaluate.close()


def _run(runner, pop, configs, chunk, mesh, bar, start, storage) -> Results:
    """Runs a population with a compiled runner (against ``storage`` when there is one);
    the metrics as Results, timed from ``start``. ``bar`` is a tqdm bar or None."""
    on_chunk_done = (lambda n: None) if bar is None else bar.update
    if storage is None:
        flat = _population.run(runner, pop, chunk, mesh, on_chunk_done)
    else:
        flat = _resume.run(runner, pop, configs, chunk, mesh, storage, on_chunk_done)
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

    def fingerprint(self, pop: _population.Population) -> str:
        """A hash that changes with the training (what a storage records it by)."""
        raise NotImplementedError


def identify(
    train: Any, pop: _population.Population, wanted: Sequence[str]
) -> tuple[str, tuple[str, ...]]:
    """``train``'s fingerprint and metric names, its names checked on abstract inputs.

    A loop (a :class:`PopulationTrain`) is not traced as a whole: its fingerprint is its
    own, and its metrics are known only once it runs.
    """
    if isinstance(train, PopulationTrain):
        return train.fingerprint(pop), ()
    traced = _trace.trace(train, pop, wanted)
    return _storage.fingerprint(traced.jaxpr), traced.metrics


class Evaluator:
    """Sweeps that share one compiled runner, and the record of what they evaluated."""

    def __init__(
        self, train, *, key, seeds, members_per_call, mesh, progress, storage, search, metric=None
    ):
        _validate.check_int("seeds", seeds, low=1)
        _check_members_per_call(members_per_call, mesh)
        _population.check_key(key)
        _check_storage(storage)
        self.train, self.key, self.seeds = train, key, int(seeds)
        self.members_per_call, self.mesh = members_per_call, mesh
        self.tqdm = _bar_class(progress)
        self.storage_path, self.search, self.metric = storage, search, metric
        self.storage = None
        self.runner = None
        self.chunk = None
        self.parts: list[Results] = []

    def __call__(self, configs: list[Config]) -> Results:
        """Trains ``configs``; returns their results (and keeps them)."""
        pop = _population.population(configs, self.key, self.seeds)
        start = time.perf_counter()
        bar = None
        if self.tqdm is not None:
            desc = "sweep" if self.runner is not None else "compiling"
            bar = self.tqdm(total=len(pop.seed), unit="member", desc=desc, leave=False)
        try:
            if self.runner is None:
                self._compile(pop)
            if bar is not None:
                bar.set_description("sweep")
            part = _run(self.runner, pop, configs, self.chunk, self.mesh, bar, start, self.storage)
        finally:
            if bar is not None:
                bar.close()
        self.parts.append(part)
        return part

    def _compile(self, pop: _population.Population) -> None:
        """Checks ``train``'s names on abstract inputs, opens the storage, then compiles."""
        wanted = () if self.metric is None else (self.metric,)
        fingerprint, metrics = identify(self.train, pop, wanted)
        if self.storage_path is not None:
            header = _storage.identity(
                self.search,
                train=fingerprint,
                hparams=list(pop.hparams),
                metrics=metrics,
                seeds=self.seeds,
                key_data=pop.key_data,
                key_impl=pop.key_impl,
                members_per_call=self.members_per_call,
            )
            self.storage = _storage.Storage(self.storage_path, header)
        if isinstance(self.train, PopulationTrain):
            self.chunk, self.runner = self.train.runner(self.members_per_call, self.mesh, pop)
            return
        self.chunk = self.members_per_call or _population.default_members_per_call(
            len(pop.seed), self.mesh
        )
        self.runner = _population.compile_runner(self.train, self.chunk, self.mesh, pop)

    def close(self) -> None:
        """Closes the storage, if one is open."""
        if self.storage is not None:
            self.storage.close()
            self.storage = None

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


def _check_storage(storage: Any) -> None:
    if storage is not None and not isinstance(storage, (str, os.PathLike)):
        raise TypeError(
            f"storage must be a file path (str or os.PathLike) or None; got {storage!r}."
        )
    if isinstance(storage, str) and "://" in storage:
        raise ValueError(
            f"storage must be a file path here (database URLs are for optuna_search); got "
            f"{storage!r}."
        )
    if storage is not None and jax.process_count() > 1:
        raise ValueError(
            "storage needs one process per worker: with jax.distributed, give each process "
            "its own devices and the same storage instead of one mesh over the hosts."
        )


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
