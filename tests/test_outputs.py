"""`trainers.outputs`: results files are strict JSON (NaN and infinities become null)."""

import json
import math

from trainers.outputs import write_json


def test_non_finite_figures_become_null_and_the_file_parses_strictly(tmp_path):
    path = write_json(str(tmp_path / "sub" / "results.json"),
                      {"accuracy": 0.5, "ratio": math.nan, "rows": [1.0, math.inf, -math.inf], "pair": (1, 2)})
    loaded = json.load(open(path), parse_constant=lambda c: 1 / 0)
    assert loaded == {"accuracy": 0.5, "ratio": None, "rows": [1.0, None, None], "pair": [1, 2]}
