"""Organ label maps <-> DICOM SEG (Segmentation Storage), through pydicom-seg.

Writing numbers the segments 1..n (DICOM requires consecutive segment numbers) and names each
with its organ (SegmentLabel); reading maps segments back to label ids by that name, so label ids
survive any renumbering by other writers (dcmqi, OHIF).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk

from medlsam.io import atomic_path

from .geometry import array_from_sitk, dicom_layout, sitk_from_nifti
from .uids import derived_uid

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
ANATOMICAL_STRUCTURE = {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                        "CodeMeaning": "Anatomical Structure"}
# SNOMED CT codes of the organs whose codes we are sure of; the others get a local code
# ("99" designators are reserved for local coding schemes by DICOM PS3.16).
SNOMED = {
    "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"), "kidney": ("64033007", "Kidney"),
    "stomach": ("69695003", "Stomach"), "gallbladder": ("28231008", "Gallbladder"),
    "pancreas": ("15776009", "Pancreas"), "aorta": ("15825003", "Aorta"),
    "inferior_vena_cava": ("64131007", "Inferior vena cava"), "esophagus": ("32849002", "Esophagus"),
    "urinary_bladder": ("89837001", "Urinary bladder"), "heart": ("80891009", "Heart"),
    "lung": ("39607008", "Lung"), "adrenal": ("23451007", "Adrenal gland"),
}
LATERALITY = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}


def segment_codes(name: str) -> dict:
    """dcmqi-style code entries for organ `name` (type code and, for paired organs, laterality)."""
    base, _, side = name.rpartition("_") if name.endswith(("_left", "_right")) else (name, "", "")
    out = {"SegmentedPropertyCategoryCodeSequence": dict(ANATOMICAL_STRUCTURE)}
    if base in SNOMED:
        code, meaning = SNOMED[base]
        out["SegmentedPropertyTypeCodeSequence"] = {"CodeValue": code, "CodingSchemeDesignator": "SCT",
                                                    "CodeMeaning": meaning}
        if side:
            code, meaning = LATERALITY[side]
            out["SegmentedPropertyTypeModifierCodeSequence"] = {
                "CodeValue": code, "CodingSchemeDesignator": "SCT", "CodeMeaning": meaning}
    else:
        out["SegmentedPropertyTypeCodeSequence"] = {"CodeValue": name[:16], "CodingSchemeDesignator": "99MEDLSAM",
                                                    "CodeMeaning": name.replace("_", " ")}
    return out


def _color(label_id: int) -> list[int]:
    rng = np.random.default_rng(label_id)
    return [int(v) for v in rng.integers(60, 256, 3)]


def write_seg(label: nib.Nifti1Image, ct_files: list[str | os.PathLike], label_map: dict[str, int],
              out_path: str | os.PathLike, *, series_uid: str | None = None, description: str = "MedLSAM labels",
              algorithm: str = "MANUAL") -> pydicom.Dataset:
    """Write organ ids of `label` (same grid as the CT series in `ct_files`) as one DICOM SEG file.

    Ids not in `label_map` are refused. The SEG references every CT instance; its Series/SOP
    Instance UIDs are `series_uid` (default: derived from the CT series) and derived from it.
    """
    names = {v: k for k, v in label_map.items()}
    data = np.asanyarray(label.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.equal(np.mod(data, 1), 0)):
            raise ValueError("label values must be whole numbers (organ ids)")
        data = data.astype(np.int64)
    present = sorted(int(v) for v in np.unique(data) if v != 0)
    unknown = [v for v in present if v not in names]
    if unknown:
        raise ValueError(f"label ids {unknown} are not in the label map ({', '.join(map(str, sorted(names)))})")
    if not present:
        raise ValueError("the label is empty: a DICOM SEG needs at least one segment")
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in ct_files]
    if not sources:
        raise ValueError("no CT files given: a SEG must reference its source series")
    # segment numbers 1..n in ascending label id order
    numbered = np.zeros(data.shape, dtype=np.uint8)
    attributes = []
    for number, label_id in enumerate(present, start=1):
        numbered[data == label_id] = number
        attributes.append({
            "labelID": number, "SegmentLabel": names[label_id], "SegmentDescription": names[label_id],
            "SegmentAlgorithmType": algorithm, **({"SegmentAlgorithmName": "MedLSAM"} if algorithm != "MANUAL" else {}),
            "recommendedDisplayRGBValue": _color(label_id), **segment_codes(names[label_id]),
        })
    template = pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "MedLSAM", "SeriesDescription": description, "SeriesNumber": "300",
        "InstanceNumber": "1", "ContentLabel": "SEGMENTATION", "ContentDescription": description,
        "BodyPartExamined": "", "segmentAttributes": [attributes],
    })
    # the SEG's geometry must match the source series: write it from the CT layout of the label
    seg_image = sitk_from_nifti(dicom_layout(nib.Nifti1Image(numbered, label.affine)))
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=True,
                                          skip_missing_segment=False)
    ds = writer.write(seg_image, sources)
    ds.SeriesInstanceUID = series_uid or derived_uid(sources[0].SeriesInstanceUID, "seg")
    ds.SOPInstanceUID = derived_uid(ds.SeriesInstanceUID, "instance", 0)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with atomic_path(out_path) as tmp:
        ds.save_as(str(tmp), write_like_original=False)
    return ds


def segment_names(ds: pydicom.Dataset) -> dict[int, str]:
    """SegmentNumber -> SegmentLabel of a SEG dataset."""
    return {int(s.SegmentNumber): str(getattr(s, "SegmentLabel", "")).strip() for s in ds.SegmentSequence}


def read_seg(seg: str | os.PathLike | pydicom.Dataset, reference: nib.Nifti1Image,
             label_map: dict[str, int]) -> tuple[np.ndarray, dict]:
    """Decode a DICOM SEG onto the voxel grid of `reference`; segments map to label ids by name.

    Returns (uint8 label array shaped like `reference`, report with `mapped` {name: id} and
    `ignored` segment names that are not in the label map). Raises ValueError for a file that
    is not a SEG or whose segments name no organ of the label map.
    """
    ds = seg if isinstance(seg, pydicom.Dataset) else pydicom.dcmread(str(seg))
    if getattr(ds, "SOPClassUID", None) != SEGMENTATION_STORAGE:
        raise ValueError(f"not a DICOM SEG (SOP class {getattr(ds, 'SOPClassUID', 'missing')})")
    names = segment_names(ds)
    wanted = {n: label_map[name] for n, name in names.items() if name in label_map}
    ignored = sorted(name for n, name in names.items() if n not in wanted)
    if not wanted:
        raise ValueError(f"no segment of the SEG names an organ of the label map (segments: {sorted(names.values())})")
    if ignored:
        logger.warning("SEG %s: segments %s are not in the label map; ignored", ds.SeriesInstanceUID, ignored)
    result = pydicom_seg.SegmentReader().read(ds)
    reference_image = sitk_from_nifti(reference, np.zeros(reference.shape[:3], np.uint8))
    out = np.zeros(reference.shape[:3], dtype=np.uint8)
    for number, label_id in sorted(wanted.items()):
        if number not in result.available_segments:
            continue
        mask = sitk.Resample(result.segment_image(number), reference_image, sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out[array_from_sitk(mask) > 0] = label_id
    report = {"mapped": {names[n]: i for n, i in wanted.items()}, "ignored": ignored,
              "series_uid": str(ds.SeriesInstanceUID),
              "referenced_series_uid": referenced_series_uid(ds)}
    return out, report


def referenced_series_uid(ds: pydicom.Dataset) -> str | None:
    """The Series Instance UID of the images a SEG was drawn on."""
    refs = ds.get("ReferencedSeriesSequence")
    return str(refs[0].SeriesInstanceUID) if refs else None


def write_seg_file_for_series(label_path: str | os.PathLike, series_dir: str | os.PathLike,
                              label_map: dict[str, int], out_path: str | os.PathLike, **kwargs) -> pydicom.Dataset:
    """`write_seg` for a label NIfTI and a folder holding the CT series."""
    files = sorted(Path(series_dir).glob("*.dcm"))
    return write_seg(nib.load(str(label_path)), files, label_map, out_path, **kwargs)
