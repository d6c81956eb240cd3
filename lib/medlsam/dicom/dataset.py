"""A NIfTI sample dataset (`medlsam.synthetic.write_sample_dataset` layout) as DICOM files.

    <out>/series/<study id>/CT0001.dcm ...   one CT series per study
    <out>/seg/<study id>.dcm                 DICOM SEG of each final label (the supports)
    <out>/dicom.json                         study id -> UIDs (and the SEG's, for supports)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
from tqdm import tqdm

from medlsam.io import atomic_write_json, load_label_map, load_nifti

from .series import write_ct_series
from .seg import write_seg
from .uids import study_uids

logger = logging.getLogger(__name__)
MANIFEST = "dicom.json"


def write_dicom_dataset(nifti_root: str | os.PathLike, out: str | os.PathLike, studies: list[str] | None = None,
                        progress: bool = True) -> dict:
    """Write every study of `nifti_root` (or only `studies`) as a CT series, its final label as a SEG.

    Idempotent: a study whose files exist with the same UIDs in the manifest is skipped.
    """
    root, out = Path(nifti_root), Path(out)
    studies_dir = root / "studies"
    if not studies_dir.is_dir():
        raise FileNotFoundError(f"{studies_dir} not found: expected a sample dataset (medlsam generate)")
    label_map = load_label_map(root / "label_map.json")
    ids = sorted(p.name[: -len(".nii.gz")] for p in studies_dir.glob("*.nii.gz"))
    if studies is not None:
        missing = sorted(set(studies) - set(ids))
        if missing:
            raise FileNotFoundError(f"studies not in {studies_dir}: {', '.join(missing)}")
        ids = [i for i in ids if i in set(studies)]
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    written = 0
    for sid in tqdm(ids, desc="DICOM series", unit="study", disable=not progress):
        label_path = studies_dir / "labels" / "final" / f"{sid}.nii.gz"
        uids = study_uids(sid)
        entry = {"StudyInstanceUID": uids["StudyInstanceUID"], "SeriesInstanceUID": uids["SeriesInstanceUID"],
                 "SegSeriesInstanceUID": uids["SegSeriesInstanceUID"] if label_path.exists() else None}
        series_dir = out / "series" / sid
        seg_path = out / "seg" / f"{sid}.dcm"
        if (manifest.get(sid) == entry and series_dir.is_dir() and any(series_dir.iterdir())
                and (entry["SegSeriesInstanceUID"] is None or seg_path.exists())):
            continue
        ref = write_ct_series(load_nifti(studies_dir / f"{sid}.nii.gz"), series_dir, sid, uids=uids)
        if label_path.exists():
            write_seg(nib.load(str(label_path)), ref.files, label_map, seg_path,
                      series_uid=uids["SegSeriesInstanceUID"], description="MedLSAM support label")
        manifest[sid] = entry
        atomic_write_json(manifest_path, manifest)
        written += 1
    logger.info("DICOM dataset %s: %d studies written, %d kept", out, written, len(ids) - written)
    return manifest


def dataset_files(out: str | os.PathLike, with_segs: bool = True) -> list[Path]:
    """All DICOM files of a written dataset (series first, then SEGs, which reference them)."""
    out = Path(out)
    files = sorted((out / "series").glob("*/*.dcm"))
    if with_segs:
        files += sorted((out / "seg").glob("*.dcm"))
    return files
