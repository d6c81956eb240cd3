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
TABLE_CURVATURE = 0.00025  # 1/mm: the table top rises this much per mm^2 off its centre line


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


def cavity_dist(b) -> np.ndarray:
    """The trunk-cavity distance of a block, from the canvas cache filled by paint_body."""
    return b.canvas.fields["cavity"][b.slices]


def paint_body(cv: Canvas, s: Subject, hu: TissueHU, table_top_y: float, table_x: float) -> None:
    """Skin, subcutaneous fat, muscle and the trunk cavity (visceral fat, diaphragm) in one pass.

    Soft tissue lying on the table is pressed flat against it (table_top_y: world y of the table
    surface at table_x). Sets the compartments later organs are confined to and caches the
    cavity distance (cavity_dist) for them."""
    lo, hi = body_lo_hi(s)
    septa = LatticeNoise(s.rng("fat_septa"), lo, hi, 20.0)
    planes_field = LatticeNoise(s.rng("muscle_planes"), lo, hi, 34.0)
    cache = np.full(cv.shape, 1e4, np.float32)  # far outside until computed
    cv.fields["cavity"] = cache

    def above_table(b, clearance):
        wx, wy, _ = cv.world_axes(b.i, b.j, b.k)
        dx = (wx - table_x).astype(np.float32)[:, None, None]
        return table_top_y - TABLE_CURVATURE * dx**2 + clearance - wy.astype(np.float32)[None, :, None]

    def trunk(b):
        dm = muscle_envelope_distance(s, b.x, b.y, b.z)
        dc = cavity_distance(s, b.x, b.y, b.z)
        cache[b.slices] = dc
        d = np.maximum(dm - fat_thickness(s, b.x, b.y, b.z), above_table(b, 0.5))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        strands = b.smooth(lambda x, y, z: septa(x, y, z)[0], 8.0)
        value = hu["fat"] + 12 * b.texture("fat") + 40 * np.exp(-(strands / 0.08) ** 2)
        value = np.where(d > -2.0, hu["skin"], value)
        # muscle envelope
        occ_m = soft_inside(np.maximum(dm, above_table(b, 0.25 * s.fat_mm + 2)), b.edge)
        planes = b.smooth(lambda x, y, z: planes_field(x, y, z)[0], 8.0)
        fat_plane = np.exp(-(planes / 0.07) ** 2)  # fat planes between muscle groups
        muscle = hu["muscle"] + 8 * b.texture("muscle") + fat_plane * (hu["fat"] - hu["muscle"]) * 0.8
        value = value + occ_m * (muscle - value)
        # cavity: visceral / mediastinal fat, split by the diaphragm
        occ_c = soft_inside(dc, b.edge)
        dz = b.z - s.diaphragm_z(b.x, b.y)
        cav_comp = np.where(dz > 2.5, THORAX, np.where(dz < -2.5, ABDOMEN, WALL)).astype(np.uint8)
        cav_value = np.where(cav_comp == WALL, hu["muscle"], hu["fat"] + 10 * b.texture("visceral_fat"))
        value = value + occ_c * (cav_value - value)
        comp = np.where(occ_c >= 0.5, cav_comp, np.uint8(WALL))
        return occ, value, comp

    cv.paint(lo, hi, trunk, label=0)


def paint_back_muscles(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    """Erector spinae behind the spine, psoas beside the lumbar spine."""
    lo, hi = body_lo_hi(s)
    lo = np.array([-80.0, lo[1], lo[2]])
    hi = np.array([80.0, 40.0, hi[2]])

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
    """A curved carbon-fibre table (dense shells around a foam core, a support plate below)
    under the patient, fixed in world coordinates: it does not move with the patient's pose."""
    wx, wy, _ = cv.world_axes(np.arange(cv.shape[0]), np.arange(cv.shape[1]), [0])
    dx = (wx - center_x)[:, None]
    depth = table_top_y - TABLE_CURVATURE * dx**2 - wy[None, :]  # mm below the top surface
    w = float(cv.spacing[1])

    def band(a, b):  # partial-volume occupancy of the layer a < depth < b
        return np.clip((np.minimum(depth - a, b - depth) + 0.5 * w) / w, 0, 1) * (np.abs(dx) < 230)

    slab, base = band(0, 38), band(70, 78) * (np.abs(dx) < 150)
    shells = np.maximum(band(0, 3), band(35, 38))
    value = -750 + 1150 * shells
    occ = np.maximum(slab, base)
    value = np.where(base > 0, 200.0, value)
    rows = np.nonzero(occ.any(axis=0))[0]
    if rows.size == 0:
        return
    sl = slice(int(rows[0]), int(rows[-1]) + 1)
    occ, value = occ[:, sl, None].astype(np.float32), value[:, sl, None].astype(np.float32)
    img = cv.image[:, sl, :]
    img += occ * (value - img)
