"""MedLSAM end to end: localize organs with MedLAM, then segment their boxes with a SAM-family model."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np

from medlsam.medlam.localizer import Localizer
from medlsam.segment import Segmenter, window_for_organ_name


def boxes_for_segmenter(organs: dict[str, dict], mode: str = "WPL") -> dict[int, list]:
    """Label id -> 3D boxes (study voxels) of the present organs; SPL uses the per-part boxes."""
    boxes = {}
    for entry in organs.values():
        if not entry["present"]:
            continue
        parts = [p["box_voxel"] for p in entry.get("parts") or []] if mode == "SPL" else []
        boxes[entry["id"]] = parts or [entry["box_voxel"]]
    return boxes


def run_medlsam(image: nib.Nifti1Image, localizer: Localizer, segmenter: Segmenter, organs=None,
                mode: str = "WPL", seed: int = 0, name: str = "image") -> tuple[np.ndarray, dict]:
    """Localize then segment; returns the multi-label volume on the study grid and a JSON-ready report."""
    t0 = time.perf_counter()
    located = localizer.localize(image, organs=organs, mode=mode, seed=seed, name=name)
    t1 = time.perf_counter()
    boxes = boxes_for_segmenter(located["organs"], mode)
    windows = {e["id"]: window_for_organ_name(n) for n, e in located["organs"].items() if e["present"]}
    if boxes:
        result = segmenter.segment_nifti(image, boxes, window_for_label=windows)
        labels, seg_stats = result.labels.astype(np.uint8), result.stats
    else:
        labels, seg_stats = np.zeros(image.shape, np.uint8), {"encoder_calls": 0, "decoder_calls": 0}
    t2 = time.perf_counter()
    present = {n: e["id"] for n, e in located["organs"].items() if e["present"]}
    report = {
        "mode": located["mode"],
        "label_names": present,
        "organs": located["organs"],
        "absent": sorted(n for n, e in located["organs"].items() if not e["present"]),
        "voxels": {n: int((labels == i).sum()) for n, i in present.items()},
        "encoder_calls": int(seg_stats.get("encoder_calls", 0)),
        "decoder_calls": int(seg_stats.get("decoder_calls", 0)),
        "timings": {"localize_s": round(t1 - t0, 3), "segment_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)},
    }
    return labels, report
