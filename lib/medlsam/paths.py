"""Where models live: one resolver for the model folder, the demo and the official MedLAM weights."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The demo MedLAM checkpoint trained by trainers/ on generated studies: package data, so it is found
# whatever model folder is configured.
DEMO_MEDLAM = PACKAGE_DIR / "medlam" / "demo" / "medlam.pt"
# File name of the official checkpoint that users put into their model folder for real CT.
OFFICIAL_MEDLAM_NAME = "medlam.pth"
MODEL_DIR_ENV = "MEDLSAM_MODEL_DIR"
# Only meaningful in a checkout of this repository (the sample app and sample data live there).
REPO_ROOT = PACKAGE_DIR.parents[1]
SAMPLE_APP_DIR = REPO_ROOT / "apps" / "medlsam"


def model_dir(explicit: str | os.PathLike | None = None, app_dir: str | os.PathLike | None = None) -> Path:
    """The folder of user-supplied checkpoints, trained weights and template stores.

    First of: `explicit` (e.g. `--conf model_dir`), $MEDLSAM_MODEL_DIR, `<app_dir>/model` of the app
    being served, the sample app's `apps/medlsam/model` of this checkout."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(MODEL_DIR_ENV):
        return Path(os.environ[MODEL_DIR_ENV]).expanduser()
    return Path(app_dir or SAMPLE_APP_DIR) / "model"


def default_medlam_checkpoint(folder: str | os.PathLike | None = None) -> Path:
    """The official MedLAM weights if the user put them into the model folder, else the demo checkpoint."""
    official = Path(folder or model_dir()) / OFFICIAL_MEDLAM_NAME
    return official if official.exists() else DEMO_MEDLAM
