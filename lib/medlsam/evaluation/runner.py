"""The per-study evaluation loop: localize, build box prompts, segment, score; resumable.

For each query study every (localization, backbone) pair is segmented: "medlam" boxes come from
the localizer and are prompted as the app prompts them (the evaluation's `prompting`),
"medlam_box" prompts the same localization's whole (WPL) boxes the paper's way (the 3D box on every
slice: the default path before key slices and fine SPL parts, for comparison),
"manual" boxes are simulated from the ground truth (manual_boxes.py). Each
finished study is written atomically to `<out>/studies/<study_id>.json`; a rerun skips the studies
already there (when they were computed with the same settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from medlsam.evaluation.datasets import LabeledStudy
from medlsam.evaluation.manual_boxes import (
    DEFAULT_MAX_SHIFT_PX, DEFAULT_SHIFT_REFERENCE_PX, boxes_extent, counted_slices, manual_slice_boxes, organ_rng,
)
from medlsam.evaluation.metrics import box_iou_mm, dice, hd95, mask_box
from medlsam.geometry import AxialView, voxel_spacing
from medlsam.io import atomic_write_json, load_nifti
from medlsam.localization import StudyLocalization
from medlsam.segment import PropagationSettings, Segmenter, TrackedPrompts, window_for_organ_name
from medlsam.segment.propagation import every_kth_slice, keep_prompt_slices

log = logging.getLogger(__name__)

LOCALIZATIONS = ("medlam", "medlam_box", "manual")
EVAL_SLICES = ("paper", "box")


@dataclass
class EvalSettings:
    """Everything that changes the numbers of an evaluation (part of each study file's key)."""

    organs: dict[str, int]  # name -> label id, the organs to evaluate
    localizations: tuple[str, ...] = ("medlam", "manual")
    backbones: tuple[str, ...] = ("litemedsam",)
    mode: str = "WPL"
    gt_slice_threshold: float = 0  # pixels; slices with less ground truth are not prompted/scored
    eval_slices: str = "paper"  # "paper": prompt only counted slices; "box": every slice of a MedLAM box
    seed: int = 0
    max_shift_px: float = DEFAULT_MAX_SHIFT_PX
    shift_reference_px: float | None = DEFAULT_SHIFT_REFERENCE_PX
    box_margin_zyx: tuple[int, int, int] = (2, 10, 10)
    in_plane_margin_mm: float | None = None  # set: replaces box_margin_zyx's y and x (as the app does)
    slice_step_mm: float = 0  # > 0: prompt and score only axial slices about this far apart (subsampling)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. weights fingerprints, support ids
    prompting: str = "box"  # MedLAM boxes: "box" (one 2D box per slice) or "propagate" (as the app)
    propagation: dict[str, Any] = field(default_factory=dict)  # PropagationSettings fields
    key_slice_mm: float = 0.0  # box prompting: key slices this far apart, interpolated between (0: all)

    def __post_init__(self):
        if not self.organs:
            raise ValueError("no organs to evaluate")
        self.localizations = tuple(self.localizations)
        bad = [loc for loc in self.localizations if loc not in LOCALIZATIONS]
        if bad or not self.localizations:
            raise ValueError(f"localizations must be among {LOCALIZATIONS}, got {self.localizations}")
        self.backbones = tuple(self.backbones)
        if not self.backbones:
            raise ValueError("at least one segmentation backbone is needed")
        self.mode = self.mode.upper()
        if self.mode not in ("WPL", "SPL"):
            raise ValueError(f"mode must be WPL or SPL, got {self.mode!r}")
        if self.eval_slices not in EVAL_SLICES:
            raise ValueError(f"eval_slices must be one of {EVAL_SLICES}, got {self.eval_slices!r}")
        if self.gt_slice_threshold < 0:
            raise ValueError(f"gt_slice_threshold must be >= 0 pixels, got {self.gt_slice_threshold}")
        self.box_margin_zyx = tuple(int(m) for m in self.box_margin_zyx)
        if self.slice_step_mm < 0:
            raise ValueError(f"slice_step_mm must be >= 0 (0: every slice), got {self.slice_step_mm}")
        if self.prompting not in ("box", "propagate"):
            raise ValueError(f"prompting must be 'box' or 'propagate', got {self.prompting!r}")
        self.propagation = asdict(PropagationSettings(**dict(self.propagation)))

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(loc, backbone) for loc in self.localizations for backbone in self.backbones]

    def to_dict(self) -> dict:
        out = json.loads(json.dumps(asdict(self)))
        if self.prompting == "box":  # as before prompting existed: older result folders keep their key
            out.pop("prompting")
            out.pop("propagation")
        if not self.key_slice_mm:  # as before key slices existed
            out.pop("key_slice_mm")
        return out

    def key(self) -> str:
        """A fingerprint of the settings; study files with another key are not reused."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def pair_name(localization: str, backbone: str) -> str:
    return f"{localization}/{backbone}"


# -- segmentation: the app's own path for MedLAM boxes, the same Segmenter for manual boxes -----
def build_segmenter(backend, settings: EvalSettings, prompting: str | None = None) -> Segmenter:
    """The Segmenter an evaluation uses: the app's, with the evaluated margins and prompting."""
    return Segmenter(backend, box_margin_zyx=settings.box_margin_zyx, in_plane_margin_mm=settings.in_plane_margin_mm,
                     progress=False, prompting=prompting or settings.prompting,
                     propagation=PropagationSettings(**settings.propagation),
                     key_slice_mm=settings.key_slice_mm if prompting is None else 0.0)


def medlam_prompts(localization: StudyLocalization, view: AxialView, segmenter: Segmenter, settings: EvalSettings,
                   counted: Mapping[str, list[int]], mode: str | None = None) -> dict[int, dict[int, list]] | TrackedPrompts:
    """The localizer's 3D boxes as the Segmenter prompts them for a user: label id -> {z: [2D boxes]},
    or `TrackedPrompts` when it propagates.

    The paper protocol keeps only the slices the ground truth counts."""
    prompts = segmenter.nifti_prompts(view, localization.prompt_boxes(mode or settings.mode))
    if settings.eval_slices == "paper":
        ids = {o.label_id: n for n, o in localization.organs.items()}
        labels = getattr(prompts, "boxes", prompts)
        prompts = keep_prompt_slices(prompts, {label: counted.get(ids[label], ()) for label in labels})
    return prompts


def segment_prompt_sets(segmenter: Segmenter, volume_zyx: np.ndarray, prompt_sets: Mapping[str, Mapping[int, Mapping]],
                        windows: Mapping[int, str], progress: bool = False, spacing_zyx=None,
                        used_prompts: dict | None = None) -> tuple[dict, dict]:
    """Segment several prompt sets ({label: {z: [boxes]}} or TrackedPrompts each) on one volume; static
    sets share one encoder pass per slice.

    Returns ({set: labels zyx}, stats); `used_prompts` (if given) receives each set's decoded 2D boxes."""
    sets = {name: prompts for name, prompts in prompt_sets.items() if prompts}
    segmenter.progress = progress
    results = segmenter.segment_prompt_sets(volume_zyx, sets, windows, spacing_zyx=spacing_zyx) if sets else {}
    if used_prompts is not None:
        used_prompts.update({name: r.prompts or {} for name, r in results.items()})
    labels = {name: results[name].labels if name in results else np.zeros(volume_zyx.shape, np.uint8)
              for name in prompt_sets}
    stats = dict(next(iter(results.values())).stats) if results else {"slices": 0, "encoder_calls": 0,
                                                                      "decoder_calls": 0, "seconds": 0.0}
    return labels, stats


# -- one study ---------------------------------------------------------------------------------
def _load_pair(study: LabeledStudy):
    image = load_nifti(study.image)
    label = load_nifti(study.label, what="label")
    if tuple(label.shape) != tuple(image.shape):
        raise ValueError(f"{study.study_id}: label shape {tuple(label.shape)} differs from image shape "
                         f"{tuple(image.shape)} ({study.label} vs {study.image})")
    if not np.allclose(label.affine, image.affine, atol=1e-3):
        raise ValueError(f"{study.study_id}: label and image have different affines (voxel grids); "
                         "resample the label onto the image first")
    truth = AxialView.from_nifti(label, dtype=None).array
    if not np.issubdtype(truth.dtype, np.integer):
        if not np.allclose(truth, np.rint(truth)):
            raise ValueError(f"{study.study_id}: label {study.label} holds non-integer values")
        truth = np.rint(truth)
    if truth.min() < 0 or truth.max() > 255:
        raise ValueError(f"{study.study_id}: label ids must be in 0..255, found {truth.min()}..{truth.max()}")
    return image, truth.astype(np.int32)


def slice_step(step_mm: float, spacing_z_mm: float) -> int:
    """Every how many axial slices to evaluate for a spacing of about `step_mm` (1 = all)."""
    return 1 if step_mm <= 0 else max(1, int(round(step_mm / spacing_z_mm)))


def score_organ(pred_zyx: np.ndarray, truth_zyx: np.ndarray, spacing_zyx, scored_slices: np.ndarray | None,
                step: int) -> dict:
    """DSC and HD95 of one organ on the axial view.

    Slices outside `scored_slices` (the paper's skipped slices) are emptied in both masks; with
    `step` > 1 only every step-th slice is kept and stacked at step times the slice spacing.
    """
    if scored_slices is not None:
        keep = np.zeros(pred_zyx.shape[0], bool)
        keep[np.asarray(scored_slices, dtype=int)] = True
        pred_zyx, truth_zyx = pred_zyx & keep[:, None, None], truth_zyx & keep[:, None, None]
    spacing = np.asarray(spacing_zyx, dtype=float)
    if step > 1:
        pred_zyx, truth_zyx = pred_zyx[::step], truth_zyx[::step]
        spacing = spacing * np.array([step, 1.0, 1.0])
    return {
        "dsc": _round(dice(pred_zyx, truth_zyx)),
        "hd95": _round(hd95(pred_zyx, truth_zyx, spacing), 3),
        "pred_voxels": int(pred_zyx.sum()),
        "scored_truth_voxels": int(truth_zyx.sum()),
    }


def _round(value: float | None, digits: int = 4):
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), digits)


def _localize(image, study: LabeledStudy, settings: EvalSettings, localizer) -> tuple[StudyLocalization, dict, dict]:
    """The localization, 3D boxes of the organs found, and one status entry per organ."""
    if localizer is None:
        raise ValueError("MedLAM localization requested but no localizer was given")
    with_templates = [n for n in settings.organs if n in localizer.organs]
    localization = (localizer.localize(image, organs=with_templates, mode=settings.mode, seed=settings.seed,
                                       name=study.study_id)
                    if with_templates else StudyLocalization(settings.mode, {}))
    boxes, entries = {}, {}
    for name in settings.organs:
        organ = localization.organs.get(name)
        if organ is None:
            entries[name] = {"status": "no_template"}
            continue
        entries[name] = {
            "status": "found" if organ.present else "absent",
            "confidence": organ.to_json()["confidence"],
            "box_voxel": [list(organ.box.lo), list(organ.box.hi)],
            "absent_reason": organ.absent_reason,
        }
        if organ.present:
            boxes[name] = [list(organ.box.lo), list(organ.box.hi)]
    return localization, boxes, entries


def _manual_boxes(view: AxialView, truth_view: np.ndarray, study: LabeledStudy, settings: EvalSettings,
                  present: Mapping[str, int]) -> tuple[dict, dict]:
    """Simulated manual prompts and the 3D box around each organ's prompts (study voxels)."""
    prompts, boxes = {}, {}
    for name, label_id in present.items():
        rng = organ_rng(settings.seed, study.study_id, label_id)
        per_slice = manual_slice_boxes(truth_view == label_id, rng, settings.gt_slice_threshold,
                                       settings.max_shift_px, settings.shift_reference_px)
        prompts[label_id] = {z: [b] for z, b in per_slice.items()}
        extent = boxes_extent(per_slice)
        if extent is not None:
            lo, hi = view.box_to_original(*extent)
            boxes[name] = [lo.tolist(), hi.tolist()]
    return prompts, boxes


@dataclass
class _StudyTruth:
    """A query study with its ground truth on the axial view and what the protocols derive from it."""

    study: LabeledStudy
    image: Any
    view: AxialView
    truth_view: np.ndarray
    present: dict[str, int]  # organs of the settings that the truth holds
    counted: dict[str, list[int]]  # the slices the paper protocol prompts and scores, per organ
    truth_boxes: dict[str, list]  # tight study-voxel box per present organ
    step: int  # evaluate every step-th slice


def _load_truth(study: LabeledStudy, settings: EvalSettings) -> _StudyTruth:
    image, truth_view = _load_pair(study)
    view = AxialView.from_nifti(image)
    counts = np.bincount(truth_view.ravel(), minlength=256)
    present = {n: i for n, i in settings.organs.items() if counts[i] > 0}
    counted = {n: counted_slices(truth_view == i, settings.gt_slice_threshold) for n, i in present.items()}
    truth_boxes = {}
    for n, i in present.items():
        lo, hi = view.box_to_original(*mask_box(truth_view == i))
        truth_boxes[n] = [lo.tolist(), hi.tolist()]
    return _StudyTruth(study, image, view, truth_view, present, counted, truth_boxes,
                       slice_step(settings.slice_step_mm, view.spacing_zyx[0]))


def _organ_entries(truth: _StudyTruth, settings: EvalSettings) -> dict[str, dict]:
    counts = np.bincount(truth.truth_view.ravel(), minlength=256)
    return {n: {"id": i, "in_truth": n in truth.present, "truth_voxels": int(counts[i]),
                "counted_slices": len(truth.counted.get(n, ())), "localization": {}, "metrics": {}}
            for n, i in settings.organs.items()}


def _prompt_sets(truth: _StudyTruth, settings: EvalSettings, localizer, segmenter: Segmenter,
                 organs_out: dict, timings: dict) -> dict[str, dict[int, dict]]:
    """Prompts {label id: {z: [2D boxes]}} per localization; fills each organ's localization entry."""
    prompt_sets, boxes_3d = {}, {}
    uses_medlam = [loc for loc in ("medlam", "medlam_box") if loc in settings.localizations]
    if uses_medlam:
        t0 = time.perf_counter()
        localization, boxes, entries = _localize(truth.image, truth.study, settings, localizer)
        timings["localize_s"] = round(time.perf_counter() - t0, 3)
        for loc in uses_medlam:  # one localization, prompted the evaluated way and/or the paper's way
            prompter = segmenter if loc == "medlam" else build_segmenter(segmenter.backend, settings, "box")
            mode = settings.mode if loc == "medlam" else "WPL"  # medlam_box: the whole box, on every slice
            prompt_sets[loc] = medlam_prompts(localization, truth.view, prompter, settings, truth.counted, mode)
            boxes_3d[loc] = boxes
            for name, entry in entries.items():
                organs_out[name]["localization"][loc] = dict(entry)
    if "manual" in settings.localizations:
        prompt_sets["manual"], boxes_3d["manual"] = _manual_boxes(truth.view, truth.truth_view, truth.study,
                                                                  settings, truth.present)
        for name in truth.present:
            box = boxes_3d["manual"].get(name)
            organs_out[name]["localization"]["manual"] = {"status": "found" if box else "no_slice", "box_voxel": box}
    # box IoU in mm against the tight ground-truth box (organs missing from the truth are not scored)
    for loc, boxes in boxes_3d.items():
        for name in truth.present:
            box = boxes.get(name)
            iou = box_iou_mm(box, truth.truth_boxes[name], truth.image.affine) if box is not None else 0.0
            organs_out[name]["localization"][loc]["iou"] = _round(iou)
    # subsampling: only every step-th slice is prompted
    return {loc: every_kth_slice(prompts, truth.step) for loc, prompts in prompt_sets.items()}


def _score(truth: _StudyTruth, settings: EvalSettings, predictions: dict, organs_out: dict) -> None:
    for backbone, by_loc in predictions.items():
        for loc, labels_zyx in by_loc.items():
            for name, label_id in truth.present.items():
                scored = truth.counted[name] if settings.eval_slices == "paper" else None
                organs_out[name]["metrics"][pair_name(loc, backbone)] = score_organ(
                    labels_zyx == label_id, truth.truth_view == label_id, truth.view.spacing_zyx, scored, truth.step)


def evaluate_study(study: LabeledStudy, settings: EvalSettings, backends: Mapping[str, Any],
                   localizer=None, overlay_dir: Path | None = None, overlay_slices: int = 3,
                   progress: bool = False) -> dict:
    """Localize, prompt, segment and score one query study; returns its JSON-ready result."""
    t_start = time.perf_counter()
    truth = _load_truth(study, settings)
    timings = {"load_s": round(time.perf_counter() - t_start, 3)}
    organs_out = _organ_entries(truth, settings)
    segmenters = {backbone: build_segmenter(backend, settings) for backbone, backend in backends.items()}
    # prompts depend on the margins only, which all backbones share
    prompt_sets = _prompt_sets(truth, settings, localizer, next(iter(segmenters.values())), organs_out, timings)

    # segmentation: per backbone, all localizations share the encoder passes
    windows = {settings.organs[n]: window_for_organ_name(n) for n in settings.organs}
    timings["segment_s"], seg_stats, predictions, used = {}, {}, {}, {}
    for backbone, segmenter in segmenters.items():
        predictions[backbone], seg_stats[backbone] = segment_prompt_sets(
            segmenter, truth.view.array, prompt_sets, windows, progress, truth.view.spacing_zyx, used)
        timings["segment_s"][backbone] = seg_stats[backbone]["seconds"]

    t0 = time.perf_counter()
    _score(truth, settings, predictions, organs_out)
    timings["metrics_s"] = round(time.perf_counter() - t0, 3)

    if overlay_dir is not None:
        from medlsam.evaluation.plots import study_overlays

        t0 = time.perf_counter()
        shown = {n: [z for z in zs if z % truth.step == 0] for n, zs in truth.counted.items()}
        by_name = {loc: {n: used.get(loc, {}).get(i, {}) for n, i in settings.organs.items()} for loc in prompt_sets}
        study_overlays(Path(overlay_dir) / study.study_id, truth.view, truth.truth_view, truth.present, shown, by_name,
                       predictions, settings, overlay_slices, getattr(localizer, "name", "medlam"))
        timings["overlays_s"] = round(time.perf_counter() - t0, 3)
    timings["total_s"] = round(time.perf_counter() - t_start, 3)

    return {
        "study_id": study.study_id,
        "image": str(study.image),
        "label": str(study.label),
        "settings_key": settings.key(),
        "shape": list(truth.image.shape),
        "spacing_mm": [round(float(s), 4) for s in voxel_spacing(truth.image.affine)],
        "slice_step": truth.step,
        "organs": organs_out,
        "segmentation": seg_stats,
        "timings": timings,
    }


# -- the loop ----------------------------------------------------------------------------------
def study_result_path(out_dir: Path, study_id: str) -> Path:
    return Path(out_dir) / "studies" / f"{study_id}.json"


def load_finished(out_dir: Path, study_id: str, settings_key: str) -> dict | None:
    """A finished study's result, None if not finished; ValueError if it used other settings."""
    path = study_result_path(out_dir, study_id)
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable result %s (it will be recomputed)", path)
        return None
    if result.get("settings_key") != settings_key:
        raise ValueError(f"{path} was computed with other evaluation settings (key {result.get('settings_key')} "
                         f"!= {settings_key}); use another output folder or delete {path.parent}")
    return result


def run_evaluation(queries: Sequence[LabeledStudy], settings: EvalSettings, backends: Mapping[str, Any],
                   out_dir: Path, localizer=None, overlay_studies: int = 1, overlay_slices: int = 3,
                   progress: bool = True) -> list[dict]:
    """Evaluate every query study (skipping finished ones); returns all per-study results."""
    out_dir = Path(out_dir)
    missing = [b for b in settings.backbones if b not in backends]
    if missing:
        raise ValueError(f"backbone(s) {missing} in the settings but not built")
    key = settings.key()
    results, done = [], 0
    bar = tqdm(queries, desc="eval", unit="study", disable=None if progress else True)
    for index, study in enumerate(bar):
        bar.set_postfix_str(study.study_id)
        finished = load_finished(out_dir, study.study_id, key)
        if finished is not None:
            results.append(finished)
            done += 1
            continue
        overlay_dir = out_dir / "overlays" if index < overlay_studies else None
        result = evaluate_study(study, settings, backends, localizer, overlay_dir, overlay_slices, progress)
        atomic_write_json(study_result_path(out_dir, study.study_id), result)
        results.append(result)
        log.info("%s: %.1f s", study.study_id, result["timings"]["total_s"])
    if done:
        log.info("reused %d finished studies from %s", done, out_dir / "studies")
    return results
