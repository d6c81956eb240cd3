"""Parsing and checking request parameters (every problem becomes a 4xx naming it)."""

from __future__ import annotations

import json
import math
from typing import Any

from medlsam.localization import resolve_mode

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


MODES = ("AUTO", "WPL", "SPL")


def mode_param(value: Any, default: str, localizer: str) -> str:
    """WPL or SPL for a request: its `mode` param, else the server's; AUTO is resolved for the localizer."""
    mode = str(value or default).strip().upper()
    if mode not in MODES:
        raise bad_request(f"mode must be 'auto', 'WPL' or 'SPL', got {value!r}")
    return resolve_mode(mode, localizer)


def int_param(request: dict, key: str, default: int) -> int:
    value = request.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f"{key} must be an integer, got {value!r}") from None


def _six_numbers(value: Any, key: str, layout: str) -> list[int] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad_request(f"{key} must be {layout}, got {value!r}") from None
    if (not isinstance(value, (list, tuple)) or len(value) != 6
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise bad_request(f"{key} must be six numbers {layout}, got {value!r}")
    return [int(round(v)) for v in value]


def _clamped_box(key: str, value: list, lo: list[int], hi: list[int], shape) -> tuple[list[int], list[int]]:
    """The box clamped to the image; 4xx if nothing of it is inside or it is flat in i or j."""
    if any(h < 0 for h in hi) or any(l > s - 1 for l, s in zip(lo, shape)):
        raise bad_request(f"{key} {list(value)} lies entirely outside the image of shape {list(shape)}")
    lo = [max(v, 0) for v in lo]
    hi = [min(v, s - 1) for v, s in zip(hi, shape)]
    if lo[0] == hi[0] or lo[1] == hi[1]:
        raise bad_request(f"{key} {list(value)} has zero width in i or j (a box needs an area on the slice)")
    return lo, hi


def roi_param(value: Any, shape) -> tuple[list[int], list[int]] | None:
    """MONAI Label's `roi` as 3D Slicer sends it: [i_a, i_b, j_a, j_b, k_a, k_b], the voxel indices of
    the ROI's two corners interleaved per axis, each pair in either order (a pair comes reversed when
    the volume's axis points against RAS). -> inclusive ([i0, j0, k0], [i1, j1, k1]) clamped to the image."""
    layout = "[i_a, i_b, j_a, j_b, k_a, k_b]"
    v = _six_numbers(value, "roi", layout)
    if v is None:
        return None
    pairs = [(v[0], v[1]), (v[2], v[3]), (v[4], v[5])]
    return _clamped_box("roi", v, [min(p) for p in pairs], [max(p) for p in pairs], shape)


def box_param(value: Any, shape) -> tuple[list[int], list[int]] | None:
    """`box` for REST callers: corner order [i0, j0, k0, i1, j1, k1] (inclusive voxel indices, each
    axis in either order) -> inclusive box clamped to the image."""
    layout = "[i0, j0, k0, i1, j1, k1]"
    v = _six_numbers(value, "box", layout)
    if v is None:
        return None
    a, b = v[:3], v[3:]
    return _clamped_box("box", v, [min(x, y) for x, y in zip(a, b)], [max(x, y) for x, y in zip(a, b)], shape)


def slice_param(value: Any) -> int | None:
    """`slice` of a 2D request (3D Slicer: the k index of the clicked point; may be null, or a
    millimetre offset when only an ROI is placed, so the caller checks it against the image)."""
    if value in (None, "", "null"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad_request(f"slice must be an integer slice index, got {value!r}") from None
    return int(round(number)) if math.isfinite(number) else None


def points_param(request: dict, key: str, shape) -> list[list[int]]:
    """`foreground` / `background` point lists [[i, j, k], ...] in study voxel indices (as 3D Slicer and
    OHIF send them: the clicked position's voxel, rounded)."""
    value = request.get(key) or []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad_request(f"{key} must be a list of [i, j, k] points") from None
    if not isinstance(value, list):
        raise bad_request(f"{key} must be a list of [i, j, k] points, got {value!r}")
    points = []
    for p in value:
        if (not isinstance(p, (list, tuple)) or len(p) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)):
            raise bad_request(f"{key}: each point must be [i, j, k], three finite numbers, got {p!r}")
        q = [int(round(v)) for v in p]
        if any(v < 0 or v > s - 1 for v, s in zip(q, shape)):
            raise bad_request(f"{key}: point {list(p)} is outside the image of shape {list(shape)}")
        points.append(q)
    return points
