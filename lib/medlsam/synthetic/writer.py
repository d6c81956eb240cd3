"""write_sample_dataset: studies in MONAI Label's local datastore layout, plus ground truth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io import atomic_write_json, save_nifti
from .acquisition import check_orientation, check_preset, check_scan_range
from .generator import GENERATOR_VERSION, generate_study
from .labels import LABEL_MAP

MANIFEST = "dataset.json"


def study_id(index: int) -> str:
    return f"synct_{index:04d}"


def study_seed(dataset_seed: int, index: int) -> int:
    """The seed of study `index` in a dataset: distinct and stable for every (seed, index)."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1)[0])


def write_sample_dataset(root, n_studies: int, n_supports: int, seed: int = 0, preset: str = "default",
                         progress: bool = True, *, scan_range: str | None = None,
                         orientation: str | None = None) -> dict:
    """Write `n_studies` studies under `root` (idempotent: complete existing files are kept).

    root/studies/<id>.nii.gz               images (a MONAI Label local datastore folder)
    root/studies/labels/final/<id>.nii.gz  labels of the first `n_supports` studies (supports:
                                           chest-abdomen-pelvis scans)
    root/ground_truth/<id>.nii.gz          labels of all studies (evaluation, outside the datastore)
    root/label_map.json                    {organ name: id}
    root/dataset.json                      generation parameters and per-study metadata

    scan_range / orientation, when given, apply to the query studies / to every study.
    """
    if isinstance(n_studies, bool) or not isinstance(n_studies, int) or n_studies < 1:
        raise ValueError(f"number of studies must be a positive integer, got {n_studies!r}")
    if isinstance(n_supports, bool) or not isinstance(n_supports, int) or not 0 <= n_supports <= n_studies:
        raise ValueError(f"number of supports must be between 0 and the number of studies ({n_studies}), "
                         f"got {n_supports!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    check_preset(preset)
    if scan_range is not None:
        check_scan_range(scan_range)
    if orientation is not None:
        orientation = check_orientation(orientation)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"output folder {root} exists and is not a folder")
    studies_dir = root / "studies"
    labels_dir = studies_dir / "labels" / "final"
    truth_dir = root / "ground_truth"
    manifest_path = root / MANIFEST
    params = {"seed": seed, "preset": preset, "scan_range": scan_range, "orientation": orientation,
              "generator_version": GENERATOR_VERSION}
    manifest = {"params": params, "label_map": LABEL_MAP, "studies": {}}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{manifest_path} is not valid JSON ({exc}); delete the folder to regenerate") from exc
        if old.get("params") != params:
            raise ValueError(
                f"{root} already holds a dataset made with {old.get('params')}, not {params}; "
                "choose another folder or delete it first"
            )
        manifest["studies"] = old.get("studies", {})
    for d in (studies_dir, labels_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "label_map.json", LABEL_MAP)

    t0 = time.perf_counter()
    made, kept = [], []
    ids = [study_id(i) for i in range(n_studies)]
    bar = tqdm(range(n_studies), desc="synthetic CT", unit="study", disable=not progress)
    for i in bar:
        sid = ids[i]
        support = i < n_supports
        image_path = studies_dir / f"{sid}.nii.gz"
        truth_path = truth_dir / f"{sid}.nii.gz"
        label_path = labels_dir / f"{sid}.nii.gz"
        if image_path.exists() and truth_path.exists() and sid in manifest["studies"]:
            if support and not label_path.exists():
                _copy(truth_path, label_path)
            kept.append(sid)
            continue
        study = generate_study(study_seed(seed, i), preset,
                               scan_range="chest_abdomen_pelvis" if support else scan_range,
                               orientation=orientation)
        save_nifti(study.label, truth_path)
        if support:
            save_nifti(study.label, label_path)
        save_nifti(study.image, image_path)  # last: its presence marks the study complete
        manifest["studies"][sid] = {**study.meta, "support": support}
        atomic_write_json(manifest_path, manifest)
        made.append(sid)
        bar.set_postfix_str(f"{sid} {study.meta['scan_range']} {study.meta['seconds']:.1f}s")
    atomic_write_json(manifest_path, manifest)
    return {
        "root": str(root),
        "studies": ids,
        "supports": ids[:n_supports],
        "generated": made,
        "kept": kept,
        "label_map": dict(LABEL_MAP),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _copy(src: Path, dst: Path) -> None:
    from ..io import atomic_write_bytes

    atomic_write_bytes(dst, src.read_bytes())
