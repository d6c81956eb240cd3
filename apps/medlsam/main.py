"""MONAI Label app: MedLSAM (MedLAM localization + SAM-family box-prompt segmentation)."""

from __future__ import annotations

import logging
import os

from monailabel.interfaces.app import MONAILabelApp

logger = logging.getLogger(__name__)


class MedLSAMApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedLSAM",
            description="Localize any organ from a few annotated supports (MedLAM), segment it with SAM-family box prompts",
            version="0.1.0",
        )
