"""Body wall: skin and subcutaneous fat, the muscle envelope, the trunk cavity with the diaphragm,
paraspinal and psoas muscles, and the scanner table."""

from __future__ import annotations

import numpy as np

from ..canvas import ABDOMEN, BODY, THORAX, WALL, Canvas
from ..fields import LatticeNoise, smoothstep, soft_inside
from ..intensities import TissueHU
from ..shapes import catmull_rom, curve_bbox, ellipse2d, tube
from ..subject import Subject

_TRUNK_BOXINESS = 0.45


def muscle_envelope_distance(s: Subject, x, y, z):
    """Signed distance to the muscle envelope (trunk superellipse, two thighs below the crotch)."""
    w = s.profile("muscle_w", z)
    ya = s.profile("muscle_ya", z)
    yp = s.profile("muscle_yp", z)
    yc = 0.5 * (ya + yp)
    d_trunk = ellipse2d(x, y - yc, w, 0.5 * (ya - yp), _TRUNK_BOXINESS)
    crotch = -30 * s.height
    if float(np.min(z)) > crotch + 40:
        return d_trunk
    tx, tr = 0.52 * w, 0.47 * w
    d_thigh = np.minimum(
        ellipse2d(x - tx, y - yc, tr, 0.5 * (ya - yp) * 0.9),
        ellipse2d(x + tx, y - yc, tr, 0.5 * (ya - yp) * 0.9),
    )
    wz = smoothstep(crotch - 15, crotch + 35, z)
    return wz * d_trunk + (1 - wz) * d_thigh


def fat_thickness(s: Subject, x, y, z):
    """Local subcutaneous fat: thinner over the back, thicker over the belly."""
    ya = s.profile("muscle_ya", z)
    yp = s.profile("muscle_yp", z)
    v = (y - 0.5 * (ya + yp)) / (0.5 * (ya - yp))
    front = np.clip(v, 0, 1)
    abdominal = smoothstep(40 * s.height, 120 * s.height, z) * (1 - smoothstep(360 * s.height, 440 * s.height, z))
    return s.fat_mm * (0.6 + 0.4 * np.clip(v + 1, 0, 1)) + s.belly_mm * front**1.5 * abdominal


def cavity_distance(s: Subject, x, y, z):
    """Signed distance to the trunk cavity (thorax + abdomen + pelvis)."""
    w = np.maximum(s.profile("cavity_w", z), 1.0)
    ya = s.profile("cavity_ya", z)
    yp = s.profile("cavity_yp", z)
    d = ellipse2d(x, y - 0.5 * (ya + yp), w, np.maximum(0.5 * (ya - yp), 1.0), 0.15)
    floor = -25 * s.height
    return np.maximum(d, floor - z)


def body_lo_hi(s: Subject):
    lo = np.array([-260, -200, -400.0]) * np.array([s.width, s.depth, s.height]) - s.fat_mm - s.belly_mm
    hi = np.array([260, 230, 800.0]) * np.array([s.width, s.depth, s.height]) + s.fat_mm + s.belly_mm
    return lo, hi


def paint_body(cv: Canvas, s: Subject, hu: TissueHU, table_top_y: float) -> None:
    """Skin, subcutaneous fat and muscle; the soft tissue lying on the table is pressed flat
    against it (table_top_y: world y of the table surface)."""
    lo, hi = body_lo_hi(s)
    septa = LatticeNoise(s.rng("fat_septa"), lo, hi, 20.0)
    planes_field = LatticeNoise(s.rng("muscle_planes"), lo, hi, 34.0)

    def above_table(b, clearance):
        wy = cv.world_axes(b.i, b.j, b.k)[1].astype(np.float32)[None, :, None]
        return table_top_y + clearance - wy

    def skin_and_fat(b):
        dm = muscle_envelope_distance(s, b.x, b.y, b.z)
        d = np.maximum(dm - fat_thickness(s, b.x, b.y, b.z), above_table(b, 0.5))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        strands = b.smooth(lambda x, y, z: septa(x, y, z)[0], 8.0)
        value = hu["fat"] + 12 * b.texture("fat") + 40 * np.exp(-(strands / 0.08) ** 2)
        value = np.where(d > -2.0, hu["skin"], value)
        return occ, value

    cv.paint(lo, hi, skin_and_fat, label=0, set_comp=WALL)

    def muscle(b):
        d = muscle_envelope_distance(s, b.x, b.y, b.z)
        d = np.maximum(d, above_table(b, 0.25 * s.fat_mm + 2))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        planes = b.smooth(lambda x, y, z: planes_field(x, y, z)[0], 8.0)
        fat_plane = np.exp(-(planes / 0.07) ** 2)  # fat planes between muscle groups
        value = hu["muscle"] + 8 * b.texture("muscle") + fat_plane * (hu["fat"] - hu["muscle"]) * 0.8
        return occ, value

    cv.paint(lo, hi, muscle, label=0, allowed=BODY, set_comp=WALL)


def paint_cavity(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    lo, hi = body_lo_hi(s)

    def cavity(b):
        d = cavity_distance(s, b.x, b.y, b.z)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        zd = s.diaphragm_z(b.x, b.y)
        dz = b.z - zd
        comp = np.where(dz > 2.5, THORAX, np.where(dz < -2.5, ABDOMEN, WALL)).astype(np.uint8)
        value = hu["fat"] + 10 * b.texture("visceral_fat")
        value = np.where(comp == WALL, hu["muscle"], value)
        return occ, value, comp

    cv.paint(lo, hi, cavity, label=0, allowed=BODY)


def paint_back_muscles(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    """Erector spinae behind the spine, psoas beside the lumbar spine."""
    lo, hi = body_lo_hi(s)

    def erector(b):
        ys = s.spine_y(b.z)
        thor = smoothstep(330 * s.height, 420 * s.height, b.z)
        cy = ys - 48 + 2 * thor
        ry = 30 - 8 * thor
        d = np.minimum(ellipse2d(b.x - 34, b.y - cy, 32, ry), ellipse2d(b.x + 34, b.y - cy, 32, ry))
        d = np.maximum(d, -(b.z - 60 * s.height))  # they end on the sacrum
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, hu["muscle"] + 8 * b.texture("erector")

    cv.paint(lo, hi, erector, label=0, allowed=BODY, set_comp=WALL)

    for side in (-1, 1):
        pts = np.array([[30, -6, 330], [35, -3, 280], [45, 2, 220], [55, 8, 170], [68, 22, 110],
                        [80, 45, 50], [82, 62, 0], [80, 70, -40]], float)
        pts[:, 0] *= side * s.width
        pts[:, 1] *= s.depth
        pts[:, 2] *= s.height
        radii = np.array([6, 13, 19, 22, 21, 18, 15, 14], float) * s.body_scale()
        curve = catmull_rom(pts, 5)
        r = np.interp(np.linspace(0, 1, len(curve)), np.linspace(0, 1, len(radii)), radii)

        def psoas(b, curve=curve, r=r):
            d, _ = tube(b.x, b.y, b.z, curve, r)
            occ = soft_inside(d, b.edge)
            if not occ.any():
                return None
            return occ, hu["muscle"] + 7 * b.texture("psoas")

        cv.paint(*curve_bbox(curve, r), psoas, label=0, allowed=BODY, set_comp=WALL)


def paint_table(cv: Canvas, table_top_y: float, center_x: float) -> None:
    """A curved carbon-fibre table (thin dense shells around a foam core) under the patient,
    fixed in world coordinates; it does not move with the patient's pose."""

    def table(b):
        wx, wy, _ = cv.world_axes(b.i, b.j, b.k)
        dx = (wx - center_x)[:, None, None].astype(np.float32)
        wy = wy[None, :, None].astype(np.float32)
        top = table_top_y - 0.00045 * dx**2
        depth = top - wy  # mm below the top surface
        inside = (depth > 0) & (depth < 38) & (np.abs(dx) < 230)
        shell = (depth < 3.0) | (depth > 35.0)
        occ = np.broadcast_to(inside, b.shape).astype(np.float32)
        value = np.where(shell, 400.0, -750.0).astype(np.float32)
        value = np.broadcast_to(value, b.shape)
        base = (depth > 70) & (depth < 78) & (np.abs(dx) < 150)
        occ = np.maximum(occ, np.broadcast_to(base, b.shape).astype(np.float32))
        value = np.where(np.broadcast_to(base, b.shape), 200.0, value)
        return occ, value

    lo = np.array([-1e4, -1e4, -1e4])
    cv.paint(lo, -lo, table, label=None)
