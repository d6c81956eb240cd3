"""3D boxes -> one 2D box prompt per axial slice (paper Sec. 2.2: expand by [2, 10, 10], clip).

The in-plane margin can be given in mm instead (`margin_in_voxels`), which the app and `medlsam eval` do.

Conventions: volumes are (z, y, x); 3D boxes are inclusive voxel bounds (lo_zyx, hi_zyx);
2D boxes are inclusive (y0, x0, y1, x1) on one axial slice.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from medlsam.errors import InputError

Box2D = tuple[int, int, int, int]
SliceBoxes = dict[int, list[Box2D]]  # z -> boxes on that slice

PAPER_MARGIN_ZYX = (2, 10, 10)
# The paper's 10 pixels on its ~0.8 mm slices, as a physical distance: on coarser slices (the sample
# data's 1.25-2 mm) 10 pixels would be a box twice as loose, and LiteMedSAM then segments whatever
# else the box holds (docs/EVAL.md, "box margin").
DEFAULT_IN_PLANE_MARGIN_MM = 8.0


def parse_margin_mm(text: str | float | None) -> float | None:
    """A configured in-plane margin: millimetres (>= 0), or 'px' / 'none' for the pixel margin."""
    if text is None or str(text).strip().lower() in ("px", "none", ""):
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"box margin must be millimetres (e.g. 8) or 'px', got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"box margin must be a finite number of mm >= 0, got {text!r}")
    return value


def margin_in_voxels(margin_zyx: Sequence[int], in_plane_margin_mm: float | None,
                     spacing_zyx: Sequence[float] | None) -> tuple[int, int, int]:
    """`margin_zyx` with its y and x replaced by `in_plane_margin_mm` in pixels of this spacing.

    Without a millimetre margin or a spacing, `margin_zyx` is returned unchanged.
    """
    z, y, x = (int(m) for m in margin_zyx)
    if in_plane_margin_mm is None or spacing_zyx is None:
        return z, y, x
    if in_plane_margin_mm < 0:
        raise InputError(f"in-plane box margin must be >= 0 mm, got {in_plane_margin_mm}")
    sy, sx = float(spacing_zyx[1]), float(spacing_zyx[2])
    return z, int(round(in_plane_margin_mm / sy)), int(round(in_plane_margin_mm / sx))


def expand_box(lo, hi, margin_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Grow an inclusive box by `margin_zyx` voxels on each side."""
    margin = np.asarray(margin_zyx, dtype=int)
    return np.asarray(lo, dtype=int) - margin, np.asarray(hi, dtype=int) + margin


def clip_box(lo, hi, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Clip an inclusive box to an array of `shape`; None when nothing of it is inside."""
    lo = np.maximum(np.asarray(lo, dtype=int), 0)
    hi = np.minimum(np.asarray(hi, dtype=int), np.asarray(shape, dtype=int) - 1)
    if np.any(hi < lo):
        return None
    return lo, hi


def slice_boxes_from_box(lo_zyx, hi_zyx, shape_zyx: Sequence[int],
                         margin_zyx: Sequence[int] = PAPER_MARGIN_ZYX) -> dict[int, Box2D]:
    """Expand a 3D box, clip it to the volume and return {z: (y0, x0, y1, x1)} for each slice it covers."""
    lo, hi = expand_box(lo_zyx, hi_zyx, margin_zyx)
    clipped = clip_box(lo, hi, shape_zyx)
    if clipped is None:
        return {}
    lo, hi = clipped
    box = (int(lo[1]), int(lo[2]), int(hi[1]), int(hi[2]))
    return {int(z): box for z in range(lo[0], hi[0] + 1)}


def _is_point(value: Any, dims: int) -> bool:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return False
    return arr.shape == (dims,) and bool(np.all(np.isfinite(arr)))


def _is_box3d(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and len(value) == 2 and all(_is_point(v, 3) for v in value)


def _check_label(label: Any) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 < int(label) < 256:
        raise InputError(f"organ label ids must be integers in 1..255, got {label!r}")
    return int(label)


def parse_organ_boxes(organ_boxes: Mapping[int, Any], shape_zyx: Sequence[int],
                      margin_zyx: Sequence[int] = PAPER_MARGIN_ZYX) -> dict[int, SliceBoxes]:
    """Normalize every accepted box form to {label: {z: [2D boxes]}}, clipped to the volume.

    Per label, one of:
    - a 3D box `(lo_zyx, hi_zyx)` or a list of them (SPL parts): expanded by `margin_zyx`, one 2D
      box per covered slice;
    - per-slice 2D boxes `{z: (y0, x0, y1, x1)}` (or `{z: [box, ...]}`): used as given, clipped.
    Boxes wholly outside the volume or with hi < lo contribute nothing (no error).
    """
    if not isinstance(organ_boxes, Mapping):
        raise InputError("organ boxes must be a dict {label id: boxes}")
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3:
        raise InputError(f"expected a (z, y, x) shape, got {shape}")
    out: dict[int, SliceBoxes] = {}
    for raw_label, value in organ_boxes.items():
        label = _check_label(raw_label)
        per_slice: SliceBoxes = {}
        if isinstance(value, Mapping):
            for raw_z, boxes in value.items():
                z = int(raw_z)
                if _is_point(boxes, 4):
                    boxes = [boxes]
                for box in boxes:
                    if not _is_point(box, 4):
                        raise InputError(f"label {label}, slice {z}: a 2D box is (y0, x0, y1, x1), got {box!r}")
                    if not 0 <= z < shape[0]:
                        continue
                    y0, x0, y1, x1 = (int(round(float(v))) for v in box)
                    clipped = clip_box((y0, x0), (y1, x1), shape[1:])
                    if clipped is not None:
                        (y0, x0), (y1, x1) = clipped
                        per_slice.setdefault(z, []).append((int(y0), int(x0), int(y1), int(x1)))
        else:
            boxes = [value] if _is_box3d(value) else value
            if not isinstance(boxes, (Sequence, np.ndarray)) or not all(_is_box3d(b) for b in boxes):
                raise InputError(
                    f"label {label}: expected a 3D box (lo_zyx, hi_zyx), a list of them, "
                    f"or {{z: (y0, x0, y1, x1)}}; got {value!r}"
                )
            for lo, hi in boxes:
                lo = np.rint(np.asarray(lo, dtype=float)).astype(int)
                hi = np.rint(np.asarray(hi, dtype=float)).astype(int)
                for z, box in slice_boxes_from_box(lo, hi, shape, margin_zyx).items():
                    per_slice.setdefault(z, []).append(box)
        if per_slice:
            out[label] = dict(sorted(per_slice.items()))
    return out


def keep_slices(prompts: Mapping[int, SliceBoxes], slices_for_label: Mapping[int, Any]) -> dict[int, SliceBoxes]:
    """Only the slices listed for each label (a label without an entry keeps none); empty labels dropped."""
    out = {}
    for label, per_slice in prompts.items():
        keep = {int(z) for z in slices_for_label.get(label, ())}
        kept = {z: boxes for z, boxes in per_slice.items() if z in keep}
        if kept:
            out[label] = kept
    return out


def every_kth(prompts: Mapping[int, SliceBoxes], step: int) -> dict[int, SliceBoxes]:
    """Only slices z with z % step == 0 (evaluation subsampling)."""
    return {label: {z: b for z, b in per.items() if z % step == 0} for label, per in prompts.items()}


def boxes_from_labels(labels_zyx: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Tight inclusive (lo_zyx, hi_zyx) box of every non-zero label in a label volume."""
    labels_zyx = np.asarray(labels_zyx)
    if not np.issubdtype(labels_zyx.dtype, np.integer):
        labels_zyx = np.rint(labels_zyx).astype(np.int64)
    boxes = {}
    for index, slices in enumerate(ndimage.find_objects(labels_zyx), start=1):
        if slices is not None:
            boxes[index] = (np.array([s.start for s in slices]), np.array([s.stop - 1 for s in slices]))
    return boxes


def slice_boxes_from_labels(labels_zyx: np.ndarray) -> dict[int, dict[int, Box2D]]:
    """Tight per-slice 2D boxes {label: {z: (y0, x0, y1, x1)}} of every non-zero label ('manual' boxes)."""
    out: dict[int, dict[int, Box2D]] = {}
    for label, (lo, hi) in boxes_from_labels(labels_zyx).items():
        per_slice = {}
        for z in range(lo[0], hi[0] + 1):
            ys, xs = np.nonzero(labels_zyx[z, lo[1]: hi[1] + 1, lo[2]: hi[2] + 1] == label)
            if len(ys):
                per_slice[z] = (int(lo[1] + ys.min()), int(lo[2] + xs.min()), int(lo[1] + ys.max()), int(lo[2] + xs.max()))
        out[label] = per_slice
    return out
