"""Leave-one-out box IoU on annotated support studies: how well a set of MedLAM weights localizes.

Every support is localized with templates built from the other supports only, and each organ's
box is compared (IoU in mm) with the box of that organ in the support's own label. The trainer
task uses it to compare new weights with the ones in use before publishing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsam.evaluation.metrics import box_iou_mm, mask_box
from medlsam.io import load_nifti
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.patches import PatchEmbedder
from medlsam.medlam.store import SupportStudy
from medlsam.medlam.templates import TemplateSet, compute_support

MIN_STUDIES = 2  # leaving one out needs at least one other support


@dataclass
class LeaveOneOutResult:
    mean_iou: float | None  # None when there were too few supports to measure anything
    per_study: dict[str, float] = field(default_factory=dict)  # mean IoU over the study's organs
    pairs: int = 0  # (study, organ) pairs measured
    error: str | None = None  # why the weights could not be measured (they score 0)

    def to_json(self) -> dict:
        out = {"mean_iou": None if self.mean_iou is None else round(self.mean_iou, 4),
               "per_study": {k: round(v, 4) for k, v in self.per_study.items()}, "pairs": self.pairs}
        return {**out, "error": self.error} if self.error else out


def common_organs(labels: Sequence[np.ndarray], label_ids: dict[str, int], max_organs: int | None) -> list[str]:
    """The organs present in every label, largest (mean voxel count) first, at most `max_organs`."""
    sizes = {name: [int(np.count_nonzero(label == i)) for label in labels] for name, i in label_ids.items()}
    common = [name for name, counts in sizes.items() if all(counts)]
    common.sort(key=lambda name: -np.mean(sizes[name]))
    return common[:max_organs] if max_organs else common


def leave_one_out_iou(checkpoint: str | Path, studies: Sequence[SupportStudy], label_ids: dict[str, int],
                      device: str = "cpu", seed: int = 0, max_organs: int | None = 4,
                      organs: Sequence[str] | None = None) -> LeaveOneOutResult:
    """Mean box IoU (mm) of each study's organs, localized with the other studies' templates.

    By default the `max_organs` largest organs that every study contains are measured (the cost grows
    with the organs: each support's contribution is computed once per study and weight set)."""
    if len(studies) < MIN_STUDIES:
        return LeaveOneOutResult(None)
    embedder = PatchEmbedder.from_checkpoint(checkpoint, device)
    loaded = {s.study_id: (load_nifti(s.image), load_nifti(s.label, what="label")) for s in studies}
    if organs is None:
        organs = common_organs([np.asanyarray(label.dataobj) for _, label in loaded.values()], label_ids, max_organs)
    try:
        contributions = {sid: compute_support(embedder, image, label, label_ids, sid, organs=list(organs))
                         for sid, (image, label) in loaded.items()}
    except (ValueError, RuntimeError) as exc:  # weights that cannot even describe the supports score 0
        return LeaveOneOutResult(0.0, {}, 0, error=f"{type(exc).__name__}: {exc}")
    per_study, pairs = {}, 0
    for sid, (image, label) in loaded.items():
        templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict())
        for other, contribution in contributions.items():
            if other != sid:
                templates.add(contribution, label_ids)
        names = [name for name in contributions[sid] if name in templates.supports]
        if not names:
            continue
        truth = np.asanyarray(label.dataobj)
        try:
            located = Localizer(embedder, templates, LocalizerSettings()).localize(image, names, seed=seed).organs
        except (ValueError, RuntimeError):  # e.g. non-finite points from broken weights: nothing found
            located = {}
        scores = []
        for name in names:
            truth_box = mask_box(truth == label_ids[name])
            if truth_box is None:
                continue
            iou = box_iou_mm(located[name].box.corners, truth_box, image.affine) if name in located else 0.0
            scores.append(iou if np.isfinite(iou) else 0.0)
        if scores:
            per_study[sid] = float(np.mean(scores))
            pairs += len(scores)
    if not per_study:
        return LeaveOneOutResult(None)
    return LeaveOneOutResult(float(np.mean(list(per_study.values()))), per_study, pairs)
