"""What the app needs from a datastore (`StudyStore`), and the local folder datastore that provides it.

The app relies on MONAI Label's `Datastore` interface plus the four members of `StudyStore`. Both
datastores (this folder one and `dicomweb.PacsDatastore`) take the label map and the final-label
check at construction, check final labels before storing them, and store them atomically.
Adding a datastore means implementing `StudyStore` on top of a MONAI Label datastore.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Hashable, Protocol, runtime_checkable

from monailabel.datastore.local import LocalDatastore

from medlsam.errors import InputError, NotFoundError
from medlsam.io import atomic_path
from medlsam.labels import LabelMap
from medlsam.medlam.store import SupportStudy

from .errors import request_errors
from .label_check import FinalLabelCheck

FINAL = "final"
LABELS_DIR = "labels"  # <studies>/labels/<tag>/<image id><ext>, MONAI Label's layout, which we pass in
LABEL_SUFFIXES = (".nii.gz", ".nii")


@runtime_checkable
class StudyStore(Protocol):
    """The datastore contract of the MedLSAM app (beside MONAI Label's `Datastore` methods)."""

    label_map: LabelMap
    check_final_label: FinalLabelCheck

    def image_file(self, image_id: str) -> str:
        """A local file of the study `image_id` (downloaded if needed); NotFoundError for unknown ids."""

    def final_label_studies(self) -> list[SupportStudy]:
        """The studies with a final label, with local image and label files (label ids as the label map's)."""

    def final_labels_version(self) -> Hashable:
        """A value that changes whenever a final label is added, replaced or removed."""


def label_suffix(file_name: str) -> str:
    """The file-type suffix of a label upload; InputError for formats the app does not read."""
    name = os.path.basename(file_name).lower()
    for suffix in LABEL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"label file {os.path.basename(file_name)!r} is not a NIfTI file "
                     f"({', '.join(LABEL_SUFFIXES)})")


class LocalStudyStore(LocalDatastore):
    """MONAI Label's folder datastore whose final labels are checked and written with one atomic rename.

    A crash while saving never leaves half a label: the new file replaces the old one in one step,
    then the datastore index is refreshed through MONAI Label's public methods."""

    def __init__(self, studies: str, label_map: LabelMap, check_final_label: FinalLabelCheck, **options):
        self.studies = str(studies)
        self.label_map = label_map
        self.check_final_label = check_final_label
        super().__init__(self.studies, labels_dir=LABELS_DIR, **options)

    # --- StudyStore -----------------------------------------------------------------------------
    def image_file(self, image_id: str) -> str:
        if image_id not in self.list_images():
            raise NotFoundError(f"image {image_id!r} is not a study of this datastore")
        return self.get_image_uri(image_id)

    def final_label_studies(self) -> list[SupportStudy]:
        studies = []
        for image_id in self.get_labeled_images(FINAL):
            label_uri = self.get_label_uri(image_id, FINAL)
            image_uri = self.get_image_uri(image_id)
            if label_uri and image_uri and os.path.exists(label_uri):
                studies.append(SupportStudy(image_id, Path(image_uri), Path(label_uri)))
        return studies

    def final_labels_version(self) -> Hashable:
        out = []
        for study in self.final_label_studies():
            try:
                out.append((study.study_id, os.stat(study.label).st_mtime_ns))
            except FileNotFoundError:
                continue
        return tuple(sorted(out))

    # --- saving ---------------------------------------------------------------------------------
    def label_folder(self, tag: str) -> Path:
        return Path(self.studies) / LABELS_DIR / tag

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        # called by MONAI Label's endpoint directly: errors must leave as HTTP answers
        with request_errors("saving the label"):
            return self._save_label(image_id, label_filename, label_tag, label_info)

    def _save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if image_id not in self.list_images():
            raise NotFoundError(f"image {image_id!r} is not a study of this datastore")
        suffix = label_suffix(label_filename)
        if label_tag == FINAL:
            self.check_final_label(self.get_image_uri(image_id), label_filename, image_id)
        target = self.label_folder(label_tag) / f"{image_id}{suffix}"
        previous = self.get_label_uri(image_id, label_tag) if label_tag in self.get_labels_by_image_id(image_id) else ""
        with atomic_path(target, suffix="") as tmp:
            with open(label_filename, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        if previous and os.path.realpath(previous) != os.path.realpath(target):
            self.remove_label(image_id, label_tag)  # a label of another file type: the new one replaces it
        self.refresh()
        info = dict(label_info or {})
        info.update(ts=int(time.time()), name=target.name)
        self.update_label_info(image_id, label_tag, info)
        return image_id
