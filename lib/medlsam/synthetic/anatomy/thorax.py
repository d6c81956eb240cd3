"""Thorax: lungs with vessels, mediastinal fat, heart, esophagus, trachea and main bronchi."""

from __future__ import annotations

import numpy as np

from ..canvas import ABDOMEN, THORAX, WALL, Canvas
from ..fields import LatticeNoise, smoothstep, soft_inside
from ..intensities import TissueHU
from ..labels import LABEL_MAP
from ..shapes import dmax, dmin, ellipsoid, frame_with_axis, to_local
from ..subject import Subject
from .body import cavity_dist
from .tubes import paint_tube


def heart_geometry(s: Subject):
    """Centre, frame (columns: short axes, long axis base->apex) and radii of the heart."""
    rng = s.rng("heart")
    size = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.2)) * s.body_scale()
    z = s.dome_left + 62 * s.height + rng.normal(0, 5)
    center = np.array([16 * s.width + rng.normal(0, 5), float(s.spine_y(z)) + 72 * s.depth, z])
    axis = np.array([0.62, 0.48, -0.62]) + rng.normal(0, 0.06, 3)
    return center, frame_with_axis(axis), np.array([50, 46, 70]) * size


def paint_lungs(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    apex = s.lung_apex
    lo = np.array([-200 * s.width, -150 * s.depth, min(s.dome_left, s.dome_right) - 120])
    hi = np.array([200 * s.width, 160 * s.depth, apex + 5])
    vessels = LatticeNoise(s.rng("lung_vessels"), lo, hi, 10.0, channels=2)
    carina_z = s.level("T5")

    for name, side in (("lung_right", -1), ("lung_left", 1)):
        hilum = np.array([side * 50 * s.width, float(s.spine_y(carina_z)) + 40, carina_z - 25])

        def lung(b, side=side, hilum=hilum):
            ys = s.spine_y(b.z)
            d = cavity_dist(b)
            top = apex - 0.012 * ((np.abs(b.x) - 55 * s.width) ** 2 + (b.y - ys - 30) ** 2)
            d = dmax(d, b.z - top, -side * (b.x - 6))
            occ = soft_inside(d, b.edge)
            if not occ.any():
                return None
            ya, yp = s.profile("cavity_ya", b.z), s.profile("cavity_yp", b.z)
            dependent = np.clip((ya - b.y) / np.maximum(ya - yp, 1), 0, 1) ** 2
            value = hu["lung"] + 70 * dependent + 18 * b.texture("lung")
            n = b.smooth(lambda x, y, z: vessels(x, y, z), 3.0)
            dist_h = np.sqrt((b.x - hilum[0]) ** 2 + (b.y - hilum[1]) ** 2 + ((b.z - hilum[2]) * 0.8) ** 2)
            width = 0.12 + 0.25 * np.exp(-dist_h / 60.0)
            v = np.clip((width - np.maximum(np.abs(n[0]), np.abs(n[1]))) / (0.5 * width), 0, 1)
            value = value + v * (hu["lung_vessel"] - value)
            return occ, value

        box_lo, box_hi = lo.copy(), hi.copy()
        if side < 0:
            box_hi[0] = 10
        else:
            box_lo[0] = 0
        cv.paint(box_lo, box_hi, lung, label=LABEL_MAP[name], allowed=(THORAX,))


def paint_mediastinum(cv: Canvas, s: Subject, hu: TissueHU, heart) -> None:
    center, frame, radii = heart
    z_top = center[2] + 45 * s.height
    lo = np.array([-60, -120 * s.depth, center[2] - 80])
    hi = np.array([70, 160 * s.depth, s.lung_apex + 10])

    def fat(b):
        ys = s.spine_y(b.z)
        upper = smoothstep(z_top - 30, z_top, b.z)
        ya = s.profile("cavity_ya", b.z)
        t = np.clip((b.y - ys - 12) / np.maximum(ya - ys - 12, 1), 0, 1)
        half = (10 + 22 * upper) * (0.55 + 0.45 * np.sin(np.pi * t)) + 6
        d = np.maximum(np.abs(b.x - 4) - half, ys + 12 - b.y)
        d = np.maximum(d, b.z - (s.lung_apex - 10))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, hu["fat"] + 10 * b.texture("mediastinum")

    cv.paint(lo, hi, fat, label=0, allowed=(THORAX,))

    def epicardial_fat(b):
        d = ellipsoid(*to_local(b.x, b.y, b.z, center, frame), radii + 7)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, hu["fat"] + 10 * b.texture("epicardial")

    r = float(radii.max()) + 10
    cv.paint(center - r, center + r, epicardial_fat, label=0, allowed=(THORAX,))


def paint_heart(cv: Canvas, s: Subject, hu: TissueHU, heart) -> None:
    center, frame, radii = heart
    septum_normal = frame @ np.array([0.9, -0.4, 0.0])

    def heart_fn(b):
        lx, ly, lz = to_local(b.x, b.y, b.z, center, frame)
        d = ellipsoid(lx, ly, lz, radii)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        d_pool = ellipsoid(lx, ly, lz + 0.12 * radii[2], radii * np.array([0.72, 0.72, 0.78]))
        px, py, pz = b.x - center[0], b.y - center[1], b.z - center[2]
        sep = px * septum_normal[0] + py * septum_normal[1] + pz * septum_normal[2]
        blood = np.where(sep > 0, hu["heart_left_blood"], hu["heart_right_blood"]) + 8 * b.texture("blood")
        myo = hu["myocardium"] + 6 * b.texture("myocardium")
        pool = soft_inside(d_pool, b.edge) * (1 - np.exp(-(sep / 4.0) ** 2))
        return occ, myo + pool * (blood - myo)

    r = float(radii.max()) + 4
    cv.paint(center - r, center + r, heart_fn, label=LABEL_MAP["heart"], allowed=(THORAX,))


def paint_esophagus(cv: Canvas, s: Subject, hu: TissueHU, ge_junction) -> None:
    rng = s.rng("esophagus")
    rel = [[2, 22, s.lung_apex + 60], [4, 20, s.level("T3")], [8, 22, s.level("T6")],
           [14, 27, s.level("T8")], [26, 40, s.level("T10")]]
    pts = np.array([[r[0] * s.width, float(s.spine_y(r[2])) + r[1] * s.depth, r[2]] for r in rel])
    pts[1:, :2] += rng.normal(0, 2.5, (len(pts) - 1, 2))
    pts = np.vstack([pts, ge_junction])
    has_air = rng.random() < 0.5

    def value(b, d, u):
        v = hu["esophagus"] + 7 * b.texture("esophagus")
        if has_air:
            v = np.where(d < -6.5, hu["air"], v)
        return v

    paint_tube(cv, pts, [7.5, 8, 8.5, 9, 9.5, 10], value, label=LABEL_MAP["esophagus"],
               allowed=(THORAX, ABDOMEN, WALL))


def paint_airways(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    carina = np.array([2.0, float(s.spine_y(s.level("T5"))) + 34 * s.depth, s.level("T5")])
    top = np.array([0.0, float(s.spine_y(s.lung_apex + 70)) + 40 * s.depth, s.lung_apex + 70])
    mid = np.array([0.0, float(s.spine_y(s.level("T3"))) + 37 * s.depth, s.level("T3")])

    def airway(b, d, u):
        return np.where(d > -1.8, hu["cartilage"] - 40, hu["air"])

    paint_tube(cv, [top, mid, carina], [9.5, 9.5, 9], airway, label=0, allowed=(THORAX, WALL))
    for side, drop in ((-1, 18), (1, 28)):
        pts = [carina, carina + [side * 30, -2, -drop * 0.6], carina + [side * 55, -6, -drop - 15]]
        paint_tube(cv, pts, [7.5, 6.5, 4.5], airway, label=0, allowed=(THORAX,))
