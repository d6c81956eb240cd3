"""NIfTI (RAS+ affine) <-> DICOM / ITK (LPS) geometry, for series written slice by slice."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dicom_layout(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """`img` reoriented (no resampling) so i runs to the patient's left, j to posterior, k to
    superior: columns, rows and ascending axial slices of a usual CT series."""
    current = io_orientation(img.affine)
    return img.as_reoriented(ornt_transform(current, axcodes2ornt(("L", "P", "S"))))


@dataclass(frozen=True)
class SliceGeometry:
    """Where voxel (i, j, k) of a volume lies as DICOM slices: column i, row j, slice k."""

    shape: tuple[int, int, int]
    column_direction: np.ndarray  # LPS unit vector along i (ImageOrientationPatient[:3])
    row_direction: np.ndarray  # LPS unit vector along j (ImageOrientationPatient[3:])
    spacing: tuple[float, float, float]  # mm along i, j, k
    lps_affine: np.ndarray  # 4x4: (i, j, k, 1) -> LPS mm

    @classmethod
    def from_nifti(cls, img: nib.Nifti1Image) -> "SliceGeometry":
        if len(img.shape) != 3:
            raise ValueError(f"a DICOM series needs a 3D volume, got shape {img.shape}")
        lps = RAS_TO_LPS @ np.asarray(img.affine, dtype=float)
        axes = lps[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        if np.any(spacing <= 0) or not np.all(np.isfinite(axes)):
            raise ValueError(f"the affine has a zero or invalid voxel size: {spacing.tolist()}")
        unit = axes / spacing
        gram = unit.T @ unit
        if not np.allclose(gram, np.eye(3), atol=1e-4):
            raise ValueError("the affine is sheared (voxel axes not orthogonal): DICOM slices cannot describe it")
        return cls(tuple(int(n) for n in img.shape), unit[:, 0], unit[:, 1],
                   tuple(float(s) for s in spacing), lps)

    @property
    def orientation(self) -> list[float]:
        return [float(v) for v in np.concatenate([self.column_direction, self.row_direction])]

    def slice_position(self, k: int) -> list[float]:
        """ImagePositionPatient of slice k (centre of its first pixel, LPS mm)."""
        return [float(v) for v in (self.lps_affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3]]

    def slice_location(self, k: int) -> float:
        normal = np.cross(self.column_direction, self.row_direction)
        return float(np.dot(normal, self.slice_position(k)))


def sitk_from_nifti(img: nib.Nifti1Image, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image with `img`'s geometry (LPS) holding `array` (default: img's data), indexed
    like the NIfTI array: ITK index (i, j, k) is array[i, j, k]."""
    data = np.asanyarray(img.dataobj) if array is None else array
    if data.shape != tuple(img.shape[:3]):
        raise ValueError(f"array shape {data.shape} differs from the image shape {img.shape}")
    lps = RAS_TO_LPS @ np.asarray(img.affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    out.SetSpacing([float(s) for s in spacing])
    out.SetOrigin([float(v) for v in lps[:3, 3]])
    out.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    return out


def array_from_sitk(image: sitk.Image) -> np.ndarray:
    """The voxels of a SimpleITK image as array[i, j, k] (the NIfTI order)."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
