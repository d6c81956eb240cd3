"""Box-prompt segmentation: slice boxes, SAM-family backends, one encoder pass per slice."""

from .backends import BACKENDS, SamBackend, LiteMedSAMBackend, build_backend, build_sam_model
from .postprocess import dice, keep_largest_component
from .segmenter import SegmentationResult, Segmenter, SliceResult
from .slice_boxes import (
    PAPER_MARGIN_ZYX,
    boxes_from_labels,
    parse_organ_boxes,
    slice_boxes_from_box,
    slice_boxes_from_labels,
)
from .windows import DEFAULT_WINDOWS, apply_window, window_for_organ_name

__all__ = [
    "BACKENDS", "DEFAULT_WINDOWS", "LiteMedSAMBackend", "PAPER_MARGIN_ZYX", "SamBackend", "SegmentationResult",
    "Segmenter", "SliceResult", "apply_window", "boxes_from_labels", "build_backend", "build_sam_model",
    "dice", "keep_largest_component", "parse_organ_boxes", "slice_boxes_from_box", "slice_boxes_from_labels",
    "window_for_organ_name",
]
