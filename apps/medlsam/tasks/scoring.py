"""Scoring `dice`: how much each organ of the app's own result needed correcting.

For a study with a final label and an `original` label (the app saves its `medlsam` result as
`original` for studies without a final label), the per-organ Dice between the two is written into
the study's image info (`GET /datastore/?output=all`, `GET /datastore/image/info?image=<id>`):
`dice` (mean over organs), `organ_dice` {organ: Dice}, `dice_of` (the two labels' timestamps).
It runs when a label is saved (`on_save_label`) and on `POST /scoring/dice` for every such study.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.scoring import ScoringMethod

from medlsam.io import load_image
from medlsam.labels import LabelMap

logger = logging.getLogger(__name__)
FINAL, ORIGINAL = "final", "original"


class OrganDice(ScoringMethod):
    def __init__(self, label_map: LabelMap):
        super().__init__("Per-organ Dice between the app's result (original label) and the final label")
        self.label_map = label_map

    def __call__(self, request, datastore):
        image = request.get("image")
        images = [image] if image else datastore.get_labeled_images()
        scored = {}
        for image_id in images:
            result = score_study(datastore, self.label_map, image_id)
            if result is not None:
                scored[image_id] = result["dice"]
        return {"scored": scored}


def score_study(datastore, label_map: LabelMap, image_id: str) -> dict[str, Any] | None:
    """Compute, store in the image info and return the study's Dice entry; None without both labels."""
    original_uri = datastore.get_label_uri(image_id, ORIGINAL)
    final_uri = datastore.get_label_uri(image_id, FINAL) if original_uri else ""
    if not final_uri or not original_uri:
        return None
    info = datastore.get_label_info(image_id, ORIGINAL) or {}
    names = (info.get("params") or {}).get("label_names") or label_map.to_dict()
    try:
        final = np.asanyarray(load_image(final_uri, what="label").dataobj)
        original = np.asanyarray(load_image(original_uri, what="label").dataobj)
    except ValueError as exc:
        logger.warning("dice of %s not computed: %s", image_id, exc)
        return None
    if final.shape != original.shape:
        logger.warning("dice of %s not computed: labels of shapes %s and %s", image_id, final.shape, original.shape)
        return None
    organ_dice = per_organ_dice(original, {n: int(v) for n, v in names.items() if n in label_map}, final,
                                label_map.to_dict())
    if not organ_dice:
        return None
    entry = {"dice": round(float(np.mean(list(organ_dice.values()))), 4), "organ_dice": organ_dice,
             "dice_of": {ORIGINAL: info.get("ts"), FINAL: (datastore.get_label_info(image_id, FINAL) or {}).get("ts")}}
    datastore.update_image_info(image_id, entry)
    return entry


def per_organ_dice(result: np.ndarray, result_ids: dict[str, int], truth: np.ndarray,
                   truth_ids: dict[str, int]) -> dict[str, float]:
    """Dice per organ present in either volume (each with its own name -> value map)."""
    out = {}
    for name in sorted(set(result_ids) | set(truth_ids), key=lambda n: truth_ids.get(n, 1 << 16)):
        a = result == result_ids[name] if name in result_ids else np.zeros(result.shape, bool)
        b = truth == truth_ids[name] if name in truth_ids else np.zeros(truth.shape, bool)
        total = int(a.sum()) + int(b.sum())
        if total:
            out[name] = round(2.0 * float(np.logical_and(a, b).sum()) / total, 4)
    return out
