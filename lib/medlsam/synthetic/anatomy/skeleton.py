"""Bones: vertebral column (labeled), sacrum, ribs with costal cartilage, sternum, scapulae,
pelvis and proximal femurs (labeled femoral heads)."""

from __future__ import annotations

import numpy as np

from ..canvas import BODY, BONE, WALL, Canvas
from ..fields import smoothstep, soft_inside
from ..intensities import TissueHU
from ..labels import LABEL_MAP
from ..shapes import catmull_rom, curve_bbox, dmax, dmin, ellipse2d, ellipsoid, to_local, tube
from ..subject import VERTEBRAE, Subject
from .body import cavity_dist, muscle_envelope_distance


def bone_value(hu: TissueHU, d, tex, cortex_mm: float = 1.5, marrow=None):
    """Cortical shell within cortex_mm of the surface, trabecular (or given marrow) inside."""
    inner = hu["trabecular_bone"] + 35 * tex if marrow is None else marrow
    return np.where(d > -cortex_mm, hu["cortical_bone"] + 60 * tex, inner)


def _vertebra_params(s: Subject):
    n = len(VERTEBRAE)
    i = np.arange(n)
    knots = [0, 4, 5, 16, 17, n - 1]
    rx = np.interp(i, knots, [25, 21, 20, 14, 11, 10]) * s.width
    ry = np.interp(i, knots, [18, 16, 16, 12, 8, 8]) * s.depth
    canal = np.interp(i, knots, [11, 10, 8, 8, 9, 9]) * s.body_scale()
    spinous = np.interp(i, knots, [28, 30, 34, 30, 22, 20]) * s.depth
    transverse = np.interp(i, knots, [42, 40, 30, 30, 25, 22]) * s.width
    return rx, ry, canal, spinous, transverse


def paint_spine(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    vz, vh = s.vertebra_z, s.vertebra_half_height
    rx, ry, canal, spinous, transverse = _vertebra_params(s)
    vy = s.spine_y(vz)
    lo = np.array([-60 * s.width, -120 * s.depth, vz[0] - vh[0] - 5])
    hi = np.array([60 * s.width, 40 * s.depth, vz[-1] + vh[-1] + 5])
    mids = 0.5 * (vz[1:] + vz[:-1])

    def ligaments(b):
        # soft tissue (ligaments, epidural fat-free space) wrapping the column
        ys = s.spine_y(b.z)
        d = ellipse2d(b.x, b.y - ys + 24 * s.depth, 27 * s.width, 40 * s.depth)
        d = np.maximum(d, np.maximum(b.z - vz[-1] - vh[-1], vz[0] - vh[0] - 30 - b.z))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, hu["muscle"] - 5 + 8 * b.texture("ligaments")

    cv.paint(lo, hi, ligaments, label=0, allowed=BODY, set_comp=WALL)

    def nearest(b):
        idx = np.searchsorted(mids, b.z)
        return idx

    def discs_and_canal(b):
        idx = nearest(b)
        yb = vy[idx]
        d_disc = np.maximum(ellipse2d(b.x, b.y - yb, rx[idx] * 0.97, ry[idx] * 0.97),
                            np.maximum(b.z - vz[-1], vz[0] - b.z))
        yc = yb - ry[idx] - canal[idx] - 2
        d_canal = np.sqrt(b.x**2 + ((b.y - yc) * 1.1) ** 2) - canal[idx]
        d_canal = np.maximum(d_canal, vz[0] - vh[0] - 25 - b.z)
        occ = np.maximum(soft_inside(d_disc, b.edge), soft_inside(d_canal, b.edge))
        if not occ.any():
            return None
        value = np.where(d_canal < d_disc, hu["csf"] + 5 * b.texture("csf"), hu["disc"] + 8 * b.texture("disc"))
        return occ, value

    cv.paint(lo, hi, discs_and_canal, label=0, allowed=BODY, set_comp=BONE)

    def vertebrae(b):
        idx = nearest(b)
        zc, h = vz[idx], vh[idx]
        yb = vy[idx]
        dz = np.abs(b.z - zc)
        d_body = np.maximum(ellipse2d(b.x, b.y - yb, rx[idx], ry[idx]), dz - h)
        yc = yb - ry[idx] - canal[idx] - 2
        rad = np.sqrt(b.x**2 + ((b.y - yc) * 1.1) ** 2)
        d_arch = np.maximum(rad - (canal[idx] + 5.5), canal[idx] - rad)
        d_arch = np.maximum(d_arch, dz - 0.75 * h)
        back = yc - canal[idx] - 2 - b.y  # mm behind the arch
        zs = b.z - zc - 0.5 * np.clip(back, 0, None) * (idx >= 5)  # thoracic spines slope down
        d_spinous = dmax(np.abs(b.x) - 3.5, -back, back - spinous[idx], np.abs(zs) - 0.55 * h)
        d_tp = dmax(
            np.abs(b.y - yc + 0.25 * np.clip(np.abs(b.x) - canal[idx], 0, None)) - 5,
            np.abs(b.x) - transverse[idx], canal[idx] - np.abs(b.x), dz - 0.4 * h)
        d = dmin(d_body, d_arch, d_spinous, d_tp)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, bone_value(hu, d, b.texture("vertebra", coarse=True))

    # the disc column above runs the whole spine; vertebral bodies replace it except in the gaps
    # between them, so they may paint over the spine's own BONE compartment
    cv.paint(lo, hi, vertebrae, label=LABEL_MAP["spinal_column"], allowed=BODY + (BONE,), set_comp=BONE)

    # sacrum and coccyx: a curved wedge continuing the column below L5
    z_top = vz[0] - vh[0] - 4
    z_bot = 25 * s.height

    def sacrum(b):
        t = np.clip((z_top - b.z) / (z_top - z_bot), 0, 1)
        half_w = (52 - 40 * t) * s.width
        half_d = (17 - 10 * t) * s.depth
        yc = s.spine_y(b.z)
        d = dmax(ellipse2d(b.x, b.y - yc, half_w, half_d), b.z - z_top, z_bot - b.z)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        value = bone_value(hu, d, b.texture("sacrum", coarse=True))
        canal = ellipse2d(b.x, b.y - yc + 0.35 * half_d, 3 + 9 * (1 - t), 3 + 3 * (1 - t)) < 0
        return occ, np.where(canal, hu["csf"], value)

    cv.paint(np.array([-60 * s.width, -110, z_bot - 5]), np.array([60 * s.width, 10, z_top + 5]),
             sacrum, label=0, allowed=BODY, set_comp=BONE)


def paint_ribs(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    """Twelve rib pairs following the inside of the chest wall, sloping down anteriorly."""
    t_levels = np.array([s.level(f"T{i}") for i in range(1, 13)])
    drop = np.interp(np.arange(12), [0, 4, 11], [55, 105, 85]) * s.height
    bone_end = np.array([2.3, 2.35, 2.4, 2.4, 2.4, 2.35, 2.3, 2.1, 2.0, 1.9, 1.55, 1.2])
    cart_end = np.array([2.95, 2.9, 2.85, 2.8, 2.75, 2.7, 2.6, 2.55, 2.45, 2.3, 0, 0])
    half_h = np.interp(np.arange(12), [0, 4, 11], [5.0, 6.5, 5.5])
    lo = np.array([-200 * s.width, -150 * s.depth, t_levels[-1] - drop.max() - 20])
    hi = np.array([200 * s.width, 150 * s.depth, t_levels[0] + 25])

    def ribs(b):
        dc = cavity_dist(b) - 7.0  # rib centre line 7 mm outside the cavity
        near = np.abs(dc) < 9
        if not near.any():
            return None
        sel = np.nonzero(near)
        x, y, z, r = b.full(b.x)[sel], b.full(b.y)[sel], b.full(b.z)[sel], dc[sel]
        ya = s.profile("cavity_ya", z)
        yp = s.profile("cavity_yp", z)
        phi = np.arctan2(np.abs(x), -(y - 0.5 * (ya + yp)))  # 0 posterior midline, pi anterior
        best = np.full(x.shape, np.inf, np.float32)
        is_cart = np.zeros(x.shape, bool)
        for i in range(12):
            zz = z + drop[i] * 0.5 * (1 - np.cos(phi)) - t_levels[i]
            d = ellipse2d(r, zz, 4.2, half_h[i])
            end = np.maximum(bone_end[i], cart_end[i])
            d = np.maximum(d, np.maximum(0.3 - phi, phi - end) * 40)
            better = d < best
            best[better] = d[better]
            is_cart[better] = phi[better] > bone_end[i]
        occ_flat = soft_inside(best, b.edge)
        occ = np.zeros(b.shape, np.float32)
        occ[sel] = occ_flat
        tex = b.texture("ribs")[sel]
        val_flat = np.where(is_cart, hu["cartilage"] + 20 * tex, bone_value(hu, best, tex, 1.2))
        value = np.zeros(b.shape, np.float32)
        value[sel] = val_flat
        return occ, value

    cv.paint(lo, hi, ribs, label=0, allowed=BODY, set_comp=BONE)

    z_lo, z_hi = s.level("T9") - 5, s.level("T2") - 10

    def sternum(b):
        ya = s.profile("cavity_ya", b.z)
        half_w = np.where(b.z > s.level("T4"), 24, 14)
        d = dmax(np.abs(b.x) - half_w, np.abs(b.y - ya - 8) - 6, z_lo - b.z, b.z - z_hi)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, bone_value(hu, d, b.texture("sternum"))

    cv.paint(np.array([-30, 40, z_lo - 5]), np.array([30, 160 * s.depth, z_hi + 5]), sternum,
             label=0, allowed=BODY, set_comp=BONE)

    z_sc = s.level("T5")

    def scapulae(b):
        dm = muscle_envelope_distance(s, b.x, b.y, b.z)
        plate = np.abs(dm + 20) - 3.5
        blade = ((np.abs(b.x) - 88 * s.width) / 42) ** 2 + ((b.z - z_sc) / 75) ** 2 - 1
        d = dmax(plate, blade * 20, b.y - s.spine_y(b.z))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, bone_value(hu, d, b.texture("scapula"))

    cv.paint(np.array([-150 * s.width, -160 * s.depth, z_sc - 90]), np.array([150 * s.width, 0, z_sc + 90]),
             scapulae, label=0, allowed=BODY, set_comp=BONE)


def hip_centers(s: Subject):
    """Femoral head centres (right, left) and radius."""
    fx, fy, fz = 90 * s.width, 12 * s.depth, 20 * s.height
    return np.array([-fx, fy, fz]), np.array([fx, fy, fz]), 24.0 * s.body_scale()


def paint_pelvis(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    c_right, c_left, r_head = hip_centers(s)
    crest = 205 * s.height
    for side, c in ((-1, c_right), (1, c_left)):
        # iliac wing: a curved plate from the sacro-iliac joint round to the anterior spine
        def wing(b, side=side, c=c):
            z_low = c[2] + 0.9 * r_head
            t = np.clip((b.z - z_low) / (crest - z_low), 0, 1)
            a = abs(c[0]) + 10 + 30 * t * s.width
            bb = 70 * s.depth + 10 * t
            yc = c[1] - 30 * t
            half = 3.5 + 3.0 * (1 - t) ** 2 + 4.0 * smoothstep(0.85, 1.0, t)  # thin fossa, thick crest
            d_shell = np.abs(ellipse2d(b.x, b.y - yc, a, bb)) - half
            # from the sacro-iliac joint (posterior) round to the anterior superior iliac spine;
            # low down only the posterior column above the acetabulum remains
            front = c[1] + (55 * s.depth - 25 * t) * smoothstep(0.0, 0.35, t) - 20 * (1 - smoothstep(0.0, 0.35, t))
            sector = np.maximum(side * -b.x + 35, b.y - front)
            back = s.spine_y(b.z) - 22 - b.y
            d = dmax(d_shell, sector, back, b.z - crest, z_low - b.z)
            occ = soft_inside(d, b.edge)
            if not occ.any():
                return None
            return occ, bone_value(hu, d, b.texture("ilium", coarse=True))

        lo = np.array([min(side * 200, side * 20), -110 * s.depth, c[2]])
        hi = np.array([max(side * 200, side * 20), 100 * s.depth, crest + 10])
        cv.paint(np.minimum(lo, hi), np.maximum(lo, hi), wing, label=0, allowed=BODY, set_comp=BONE)

        # pubic and ischial rami: a ring from the acetabulum to the symphysis and back
        sym = np.array([side * 7, s.profile("muscle_ya", 0)[()] - 28, 8 * s.height])
        tub = np.array([side * 55 * s.width, c[1] - 10, c[2] - 55 * s.height])
        ring = np.array([c + [-side * 18, 22, 8], sym + [0, 0, 8], sym + [0, -6, -22], tub, c + [-side * 8, -20, -10]])
        curve = catmull_rom(ring, 6)
        radii = np.full(len(curve), 7.5 * s.body_scale())

        def rami(b, curve=curve, radii=radii):
            d, _ = tube(b.x, b.y, b.z, curve, radii)
            occ = soft_inside(d, b.edge)
            if not occ.any():
                return None
            return occ, bone_value(hu, d, b.texture("rami"))

        cv.paint(*curve_bbox(curve, radii), rami, label=0, allowed=BODY, set_comp=BONE)

        # acetabular cup around the head (open laterally and inferiorly)
        def acetabulum(b, side=side, c=c):
            lx, ly, lz = to_local(b.x, b.y, b.z, c)
            rad = np.sqrt(lx**2 + ly**2 + lz**2)
            d = np.maximum(np.abs(rad - r_head - 5.5) - 3.5, (side * lx * 0.6 - lz * 0.8) - 0.25 * r_head)
            occ = soft_inside(d, b.edge)
            if not occ.any():
                return None
            return occ, bone_value(hu, d, b.texture("acetabulum"))

        cv.paint(c - r_head - 15, c + r_head + 15, acetabulum, label=0, allowed=BODY, set_comp=BONE)


def paint_femurs(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    c_right, c_left, r_head = hip_centers(s)
    for name, side, c in (("femoral_head_right", -1, c_right), ("femoral_head_left", 1, c_left)):
        neck_end = c + [side * 38, -4, -30]
        shaft_top = c + [side * 36, -2, -45]
        shaft_bot = c + [side * 22, 12, -420]
        troch = c + [side * 45, -10, -24]
        lesser = c + [side * 18, -12, -62]

        def femur(b, c=c, neck_end=neck_end, shaft_top=shaft_top, shaft_bot=shaft_bot, troch=troch, lesser=lesser):
            lx, ly, lz = to_local(b.x, b.y, b.z, c)
            d_head = np.sqrt(lx**2 + ly**2 + lz**2) - r_head
            d_neck, _ = tube(b.x, b.y, b.z, [c, neck_end], [15, 16])
            d_shaft, _ = tube(b.x, b.y, b.z, [shaft_top, shaft_bot], [16, 14])
            d_tr = ellipsoid(*to_local(b.x, b.y, b.z, troch), (15, 20, 24))
            d_lt = ellipsoid(*to_local(b.x, b.y, b.z, lesser), (9, 9, 12))
            d = dmin(d_head, d_neck, d_shaft, d_tr, d_lt)
            occ = soft_inside(d, b.edge)
            if not occ.any():
                return None
            tex = b.texture("femur", coarse=True)
            shaft_part = (b.z < c[2] - 70) & (d_shaft <= d)
            marrow = np.where(shaft_part, hu["yellow_marrow"] + 30 * tex, hu["trabecular_bone"] + 35 * tex)
            value = bone_value(hu, d, tex, cortex_mm=np.where(shaft_part, 5.0, 1.5), marrow=marrow)
            return occ, value

        lo = np.minimum(c - r_head, shaft_bot - 20) - 25
        hi = np.maximum(c + r_head, troch + 25) + 5
        lo[0], hi[0] = min(c[0] - 40, c[0] + side * 80), max(c[0] + 40, c[0] + side * 80)
        cv.paint(lo, hi, femur, label=LABEL_MAP[name], allowed=BODY, set_comp=BONE)
