"""Exact mappings between a study's voxel grid and the grids the models work on.

Two working grids, both (z, y, x) arrays with 4x4 index maps back to the study's voxels:

- `MedLAMGrid`: reoriented to LAS, resampled to the MedLAM spacing, HU mapped to [0, 1],
  zero padded to at least one patch (METHOD section 2).
- `AxialView`: reoriented to LPS, no resampling, so `array[z]` is an axial slice in radiological
  display (anterior at the top, patient left on the right) for the 2D segmenters.

Orientation changes are permutations and flips only, so boxes stay boxes in every grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from medlsam.errors import InputError

# Piecewise-linear CT intensity map of the MedLAM preprocessing (METHOD section 2).
HU_KNOTS = (-1000.0, -200.0, 200.0, 1500.0)
MAPPED_KNOTS = (0.0, 0.2, 0.8, 1.0)
# An image whose minimum is above this does not contain air in Hounsfield units.
HU_MIN_THRESHOLD = -10.0

_XYZ_TO_ZYX = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)  # its own inverse


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis of an affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to an (N, 3) or (3,) array of points."""
    points = np.asarray(points, dtype=np.float64)
    return nib.affines.apply_affine(matrix, points)


def reorient_zyx(img: nib.Nifti1Image, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorient `img` to `axcodes` (e.g. "LAS") and transpose to (z, y, x).

    Returns the array and the 4x4 matrix mapping its (z, y, x) indices to the study's (i, j, k).
    """
    source = nio.io_orientation(img.affine)
    transform = nio.ornt_transform(source, nio.axcodes2ornt(tuple(axcodes)))
    data = np.asanyarray(img.dataobj)
    reoriented = nio.apply_orientation(data, transform)
    to_original = nio.inv_ornt_aff(transform, data.shape) @ _XYZ_TO_ZYX
    return np.ascontiguousarray(reoriented.transpose(2, 1, 0)), to_original


def map_hu(array: np.ndarray) -> np.ndarray:
    """MedLAM's piecewise-linear HU map to [0, 1], clipped outside [-1000, 1500]."""
    return np.interp(array, HU_KNOTS, MAPPED_KNOTS).astype(np.float32)


def check_ct_intensities(array: np.ndarray, name: str = "image") -> None:
    """Raise ValueError unless the intensities look like CT Hounsfield units."""
    lo, hi = float(array.min()), float(array.max())
    if lo >= HU_MIN_THRESHOLD:
        raise InputError(
            f"{name} intensities range from {lo:g} to {hi:g}: this does not look like CT in "
            "Hounsfield units (no air below -10 HU). MedLSAM expects CT; rescale the image to HU "
            "(e.g. apply RescaleSlope/Intercept) first."
        )


def resample_zyx(array: np.ndarray, scale: np.ndarray, order: int) -> np.ndarray:
    """Resample so that output index o samples input index o * scale (exact, corner-aligned).

    Downsampling first smooths with a Gaussian to avoid aliasing; order 0 (labels) never smooths.
    """
    scale = np.asarray(scale, dtype=np.float64)
    out_shape = tuple(int(max(1, np.floor((n - 1) / s) + 1)) for n, s in zip(array.shape, scale))
    source = array.astype(np.float32, copy=False)
    if order > 0 and np.any(scale > 1.0):
        sigma = np.where(scale > 1.0, 0.4 * scale, 0.0)
        source = ndimage.gaussian_filter(source, sigma=sigma, mode="nearest")
    return ndimage.affine_transform(
        source, np.diag(scale), output_shape=out_shape, order=order, mode="nearest", prefilter=False
    )


@dataclass
class MedLAMGrid:
    """A study on MedLAM's grid: (z, y, x), LAS, `spacing_mm`, values in [0, 1], padded."""

    array: np.ndarray  # float32 (z, y, x), padded to at least `patch_size`
    spacing_mm: np.ndarray  # (3,) z, y, x
    valid_shape: tuple[int, int, int]  # shape before padding: the part that holds the study
    to_original_matrix: np.ndarray  # 4x4: grid (z, y, x) -> study (i, j, k)
    study_affine: np.ndarray  # 4x4: study (i, j, k) -> world RAS mm
    study_shape: tuple[int, int, int]
    scale: np.ndarray  # (3,) grid step in native LAS voxels: spacing_mm / native spacing

    @classmethod
    def from_nifti(
        cls,
        img: nib.Nifti1Image,
        spacing_mm=(3.0, 3.0, 3.0),
        patch_size=(64, 64, 64),
        name: str = "image",
    ) -> "MedLAMGrid":
        """Preprocess a CT study for MedLAM (reorient, resample, HU map, pad)."""
        if len(img.shape) != 3:
            raise InputError(f"{name} must be a 3D volume, got shape {tuple(img.shape)}")
        array_zyx, index_map = reorient_zyx(img, "LAS")
        check_ct_intensities(array_zyx, name)
        spacing_in = voxel_spacing(img.affine @ index_map)
        target = np.asarray(spacing_mm, dtype=np.float64)
        scale = target / spacing_in
        mapped = map_hu(array_zyx)
        resampled = resample_zyx(mapped, scale, order=1)
        valid_shape = resampled.shape
        extent_mm = np.array(array_zyx.shape) * spacing_in
        field_of_view_mm = np.asarray(patch_size) * target
        if np.any(extent_mm < field_of_view_mm / 2):
            raise InputError(
                f"{name} covers only {np.round(extent_mm).astype(int).tolist()} mm (z, y, x), less than half of "
                f"one MedLAM patch ({np.round(field_of_view_mm).astype(int).tolist()} mm): too small to localize in"
            )
        pad = [(0, max(0, int(p) - n)) for n, p in zip(valid_shape, patch_size)]
        padded = np.pad(resampled, pad, mode="constant", constant_values=0.0)
        return cls(
            array=np.ascontiguousarray(padded, dtype=np.float32),
            spacing_mm=target,
            valid_shape=tuple(int(n) for n in valid_shape),
            to_original_matrix=index_map @ np.diag([*scale, 1.0]),
            study_affine=np.asarray(img.affine, dtype=np.float64),
            study_shape=tuple(int(n) for n in img.shape),
            scale=scale,
        )

    def to_original(self, points_zyx: np.ndarray) -> np.ndarray:
        """Grid (z, y, x) points -> study voxel (i, j, k) points (float)."""
        return apply_affine(self.to_original_matrix, points_zyx)

    def from_original(self, points_ijk: np.ndarray) -> np.ndarray:
        """Study voxel (i, j, k) points -> grid (z, y, x) points (float)."""
        return apply_affine(np.linalg.inv(self.to_original_matrix), points_ijk)

    def to_world(self, points_zyx: np.ndarray) -> np.ndarray:
        """Grid (z, y, x) points -> world RAS mm."""
        return apply_affine(self.study_affine @ self.to_original_matrix, points_zyx)

    def native_to_grid(self, points_native_zyx: np.ndarray) -> np.ndarray:
        """Points on the reoriented study at native resolution (see `reorient_zyx(img, "LAS")`) -> grid."""
        return np.asarray(points_native_zyx, dtype=np.float64) / self.scale


@dataclass
class AxialView:
    """A study reoriented to LPS and transposed to (z, y, x), without resampling."""

    array: np.ndarray  # (z, y, x), dtype of the study (float32 for images)
    to_original_matrix: np.ndarray  # 4x4: view (z, y, x) -> study (i, j, k)
    study_affine: np.ndarray
    study_shape: tuple[int, int, int]

    AXCODES = "LPS"

    @classmethod
    def from_nifti(cls, img: nib.Nifti1Image, dtype=np.float32) -> "AxialView":
        if len(img.shape) != 3:
            raise InputError(f"expected a 3D volume, got shape {tuple(img.shape)}")
        array, index_map = reorient_zyx(img, cls.AXCODES)
        return cls(
            array=array.astype(dtype, copy=False) if dtype is not None else array,
            to_original_matrix=index_map,
            study_affine=np.asarray(img.affine, dtype=np.float64),
            study_shape=tuple(int(n) for n in img.shape),
        )

    @property
    def spacing_zyx(self) -> np.ndarray:
        return voxel_spacing(self.study_affine @ self.to_original_matrix)

    def box_from_original(self, lo_ijk, hi_ijk) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive study-voxel box -> inclusive (z, y, x) box in this view (ints)."""
        corners = apply_affine(np.linalg.inv(self.to_original_matrix), np.array([lo_ijk, hi_ijk]))
        lo, hi = np.rint(corners.min(axis=0)).astype(int), np.rint(corners.max(axis=0)).astype(int)
        return lo, hi

    def box_to_original(self, lo_zyx, hi_zyx) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive (z, y, x) box in this view -> inclusive study-voxel box (ints)."""
        corners = apply_affine(self.to_original_matrix, np.array([lo_zyx, hi_zyx]))
        return np.rint(corners.min(axis=0)).astype(int), np.rint(corners.max(axis=0)).astype(int)

    def points_to_view(self, points_ijk) -> np.ndarray:
        return apply_affine(np.linalg.inv(self.to_original_matrix), points_ijk)

    def to_original(self, volume_zyx: np.ndarray) -> np.ndarray:
        """Map a (z, y, x) volume on this view (e.g. a mask) back onto the study grid."""
        source = nio.io_orientation(self.study_affine)
        transform = nio.ornt_transform(nio.axcodes2ornt(tuple(self.AXCODES)), source)
        return np.ascontiguousarray(nio.apply_orientation(volume_zyx.transpose(2, 1, 0), transform))
