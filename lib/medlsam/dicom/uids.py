"""Stable DICOM UIDs: the same study id always gives the same Study/Series/SOP Instance UIDs."""

from __future__ import annotations

import uuid

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "medlsam:dicom")


def derived_uid(*parts: object) -> str:
    """A `2.25.<int>` UID (ISO/IEC 9834-8: a UUID as an integer) from a name-based UUID of `parts`:
    deterministic, and no registered UID root needed."""
    if not parts:
        raise ValueError("derived_uid needs at least one part to derive the UID from")
    return f"2.25.{uuid.uuid5(NAMESPACE, '/'.join(str(p) for p in parts)).int}"


def study_uids(study_id: str) -> dict[str, str]:
    """The UIDs of one generated study: its DICOM study, CT series, frame of reference, SEG series."""
    return {
        "StudyInstanceUID": derived_uid(study_id, "study"),
        "SeriesInstanceUID": derived_uid(study_id, "ct-series"),
        "FrameOfReferenceUID": derived_uid(study_id, "frame-of-reference"),
        "SegSeriesInstanceUID": derived_uid(study_id, "seg-series"),
    }
