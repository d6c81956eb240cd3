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
    _check_arguments(n_studies, n_supports, seed, preset, scan_range)
    if orientation is not None:
        orientation = check_orientation(orientation)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"output folder {root} exists and is not a folder")
    params = {"seed": seed, "preset": preset, "scan_range": scan_range, "orientation": orientation,
              "generator_version": GENERATOR_VERSION}
    manifest = _open_manifest(root, params)
    layout = _Layout(root)
    layout.make()
    atomic_write_json(root / "label_map.json", LABEL_MAP)

    t0 = time.perf_counter()
    made, kept = [], []
    ids = [study_id(i) for i in range(n_studies)]
    bar = tqdm(range(n_studies), desc="synthetic CT", unit="study", disable=not progress)
    for i in bar:
        sid, support = ids[i], i < n_supports
        if _complete(layout, sid, support, manifest):
            kept.append(sid)
            continue
        study = generate_study(study_seed(seed, i), preset,
                               scan_range="chest_abdomen_pelvis" if support else scan_range,
                               orientation=orientation)
        _write_study(layout, sid, study, support)
        manifest["studies"][sid] = {**study.meta, "support": support}
        atomic_write_json(layout.manifest, manifest)
        made.append(sid)
        bar.set_postfix_str(f"{sid} {study.meta['scan_range']} {study.meta['seconds']:.1f}s")
    atomic_write_json(layout.manifest, manifest)
    return {
        "root": str(root),
        "studies": ids,
        "supports": ids[:n_supports],
        "generated": made,
        "kept": kept,
        "label_map": dict(LABEL_MAP),
        "seconds": round(time.perf_counter() - t0, 2),
    }


class _Layout:
    """The files of a sample dataset under its root folder."""

    def __init__(self, root: Path):
        self.studies = root / "studies"
        self.labels = self.studies / "labels" / "final"
        self.truth = root / "ground_truth"
        self.manifest = root / MANIFEST

    def make(self) -> None:
        for d in (self.studies, self.labels, self.truth):
            d.mkdir(parents=True, exist_ok=True)

    def image(self, sid: str) -> Path:
        return self.studies / f"{sid}.nii.gz"

    def label(self, sid: str) -> Path:
        return self.labels / f"{sid}.nii.gz"

    def ground_truth(self, sid: str) -> Path:
        return self.truth / f"{sid}.nii.gz"


def _check_arguments(n_studies, n_supports, seed, preset, scan_range) -> None:
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


def _open_manifest(root: Path, params: dict) -> dict:
    """The manifest to extend: the existing one if it was made with the same parameters (else refuse)."""
    manifest = {"params": params, "label_map": LABEL_MAP, "studies": {}}
    path = root / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); delete the folder to regenerate") from exc
        if old.get("params") != params:
            raise ValueError(
                f"{root} already holds a dataset made with {old.get('params')}, not {params}; "
                "choose another folder or delete it first"
            )
        manifest["studies"] = old.get("studies", {})
    return manifest


def _complete(layout: _Layout, sid: str, support: bool, manifest: dict) -> bool:
    """Whether a study is already written (a support's missing label is restored from the truth)."""
    if not (layout.image(sid).exists() and layout.ground_truth(sid).exists() and sid in manifest["studies"]):
        return False
    if support and not layout.label(sid).exists():
        _copy(layout.ground_truth(sid), layout.label(sid))
    return True


def _write_study(layout: _Layout, sid: str, study, support: bool) -> None:
    save_nifti(study.label, layout.ground_truth(sid))
    if support:
        save_nifti(study.label, layout.label(sid))
    save_nifti(study.image, layout.image(sid))  # last: its presence marks the study complete


def _copy(src: Path, dst: Path) -> None:
    from ..io import atomic_write_bytes

    atomic_write_bytes(dst, src.read_bytes())
