"""Evaluation: the paper's metrics (box IoU, DSC, HD95), manual-box simulation, the resumable
per-study runner, tables and figures behind `medlsam eval`."""

from .datasets import LabeledStudy, pair_studies, split_supports, study_ids
from .manual_boxes import counted_slices, manual_slice_boxes, perturbed_box
from .metrics import box_iou, box_iou_mm, dice, hd95, mask_box, summarize, voxel_box_to_mm
from .runner import EvalSettings, evaluate_study, run_evaluation

__all__ = [
    "EvalSettings", "LabeledStudy", "box_iou", "box_iou_mm", "counted_slices", "dice", "evaluate_study", "hd95",
    "manual_slice_boxes", "mask_box", "pair_studies", "perturbed_box", "run_evaluation", "split_supports",
    "study_ids", "summarize", "voxel_box_to_mm",
]
