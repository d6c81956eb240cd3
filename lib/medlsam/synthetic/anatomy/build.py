"""Paint a whole subject onto a canvas, back to front."""

from __future__ import annotations

from ..canvas import Canvas
from ..intensities import TissueHU
from ..subject import Subject
from . import abdomen, body, bowel, skeleton, thorax, vessels


def paint_subject(cv: Canvas, s: Subject, hu: TissueHU, table_top_y: float, table_x: float) -> None:
    """Paint the table, body wall, skeleton and organs. Later paints win where they overlap,
    and organs are confined to their cavity, so labels never overlap."""
    body.paint_table(cv, table_top_y, table_x)
    body.paint_body(cv, s, hu, table_top_y, table_x)
    body.paint_back_muscles(cv, s, hu)
    skeleton.paint_spine(cv, s, hu)
    skeleton.paint_ribs(cv, s, hu)
    skeleton.paint_pelvis(cv, s, hu)
    skeleton.paint_femurs(cv, s, hu)
    heart = thorax.heart_geometry(s)
    kidneys = abdomen.kidney_geometry(s)
    thorax.paint_lungs(cv, s, hu)
    thorax.paint_mediastinum(cv, s, hu, heart)
    bowel.paint_small_bowel(cv, s, hu)
    bowel.paint_colon(cv, s, hu)
    vessels.paint_vessels(cv, s, hu, heart[0], abdomen.kidney_hila(kidneys))
    thorax.paint_heart(cv, s, hu, heart)
    thorax.paint_airways(cv, s, hu)
    liver = abdomen.paint_liver(cv, s, hu)
    abdomen.paint_gallbladder(cv, s, hu, liver)
    ge = abdomen.paint_stomach(cv, s, hu)
    abdomen.paint_spleen(cv, s, hu)
    thorax.paint_esophagus(cv, s, hu, ge)
    abdomen.paint_pancreas(cv, s, hu)
    abdomen.paint_kidneys(cv, s, hu, kidneys)
    abdomen.paint_adrenals(cv, s, hu, kidneys)
    abdomen.paint_bladder(cv, s, hu)
