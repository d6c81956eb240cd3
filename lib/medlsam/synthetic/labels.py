"""The label map shared by every synthetic study: organ name -> label id."""

from __future__ import annotations

# Stable ids: never renumber, only append. "left"/"right" are the patient's left/right.
LABEL_MAP: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "stomach": 5,
    "gallbladder": 6,
    "pancreas": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "esophagus": 10,
    "urinary_bladder": 11,
    "femoral_head_left": 12,
    "femoral_head_right": 13,
    "spinal_column": 14,
    "lung_left": 15,
    "lung_right": 16,
    "heart": 17,
    "adrenal_left": 18,
    "adrenal_right": 19,
}

ID_TO_NAME: dict[int, str] = {v: k for k, v in LABEL_MAP.items()}
