"""Support labels onto the query: warping through a registration, and boxes in the query's voxels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .preprocessing import Grid, index_to_lps_matrix, physical_bounds, resample_to


def query_label_grid(query: sitk.Image, spacing_mm: float) -> Grid:
    """Axis-aligned LPS grid covering the query at `spacing_mm`: support labels are warped onto it."""
    lo, hi = physical_bounds(query)
    return Grid.covering(lo, hi, spacing_mm)


def warp_label(label: sitk.Image, grid: Grid, transform: sitk.Transform) -> np.ndarray:
    """A support's label resampled (nearest neighbour) onto the query grid; (z, y, x) uint8 array.
    Query points that map outside the support's label grid get 0."""
    warped = resample_to(label, grid, sitk.sitkNearestNeighbor, 0, transform, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(warped)


def warp_image(image: sitk.Image, grid: Grid, transform: sitk.Transform, default: float) -> np.ndarray:
    """A support's (prepared) image resampled linearly onto a query grid; (z, y, x) float32 array."""
    return sitk.GetArrayFromImage(resample_to(image, grid, sitk.sitkLinear, default, transform, sitk.sitkFloat32))


def voxels_to_lps(grid: Grid, zyx: np.ndarray) -> np.ndarray:
    """(N, 3) grid indices in (z, y, x) order -> LPS mm."""
    return grid.origin + np.asarray(zyx, float)[:, ::-1] * grid.spacing


def box_lps(grid: Grid, zyx_lo, zyx_hi) -> tuple[np.ndarray, np.ndarray]:
    """LPS box covering grid voxels [lo, hi] (inclusive, (z, y, x)) entirely."""
    lo = voxels_to_lps(grid, np.asarray([zyx_lo]))[0] - grid.spacing / 2
    hi = voxels_to_lps(grid, np.asarray([zyx_hi]))[0] + grid.spacing / 2
    return lo, hi


class QueryFrame:
    """The query study's voxel frame: LPS boxes -> inclusive voxel boxes and world RAS boxes."""

    def __init__(self, image: nib.Nifti1Image):
        self.shape = np.asarray(image.shape[:3], int)
        self.affine = np.asarray(image.affine, float)
        self.lps_to_index = np.linalg.inv(index_to_lps_matrix(image))

    def _corners(self, lo, hi) -> np.ndarray:
        return np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T

    def continuous_box(self, lo_lps, hi_lps) -> tuple[np.ndarray, np.ndarray]:
        """Continuous voxel-index box (unclipped) of an LPS box."""
        ijk = nib.affines.apply_affine(self.lps_to_index, self._corners(lo_lps, hi_lps))
        return ijk.min(axis=0), ijk.max(axis=0)

    def voxel_box(self, lo_lps, hi_lps) -> list[list[int]]:
        """Inclusive voxel box of the voxels whose centres lie in the LPS box, clipped to the image
        (the nearest voxel when the box is thinner than one voxel)."""
        a, b = self.continuous_box(lo_lps, hi_lps)
        lo, hi = np.ceil(a - 1e-6), np.floor(b + 1e-6)
        thin = lo > hi
        mid = np.rint((a + b) / 2)
        lo, hi = np.where(thin, mid, lo), np.where(thin, mid, hi)
        lo = np.clip(lo, 0, self.shape - 1).astype(int)
        hi = np.clip(hi, 0, self.shape - 1).astype(int)
        return [lo.tolist(), hi.tolist()]

    def world_box(self, lo_lps, hi_lps) -> list[list[float]]:
        """The LPS box as a world RAS box (lo, hi), in mm."""
        ras = self._corners(lo_lps, hi_lps) * np.array([-1.0, -1.0, 1.0])
        return [np.round(ras.min(axis=0), 2).tolist(), np.round(ras.max(axis=0), 2).tolist()]

    def to_voxel(self, points_lps: np.ndarray) -> np.ndarray:
        return nib.affines.apply_affine(self.lps_to_index, np.asarray(points_lps, float))
