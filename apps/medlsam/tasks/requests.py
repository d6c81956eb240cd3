"""Parsing and checking request parameters (every problem becomes a 4xx naming it)."""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import bad_request


def organs_param(value: Any) -> list[str] | None:
    """`organs` as a list, a comma-separated string, or a JSON list; empty means all."""
    if value in (None, "", [], "all"):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise bad_request(f"organs: not a valid JSON list: {exc}") from exc
        else:
            value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, (int,)):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise bad_request(f"organs must be a list of organ names or ids, got {value!r}")
    return [str(v).strip() for v in value]


def mode_param(value: Any, default: str) -> str:
    mode = str(value or default).upper()
    if mode not in ("WPL", "SPL"):
        raise bad_request(f"mode must be 'WPL' or 'SPL', got {value!r}")
    return mode


def int_param(request: dict, key: str, default: int) -> int:
    value = request.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f"{key} must be an integer, got {value!r}") from None


def roi_param(value: Any, shape) -> tuple[list[int], list[int]] | None:
    """MONAI Label's `roi` [x0, y0, x1, y1, z0, z1] (study voxel indices i, j, k) -> inclusive box."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad_request(f"roi must be [x0, y0, x1, y1, z0, z1], got {value!r}") from None
    if (not isinstance(value, (list, tuple)) or len(value) != 6
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise bad_request(f"roi must be six finite numbers [x0, y0, x1, y1, z0, z1], got {value!r}")
    x0, y0, x1, y1, z0, z1 = (int(round(v)) for v in value)
    lo = [min(x0, x1), min(y0, y1), min(z0, z1)]
    hi = [max(x0, x1), max(y0, y1), max(z0, z1)]
    if any(h < 0 for h in hi) or any(l > s - 1 for l, s in zip(lo, shape)):
        raise bad_request(f"roi {list(value)} lies entirely outside the image of shape {list(shape)}")
    if lo[0] == hi[0] or lo[1] == hi[1]:
        raise bad_request(f"roi {list(value)} has zero area in the x-y plane")
    return lo, hi


def points_param(request: dict, key: str, shape) -> list[list[int]]:
    """`foreground` / `background` point lists [[x, y, z], ...] in study voxel indices."""
    value = request.get(key) or []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad_request(f"{key} must be a list of [x, y, z] points") from None
    if not isinstance(value, list):
        raise bad_request(f"{key} must be a list of [x, y, z] points, got {value!r}")
    points = []
    for p in value:
        if (not isinstance(p, (list, tuple)) or len(p) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)):
            raise bad_request(f"{key}: each point must be [x, y, z] finite numbers, got {p!r}")
        q = [int(round(v)) for v in p]
        if any(v < 0 or v > s - 1 for v, s in zip(q, shape)):
            raise bad_request(f"{key}: point {list(p)} is outside the image of shape {list(shape)}")
        points.append(q)
    return points
