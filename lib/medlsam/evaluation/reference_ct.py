"""The real CT studies that ship with TotalSegmentator's source distribution, as MedLSAM studies.

`scripts/fetch_reference_ct.py` puts its tests/reference_files/ into a cache folder. Three real CT
studies are there, three different patients:

- `example_ct.nii.gz`: non-contrast abdomen-pelvis (lower thorax to femora), 3 mm, with
  TotalSegmentator's own multi-label segmentation of it (`example_seg_fast_force_split.nii.gz`).
- `aorta_report/example_ct.nii.gz`: contrast CT angiography of the chest and upper abdomen (neck
  base to the upper abdomen), 1.5 mm, with reference masks of the aorta and vertebra T12 (on a
  cropped grid) and the heart (`pulmonary_report/models/heart.nii.gz`, full grid).
- `example_ct_dicom/`: a 20-slice (40 mm) contrast DICOM series through the upper abdomen, with its
  multi-label segmentation `example_seg_dicom.nii.gz`.

TotalSegmentator's names map onto MedLSAM's label map below. Its femur covers more than the femoral
head, and its vertebrae are split by level: those mappings are approximate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

# TotalSegmentator v2 "total" task class ids (those used here)
TOTALSEG_IDS = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6, "pancreas": 7,
    "adrenal_gland_right": 8, "adrenal_gland_left": 9, "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11,
    "lung_upper_lobe_right": 12, "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "esophagus": 15,
    "urinary_bladder": 21, "heart": 51, "aorta": 52, "inferior_vena_cava": 63, "femur_left": 75, "femur_right": 76,
    **{f"vertebrae_{level}": i for i, level in enumerate(
        ["S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3", "T2",
         "T1", "C7", "C6", "C5", "C4", "C3", "C2", "C1"], start=26)},
}

# MedLSAM organ -> the TotalSegmentator classes that make it up
OURS_FROM_TOTALSEG: dict[str, list[str]] = {
    "liver": ["liver"], "spleen": ["spleen"], "kidney_left": ["kidney_left"], "kidney_right": ["kidney_right"],
    "stomach": ["stomach"], "gallbladder": ["gallbladder"], "pancreas": ["pancreas"], "aorta": ["aorta"],
    "inferior_vena_cava": ["inferior_vena_cava"], "esophagus": ["esophagus"], "urinary_bladder": ["urinary_bladder"],
    "femoral_head_left": ["femur_left"], "femoral_head_right": ["femur_right"],
    "spinal_column": [n for n in TOTALSEG_IDS if n.startswith("vertebrae_")],
    "lung_left": ["lung_upper_lobe_left", "lung_lower_lobe_left"],
    "lung_right": ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "heart": ["heart"], "adrenal_left": ["adrenal_gland_left"], "adrenal_right": ["adrenal_gland_right"],
}
# one vertebra as an extra organ: the CT angiography has a reference mask of it
EXTRA_ORGANS = {"vertebrae_T12": 20}


def reference_label_map(base: dict[str, int]) -> dict[str, int]:
    """MedLSAM's label map plus the extra organs measured on the real studies."""
    return {**base, **{k: v for k, v in EXTRA_ORGANS.items() if k not in base}}


def from_totalseg(seg: np.ndarray, label_ids: dict[str, int]) -> np.ndarray:
    """A TotalSegmentator multi-label array in `label_ids` (MedLSAM names; extra organs by their
    TotalSegmentator name); classes without a counterpart become background."""
    out = np.zeros(seg.shape, np.uint8)
    for ours, label_id in label_ids.items():
        sources = OURS_FROM_TOTALSEG.get(ours, [ours] if ours in TOTALSEG_IDS else [])
        out[np.isin(seg, [TOTALSEG_IDS[s] for s in sources])] = label_id
    return out


def _on_grid(mask_img: nib.Nifti1Image, target: nib.Nifti1Image) -> np.ndarray:
    """A mask saved on a crop of `target`'s grid (same axes and spacing) placed on the full grid."""
    shift = np.linalg.inv(target.affine) @ mask_img.affine
    if not np.allclose(shift[:3, :3], np.eye(3), atol=1e-4) or not np.allclose(shift[:3, 3], np.rint(shift[:3, 3]), atol=1e-3):
        raise ValueError("mask grid is not an integer crop of the image grid")
    off = np.rint(shift[:3, 3]).astype(int)
    data = np.asanyarray(mask_img.dataobj) > 0
    out = np.zeros(target.shape, bool)
    lo = np.maximum(off, 0)
    hi = np.minimum(off + np.array(data.shape), target.shape)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = data[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, off))]
    return out


@dataclass
class RealStudy:
    name: str
    image: nib.Nifti1Image
    label: np.ndarray | None  # MedLSAM ids on the image grid (a support's label), or None
    references: dict[str, np.ndarray]  # organ -> boolean mask on the image grid


def abdomen_pelvis(folder: Path, label_ids: dict[str, int]) -> RealStudy:
    """The non-contrast abdomen-pelvis study and its TotalSegmentator segmentation."""
    image = nib.load(str(folder / "example_ct.nii.gz"))
    seg = np.asanyarray(nib.load(str(folder / "example_seg_fast_force_split.nii.gz")).dataobj)
    label = from_totalseg(seg, label_ids)
    refs = {name: label == i for name, i in label_ids.items() if (label == i).any()}
    return RealStudy("abdomen_pelvis", image, label, refs)


def chest_cta(folder: Path, label_ids: dict[str, int]) -> RealStudy:
    """The CT angiography (chest and upper abdomen) with its aorta, T12 and heart masks."""
    image = nib.load(str(folder / "aorta_report" / "example_ct.nii.gz"))
    models = folder / "aorta_report" / "test_result" / "models"
    refs = {"aorta": _on_grid(nib.load(str(models / "aorta.nii.gz")), image),
            "vertebrae_T12": _on_grid(nib.load(str(models / "vertebrae_T12.nii.gz")), image),
            "heart": _on_grid(nib.load(str(folder / "pulmonary_report" / "models" / "heart.nii.gz")), image)}
    refs = {k: v for k, v in refs.items() if k in label_ids}
    label = np.zeros(image.shape, np.uint8)
    for name, mask in refs.items():
        label[mask] = label_ids[name]
    return RealStudy("chest_cta", image, label, refs)


def upper_abdomen_slab(folder: Path, label_ids: dict[str, int]) -> RealStudy:
    """The 20-slice DICOM series (read with SimpleITK) and its segmentation."""
    import SimpleITK as sitk

    from medlsam.registration.preprocessing import RAS_TO_LPS

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "example_ct_dicom")))
    dicom = reader.Execute()
    array = sitk.GetArrayFromImage(dicom).transpose(2, 1, 0).astype(np.int16)
    affine = np.eye(4)
    direction = np.asarray(dicom.GetDirection()).reshape(3, 3)
    affine[:3, :3] = RAS_TO_LPS @ direction @ np.diag(dicom.GetSpacing())
    affine[:3, 3] = RAS_TO_LPS @ np.asarray(dicom.GetOrigin())
    image = nib.Nifti1Image(array, affine)
    seg_img = nib.load(str(folder / "example_seg_dicom.nii.gz"))
    seg = np.asanyarray(seg_img.dataobj)
    # the segmentation was written in another axis order: bring it onto the series' grid
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(seg_img.affine),
                                                nib.orientations.io_orientation(affine))
    seg = nib.orientations.apply_orientation(seg, transform)
    if seg.shape != image.shape:
        raise ValueError(f"slab segmentation {seg.shape} does not match the DICOM series {image.shape}")
    label = from_totalseg(seg, label_ids)
    refs = {name: label == i for name, i in label_ids.items() if (label == i).any()}
    return RealStudy("upper_abdomen_slab", image, label, refs)
