"""What an image id, a label tag, a session id or an upload's file name may be.

Ids of stored images are checked by membership (the datastore lists them); a new image id by a
pattern that still takes 3D Slicer's node names ("3: CT ABDOMEN", "Segment_1 (copy)") and, for the
folder datastore, by where the file would land. Every refusal names the value and the rule.
"""

from __future__ import annotations

import os
import re

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore

from medlsam.errors import InputError, NotFoundError

# letters/digits (any script) first; then also space and . , : ; ( ) [ ] + # @ = ~ ' -  - never / \ or control
IMAGE_ID = re.compile(r"[\w][\w .,:;()\[\]+#@=~'-]{0,199}")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SESSION_ID = re.compile(r"[0-9A-Fa-f][0-9A-Fa-f-]{7,63}")
DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+){0,40}")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
SUFFIX_PART = re.compile(r"\.[a-z0-9]{1,8}")


def check_new_image_id(image_id: str, datastore=None, suffix: str = "") -> str:
    """An id for an image being added; for a folder datastore its file must land directly in the folder."""
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id) or image_id.endswith((" ", ".")):
        raise InputError(
            f"image id {image_id!r} is not allowed: 1-200 characters, starting with a letter or digit, made of "
            "letters, digits, spaces and . , : ; ( ) [ ] + # @ = ~ ' - _ (no path separators)")
    if datastore_folder(datastore):
        folder = os.path.realpath(datastore_folder(datastore))
        target = os.path.realpath(os.path.join(folder, image_id + suffix))
        if os.path.dirname(target) != folder:
            raise InputError(f"image id {image_id!r} would be stored outside the datastore folder")
    return image_id


def is_folder_store(datastore) -> bool:
    """A datastore of files in one folder (MONAI Label's DICOMweb datastore subclasses the local one,
    but its images are series of a PACS, cached elsewhere)."""
    return isinstance(datastore, LocalDatastore) and not isinstance(datastore, DICOMWebDatastore)


def datastore_folder(datastore) -> str | None:
    """The folder of a folder datastore (LocalStudyStore), None for others (DICOMweb)."""
    return getattr(datastore, "studies", None) if is_folder_store(datastore) else None


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise InputError(f"label tag {tag!r} is not allowed: 1-64 letters, digits, '_' or '-', starting with a "
                         "letter or digit (e.g. final, original)")
    return tag


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise NotFoundError(f"session {session_id!r} not found (session ids are hexadecimal UUIDs)")
    return session_id


def check_known_image(datastore, image_id: str) -> str:
    """An id the datastore lists (DICOMweb: a well-formed Series Instance UID); else NotFoundError."""
    if not isinstance(image_id, str) or not image_id:
        raise InputError("no image id given: pass ?image=<id> of a datastore study")
    if is_folder_store(datastore):
        if image_id not in datastore.list_images():
            raise NotFoundError(f"image {image_id!r} is not a study of this datastore")
    elif not DICOM_UID.fullmatch(image_id) or len(image_id) > 64:
        raise NotFoundError(f"image {image_id!r} is not a Series Instance UID of this datastore")
    return image_id


def check_image_reference(image_id: str) -> str:
    """An `image=` of an infer request: never a path (the app then checks the id against the datastore,
    which for DICOMweb may be a series the PACS got a moment ago)."""
    if not isinstance(image_id, str) or not image_id:
        raise InputError("no image id given: pass ?image=<id> of a datastore study")
    if "/" in image_id or "\\" in image_id or image_id in (".", "..") or "\x00" in image_id:
        raise NotFoundError(f"image {image_id!r} is not a study of this datastore")
    return image_id


def check_known_label(datastore, image_id: str, tag: str) -> str:
    check_known_image(datastore, image_id)
    check_tag(tag)
    if tag not in (datastore.get_labels_by_image_id(image_id) or {}):
        raise NotFoundError(f"image {image_id!r} has no label with tag {tag!r}")
    return tag


def inside(path: str, folder: str) -> bool:
    """Whether `path` (symlinks resolved) lies inside `folder`."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def image_suffix(file_name: str | None) -> str:
    """The image format of an upload from its file name; InputError for formats the app does not read."""
    name = os.path.basename(file_name or "").lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"image file {os.path.basename(file_name or '')!r} is not a CT volume file the app reads "
                     f"({', '.join(IMAGE_SUFFIXES)})")


def upload_suffix(file_name: str | None, default: str = ".nii.gz") -> str:
    """The last (up to two) extensions of an uploaded file's name, e.g. `.nii.gz`, `.seg.nrrd`, `.json`,
    reduced to plain characters; the datastore decides whether it reads that format."""
    parts = [p.lower() for p in os.path.basename(file_name or "").split(".")[1:]][-2:]
    parts = [f".{p}" for p in parts if SUFFIX_PART.fullmatch(f".{p}")]
    if len(parts) == 2 and parts[-1] not in (".gz", ".nrrd"):
        parts = parts[-1:]
    return "".join(parts) or default
