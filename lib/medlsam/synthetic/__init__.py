"""Synthetic CT studies with organ labels: the project's embedded sample data.

    from medlsam.synthetic import LABEL_MAP, generate_study, write_sample_dataset
"""

from .acquisition import PRESETS, SCAN_RANGES
from .generator import GENERATOR_VERSION, Study, generate_study
from .intensities import EXPECTED_ORGAN_HU, PHASES
from .labels import LABEL_MAP
from .writer import write_sample_dataset

__all__ = [
    "EXPECTED_ORGAN_HU", "GENERATOR_VERSION", "LABEL_MAP", "PHASES", "PRESETS", "SCAN_RANGES",
    "Study", "generate_study", "write_sample_dataset",
]
