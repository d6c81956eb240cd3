"""Mask clean-up on a multi-label (z, y, x) volume."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_largest_component(labels: np.ndarray, label_ids=None) -> np.ndarray:
    """Per label, keep only its largest 6-connected 3D component (in place; returns `labels`)."""
    objects = ndimage.find_objects(labels)
    wanted = set(int(i) for i in label_ids) if label_ids is not None else None
    for index, box in enumerate(objects, start=1):
        if box is None or (wanted is not None and index not in wanted):
            continue
        region = labels[box]
        mask = region == index
        components, count = ndimage.label(mask)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        region[mask & (components != int(np.argmax(sizes)))] = 0
    return labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
