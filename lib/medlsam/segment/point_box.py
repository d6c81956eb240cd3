"""A box prompt from clicks: LiteMedSAM and MedSAM were trained with boxes and answer a lone point
with an empty mask, while OHIF's and 3D Slicer's point prompts send only clicks.

Around each foreground click, the pixels whose (median-smoothed) CT value is within
`TOLERANCE_HU` of the clicked tissue's and that connect to the click, after an opening that cuts
thin bridges to neighbouring tissue, form a region; its bounding box plus a margin is the box
prompt. The clicks go to the model with the box, so models that read points use them too.
Measured on a generated default-preset study, one click in each organ's widest slice (LiteMedSAM,
slice Dice): liver 0.82, aorta 0.93, urinary bladder 0.95, stomach 0.66, heart 0.43, spleen 0.34,
kidneys 0.01-0.11, pancreas 0.0: organs whose neighbours have the same CT values need a box (ROI).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

TOLERANCE_HU = 25.0  # tissue within this of the clicked value belongs to the clicked structure
MAX_EXTENT_MM = 260.0  # a region never spans more than this (an organ, not the whole body)
OPENING_MM = 3.0
MARGIN_MM = 3.0

Box = tuple[float, float, float, float]  # (y0, x0, y1, x1), inclusive pixel coordinates


def box_from_clicks(slice_hu: np.ndarray, foreground: Sequence[Sequence[float]],
                    background: Sequence[Sequence[float]] = (), spacing_yx: Sequence[float] = (1.0, 1.0),
                    tolerance_hu: float = TOLERANCE_HU) -> Box | None:
    """(y0, x0, y1, x1) around the structures under the foreground clicks (y, x) of one slice in
    Hounsfield units; None without foreground clicks. Background clicks are kept out of the region."""
    if not len(foreground):
        return None
    h, w = slice_hu.shape
    spacing = np.maximum(np.asarray(spacing_yx, dtype=float), 1e-3)
    smooth = ndimage.median_filter(np.asarray(slice_hu, dtype=np.float32), size=3)
    radius = np.maximum(1, np.round(OPENING_MM / 2 / spacing)).astype(int)
    opening = np.ones(tuple(2 * radius + 1), bool)
    half = np.ceil(MAX_EXTENT_MM / 2 / spacing).astype(int)
    region = np.zeros((h, w), bool)
    for y, x in foreground:
        yi, xi = _pixel(y, x, h, w)
        value = float(np.median(smooth[max(yi - 1, 0):yi + 2, max(xi - 1, 0):xi + 2]))
        similar = np.abs(smooth - value) <= tolerance_hu
        for by, bx in background:  # a background click is never part of the region
            byi, bxi = _pixel(by, bx, h, w)
            similar[max(byi - 1, 0):byi + 2, max(bxi - 1, 0):bxi + 2] = False
        window = np.zeros((h, w), bool)
        window[max(yi - half[0], 0):yi + half[0] + 1, max(xi - half[1], 0):xi + half[1] + 1] = True
        similar &= window
        opened = ndimage.binary_opening(similar, structure=opening)
        labels, _ = ndimage.label(opened if opened[yi, xi] else similar)
        if labels[yi, xi]:
            region |= labels == labels[yi, xi]
        else:
            region[yi, xi] = True
    ys, xs = np.nonzero(region)
    margin = np.ceil(MARGIN_MM / spacing).astype(int)
    return (float(max(ys.min() - margin[0], 0)), float(max(xs.min() - margin[1], 0)),
            float(min(ys.max() + margin[0], h - 1)), float(min(xs.max() + margin[1], w - 1)))


def _pixel(y: float, x: float, h: int, w: int) -> tuple[int, int]:
    return int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1))
