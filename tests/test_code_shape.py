"""The package keeps the shape the README's Development section describes.

Every function fits on a screen (at most 80 lines of code, docstring excluded), and every
import within the package points to a lower level, so the code reads top-down.
"""

import _code_shape as code_shape

MAX_FUNCTION_LINES = 80
LEVELS = {
    "tuning": 12,  # re-exports the tuning package's names
    "tuning._optuna": 11,  # searches, through the sweep's evaluator
    "tuning._search": 11,
    "tuning._loop": 11,  # populations in the user's loop, over the sweep's checks
    "tuning._sweep": 10,  # trains populations of whole runs
    "tuning._resume": 9,  # a population against a storage
    "tuning._trace": 9,  # train traced before anything compiles
    "tuning._population": 8,
    "tuning._results": 8,
    "tuning._storage": 8,
    "tuning._space": 7,
    "tuning._heatmap": 7,
    "tuning._study": 7,
    "fused": 6,  # builds on adamw
    "alias": 5,
    "compat": 5,
    "moments": 4,
    "decay": 4,
    "precision": 4,
    "stability": 4,
    "schedules": 4,
    "sharding": 4,
    "_moment_storage": 3,  # builds on quantize's codes
    "_packing": 2,
    "quantize": 2,
    "masks": 2,
    "_numerics": 1,
    "_base": 1,
    "_trees": 1,
    "_validate": 1,
}


def test_every_function_fits_on_a_screen():
    too_long = [row for row in code_shape.function_lengths() if row[0] > MAX_FUNCTION_LINES]
    assert not too_long, too_long


def test_imports_point_to_lower_levels():
    graph = code_shape.import_graph()
    del graph["__init__"]  # re-exports everything
    assert set(graph) == set(LEVELS), "a new module needs a level here and in the README"
    upward = [
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if LEVELS[target] >= LEVELS[module]
    ]
    assert not upward, upward
