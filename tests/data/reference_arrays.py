"""Reference arrays of the tests, stored as JSON (name -> dtype, shape, values), so that no binary
array file is tracked. Python floats print the shortest repr that reads back to the same float64,
so a float32 array round-trips exactly."""

import json
from pathlib import Path

import numpy as np


def save(path, arrays: dict) -> None:
    """Write `arrays` (name -> array) to `path`."""
    table = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        table[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "values": a.ravel().tolist()}
    Path(path).write_text(json.dumps(table))


def load(path) -> dict:
    """The arrays `save` wrote, with their dtypes and shapes."""
    table = json.loads(Path(path).read_text())
    return {
        name: np.asarray(t["values"], dtype=np.dtype(t["dtype"])).reshape(t["shape"])
        for name, t in table.items()
    }
