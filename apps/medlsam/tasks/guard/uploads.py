"""Uploaded files and form fields: size-capped copies, header checks before decompression, JSON params."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from fastapi import HTTPException, UploadFile

from medlsam.errors import InputError
from medlsam.geometry import check_ct_intensities
from medlsam.io import check_nifti_header, load_nifti

from ..errors import CORRUPT_FILE_ERRORS

logger = logging.getLogger(__name__)

TEMP_PREFIX = "medlsam-"  # every temporary file of the app (uploads, infer results) starts with this
UPLOAD_PREFIX = TEMP_PREFIX + "upload-"
MAX_INTEGER_DIGITS = 18


def _refuse_constant(name: str):
    raise InputError(f"{name} is not a number JSON allows here: send finite numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise InputError(f"{text} is out of range: numbers must be finite (within about +-1.8e308)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise InputError(f"integer {text[:30]}... has more than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def json_object(text: str | None, what: str = "params") -> dict:
    """A form field holding a JSON object of finite numbers; InputError (HTTP 422) naming the problem."""
    if text is None or not str(text).strip():
        return {}
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON ({exc.msg} at position {exc.pos}); send a JSON object") from None
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{what} is not usable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object {{...}}, got {type(value).__name__}: {str(text)[:60]!r}")
    return value


def check_finite(value, what: str = "params") -> None:
    """Refuse NaN / infinite numbers anywhere in a parsed JSON value (JSON bodies parsed by FastAPI)."""
    if isinstance(value, float) and not np.isfinite(value):
        raise InputError(f"{what}: {value} is not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{what}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_finite(v, what)


def write_upload(upload: UploadFile, path: str | os.PathLike, max_bytes: int, what: str = "file") -> None:
    """Copy an upload to `path`: HTTP 413 past `max_bytes`, InputError when it is empty."""
    size = 0
    with open(path, "wb") as out:
        while chunk := upload.file.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(413, detail=f"{what} is larger than the server's limit of "
                                                f"{max_bytes >> 20} MB (--conf max_upload_mb)")
            out.write(chunk)
    if size == 0:
        raise InputError(f"{what} {upload.filename!r} is empty")


@contextlib.contextmanager
def saved_upload(upload: UploadFile, suffix: str, max_bytes: int, what: str = "file",
                 folder: str | None = None) -> Iterator[Path]:
    """The upload in a temporary file (in `folder`, default the temp folder), removed when the block
    ends, whatever happens."""
    fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=suffix, dir=folder)
    os.close(fd)
    path = Path(name)
    try:
        write_upload(upload, path, max_bytes, what)
        yield path
    finally:
        path.unlink(missing_ok=True)


def nrrd_shape(path: Path) -> tuple[int, ...]:
    """The `sizes` of an NRRD header, read as text up to the blank line (never the data)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.startswith(b"NRRD"):
        raise InputError(f"{path.name} is not an NRRD file (no NRRD magic)")
    for line in head.split(b"\n\n", 1)[0].splitlines():
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == "sizes":
            try:
                return tuple(int(v) for v in value.split())
            except ValueError:
                break
    raise InputError(f"{path.name}: NRRD header without a readable 'sizes' field")


def check_image_header(path: Path, max_voxels: int, what: str = "image") -> tuple[int, ...]:
    """Refuse an image whose header is unreadable or declares more than `max_voxels`, without its data."""
    try:
        return _check_image_header(path, max_voxels, what)
    except InputError as exc:  # the server's temporary file name means nothing to the client
        raise InputError(str(exc).replace(str(path), "the upload").replace(path.name, "upload")) from None


def _check_image_header(path: Path, max_voxels: int, what: str) -> tuple[int, ...]:
    if path.name.endswith(".nrrd"):
        shape = nrrd_shape(path)
        if int(np.prod(shape, dtype=np.float64)) > max_voxels:
            raise InputError(f"{what} declares shape {shape}, more than the server's limit of {max_voxels} voxels")
        return shape
    return check_nifti_header(path, max_voxels, what=what)


def check_ct_file(path: Path, max_voxels: int, what: str = "image") -> None:
    """A whole uploaded CT volume: header within limits, data complete, 3D, finite Hounsfield units."""
    check_image_header(path, max_voxels, what)
    try:
        if path.name.endswith(".nrrd"):
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                raise InputError(f"{what} must be a 3D scalar volume, got {image.GetDimension()}D with "
                                 f"{image.GetNumberOfComponentsPerPixel()} components")
            data = sitk.GetArrayViewFromImage(image)
        else:
            data = np.asanyarray(load_nifti(path, what=what).dataobj)
    except CORRUPT_FILE_ERRORS as exc:
        raise InputError(f"{what}: the file is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    except RuntimeError as exc:  # SimpleITK reports unreadable files this way
        raise InputError(f"{what} is not a readable NRRD file: {str(exc).strip().splitlines()[-1]}") from exc
    check_ct_intensities(data, what)


def sweep_stale_temp_files(max_age_s: float = 3600.0) -> int:
    """Remove the app's temporary files left by a crash (older than `max_age_s`); returns how many."""
    now, removed = time.time(), 0
    folder = Path(tempfile.gettempdir())
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        try:
            if path.is_file() and now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        logger.info("removed %d stale temporary files from %s", removed, folder)
    return removed
