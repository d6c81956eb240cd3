"""The paper's "manual" box prompts, simulated from the ground truth (MedSAM's recipe).

On every axial slice where an organ's ground-truth area exceeds `gt_slice_threshold` pixels, the
tight 2D box of the organ is grown outward on each side by an independent random 0-20 pixels and
clipped to the slice. MedSAM drew those 0-20 pixels on slices resized to 1024 pixels; with
`shift_reference_px=1024` the shift is scaled to the slice's own size (0-5 pixels on a 256-pixel
slice) so that a box is as loose, relative to the image, as in the paper. `None` draws the shift
in native pixels.
"""

from __future__ import annotations

import zlib

import numpy as np

Box2D = tuple[int, int, int, int]  # inclusive (y0, x0, y1, x1)

DEFAULT_MAX_SHIFT_PX = 20
DEFAULT_SHIFT_REFERENCE_PX = 1024


def slice_areas(truth_zyx: np.ndarray) -> np.ndarray:
    """Foreground pixel count of every axial slice of a boolean (z, y, x) mask."""
    truth_zyx = np.asarray(truth_zyx, dtype=bool)
    if truth_zyx.ndim != 3:
        raise ValueError(f"expected a (z, y, x) mask, got shape {truth_zyx.shape}")
    return truth_zyx.reshape(truth_zyx.shape[0], -1).sum(axis=1)


def counted_slices(truth_zyx: np.ndarray, gt_slice_threshold: float = 0) -> list[int]:
    """Slices whose ground-truth area is above `gt_slice_threshold` pixels (the paper's slice filter)."""
    if gt_slice_threshold < 0:
        raise ValueError(f"gt_slice_threshold must be >= 0 pixels, got {gt_slice_threshold}")
    return [int(z) for z in np.flatnonzero(slice_areas(truth_zyx) > gt_slice_threshold)]


def organ_rng(seed: int, study_id: str, label_id: int) -> np.random.Generator:
    """A generator that depends only on (seed, study, organ), not on the order studies are processed."""
    return np.random.default_rng([int(seed), zlib.crc32(study_id.encode()), int(label_id)])


def shift_scale(slice_shape, shift_reference_px: float | None) -> float:
    """Native pixels per reference pixel (1 when the shift is drawn in native pixels)."""
    if shift_reference_px is None:
        return 1.0
    if shift_reference_px <= 0:
        raise ValueError(f"shift_reference_px must be positive or None, got {shift_reference_px}")
    return max(slice_shape) / float(shift_reference_px)


def perturbed_box(mask_yx: np.ndarray, rng: np.random.Generator, max_shift_px: float = DEFAULT_MAX_SHIFT_PX,
                  scale: float = 1.0) -> Box2D:
    """Tight box of a non-empty 2D mask, each side moved outward by U{0..max_shift_px} * scale pixels."""
    ys, xs = np.nonzero(mask_yx)
    if ys.size == 0:
        raise ValueError("cannot draw a box around an empty mask")
    h, w = mask_yx.shape
    shift = np.rint(rng.integers(0, int(max_shift_px) + 1, size=4) * scale).astype(int)
    y0 = max(0, int(ys.min()) - shift[0])
    x0 = max(0, int(xs.min()) - shift[1])
    y1 = min(h - 1, int(ys.max()) + shift[2])
    x1 = min(w - 1, int(xs.max()) + shift[3])
    return y0, x0, y1, x1


def manual_slice_boxes(truth_zyx: np.ndarray, rng: np.random.Generator, gt_slice_threshold: float = 0,
                       max_shift_px: float = DEFAULT_MAX_SHIFT_PX,
                       shift_reference_px: float | None = DEFAULT_SHIFT_REFERENCE_PX) -> dict[int, Box2D]:
    """{z: perturbed ground-truth box} for every counted slice of one organ's (z, y, x) mask."""
    if max_shift_px < 0:
        raise ValueError(f"max_shift_px must be >= 0, got {max_shift_px}")
    truth_zyx = np.asarray(truth_zyx, dtype=bool)
    scale = shift_scale(truth_zyx.shape[1:], shift_reference_px)
    return {z: perturbed_box(truth_zyx[z], rng, max_shift_px, scale)
            for z in counted_slices(truth_zyx, gt_slice_threshold)}


def boxes_extent(slice_boxes: dict[int, Box2D]) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (lo_zyx, hi_zyx) 3D box around per-slice 2D boxes; None when there are none."""
    if not slice_boxes:
        return None
    zs = np.array(sorted(slice_boxes))
    boxes = np.array([slice_boxes[z] for z in zs])
    lo = np.array([zs.min(), boxes[:, 0].min(), boxes[:, 1].min()])
    hi = np.array([zs.max(), boxes[:, 2].max(), boxes[:, 3].max()])
    return lo, hi
