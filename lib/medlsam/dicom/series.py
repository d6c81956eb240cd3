"""Write a CT volume (NIfTI, HU) as a DICOM CT Image Storage series, one file per axial slice."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from .geometry import SliceGeometry, dicom_layout
from .uids import derived_uid, study_uids

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}
RESCALE_INTERCEPT = -1024  # stored value 0 = -1024 HU, the usual CT convention
FIXED_DATE = "20240101"  # generated studies: stable content, so a stable date


@dataclass
class SeriesRef:
    """Identifiers and files of a written series."""

    study_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    modality: str
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"study_id": self.study_id, "StudyInstanceUID": self.study_uid,
                "SeriesInstanceUID": self.series_uid, "FrameOfReferenceUID": self.frame_of_reference_uid,
                "Modality": self.modality, "instances": len(self.files)}


def _patient_module(ds, study_id: str) -> None:
    ds.PatientName = f"MedLSAM^{study_id}"
    ds.PatientID = study_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"


def _study_module(ds, study_id: str, uids: dict) -> None:
    ds.StudyInstanceUID = uids["StudyInstanceUID"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = FIXED_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = study_id[-16:]
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"MedLSAM synthetic CT {study_id}"


def write_ct_series(image: nib.Nifti1Image, out_dir: str | os.PathLike, study_id: str, *,
                    modality: str = "CT", series_number: int = 1, description: str = "synthetic CT",
                    uids: dict[str, str] | None = None) -> SeriesRef:
    """Write `image` (values in HU) as a DICOM series into `out_dir` (replaced atomically).

    The volume is first put into the usual CT layout (`dicom_layout`: columns to the patient's
    left, rows to posterior, slices ascending to superior); geometry tags (ImagePositionPatient,
    ImageOrientationPatient, PixelSpacing, SliceThickness) reproduce its affine exactly. Pixels are
    stored as uint16 with RescaleIntercept -1024 / RescaleSlope 1 (HU below -1024 are clipped).
    UIDs are derived from `study_id`, so re-writing a study gives identical UIDs. `modality` "MR"
    writes an MR Image Storage series (used to test refusals of non-CT input).
    """
    if modality not in SOP_CLASS:
        raise ValueError(f"modality must be one of {', '.join(SOP_CLASS)}, got {modality!r}")
    if not study_id or not isinstance(study_id, str):
        raise ValueError(f"study_id must be a non-empty string, got {study_id!r}")
    img = dicom_layout(image)
    geo = SliceGeometry.from_nifti(img)
    hu = np.asanyarray(img.dataobj)
    if not np.issubdtype(hu.dtype, np.number) or not np.all(np.isfinite(hu)):
        raise ValueError(f"image {study_id}: voxel values must be finite numbers (HU)")
    stored = np.clip(np.rint(hu.astype(np.float64)) - RESCALE_INTERCEPT, 0, 65535).astype(np.uint16)
    uids = dict(uids or study_uids(study_id))
    if modality != "CT":  # a different series of the same patient and study
        uids["SeriesInstanceUID"] = derived_uid(study_id, f"{modality.lower()}-series")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    ref = SeriesRef(study_id, uids["StudyInstanceUID"], uids["SeriesInstanceUID"],
                    uids["FrameOfReferenceUID"], modality)
    try:
        for k in range(geo.shape[2]):
            name = f"{modality}{k + 1:04d}.dcm"
            _slice_dataset(stored[:, :, k], k, geo, study_id, uids, modality, series_number,
                           description).save_as(tmp_dir / name, write_like_original=False)
            ref.files.append(out_dir / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return ref


def _slice_dataset(pixels_ij: np.ndarray, k: int, geo: SliceGeometry, study_id: str, uids: dict,
                   modality: str, series_number: int, description: str) -> FileDataset:
    sop_uid = derived_uid(uids["SeriesInstanceUID"], "instance", k)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = FIXED_DATE
    _patient_module(ds, study_id)
    _study_module(ds, study_id, uids)
    ds.Modality = modality
    ds.SeriesInstanceUID = uids["SeriesInstanceUID"]
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST" if modality == "CT" else ""
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "MedLSAM synthetic data generator"
    ds.FrameOfReferenceUID = uids["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = geo.slice_position(k)
    ds.ImageOrientationPatient = geo.orientation
    ds.SliceLocation = round(geo.slice_location(k), 4)
    ds.SliceThickness = round(geo.spacing[2], 6)
    ds.SpacingBetweenSlices = round(geo.spacing[2], 6)
    ds.PixelSpacing = [round(geo.spacing[1], 6), round(geo.spacing[0], 6)]  # row spacing, column spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels_ij.shape[1]), int(pixels_ij.shape[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.KVP = 120
    else:
        ds.RescaleIntercept, ds.RescaleSlope = RESCALE_INTERCEPT, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.AcquisitionDate = FIXED_DATE
    ds.PixelData = np.ascontiguousarray(pixels_ij.T).tobytes()  # rows = j, columns = i
    return ds
