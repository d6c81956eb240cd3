"""File I/O: image loading with validation (NIfTI, NRRD, DICOM folders), atomic writes, label maps.

Every loader returns a `nib.Nifti1Image`: `array[i, j, k]` with an affine from voxel indices to
world RAS+ millimetres, whatever the file format, so NIfTI and NRRD copies of one study give the
same voxels, boxes and masks in world coordinates."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from medlsam.errors import InputError, NotFoundError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")  # includes 3D Slicer's .seg.nrrd
IMAGE_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK / DICOM world (LPS) <-> NIfTI world (RAS)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    Readers never see a half-written file, and a crash leaves the old file intact.
    The temporary name keeps `suffix` (default: the target's suffixes) so writers that infer
    the format from the extension (nibabel, torch) still work.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as pretty JSON to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """Save a NIfTI image atomically (the format follows the .nii / .nii.gz suffix)."""
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def is_nrrd(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NRRD_SUFFIXES)


def load_image(path: str | os.PathLike, *, what: str = "image") -> nib.Nifti1Image:
    """Load a 3D volume from NIfTI (nibabel), NRRD or a DICOM series folder (SimpleITK), checked
    as `load_nifti` checks it; InputError naming the problem otherwise."""
    path = Path(path)
    if path.is_dir():
        return _checked(_load_dicom_folder(path, what), path, what)
    if is_nrrd(path):
        return _checked(_load_with_sitk(path, what, "NRRD"), path, what)
    return load_nifti(path, what=what)


def nifti_from_sitk(image, array: np.ndarray | None = None) -> nib.Nifti1Image:
    """A SimpleITK image as a NIfTI image: ITK index (i, j, k) is array[i, j, k], LPS -> RAS affine."""
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D volume, got {image.GetDimension()} dimensions")
    if array is None:
        import SimpleITK as sitk

        array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    return nib.Nifti1Image(array, sitk_affine(image))


def sitk_affine(image) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image (or an ImageFileReader after ReadImageInformation)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    return RAS_FROM_LPS @ lps


def _load_with_sitk(path: Path, what: str, kind: str) -> nib.Nifti1Image:
    import SimpleITK as sitk

    if not path.exists():
        raise NotFoundError(f"{what} file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{what} {path.name} is not a readable {kind} file: {_first_line(exc)}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} {path.name} has {image.GetNumberOfComponentsPerPixel()} values per voxel: "
                         "expected a scalar 3D volume")
    if image.GetDimension() != 3:
        raise InputError(f"{what} {path.name} must be a 3D volume, got {image.GetDimension()} dimensions "
                         f"(size {list(image.GetSize())})")
    return nifti_from_sitk(image)


def _load_dicom_folder(path: Path, what: str) -> nib.Nifti1Image:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(path))
    if not files:
        raise InputError(f"{what} folder {path.name} holds no DICOM series")
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{what} folder {path.name}: the DICOM series is not readable: {_first_line(exc)}") from exc
    return nifti_from_sitk(image)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _nrrd_header(path: Path):
    """A SimpleITK reader holding an NRRD file's header (voxels not read); InputError if unreadable."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path.name} is not a readable NRRD file: {_first_line(exc)}") from exc
    return reader


def declared_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """A volume's shape as its header declares it, read without decompressing the voxels: NIfTI
    (x, y, z[, t...]), NRRD (i, j, k[, components]). InputError if the header is unreadable."""
    path = Path(path)
    if is_nrrd(path):
        reader = _nrrd_header(path)
        shape = tuple(int(n) for n in reader.GetSize())
        components = reader.GetNumberOfComponents()
        return shape + ((components,) if components > 1 else ())
    try:
        return tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path.name} is not a readable NIfTI file: {exc}") from exc


def image_geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, RAS affine) of a 3D volume file from its header alone (a DICOM folder is read whole)."""
    path = Path(path)
    if path.is_dir():
        img = load_image(path)
        return tuple(img.shape), img.affine
    if is_nrrd(path):
        reader = _nrrd_header(path)
        if reader.GetDimension() != 3:
            raise InputError(f"{path.name} is not a 3D volume")
        return tuple(int(n) for n in reader.GetSize()), sitk_affine(reader)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path.name} is not a readable NIfTI file: {exc}") from exc
    return tuple(int(n) for n in img.shape[:3]), img.affine


def load_nifti(path: str | os.PathLike, *, what: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI (a trailing singleton 4th axis is dropped) or raise ValueError saying why not."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{what} file not found: {path}")
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{what} {path.name} is not a readable NIfTI file: {exc}") from exc
    if len(shape) == 4 and shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    return _checked(img, path, what)


def _checked(img: nib.Nifti1Image, path: Path, what: str) -> nib.Nifti1Image:
    shape = img.shape
    if len(shape) != 3:
        raise InputError(f"{what} {path.name} must be a 3D volume, got shape {tuple(shape)}")
    if min(shape) < 2:
        raise InputError(
            f"{what} {path.name} has shape {tuple(shape)}: a 3D CT volume needs at least 2 voxels "
            "along every axis (this looks like a 2D image)"
        )
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise InputError(f"{what} {path.name} has an invalid (singular or non-finite) affine")
    return img


def check_nifti_header(path: str | os.PathLike, max_voxels: int, *, what: str = "image") -> tuple[int, ...]:
    """Read only the header of a NIfTI file and refuse it (InputError) when it is unreadable or declares
    more than `max_voxels` voxels: nothing is decompressed, so a small gzip bomb costs no memory."""
    path = Path(path)
    try:
        shape = tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise InputError(f"{what} {path.name} is not a readable NIfTI file: {exc}") from exc
    voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if voxels > max_voxels:
        raise InputError(f"{what} {path.name} declares shape {shape} = {voxels} voxels, more than the "
                         f"server's limit of {max_voxels} voxels")
    return shape


def load_label_map(path: str | os.PathLike) -> dict[str, int]:
    """Read a JSON label map {organ name: label id} and check it (see `medlsam.labels.LabelMap`)."""
    from medlsam.labels import LabelMap

    return LabelMap.from_file(path).to_dict()
