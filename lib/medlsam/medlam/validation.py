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

    def to_json(self) -> dict:
        return {"mean_iou": None if self.mean_iou is None else round(self.mean_iou, 4),
                "per_study": {k: round(v, 4) for k, v in self.per_study.items()}, "pairs": self.pairs}


def leave_one_out_iou(checkpoint: str | Path, studies: Sequence[SupportStudy], label_ids: dict[str, int],
                      device: str = "cpu", seed: int = 0) -> LeaveOneOutResult:
    """Mean box IoU (mm) of every organ of every study, localized with the other studies' templates."""
    if len(studies) < MIN_STUDIES:
        return LeaveOneOutResult(None)
    embedder = PatchEmbedder.from_checkpoint(checkpoint, device)
    loaded = {s.study_id: (load_nifti(s.image), load_nifti(s.label, what="label")) for s in studies}
    contributions = {sid: compute_support(embedder, image, label, label_ids, sid)
                     for sid, (image, label) in loaded.items()}
    per_study, pairs = {}, 0
    for sid, (image, label) in loaded.items():
        templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict())
        for other, contribution in contributions.items():
            if other != sid:
                templates.add(contribution, label_ids)
        organs = [name for name in contributions[sid] if name in templates.supports]
        if not organs:
            continue
        localization = Localizer(embedder, templates, LocalizerSettings()).localize(image, organs, seed=seed)
        truth = np.asanyarray(label.dataobj)
        scores = []
        for name, found in localization.organs.items():
            truth_box = mask_box(truth == label_ids[name])
            if truth_box is not None:
                scores.append(box_iou_mm(found.box.corners, truth_box, image.affine))
        if scores:
            per_study[sid] = float(np.mean(scores))
            pairs += len(scores)
    if not per_study:
        return LeaveOneOutResult(None)
    return LeaveOneOutResult(float(np.mean(list(per_study.values()))), per_study, pairs)
