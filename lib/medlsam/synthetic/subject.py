"""One synthetic subject: body build, landmark levels and the body/cavity profiles along z.

Anatomical frame (mm): x towards the patient's left, y anterior, z superior; x = 0 is the midline,
y = 0 the centre of the L3 vertebral body, z = 0 the top of the pubic symphysis.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

# Nominal profiles of an average adult (before subject scaling), tabulated along z.
_Z = np.array([-140, -40, 0, 40, 100, 150, 200, 260, 320, 380, 440, 500, 560, 610, 650, 700, 760.0])
_PROFILES = {
    # y of the vertebral body centre (sacrum below S1): lumbar lordosis, thoracic kyphosis
    "spine_y": [-75, -75, -72, -62, -38, -12, -2, 0, -10, -24, -36, -42, -40, -32, -24, -10, 0],
    # half width, anterior and posterior y of the muscle envelope (skin minus subcutaneous fat)
    "muscle_w": [160, 165, 170, 168, 160, 148, 138, 132, 135, 140, 143, 146, 150, 152, 135, 65, 55],
    "muscle_ya": [70, 75, 85, 95, 105, 110, 112, 112, 110, 110, 112, 108, 98, 88, 75, 40, 40],
    "muscle_yp": [-110, -115, -120, -118, -105, -88, -82, -80, -86, -95, -104, -108, -106, -98, -88, -50, -45],
    # trunk cavity (inside ribs / abdominal wall; posterior limit in the paravertebral gutters)
    "cavity_w": [0, 40, 55, 62, 98, 115, 116, 113, 118, 124, 127, 127, 120, 98, 55, 0, 0],
    "cavity_ya": [20, 45, 55, 72, 88, 94, 97, 97, 95, 92, 88, 82, 72, 60, 45, 10, 10],
    "cavity_yp": [-40, -40, -40, -45, -40, -30, -30, -32, -40, -58, -72, -80, -78, -68, -55, -20, -20],
}

# Vertebral body centres (nominal z) from L5 up to C3, and half-heights.
VERTEBRAE = ["L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4",
             "T3", "T2", "T1", "C7", "C6", "C5", "C4", "C3"]
_VERT_Z = np.array([165, 199, 234, 269, 302, 334, 363, 390, 417, 442, 467, 490, 513, 535, 555, 575,
                    593, 611, 628, 645, 662, 679.0])
_VERT_HALF_H = np.array([14, 14, 14, 13.5, 13, 11.5, 11, 10.5, 10, 10, 9.5, 9.5, 9, 9, 8.5, 8.5, 8,
                         7, 6.5, 6.5, 6.5, 6.5])


@dataclass
class Subject:
    seed: int
    height: float  # z scale
    width: float  # x scale
    depth: float  # y scale
    fat_mm: float  # subcutaneous fat thickness
    belly_mm: float  # extra anterior abdominal fat
    age: float
    dome_right: float  # z of the hemidiaphragm domes
    dome_left: float
    lung_apex: float
    profile_jitter: dict = field(default_factory=dict)

    def rng(self, name: str) -> np.random.Generator:
        """An independent random stream for one part of the anatomy (stable across versions
        of the other parts)."""
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def zs(self, nominal_z) -> np.ndarray:
        """Subject z of a nominal level."""
        return np.asarray(nominal_z, float) * self.height

    def profile(self, name: str, z) -> np.ndarray:
        """A body profile at subject z (float32 array like z)."""
        scale = self.width if name.endswith("_w") else self.depth
        values = np.asarray(_PROFILES[name], float) * self.profile_jitter.get(name, 1.0)
        out = np.interp(np.asarray(z, np.float32) / self.height, _Z, values) * scale
        return out.astype(np.float32)

    def spine_y(self, z) -> np.ndarray:
        return (np.interp(np.asarray(z, np.float32) / self.height, _Z, _PROFILES["spine_y"])
                * self.depth).astype(np.float32)

    @property
    def vertebra_z(self) -> np.ndarray:
        return _VERT_Z * self.height

    @property
    def vertebra_half_height(self) -> np.ndarray:
        return _VERT_HALF_H * self.height

    def level(self, name: str) -> float:
        """z of a vertebral body's centre, e.g. level('L1')."""
        return float(_VERT_Z[VERTEBRAE.index(name)] * self.height)

    def diaphragm_z(self, x, y) -> np.ndarray:
        """z of the diaphragm surface under each (x, y): two domes, deep posterior recesses."""
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.float32)
        zmid = self.level("T10")
        wc = float(self.profile("cavity_w", zmid))
        ya = float(self.profile("cavity_ya", zmid))
        yp = float(self.profile("cavity_yp", zmid))
        yc = 0.5 * (ya + yp) + 10
        dc = 0.5 * (ya - yp)
        v = (y - yc) / dc
        side_left = x > 0
        top = np.where(side_left, self.dome_left, self.dome_right)
        u = (x - np.where(side_left, 0.45, -0.45) * wc) / wc
        drop = 55 * u * u + 75 * np.maximum(-v, 0) ** 2 + 20 * np.maximum(v, 0) ** 2
        # central tendon: the domes meet in a saddle under the heart
        saddle = 18 * np.exp(-((x / (0.25 * wc)) ** 2))
        return (top - drop - saddle).astype(np.float32)

    def body_scale(self) -> float:
        return 0.5 * (self.width + self.depth)


def draw_subject(seed: int) -> Subject:
    """Draw a subject's build from its seed."""
    rng = np.random.default_rng([seed, 1])
    height = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    width = float(np.clip(rng.normal(1.0, 0.07), 0.84, 1.18))
    depth = float(np.clip(rng.normal(1.0, 0.07), 0.84, 1.18))
    fat = float(np.clip(rng.lognormal(np.log(16), 0.45), 5, 45))
    belly = float(np.clip(rng.gamma(1.5, 8.0) * fat / 16, 0, 60))
    jitter = {
        name: np.clip(1 + np.convolve(rng.normal(0, 0.035, len(_Z) + 2), [0.25, 0.5, 0.25], "valid"),
                      0.9, 1.1)
        for name in ("muscle_w", "muscle_ya", "muscle_yp")
    }
    return Subject(
        seed=int(seed),
        height=height,
        width=width,
        depth=depth,
        fat_mm=fat,
        belly_mm=belly,
        age=float(rng.uniform(20, 85)),
        dome_right=float((400 + rng.normal(0, 12)) * height),
        dome_left=float((386 + rng.normal(0, 12)) * height),
        lung_apex=float((622 + rng.normal(0, 8)) * height),
        profile_jitter=jitter,
    )
