"""Query studies of a batch run: NIfTI files from folders or list files, a MONAI Label datastore
folder, or CT series of a DICOMweb server.

A `StudyRef` only names a study (id + where to read it); it is small and picklable so a Ray
worker on another machine can load the study itself from a shared path or the DICOMweb server.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from medlsam.errors import InputError
from medlsam.io import is_nifti, load_nifti

FINAL_LABELS = Path("labels") / "final"  # MONAI Label local datastore: <studies>/labels/final/<id>.nii.gz


@dataclass(frozen=True)
class StudyRef:
    """One query study: a NIfTI file (`source` is its path) or a DICOMweb series (`source` is the
    server URL, `study_uid`/`series_uid` name the series)."""

    study_id: str
    source: str
    kind: str = "file"  # "file" or "dicomweb"
    study_uid: str = ""
    series_uid: str = ""

    def load(self) -> nib.Nifti1Image:
        """The study's image (HU), read from its file or downloaded from the DICOMweb server."""
        if self.kind == "file":
            return load_nifti(self.source)
        if self.kind == "dicomweb":
            return load_dicomweb_series(self.source, self.study_uid, self.series_uid)
        raise InputError(f"unknown study kind {self.kind!r}")


def strip_nifti(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_studies(entries: Sequence[str | os.PathLike]) -> list[StudyRef]:
    """Studies from folders (their NIfTI files), .txt list files (one path a line) and NIfTI files."""
    from medlsam.evaluation.datasets import expand_paths, study_ids

    paths, _ = expand_paths(entries, "query image")
    refs = [StudyRef(sid, str(path)) for sid, path in zip(study_ids(paths), paths)]
    return refs


def datastore_studies(folder: str | os.PathLike, which: str = "unlabeled") -> list[StudyRef]:
    """Studies of a MONAI Label local datastore folder: `unlabeled` (no final label: the queries),
    `labeled` (the supports) or `all`."""
    folder = Path(folder)
    if which not in ("unlabeled", "labeled", "all"):
        raise InputError(f"datastore studies must be 'unlabeled', 'labeled' or 'all', got {which!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"datastore folder not found: {folder}")
    refs = []
    for image in sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p)):
        labeled = any((folder / FINAL_LABELS / f"{strip_nifti(image.name)}{s}").exists() for s in (".nii.gz", ".nii"))
        if which == "all" or labeled == (which == "labeled"):
            refs.append(StudyRef(strip_nifti(image.name), str(image)))
    return refs


def datastore_supports(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, final label) pairs of a MONAI Label local datastore folder."""
    folder = Path(folder)
    pairs = []
    for ref in datastore_studies(folder, "labeled"):
        name = strip_nifti(Path(ref.source).name)
        label = next(folder / FINAL_LABELS / f"{name}{s}" for s in (".nii.gz", ".nii")
                     if (folder / FINAL_LABELS / f"{name}{s}").exists())
        pairs.append((Path(ref.source), label))
    return pairs


# --- DICOMweb ---------------------------------------------------------------------------------
def dicomweb_client(url: str):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=url.rstrip("/"))


def dicomweb_studies(url: str, series: Sequence[str] | None = None, modality: str = "CT") -> list[StudyRef]:
    """The `modality` series of a DICOMweb server (or only the Series Instance UIDs in `series`);
    each series is one study, its id the Series Instance UID."""
    from pydicom import Dataset

    client = dicomweb_client(url)
    found = [Dataset.from_json(d) for d in client.search_for_series(search_filters={"Modality": modality})]
    by_uid = {str(d.SeriesInstanceUID): str(d.StudyInstanceUID) for d in found}
    wanted = list(series) if series else sorted(by_uid)
    unknown = [s for s in wanted if s not in by_uid]
    if unknown:
        raise InputError(f"series not found as {modality} on {url}: {', '.join(unknown[:5])}")
    return [StudyRef(uid, url, "dicomweb", by_uid[uid], uid) for uid in wanted]


def load_dicomweb_series(url: str, study_uid: str, series_uid: str) -> nib.Nifti1Image:
    """Download one series (WADO-RS) and read it as a NIfTI volume in memory (SimpleITK/GDCM)."""
    import SimpleITK as sitk

    instances = dicomweb_client(url).retrieve_series(study_uid, series_uid)
    if not instances:
        raise InputError(f"series {series_uid} on {url} has no instances")
    with tempfile.TemporaryDirectory(prefix="medlsam-series-") as tmp:
        for i, ds in enumerate(instances):
            ds.save_as(os.path.join(tmp, f"{i:05d}.dcm"), write_like_original=False)
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(tmp, series_uid)
        if not names:
            raise InputError(f"series {series_uid} on {url} is not a readable image series")
        reader.SetFileNames(names)
        out = os.path.join(tmp, "image.nii.gz")
        sitk.WriteImage(reader.Execute(), out)
        img = nib.load(out)
        return nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), img.affine)
