"""File I/O: NIfTI loading with validation, atomic writes, label maps."""

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


def load_label_map(path: str | os.PathLike) -> dict[str, int]:
    """Read a JSON label map {organ name: label id} and check it (see `medlsam.labels.LabelMap`)."""
    from medlsam.labels import LabelMap

    return LabelMap.from_file(path).to_dict()
