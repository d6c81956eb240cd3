"""CT display windows: Hounsfield units -> the 0-255 grey levels the SAM-family models expect."""

from __future__ import annotations

import re

import numpy as np

# name -> (level, width) in HU. Soft tissue is the default (METHOD section 7).
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {
    "default": (40.0, 400.0),
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

# Organ-name fragments that look better in a non-default window.
_NAME_HINTS = (
    ("lung", "lung"),
    ("trachea", "lung"),
    ("bronch", "lung"),
    ("femur", "bone"),
    ("femoral", "bone"),
    ("bone", "bone"),
    ("vertebra", "bone"),
    ("rib", "bone"),
    ("mandible", "bone"),
    ("skull", "bone"),
    ("pelvis", "bone"),
    ("sacrum", "bone"),
)


def check_windows(windows: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Validate {name: (level, width)} and return it with float values; a 'default' entry is required."""
    if not isinstance(windows, dict) or "default" not in windows:
        raise ValueError("windows must be a dict {name: (level, width)} with a 'default' entry")
    out = {}
    for name, value in windows.items():
        try:
            level, width = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"window {name!r} must be (level, width), got {value!r}") from None
        if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
            raise ValueError(f"window {name!r} needs a finite level and a positive width, got {value!r}")
        out[str(name)] = (level, width)
    return out


def apply_window(slice_hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to [level - width/2, level + width/2] and scale to float32 grey levels in [0, 255]."""
    lower = level - width / 2.0
    scaled = (np.asarray(slice_hu, dtype=np.float32) - lower) * (255.0 / width)
    return np.clip(scaled, 0.0, 255.0, out=scaled)


def window_for_organ_name(name: str) -> str:
    """Pick 'lung', 'bone' or 'default' from an organ's name (e.g. 'lung_left' -> 'lung')."""
    tokens = re.split(r"[^a-z]+", name.lower())
    for fragment, window in _NAME_HINTS:
        if any(token.startswith(fragment) for token in tokens):
            return window
    return "default"
