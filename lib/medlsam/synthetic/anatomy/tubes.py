"""Painting helper for tubular structures (vessels, airways, bowel, ducts)."""

from __future__ import annotations

import numpy as np

from ..canvas import Canvas
from ..fields import soft_inside
from ..shapes import catmull_rom, curve_bbox, tube


def paint_tube(cv: Canvas, points, radii, value_fn, *, label=0, allowed=None, set_comp=None,
               samples: int = 6) -> None:
    """Paint a smooth tube through control points with per-point radii.

    value_fn(block, dist, u) -> HU array, with dist the signed distance to the tube wall and u
    the position along it (0 at the first point, 1 at the last); a float is used as a constant.
    """
    pts = np.asarray(points, float)
    curve = catmull_rom(pts, samples)
    r = np.interp(np.linspace(0, 1, len(curve)), np.linspace(0, 1, len(pts)), np.asarray(radii, float))

    def fn(b):
        d, u = tube(b.x, b.y, b.z, curve, r)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        value = value_fn(b, d, u) if callable(value_fn) else value_fn
        return occ, value

    cv.paint(*curve_bbox(curve, r), fn, label=label, allowed=allowed, set_comp=set_comp)
