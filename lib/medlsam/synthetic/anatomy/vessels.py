"""Great vessels: aorta with iliac arteries, inferior vena cava with iliac veins, superior vena
cava, pulmonary trunk, and the abdominal branches (portal, splenic, mesenteric, renal)."""

from __future__ import annotations

import numpy as np

from ..canvas import BODY, THORAX, ABDOMEN, WALL, VESSEL, Canvas
from ..intensities import TissueHU
from ..labels import LABEL_MAP
from ..subject import Subject
from .skeleton import hip_centers
from .tubes import paint_tube

VESSEL_ALLOWED = (WALL, THORAX, ABDOMEN)


def _pts(s: Subject, rel):
    """(x, y relative to the spine at that z, z) rows -> anatomical points (scaled)."""
    rel = np.asarray(rel, float)
    z = rel[:, 2]
    return np.stack([rel[:, 0] * s.width, s.spine_y(z) + rel[:, 1] * s.depth, z], axis=1)


def aorta_curve(s: Subject, heart_center):
    z_root = heart_center[2] + 35 * s.height
    z_arch = s.level("T4") + 12 * s.height
    rel = [
        [-4, 78, z_root], [-12, 76, z_root + 35 * s.height], [-4, 62, z_arch], [12, 42, z_arch + 4],
        [22, 22, z_arch - 14], [24, 10, z_arch - 55], [20, 10, s.level("T9")], [10, 24, s.level("T12")],
        [8, 30, s.level("L2")], [6, 30, s.level("L4") + 8 * s.height],
    ]
    radii = np.array([15, 15, 14, 13, 12.5, 12, 11.5, 10.5, 9.5, 9]) * s.body_scale()
    return _pts(s, rel), radii


def paint_vessels(cv: Canvas, s: Subject, hu: TissueHU, heart_center, kidneys) -> dict:
    """Paint the vessels; returns key points other organs attach to."""
    rng = s.rng("vessels")
    art = hu["aorta_blood"]
    ven = hu["vein_blood"]
    scale_age = 1 + 0.12 * (s.age - 50) / 35
    c_right, c_left, _ = hip_centers(s)
    aorta, ar = aorta_curve(s, heart_center)
    ar = ar * scale_age
    calcified = s.age > 55

    def aorta_value(b, d, u):
        value = art + 6 * b.texture("blood")
        if calcified:
            spots = (d > -2.0) & (b.texture("calc", coarse=True) > 1.6 - 0.01 * (s.age - 55))
            value = np.where(spots, 700.0, value)
        return value

    bif = aorta[-1]
    for c in (c_right, c_left):
        side = np.sign(c[0])
        iliac = [bif, bif + [side * 22, -4, -25], [side * 55 * s.width, c[1] + 5, 110 * s.height],
                 [side * 72 * s.width, c[1] + 30, 60 * s.height], [c[0] * 0.92, c[1] + 42, 0],
                 [c[0] * 0.95, c[1] + 45, -90 * s.height]]
        paint_tube(cv, iliac, [8.5, 7.5, 6.5, 6, 5.5, 5], aorta_value, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
    paint_tube(cv, aorta, ar, aorta_value, label=LABEL_MAP["aorta"], allowed=VESSEL_ALLOWED, set_comp=VESSEL)

    # inferior vena cava from the iliac confluence to the right atrium
    z_conf = s.level("L5")
    ivc_rel = [[-22, 26, z_conf], [-24, 30, s.level("L3")], [-26, 36, s.level("L1")],
               [-28, 48, s.level("T11")], [-20, 58, s.dome_right + 2], [-12, 66, s.dome_right + 22 * s.height]]
    ivc = _pts(s, ivc_rel)
    ivc_r = np.array([11, 11.5, 12, 13, 13.5, 14]) * s.body_scale()
    vblood = lambda b, d, u: ven + (hu["portal_blood"] - ven) * 0.3 * u + 6 * b.texture("blood")  # noqa: E731
    for c in (c_right, c_left):
        side = np.sign(c[0])
        iliac = [ivc[0], ivc[0] + [side * 20 + 20, -10, -20], [side * 50 * s.width, c[1] - 5, 110 * s.height],
                 [side * 68 * s.width, c[1] + 20, 60 * s.height], [c[0] * 0.82, c[1] + 36, 0],
                 [c[0] * 0.85, c[1] + 40, -90 * s.height]]
        paint_tube(cv, iliac, [9.5, 8.5, 8, 7.5, 7, 6.5], vblood, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
    paint_tube(cv, ivc, ivc_r, vblood, label=LABEL_MAP["inferior_vena_cava"], allowed=VESSEL_ALLOWED,
               set_comp=VESSEL)

    # superior vena cava and pulmonary trunk (mediastinum)
    z_root = heart_center[2] + 35 * s.height
    svc = _pts(s, [[-30, 62, s.level("T2")], [-30, 64, s.level("T4")], [-26, 66, z_root + 5]])
    paint_tube(cv, svc, np.array([9, 10, 10.5]) * s.body_scale(), ven + 20, allowed=VESSEL_ALLOWED,
               set_comp=VESSEL)
    rv = hu["heart_right_blood"]
    trunk = _pts(s, [[12, 90, z_root - 5], [10, 70, z_root + 25], [4, 52, z_root + 32]])
    paint_tube(cv, trunk, [13, 13, 12], rv, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
    for side in (-1, 1):
        pa = _pts(s, [[4, 52, z_root + 32], [side * 30, 50, z_root + 30 + 6 * side], [side * 55, 45, z_root + 22 + 6 * side]])
        paint_tube(cv, pa, [10, 9, 7], rv, allowed=VESSEL_ALLOWED, set_comp=VESSEL)

    # abdominal veins: superior mesenteric -> portal confluence -> portal vein into the liver hilum
    portal = hu["portal_blood"]
    conf = _pts(s, [[-6, 58, s.level("L1") - 8 * s.height]])[0]
    smv = np.vstack([_pts(s, [[-4, 60, s.level("L4")], [-6, 60, s.level("L2")]]), conf])
    paint_tube(cv, smv, [6, 6.5, 7.5], portal, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
    pv = np.vstack([conf, _pts(s, [[-30, 62, s.level("T12")], [-50, 58, s.level("T12") + 12]])])
    paint_tube(cv, pv, [8, 7.5, 6], portal, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
    sma = np.vstack([_pts(s, [[7, 30, s.level("L1")], [5, 46, s.level("L1") - 12], [2, 54, s.level("L2")],
                                [0, 56, s.level("L4")]])])
    paint_tube(cv, sma, [4.5, 4.2, 4, 3.5], art, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
    splenic_end = _pts(s, [[88, 18, s.level("T11")]])[0] + rng.normal(0, 4, 3)
    spl = np.vstack([conf, _pts(s, [[30, 48, s.level("L1") + 5], [65, 32, s.level("T12")]]), splenic_end])
    paint_tube(cv, spl, [6, 5.5, 5, 4.5], portal, allowed=VESSEL_ALLOWED, set_comp=VESSEL)

    # renal veins (left passes between aorta and SMA) and renal arteries
    for name, (hilum, _top) in kidneys.items():
        side = 1 if name.endswith("left") else -1
        z_h = hilum[2]
        if side > 0:
            rvein = [hilum, _pts(s, [[40, 35, z_h]])[0], _pts(s, [[8, 46, z_h + 4]])[0], _pts(s, [[-18, 38, z_h + 6]])[0]]
        else:
            rvein = [hilum, _pts(s, [[-24, 32, z_h + 6]])[0]]
        paint_tube(cv, rvein, [5.5] * len(rvein), ven, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
        rart = [hilum + [0, -6, 4], _pts(s, [[side * 30, 20, z_h + 6]])[0], _pts(s, [[8, 28, z_h + 10]])[0]]
        paint_tube(cv, rart, [3.5, 3.5, 3.5], art, allowed=VESSEL_ALLOWED, set_comp=VESSEL)
    return {"portal_hilum": pv[-1], "ivc": ivc, "aorta": aorta, "splenic_end": splenic_end}
