"""Default locations of models and data (overridable with environment variables)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("MEDLSAM_MODEL_DIR", REPO_ROOT / "apps" / "medlsam" / "model"))
# The demo MedLAM checkpoint trained by trainers/ on generated studies (committed).
DEMO_MEDLAM = MODEL_DIR / "medlam_demo" / "medlam.pt"
# Where users put the official checkpoint for real CT.
OFFICIAL_MEDLAM = MODEL_DIR / "medlam.pth"
SAMPLE_DATA = REPO_ROOT / "sample-datasets"


def default_medlam_checkpoint() -> Path:
    """The official MedLAM weights if the user supplied them, else the demo checkpoint."""
    return OFFICIAL_MEDLAM if OFFICIAL_MEDLAM.exists() else DEMO_MEDLAM
