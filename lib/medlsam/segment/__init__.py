"""Box-prompt segmentation: slice boxes, SAM-family backends, one encoder pass per slice."""

from .backends import BACKENDS, SamBackend, LiteMedSAMBackend, build_backend, build_sam_model
from .postprocess import dice, keep_largest_component
from .propagation import DEFAULT_PROMPTING, PROMPTING, PropagationSettings, TrackedPrompts, check_prompting
from .segmenter import SegmentationResult, Segmenter, SliceResult
from .slice_boxes import (
    DEFAULT_IN_PLANE_MARGIN_MM,
    PAPER_MARGIN_ZYX,
    boxes_from_labels,
    margin_in_voxels,
    parse_margin_mm,
    parse_organ_boxes,
    slice_boxes_from_box,
    slice_boxes_from_labels,
)
from .windows import DEFAULT_WINDOWS, apply_window, window_for_organ_name

__all__ = [
    "BACKENDS", "DEFAULT_IN_PLANE_MARGIN_MM", "DEFAULT_PROMPTING", "DEFAULT_WINDOWS", "LiteMedSAMBackend", "PAPER_MARGIN_ZYX", "PROMPTING",
    "PropagationSettings", "SamBackend", "TrackedPrompts", "check_prompting",
    "SegmentationResult", "Segmenter", "SliceResult", "apply_window", "boxes_from_labels", "build_backend",
    "build_sam_model", "dice", "keep_largest_component", "margin_in_voxels", "parse_margin_mm", "parse_organ_boxes",
    "slice_boxes_from_box", "slice_boxes_from_labels", "window_for_organ_name",
]
