"""Fusing the supports' warped organ masks into one query mask per organ, and judging presence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class FusedOrgan:
    mask: np.ndarray | None  # (z, y, x) bool on the region `offset`..; None when nothing was found
    offset: np.ndarray  # (3,) index of the region's first voxel on the query label grid
    box: tuple[np.ndarray, np.ndarray] | None  # inclusive (z, y, x) box on the query label grid
    agreement: float  # mean Dice of each support's mask with the fused one (1.0 for one support)
    fraction_inside: float  # median over supports: warped volume in the query / volume expected there
    n_supports: int
    n_found: int  # supports whose warped organ reached the query at all


def _box_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return None
    return idx.min(axis=0), idx.max(axis=0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 0.0


def organ_boxes(warped: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Inclusive (z, y, x) box of every label id in a warped label volume (one pass)."""
    out = {}
    for i, found in enumerate(ndimage.find_objects(warped), start=1):
        if found is not None:
            out[i] = (np.array([s.start for s in found]), np.array([s.stop - 1 for s in found]))
    return out


def fuse_organ(warped: list[np.ndarray], boxes: list[dict], label_id: int, expected_mm3: list[float],
               voxel_mm3: float, method: str = "vote", vote_fraction: float = 0.5) -> FusedOrgan:
    """Fuse one organ over the supports that hold it.

    warped: each support's label warped onto the query label grid (same shape), with `boxes` from
    `organ_boxes`; expected_mm3: the organ's volume each support expects in the query (support volume
    / affine volume change). "vote": voxels where at least `vote_fraction` of the supports agree (at
    least one), the box of that mask (median of the support boxes when no voxel reaches the vote);
    "median": median of the support boxes.
    """
    n = len(warped)
    found_boxes = [b[label_id] for b in boxes if label_id in b]
    if not found_boxes:
        return FusedOrgan(None, np.zeros(3, int), None, 0.0, 0.0, n, 0)
    # work on the region any support's organ reaches (small against the whole query grid)
    lo = np.min([b[0] for b in found_boxes], axis=0)
    hi = np.max([b[1] for b in found_boxes], axis=0)
    region = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    masks = [w[region] == label_id for w in warped]
    votes = np.sum(masks, axis=0)
    needed = max(1, int(np.ceil(vote_fraction * n - 1e-9)))
    fused = votes >= needed
    median_box = (np.floor(np.median([b[0] for b in found_boxes], axis=0)).astype(int),
                  np.ceil(np.median([b[1] for b in found_boxes], axis=0)).astype(int))
    if method == "median":
        box = median_box
    elif method == "vote":
        local = _box_of(fused)
        box = (local[0] + lo, local[1] + lo) if local is not None else median_box
    else:
        raise ValueError(f"fusion method must be 'vote' or 'median', got {method!r}")
    if not fused.any():  # no voxel reached the vote: the union stands in for the mask
        fused = votes > 0
    agreement = 1.0 if n == 1 else float(np.mean([_dice(m, fused) for m in masks]))
    # how much of each support's organ lands inside the query (not the fused mask: a vote shrinks small
    # organs the supports disagree on, without any of them being outside the scan)
    fractions = [min(1.0, float(m.sum()) * voxel_mm3 / e) if e > 0 else 0.0 for m, e in zip(masks, expected_mm3)]
    return FusedOrgan(fused, lo, box, agreement, float(np.median(fractions)), n, len(found_boxes))
