"""Writing a stage's outputs: strict JSON (a NaN or infinity becomes `null`, which every JSON parser reads)."""

import json
import math
import os


def to_strict_json(value):
    """`value` with every non-finite float replaced by None, containers walked, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): to_strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(v) for v in value]
    return value


def write_json(path: str, value, indent: int | None = 1) -> str:
    """Write `value` as strict JSON to `path` (its folder created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_strict_json(value), f, indent=indent, allow_nan=False)
    return path


__all__ = ["to_strict_json", "write_json"]
