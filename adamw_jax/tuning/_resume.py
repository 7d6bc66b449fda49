"""A population run against a storage: recorded members are read back, the others trained
chunk by chunk, each chunk claimed so that several processes never train it twice."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from jax.sharding import Mesh

from adamw_jax.tuning import _population
from adamw_jax.tuning._population import Population
from adamw_jax.tuning._space import Config
from adamw_jax.tuning._storage import Storage, member_id


def _slice(pop: Population, start: int, stop: int) -> Population:
    return pop._replace(
        hparams={k: v[start:stop] for k, v in pop.hparams.items()}, seed=pop.seed[start:stop]
    )


def run(
    runner: Callable,
    pop: Population,
    configs: list[Config],
    members_per_call: int,
    mesh: Mesh | None,
    storage: Storage,
    on_chunk_done: Callable[[int], None],
) -> dict[str, np.ndarray]:
    """Every member's metrics, name -> (members,) float64, as :func:`_population.run`.

    The chunks are those of an uninterrupted run (same boundaries, same padding), so a
    member trained after a restart runs the same program on the same inputs. A chunk whose
    members are all recorded is skipped; one another process holds is left for later, then
    waited for (and trained here if its holder died before recording it).
    """
    num = len(pop.seed)
    ids = [member_id(configs[i // pop.seeds], int(pop.seed[i])) for i in range(num)]
    starts = list(range(0, num, members_per_call))
    done = storage.members()
    for wait in (False, True):
        held_elsewhere = []
        for start in starts:
            stop = min(start + members_per_call, num)
            if all(ids[i] in done for i in range(start, stop)):
                on_chunk_done(stop - start)
                continue
            name = json.dumps([members_per_call, ids[start:stop]])
            with storage.claim(name, wait=wait) as held:
                if not held:
                    held_elsewhere.append(start)
                    continue
                done = storage.members()
                missing = [i for i in range(start, stop) if ids[i] not in done]
                if missing:
                    flat = _population.run(
                        runner, _slice(pop, start, stop), members_per_call, mesh, lambda n: None
                    )
                    storage.record(
                        [
                            (
                                configs[i // pop.seeds],
                                int(pop.seed[i]),
                                {k: float(v[i - start]) for k, v in flat.items()},
                            )
                            for i in missing
                        ]
                    )
                    done = storage.members()
            on_chunk_done(stop - start)
        starts = held_elsewhere
    names = next(iter(done.values())).keys()
    return {k: np.asarray([done[ids[i]][k] for i in range(num)], np.float64) for k in names}
