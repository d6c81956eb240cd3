"""MedLSAM end to end: localize organs, turn their boxes into per-slice prompts, segment them.

This is the one path from a localization to masks. The app's `/infer/medlsam`, `medlsam segment`,
`medlsam eval` (MedLAM boxes) and batch runs all call `segment_localization`, so an evaluation
measures what users get.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import nibabel as nib
import numpy as np

from medlsam.localization import OrganLocalizer, StudyLocalization, check_mode
from medlsam.segment import SegmentationResult, Segmenter, window_for_organ_name


def organ_windows(localization: StudyLocalization) -> dict[int, str]:
    """CT window per present organ's label id, chosen from its name (lungs: lung window, ...)."""
    return {o.label_id: window_for_organ_name(n) for n, o in localization.present.items()}


def segment_localization(image: nib.Nifti1Image, localization: StudyLocalization, segmenter: Segmenter,
                         mode: str | None = None,
                         slices_for_label: Mapping[int, Iterable[int]] | None = None,
                         windows: Mapping[int, str] | None = None) -> SegmentationResult:
    """Segment the present organs of `localization` on `image` (labels on the study grid).

    `mode` picks whole boxes or SPL part boxes (default: the localization's own mode);
    `slices_for_label` restricts each organ to some axial slices (evaluation protocols);
    `windows` overrides the CT window chosen per organ name.
    """
    boxes = localization.prompt_boxes(mode)
    if not boxes:
        shape = tuple(image.shape)
        empty = np.zeros(shape, np.uint8)
        return SegmentationResult(labels=empty, stats={"encoder_calls": 0, "decoder_calls": 0, "slices": 0},
                                  view_labels=None)
    result = segmenter.segment_nifti(image, boxes, window_for_label=windows or organ_windows(localization),
                                     slices_for_label=slices_for_label)
    result.labels = result.labels.astype(np.uint8, copy=False)
    return result


@dataclass
class MedLSAMResult:
    """A study's label volume (study grid) with the localization it came from."""

    labels: np.ndarray
    localization: StudyLocalization
    segmentation: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def report(self) -> dict:
        """The JSON a client gets: per-organ boxes and presence, label names, voxel counts, costs."""
        loc = self.localization
        return {
            **loc.to_json(),
            "voxels": {n: int((self.labels == i).sum()) for n, i in loc.label_names.items()},
            "encoder_calls": int(self.segmentation.get("encoder_calls", 0)),
            "decoder_calls": int(self.segmentation.get("decoder_calls", 0)),
            "timings": dict(self.timings),
        }


def run_medlsam(image: nib.Nifti1Image, localizer: OrganLocalizer, segmenter: Segmenter, organs=None,
                mode: str = "WPL", seed: int = 0, name: str = "image") -> MedLSAMResult:
    """Localize `organs` (names; None: all with templates) in `image`, then segment them."""
    mode = check_mode(mode)
    t0 = time.perf_counter()
    localization = localizer.localize(image, organs=organs, mode=mode, seed=seed, name=name)
    t1 = time.perf_counter()
    segmentation = segment_localization(image, localization, segmenter)
    t2 = time.perf_counter()
    timings = {"localize_s": round(t1 - t0, 3), "segment_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)}
    return MedLSAMResult(segmentation.labels, localization, dict(segmentation.stats), timings)
