"""Bowel: small-bowel loops filling the free abdomen and the colon frame with air and stool."""

from __future__ import annotations

import numpy as np

from ..canvas import ABDOMEN, Canvas
from ..fields import LatticeNoise, smoothstep, soft_inside
from ..intensities import TissueHU
from ..shapes import dmax
from ..subject import Subject
from .body import cavity_dist
from .tubes import paint_tube


def paint_small_bowel(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    rng = s.rng("small_bowel")
    z_lo, z_hi = 70 * s.height, s.level("L1")
    lo = np.array([-140 * s.width, -40 * s.depth, z_lo])
    hi = np.array([140 * s.width, 170 * s.depth, z_hi])
    loops = LatticeNoise(rng, lo, hi, 30.0, channels=3)
    oral_contrast = rng.random() < 0.3
    lumen_hu = 220.0 if oral_contrast else hu["bowel_fluid"]

    def bowel(b):
        ys = s.spine_y(b.z)
        region = dmax(cavity_dist(b) + 6, ys + 25 - b.y,
                                    b.z - z_hi, z_lo - b.z)
        inside = soft_inside(region, 10.0)
        if not inside.any():
            return None
        n = b.smooth(lambda x, y, z: loops(x, y, z), 3.0)
        # loops: tubes along the intersection of two random zero-level surfaces
        r = np.sqrt(n[0] ** 2 + (0.6 * n[1]) ** 2)
        occ = soft_inside((r - 0.62) * 40, b.edge) * inside
        wall = r > 0.52
        lumen = lumen_hu + 8 * b.texture("bowel")
        lumen = np.where(n[2] > 1.4, hu["air"], lumen)
        return occ, np.where(wall, hu["bowel_wall"] + 6 * b.texture("bowel_wall"), lumen)

    cv.paint(lo, hi, bowel, label=0, allowed=(ABDOMEN,))


def paint_colon(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    rng = s.rng("colon")
    rel = [
        [-72, 35, 120], [-88, 20, 200], [-78, 45, 262], [-30, 88, 252], [30, 88, 258], [82, 40, 305],
        [90, 5, 230], [86, 12, 150], [55, 45, 100], [12, 30, 80], [0, -25, 65], [0, -45, 20], [0, -35, -15],
    ]
    pts = np.array([[r[0] * s.width, r[1] * s.depth, r[2] * s.height] for r in rel], float)
    pts[:-3] += rng.normal(0, 7, (len(pts) - 3, 3))
    radii = np.array([28, 25, 24, 22, 22, 22, 18, 17, 16, 16, 20, 20, 10]) * s.body_scale()
    radii = radii * rng.uniform(0.8, 1.15, len(radii))
    air_level = rng.uniform(-0.3, 1.0)

    def value(b, d, u):
        stool = -40 + 70 * np.tanh(b.texture("stool", coarse=True)) + 20 * b.texture("stool")
        gas = b.texture("colon_gas", coarse=True) > air_level - 0.8 * smoothstep(0.2, 0.6, u)
        content = np.where(gas, hu["air"], stool)
        return np.where(d > -2.5, hu["bowel_wall"] + 6 * b.texture("colon_wall"), content)

    paint_tube(cv, pts, radii, value, label=0, allowed=(ABDOMEN,))
