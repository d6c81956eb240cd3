"""Organ localization by registering annotated support studies to the query (no trained weights).

    atlas = SupportAtlas.build(study_id, image, label, label_ids, RegistrationSettings())
    result = RegistrationLocalizer([atlas, ...]).localize(query_image, mode="SPL")
"""

from .atlas import SupportAtlas, atlas_key
from .localizer import RegistrationLocalizer, RegistrationLocalizerSettings
from .registration import RegistrationSettings, register

__all__ = ["RegistrationLocalizer", "RegistrationLocalizerSettings", "RegistrationSettings", "SupportAtlas", "atlas_key", "register"]
