"""Abdominal and pelvic organs: liver, gallbladder, spleen, stomach and duodenum, pancreas,
kidneys, adrenal glands, urinary bladder, pelvic soft tissue."""

from __future__ import annotations

import numpy as np

from ..canvas import ABDOMEN, Canvas
from ..fields import LatticeNoise, smoothstep, soft_inside
from ..intensities import TissueHU
from ..labels import LABEL_MAP
from ..shapes import dmax, dmin, ellipsoid, frame_with_axis, to_local
from ..subject import Subject
from .body import cavity_dist
from .tubes import paint_tube

ORGAN_ALLOWED = (ABDOMEN,)


def _deformer(s: Subject, name: str, lo, hi, amp_mm: float, cell_mm: float = 35.0):
    """Smooth non-rigid displacement of an organ's coordinates (grid independent)."""
    field = LatticeNoise(s.rng(name + "_deform"), lo, hi, cell_mm, channels=3)

    def warp(b):
        u = b.smooth(lambda x, y, z: field(x, y, z), 6.0) * amp_mm
        return b.x + u[0], b.y + u[1], b.z + u[2]

    return warp


def liver_inferior_z(s: Subject, x, y, low: float):
    return low + 95 * s.height * smoothstep(-110 * s.width, 40 * s.width, x) - 0.15 * (y - s.spine_y(low))


def paint_liver(cv: Canvas, s: Subject, hu: TissueHU) -> dict:
    rng = s.rng("liver")
    low = s.level("L2") - 28 * s.height + rng.normal(0, 12)
    reach = float(np.clip(rng.normal(1.05, 0.15), 0.75, 1.35))
    lo = np.array([-170 * s.width, -120 * s.depth, low - 40])
    hi = np.array([130 * s.width, 170 * s.depth, s.dome_right + 10])
    warp = _deformer(s, "liver", lo, hi, 7.0)
    vessels = LatticeNoise(s.rng("liver_vessels"), lo, hi, 17.0, channels=2)
    cysts = rng.random() < 0.25
    portal_v = hu["portal_blood"]

    def liver(b):
        x, y, z = warp(b)
        ys = s.spine_y(z)
        d_cav = cavity_dist(b)
        d_inf = liver_inferior_z(s, x, y, low) - z
        x_left = -5 * s.width + 95 * reach * s.width * smoothstep(ys + 20, ys + 105, y)
        d = dmax(d_cav, d_inf, x - x_left)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        value = hu["liver"] + 6 * b.texture("liver", coarse=True) + 4 * b.texture("liver")
        n = b.smooth(lambda x, y, z: vessels(x, y, z), 3.0)
        v = np.clip((0.12 - np.maximum(np.abs(n[0]), np.abs(n[1]))) / 0.05, 0, 1)
        value = value + v * (portal_v - value)
        if cysts:
            c = b.texture("liver_cyst", coarse=True)
            value = np.where(c > 2.6, hu["fluid"], value)
        return occ, value

    cv.paint(lo, hi, liver, label=LABEL_MAP["liver"], allowed=ORGAN_ALLOWED)
    return {"low": low}


def paint_gallbladder(cv: Canvas, s: Subject, hu: TissueHU, liver_info) -> None:
    rng = s.rng("gallbladder")
    size = float(np.clip(rng.normal(1.0, 0.2), 0.6, 1.4)) * s.body_scale()
    x = -48 * s.width + rng.normal(0, 6)
    z0 = float(liver_inferior_z(s, np.float32(x), np.float32(0), liver_info["low"]))
    ya = float(s.profile("cavity_ya", z0))
    center = np.array([x, ya - 40 * s.depth, z0 + 18 + rng.normal(0, 5)])
    frame = frame_with_axis([0.15, 0.55, -0.8] + rng.normal(0, 0.1, 3))
    radii = np.array([15, 14, 36]) * size

    def gb(b):
        d = ellipsoid(*to_local(b.x, b.y, b.z, center, frame), radii)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        value = np.where(d > -2.0, hu["gallbladder_wall"], hu["bile"] + 4 * b.texture("bile"))
        return occ, value

    r = radii.max() + 3
    cv.paint(center - r, center + r, gb, label=LABEL_MAP["gallbladder"], allowed=ORGAN_ALLOWED)


def paint_spleen(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    rng = s.rng("spleen")
    size = float(np.clip(rng.normal(1.0, 0.15), 0.7, 1.5)) * s.body_scale()
    z = s.dome_left - 78 * s.height + rng.normal(0, 8)
    wc = float(s.profile("cavity_w", z))
    yp = float(s.profile("cavity_yp", z))
    center = np.array([wc - 36 * size, yp + 58 * s.depth, z])
    frame = frame_with_axis([0.3, 0.55, -0.78] + rng.normal(0, 0.08, 3))
    radii = np.array([24, 42, 56]) * size
    medial = np.array([-0.8, 0.45, 0.0])
    hollow = center + medial * 72 * size
    lo, hi = center - 80 * size, center + 80 * size
    warp = _deformer(s, "spleen", lo, hi, 5.0, 30.0)
    arterial = hu.phase == "arterial"

    def spleen(b):
        x, y, z = warp(b)
        d = ellipsoid(*to_local(x, y, z, center, frame), radii)
        d = np.maximum(d, 46 * size - np.sqrt((x - hollow[0]) ** 2 + (y - hollow[1]) ** 2 + (z - hollow[2]) ** 2))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        value = hu["spleen"] + 5 * b.texture("spleen")
        if arterial:  # heterogeneous "zebra" enhancement of the red pulp
            value = value + 28 * np.tanh(2 * b.texture("spleen_zebra", coarse=True))
        return occ, value

    cv.paint(lo, hi, spleen, label=LABEL_MAP["spleen"], allowed=ORGAN_ALLOWED)


def stomach_points(s: Subject):
    rng = s.rng("stomach")
    dl = s.dome_left
    rel = [[45, 42, dl - 18], [66, 68, dl - 55], [56, 95, dl - 95], [15, 106, s.level("L1") + 5],
           [-18, 86, s.level("L1")]]
    pts = np.array([[r[0] * s.width, float(s.spine_y(r[2])) + r[1] * s.depth, r[2]] for r in rel])
    pts += rng.normal(0, 5, pts.shape)
    size = float(np.clip(rng.normal(1.0, 0.12), 0.75, 1.3)) * s.body_scale()
    return pts, np.array([36, 35, 29, 21, 11]) * size, rng


def paint_stomach(cv: Canvas, s: Subject, hu: TissueHU) -> np.ndarray:
    """Paint the stomach and duodenum; returns the gastro-oesophageal junction point."""
    pts, radii, rng = stomach_points(s)
    air_frac = float(rng.uniform(0.0, 0.35))
    y_air = float(pts[:, 1].max() + radii.max() * 0.8 - air_frac * 90)
    food = rng.random() < 0.3

    def value(b, d, u):
        wall = hu["stomach_wall"] + 6 * b.texture("stomach")
        content = hu["fluid"] + 6 * b.texture("gastric")
        if food:
            content = content + 60 * np.tanh(b.texture("food", coarse=True))
        content = np.where(b.y > y_air, hu["air"], content)
        return np.where(d > -4.0, wall, content)

    paint_tube(cv, pts, radii, value, label=LABEL_MAP["stomach"], allowed=ORGAN_ALLOWED)
    pyl = pts[-1]
    duo_rel = [[-40, 70, s.level("L1") - 5], [-52, 55, s.level("L2")], [-50, 48, s.level("L3")],
               [-20, 40, s.level("L3") - 15], [15, 40, s.level("L3") - 10], [30, 46, s.level("L2")]]
    duo = np.vstack([pyl, [[r[0] * s.width, float(s.spine_y(r[2])) + r[1] * s.depth, r[2]] for r in duo_rel]])

    def duo_value(b, d, u):
        v = np.where(d > -2.5, hu["bowel_wall"], hu["bowel_fluid"] + 8 * b.texture("duodenum"))
        return np.where((d < -2.5) & (b.texture("duo_air", coarse=True) > 1.2), hu["air"], v)

    paint_tube(cv, duo, [11, 12, 12, 11, 11, 10, 10], duo_value, label=0, allowed=ORGAN_ALLOWED)
    # gastro-oesophageal junction: on the fundus' medial-posterior surface
    return pts[0] + np.array([-0.6, -0.1, 0.45]) * radii[0] * 0.8


def paint_pancreas(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    rng = s.rng("pancreas")
    rel = [[-18, 40, s.level("L2") - 12], [-36, 50, s.level("L2") + 4], [-8, 64, s.level("L1") - 6],
           [30, 60, s.level("L1") + 2], [68, 36, s.level("T12")], [90, 22, s.level("T12") + 12]]
    pts = np.array([[r[0] * s.width, float(s.spine_y(r[2])) + r[1] * s.depth, r[2]] for r in rel])
    pts += rng.normal(0, 4, pts.shape)
    size = float(np.clip(rng.normal(1.0, 0.12), 0.7, 1.3)) * s.body_scale()
    fatty = np.clip((s.age - 45) / 40, 0, 1)

    def value(b, d, u):
        v = hu["pancreas"] + 12 * b.texture("pancreas")
        lob = smoothstep(0.6, 1.4, b.texture("pancreas_lobules")) * fatty
        return v + lob * (hu["fat"] - v) * 0.7

    paint_tube(cv, pts, np.array([12, 15, 11, 11, 9, 7]) * size, value, label=LABEL_MAP["pancreas"],
               allowed=ORGAN_ALLOWED)


def kidney_geometry(s: Subject) -> dict:
    """Per side: centre, frame (x: towards the hilum, z: long axis) and radii."""
    out = {}
    rng = s.rng("kidneys")
    base = 0.5 * (s.level("T12") + s.level("L3")) + rng.normal(0, 10)
    for name, side in (("kidney_left", 1), ("kidney_right", -1)):
        size = float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.2)) * s.body_scale()
        z = base - (14 * s.height if side < 0 else 0) + rng.normal(0, 6)
        center = np.array([side * 70 * s.width + rng.normal(0, 4), float(s.spine_y(z)) + 6 * s.depth, z])
        axis = np.array([-side * 0.25, -0.22, 1.0]) + rng.normal(0, 0.05, 3)
        axis /= np.linalg.norm(axis)
        hil = np.array([-side * 0.72, 0.7, 0.0])
        hil = hil - (hil @ axis) * axis
        hil /= np.linalg.norm(hil)
        frame = np.stack([hil, np.cross(axis, hil), axis], axis=1)
        radii = np.array([27, 22, 53]) * size
        out[name] = (center, frame, radii)
    return out


def kidney_hila(geom) -> dict:
    """name -> (hilum point, upper pole point) for attaching vessels and adrenals."""
    return {n: (c + f[:, 0] * r[0] * 1.05, c + f[:, 2] * r[2]) for n, (c, f, r) in geom.items()}


def paint_kidneys(cv: Canvas, s: Subject, hu: TissueHU, geom) -> None:
    """Kidneys with cortex, medulla and a fat-filled sinus holding the renal pelvis; the label
    covers the parenchyma only."""
    for name, (center, frame, radii) in geom.items():
        sinus_radii = radii * np.array([0.55, 0.42, 0.55])
        pelvis_radii = radii * np.array([0.3, 0.2, 0.3])

        def kidney(b, name=name, center=center, frame=frame, radii=radii):
            lx, ly, lz = to_local(b.x, b.y, b.z, center, frame)
            occ = soft_inside(ellipsoid(lx, ly, lz, radii), b.edge)
            if not occ.any():
                return None
            k = np.sqrt((lx / radii[0]) ** 2 + (ly / radii[1]) ** 2 + (lz / radii[2]) ** 2)
            medulla = (k < 0.78) & (b.texture(name + "_pyramids", coarse=True) > -0.6)
            value = np.where(medulla, hu["kidney_medulla"], hu["kidney_cortex"]) + 6 * b.texture(name)
            sx = lx - radii[0] * 0.55
            in_sinus = soft_inside(ellipsoid(sx, ly, lz, sinus_radii), b.edge)
            pelvis = ellipsoid(sx - radii[0] * 0.05, ly, lz, pelvis_radii) < 0
            value = value + in_sinus * (np.where(pelvis, hu["renal_pelvis"], hu["fat"]) - value)
            return occ, value

        r = radii.max() + 3
        cv.paint(center - r, center + r, kidney, label=0, allowed=ORGAN_ALLOWED)
        for blk in cv.blocks(center - r, center + r):
            lx, ly, lz = to_local(blk.x, blk.y, blk.z, center, frame)
            d = np.maximum(ellipsoid(lx, ly, lz, radii),
                           -ellipsoid(lx - radii[0] * 0.55, ly, lz, sinus_radii))
            sl = blk.slices
            cv.label[sl][(d < 0) & (cv.label[sl] == 0) & (cv.comp[sl] == ABDOMEN)] = LABEL_MAP[name]


def paint_adrenals(cv: Canvas, s: Subject, hu: TissueHU, kidney_geom) -> None:
    hila = kidney_hila(kidney_geom)
    for name, kname, side in (("adrenal_left", "kidney_left", 1), ("adrenal_right", "kidney_right", -1)):
        rng = s.rng(name)
        top = hila[kname][1]
        vertex = np.array([side * (30 if side > 0 else 34) * s.width,
                           float(s.spine_y(top[2])) + (24 if side > 0 else 16) * s.depth,
                           top[2] + (6 if side > 0 else 14) * s.height]) + rng.normal(0, 2.5, 3)
        limbs = [np.array([side * 0.15, -0.9, -0.45]), np.array([side * 0.75, -0.55, -0.4])]
        size = float(np.clip(rng.normal(1.0, 0.12), 0.75, 1.3))
        shapes = []
        for direction in limbs:
            direction = direction + rng.normal(0, 0.06, 3)
            frame = frame_with_axis(direction)
            length = 15 * size
            shapes.append((vertex + frame[:, 2] * length, frame, np.array([2.6, 8.0, length]) * [1, size, 1]))

        def adrenal(b, shapes=shapes):
            d = dmin(*[ellipsoid(*to_local(b.x, b.y, b.z, c, f), r) for c, f, r in shapes])
            occ = soft_inside(d, b.edge)
            if not occ.any():
                return None
            return occ, hu["adrenal"] + 6 * b.texture(name)

        cv.paint(vertex - 38, vertex + 38, adrenal, label=LABEL_MAP[name], allowed=ORGAN_ALLOWED)


def paint_bladder(cv: Canvas, s: Subject, hu: TissueHU) -> None:
    rng = s.rng("bladder")
    fill = float(rng.uniform(0.25, 1.0))
    radii = np.array([30 + 28 * fill, 22 + 22 * fill, 20 + 26 * fill]) * s.body_scale()
    z = 10 * s.height + 0.8 * radii[2]
    ya = float(s.profile("cavity_ya", z))
    center = np.array([rng.normal(0, 5), ya - radii[1] - 6, z])
    lo, hi = center - radii - 10, center + radii + 10
    warp = _deformer(s, "bladder", lo, hi, 4.0, 30.0)
    contrast = hu.phase == "delayed"

    def bladder(b):
        x, y, z = warp(b)
        d = ellipsoid(*to_local(x, y, z, center), radii)
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        urine = hu["urine"] + 4 * b.texture("urine")
        if contrast:  # excreted contrast layers in the dependent (posterior) part
            urine = np.where(b.y < center[1] - 0.7 * radii[1], hu["urine_contrast"], urine)
        return occ, np.where(d > -3.0, hu["bladder_wall"], urine)

    cv.paint(lo, hi, bladder, label=LABEL_MAP["urinary_bladder"], allowed=ORGAN_ALLOWED)

    # prostate / uterus: soft tissue behind and below the bladder, unlabeled
    pc = center + np.array([0, -radii[1] * 0.8, -radii[2] * 0.6])

    def pelvic_organ(b):
        d = ellipsoid(*to_local(b.x, b.y, b.z, pc), (24, 18, 22))
        occ = soft_inside(d, b.edge)
        if not occ.any():
            return None
        return occ, 45 + hu["muscle"] * 0.3 + 8 * b.texture("pelvic_organ")

    cv.paint(pc - 30, pc + 30, pelvic_organ, label=0, allowed=ORGAN_ALLOWED)
