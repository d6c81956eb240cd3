"""NIfTI <-> SimpleITK and the coarse, body-masked CT grid that registration works on.

nibabel affines map voxels to world RAS mm; SimpleITK's physical space is LPS mm. Every grid made
here is axis-aligned in LPS (identity direction), so its third axis is the patient's
superior-inferior axis and axial slices are array planes.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medlsam.geometry import check_ct_intensities

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
AIR_HU = -1000.0
BODY_THRESHOLD_HU = -400.0  # body: soft tissue and bone, not air (lungs are filled in slice by slice)
DESCRIPTOR_HU = (-300.0, 300.0)
DESCRIPTOR_SIZE = 24


def nifti_to_sitk(img: nib.Nifti1Image, dtype=np.float32) -> sitk.Image:
    """The same voxels as a SimpleITK image in LPS physical space."""
    if len(img.shape) != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(img.shape)}")
    array = np.asanyarray(img.dataobj)
    out = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0).astype(dtype, copy=False)))
    linear = RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)[:3, :3]
    spacing = np.sqrt((linear**2).sum(axis=0))
    out.SetSpacing(spacing.tolist())
    out.SetDirection((linear / spacing).ravel().tolist())
    out.SetOrigin((RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)[:3, 3]).tolist())
    return out


def index_to_lps_matrix(img: nib.Nifti1Image) -> np.ndarray:
    """4x4 map from a NIfTI's voxel (i, j, k) to LPS mm."""
    m = np.eye(4)
    m[:3] = RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)[:3]
    return m


@dataclass
class Grid:
    """An axis-aligned LPS grid: index (x, y, z) -> origin + index * spacing."""

    origin: np.ndarray  # (3,) LPS mm of voxel (0, 0, 0)
    spacing: np.ndarray  # (3,)
    size: np.ndarray  # (3,) voxels along x, y, z (SimpleITK order)

    @classmethod
    def covering(cls, lo: np.ndarray, hi: np.ndarray, spacing_mm: float) -> "Grid":
        """A grid whose voxel centres span the LPS box [lo, hi]."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        size = np.maximum(1, np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
        centre = (lo + hi) / 2
        origin = centre - (size - 1) * spacing_mm / 2
        return cls(origin, np.full(3, float(spacing_mm)), size)

    def reference(self, pixel_type=sitk.sitkUInt8) -> sitk.Image:
        ref = sitk.Image([int(n) for n in self.size], pixel_type)
        ref.SetOrigin(self.origin.tolist())
        ref.SetSpacing(self.spacing.tolist())
        return ref

    def to_dict(self) -> dict:
        return {"origin": self.origin.tolist(), "spacing": self.spacing.tolist(), "size": self.size.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(np.asarray(d["origin"], float), np.asarray(d["spacing"], float), np.asarray(d["size"], int))

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()), np.asarray(image.GetSize()))


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """LPS box spanned by the voxel centres of an image (any direction)."""
    size = np.asarray(image.GetSize()) - 1
    corners = np.array(np.meshgrid(*[[0, n] for n in size], indexing="ij")).reshape(3, -1).T
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners.astype(float)])
    return points.min(axis=0), points.max(axis=0)


def resample_to(image: sitk.Image, grid: Grid, interpolator=sitk.sitkLinear, default: float = 0.0,
                transform: sitk.Transform | None = None, pixel_type=None) -> sitk.Image:
    """Resample onto `grid` (through `transform`: grid points -> `image` points)."""
    pixel_type = image.GetPixelID() if pixel_type is None else pixel_type
    return sitk.Resample(image, grid.reference(pixel_type), transform or sitk.Transform(), interpolator,
                         default, pixel_type)


def body_mask(hu_zyx: np.ndarray) -> np.ndarray:
    """The patient's body on a coarse (z, y, x) HU array: largest component above -400 HU after an
    opening (detaches the table and blankets), lungs and bowel gas filled slice by slice."""
    solid = hu_zyx > BODY_THRESHOLD_HU
    solid = ndimage.binary_opening(solid, structure=np.ones((1, 3, 3), bool))
    labels, n = ndimage.label(solid)
    if n == 0:
        return solid
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    return body


@dataclass
class PreparedImage:
    """A CT study on an axis-aligned LPS grid at the registration spacing, HU clamped, air outside the
    body; plus its body mask and per-slice descriptors for the z initialisation."""

    image: sitk.Image  # float32 HU
    body: sitk.Image  # uint8
    slices: np.ndarray  # (z, D) per axial slice descriptor (see slice_descriptors)

    @property
    def grid(self) -> Grid:
        return Grid.of(self.image)

    def arrays(self) -> dict:
        return {"image": sitk.GetArrayFromImage(self.image).astype(np.float32),
                "body": sitk.GetArrayFromImage(self.body).astype(np.uint8)}

    def to_dict(self) -> dict:
        return {**self.arrays(), "grid": self.grid.to_dict(), "slices": self.slices}

    @classmethod
    def from_dict(cls, d: dict) -> "PreparedImage":
        grid = Grid.from_dict(d["grid"])
        image = sitk.GetImageFromArray(np.asarray(d["image"], np.float32))
        body = sitk.GetImageFromArray(np.asarray(d["body"], np.uint8))
        for im in (image, body):
            im.SetOrigin(grid.origin.tolist())
            im.SetSpacing(grid.spacing.tolist())
        return cls(image, body, np.asarray(d["slices"], np.float32))


def slice_descriptors(hu_zyx: np.ndarray, body: np.ndarray, size: int = DESCRIPTOR_SIZE) -> np.ndarray:
    """Per axial slice: the edge strength (gradient magnitude) of the slice inside the body, cropped to
    the body's extent and resized to size x size, zero mean and unit norm (a dot product of two is a
    normalised cross-correlation); zeros where a slice holds (almost) no body.

    Cropping to the body makes patients of different sizes comparable; HU clipped to a soft-tissue
    range and edges rather than intensities keep contrast phase and the body outline from dominating.
    """
    out = np.zeros((hu_zyx.shape[0], size * size), np.float32)
    inside = np.where(body, np.clip(hu_zyx, *DESCRIPTOR_HU), 0.0)
    for z in range(hu_zyx.shape[0]):
        rows, cols = np.flatnonzero(body[z].any(axis=1)), np.flatnonzero(body[z].any(axis=0))
        if len(rows) < 4 or len(cols) < 4:
            continue
        crop = inside[z, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        small = ndimage.zoom(crop, (size / crop.shape[0], size / crop.shape[1]), order=1, grid_mode=True,
                             mode="nearest")[:size, :size]
        edges = np.hypot(*np.gradient(small))
        v = edges.ravel() - edges.mean()
        norm = float(np.linalg.norm(v))
        if norm > 0:
            out[z, :v.size] = v / norm
    return out


def prepare_ct(img: nib.Nifti1Image | sitk.Image, spacing_mm: float = 4.0, clamp_hu=(-1000.0, 1000.0),
               name: str = "image") -> PreparedImage:
    """Resample a CT study to an isotropic axis-aligned LPS grid, clamp HU, set air outside the body."""
    native = nifti_to_sitk(img) if isinstance(img, nib.Nifti1Image) else sitk.Cast(img, sitk.sitkFloat32)
    check_ct_intensities(sitk.GetArrayViewFromImage(native), name)
    lo, hi = physical_bounds(native)
    grid = Grid.covering(lo, hi, spacing_mm)
    # anti-alias before downsampling: smooth by about half the new voxel where the old one was finer
    native_spacing = np.asarray(native.GetSpacing())
    sigma = 0.5 * np.sqrt(np.clip(spacing_mm**2 - native_spacing**2, 0, None))
    if np.any(sigma > 0.1):
        native = sitk.SmoothingRecursiveGaussian(native, np.maximum(sigma, 0.01).tolist())
    coarse = resample_to(native, grid, sitk.sitkLinear, AIR_HU)
    del native
    hu = np.clip(sitk.GetArrayFromImage(coarse), *clamp_hu)
    body = body_mask(hu)
    hu[~body] = AIR_HU
    slices = slice_descriptors(hu, body)
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    mask = sitk.GetImageFromArray(body.astype(np.uint8))
    for im in (image, mask):
        im.CopyInformation(coarse)
    return PreparedImage(image, mask, slices)
