"""Tissue attenuation (HU) by contrast phase, per-subject variation, and the expected organ ranges."""

from __future__ import annotations

import numpy as np

PHASES = ("native", "arterial", "portal_venous", "delayed")
PHASE_WEIGHTS = (0.15, 0.2, 0.5, 0.15)

# tissue -> mean HU in (native, arterial, portal_venous, delayed)
_PHASE_HU: dict[str, tuple[float, float, float, float]] = {
    "aorta_blood": (40, 300, 170, 115),
    "vein_blood": (40, 95, 150, 115),
    "portal_blood": (40, 130, 170, 120),
    "heart_left_blood": (40, 290, 160, 115),
    "heart_right_blood": (40, 190, 155, 115),
    "lung_vessel": (40, 200, 150, 110),
    "myocardium": (45, 100, 110, 90),
    "liver": (58, 75, 110, 90),
    "spleen": (47, 110, 120, 95),
    "pancreas": (42, 115, 95, 75),
    "kidney_cortex": (33, 175, 165, 130),
    "kidney_medulla": (30, 80, 155, 135),
    "renal_pelvis": (10, 10, 15, 450),
    "adrenal": (30, 65, 70, 55),
    "muscle": (50, 55, 62, 58),
    "bowel_wall": (40, 80, 85, 70),
    "stomach_wall": (40, 85, 90, 75),
    "esophagus": (42, 55, 65, 60),
    "bladder_wall": (40, 60, 70, 65),
    "gallbladder_wall": (40, 60, 70, 60),
    "urine_contrast": (10, 10, 12, 600),
}
# phase-independent tissues
_STATIC_HU: dict[str, float] = {
    "air": -1000,
    "lung": -860,
    "fat": -100,
    "fluid": 10,
    "bile": 8,
    "urine": 8,
    "bowel_fluid": 18,
    "cortical_bone": 950,
    "trabecular_bone": 230,
    "yellow_marrow": -40,
    "cartilage": 110,
    "disc": 85,
    "csf": 15,
    "skin": 30,
    "table_shell": 350,
    "table_core": -850,
}

# Expected median HU of each labeled organ per phase (what a correct generator produces,
# including partial volume, internal structure and subject variation). Tests hold us to these.
EXPECTED_ORGAN_HU: dict[str, dict[str, tuple[float, float]]] = {
    "liver": {"native": (15, 80), "arterial": (40, 100), "portal_venous": (70, 140), "delayed": (50, 115)},
    "spleen": {"native": (30, 65), "arterial": (70, 150), "portal_venous": (90, 150), "delayed": (70, 120)},
    "kidney_left": {"native": (15, 50), "arterial": (80, 200), "portal_venous": (120, 200), "delayed": (100, 180)},
    "kidney_right": {"native": (15, 50), "arterial": (80, 200), "portal_venous": (120, 200), "delayed": (100, 180)},
    "stomach": {"native": (-40, 60), "arterial": (-40, 90), "portal_venous": (-40, 95), "delayed": (-40, 85)},
    "gallbladder": {"native": (-10, 40), "arterial": (-10, 45), "portal_venous": (-10, 50), "delayed": (-10, 45)},
    "pancreas": {"native": (10, 65), "arterial": (60, 140), "portal_venous": (50, 120), "delayed": (35, 100)},
    "aorta": {"native": (20, 65), "arterial": (200, 380), "portal_venous": (120, 220), "delayed": (80, 150)},
    "inferior_vena_cava": {"native": (20, 65), "arterial": (60, 140), "portal_venous": (100, 190), "delayed": (80, 150)},
    "esophagus": {"native": (0, 70), "arterial": (10, 85), "portal_venous": (15, 95), "delayed": (10, 90)},
    "urinary_bladder": {"native": (-10, 35), "arterial": (-10, 35), "portal_venous": (-10, 35), "delayed": (-10, 120)},
    "femoral_head_left": {"native": (150, 700), "arterial": (150, 700), "portal_venous": (150, 700), "delayed": (150, 700)},
    "femoral_head_right": {"native": (150, 700), "arterial": (150, 700), "portal_venous": (150, 700), "delayed": (150, 700)},
    "spinal_column": {"native": (150, 650), "arterial": (150, 650), "portal_venous": (150, 650), "delayed": (150, 650)},
    "lung_left": {"native": (-920, -720), "arterial": (-920, -720), "portal_venous": (-920, -720), "delayed": (-920, -720)},
    "lung_right": {"native": (-920, -720), "arterial": (-920, -720), "portal_venous": (-920, -720), "delayed": (-920, -720)},
    "heart": {"native": (20, 70), "arterial": (80, 300), "portal_venous": (90, 190), "delayed": (70, 140)},
    "adrenal_left": {"native": (-40, 60), "arterial": (0, 100), "portal_venous": (0, 100), "delayed": (-10, 90)},
    "adrenal_right": {"native": (-40, 60), "arterial": (0, 100), "portal_venous": (0, 100), "delayed": (-10, 90)},
}


class TissueHU:
    """HU lookup for one study: phase-dependent means plus this subject's own offsets."""

    def __init__(self, phase: str, rng: np.random.Generator):
        if phase not in PHASES:
            raise ValueError(f"unknown contrast phase {phase!r}; choose one of {', '.join(PHASES)}")
        self.phase = phase
        p = PHASES.index(phase)
        self._hu = {name: float(v[p]) for name, v in _PHASE_HU.items()}
        self._hu.update(_STATIC_HU)
        # subject variation: perfusion / timing differences scale the enhanced part
        timing = rng.normal(1.0, 0.12)
        for name, v in _PHASE_HU.items():
            enhancement = self._hu[name] - v[0]
            self._hu[name] = v[0] + enhancement * timing + rng.normal(0, 5)
        self._hu["fat"] += rng.normal(0, 8)
        self._hu["muscle"] += rng.normal(0, 4)
        self._hu["trabecular_bone"] += rng.normal(0, 45)  # bone density varies with age
        self._hu["lung"] += rng.normal(0, 20)
        if rng.random() < 0.12:  # hepatic steatosis lowers liver attenuation
            self._hu["liver"] -= rng.uniform(15, 35)

    def __getitem__(self, tissue: str) -> float:
        return self._hu[tissue]
