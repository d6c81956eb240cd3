"""The check every final label passes before a datastore stores it (it becomes a support)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from medlsam.errors import InputError
from medlsam.io import load_nifti
from medlsam.labels import LabelMap
from medlsam.medlam.templates import check_label


class FinalLabelCheck:
    """Refuses (InputError, naming the problem) a label the template store could not use:
    unreadable, another grid than its image, ids outside the label map, empty."""

    def __init__(self, label_map: LabelMap):
        self.label_map = label_map

    def __call__(self, image_file: str, label_file: str, image_id: str) -> None:
        try:
            label = load_nifti(label_file, what="label")
            image = nib.load(image_file)
            check_label(np.asanyarray(label.dataobj), image.shape, self.label_map, name=f"label for {image_id}")
        except ValueError as exc:
            raise InputError(f"label rejected: {exc}") from exc
        if not np.allclose(label.affine, image.affine, atol=1e-3):
            raise InputError(f"label rejected: its affine differs from the affine of image {image_id!r}")
