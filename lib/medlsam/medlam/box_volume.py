"""Draw localized boxes into a label volume so any viewer can show them."""

from __future__ import annotations

import numpy as np

from medlsam.localization import StudyLocalization


def boxes_to_label_volume(localization: StudyLocalization, shape, outline: bool = True) -> np.ndarray:
    """uint8 volume on the study grid with each present organ's box drawn with its id.

    With `outline`, only the box's faces are drawn (one voxel thick), so boxes stay readable
    where they overlap and do not hide the anatomy.
    """
    volume = np.zeros(shape, dtype=np.uint8)
    for organ in localization.present.values():
        (i0, j0, k0), (i1, j1, k1) = organ.box.lo, organ.box.hi
        box = np.s_[i0:i1 + 1, j0:j1 + 1, k0:k1 + 1]
        if not outline:
            volume[box] = organ.label_id
            continue
        shell = np.ones((i1 - i0 + 1, j1 - j0 + 1, k1 - k0 + 1), dtype=bool)
        shell[1:-1, 1:-1, 1:-1] = False
        region = volume[box]
        region[shell] = organ.label_id
    return volume
