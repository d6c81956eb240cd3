"""Evaluation metrics: 3D box IoU in millimetres, Dice, 95th-percentile Hausdorff distance.

Masks are boolean arrays on one voxel grid with `spacing_mm` along its array axes. Boxes are
inclusive voxel boxes `[[i0, j0, k0], [i1, j1, k1]]`; a voxel covers +-0.5 around its index, so
a one-voxel box has the size of one voxel.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from medlsam.geometry import apply_affine


def voxel_box_to_mm(box_voxel, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive voxel box -> axis-aligned world box (lo_mm, hi_mm) covering its voxels entirely."""
    box = np.asarray(box_voxel, dtype=np.float64)
    if box.shape != (2, 3) or not np.all(np.isfinite(box)):
        raise ValueError(f"a voxel box is [[i0, j0, k0], [i1, j1, k1]], got {box_voxel!r}")
    lo, hi = np.minimum(box[0], box[1]) - 0.5, np.maximum(box[0], box[1]) + 0.5
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    world = apply_affine(np.asarray(affine, dtype=np.float64), corners)
    return world.min(axis=0), world.max(axis=0)


def box_iou(box_a: Sequence, box_b: Sequence) -> float:
    """IoU of two continuous axis-aligned boxes (lo, hi) in the same units (e.g. mm)."""
    lo_a, hi_a = (np.asarray(v, dtype=np.float64) for v in box_a)
    lo_b, hi_b = (np.asarray(v, dtype=np.float64) for v in box_b)
    size_a, size_b = np.clip(hi_a - lo_a, 0, None), np.clip(hi_b - lo_b, 0, None)
    overlap = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    inter = float(np.prod(overlap))
    union = float(np.prod(size_a) + np.prod(size_b)) - inter
    return inter / union if union > 0 else 0.0


def box_iou_mm(box_voxel_a, box_voxel_b, affine: np.ndarray) -> float:
    """IoU of two inclusive voxel boxes of one study, measured in world millimetres."""
    return box_iou(voxel_box_to_mm(box_voxel_a, affine), voxel_box_to_mm(box_voxel_b, affine))


def mask_box(mask: np.ndarray) -> list[list[int]] | None:
    """Tight inclusive voxel box of a boolean mask, or None when it is empty."""
    found = ndimage.find_objects(np.asarray(mask, dtype=np.uint8))
    if not found or found[0] is None:
        return None
    slices = found[0]
    return [[s.start for s in slices], [s.stop - 1 for s in slices]]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks; NaN when both are empty (undefined)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {truth.shape}")
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float], percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between the surfaces of two masks.

    Uses MONAI's surface-distance implementation with the voxel spacing of each array axis.
    NaN when either mask is empty (the distance is undefined).
    """
    from monai.metrics import compute_hausdorff_distance

    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {truth.shape}")
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != pred.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing_mm needs {pred.ndim} positive values, got {spacing_mm!r}")
    if not pred.any() or not truth.any():
        return float("nan")
    # Distances only depend on the box holding both masks: crop to it and pad with one empty voxel
    # (everything outside it is empty anyway), which keeps large CT volumes cheap.
    lo, hi = mask_box(pred | truth)
    crop = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    pred_c = np.pad(pred[crop], 1)[None, None]
    truth_c = np.pad(truth[crop], 1)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecation notices
        value = compute_hausdorff_distance(pred_c, truth_c, include_background=True, percentile=percentile,
                                           spacing=spacing)
    return float(value.reshape(-1)[0])


def summarize(values: Iterable[float]) -> dict:
    """{"mean", "std", "n"} over the finite values (population std, as the paper's tables); NaN if none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}
