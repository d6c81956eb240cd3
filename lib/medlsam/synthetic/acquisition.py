"""Acquisition: presets, scan ranges, NIfTI orientations, and how a study is scanned
(grid, patient pose, contrast phase, blur, noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .intensities import PHASE_WEIGHTS, PHASES
from .shapes import rotation
from .subject import Subject


@dataclass(frozen=True)
class Preset:
    name: str
    in_plane_size: int  # voxels along x and y
    spacing_limits: tuple[float, float]  # in-plane mm; the field of view is fitted to the body
    thicknesses: tuple[float, ...]  # slice thickness (= spacing) choices, mm
    thickness_weights: tuple[float, ...]
    max_slices: int  # drawn thicknesses that would need more slices are skipped (time bound)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 96, (3.6, 5.6), (5.0, 6.0, 7.0, 8.0), (0.3, 0.3, 0.2, 0.2), 200),
    "default": Preset(
        "default", 256, (1.25, 2.0),
        (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.75, 4.0, 5.0),
        (0.03, 0.02, 0.05, 0.12, 0.15, 0.2, 0.13, 0.15, 0.15),
        360,
    ),
}

SCAN_RANGES = ("chest_abdomen_pelvis", "thorax", "abdomen")
SCAN_RANGE_WEIGHTS = (0.5, 0.25, 0.25)
# orientations drawn when none is given: the common axial layouts and their flips
DRAWN_ORIENTATIONS = ("LPS", "RAS", "LAS", "RPS", "LPI", "RAI", "LAI", "RPI")
DRAWN_ORIENTATION_WEIGHTS = (0.3, 0.2, 0.2, 0.06, 0.06, 0.06, 0.06, 0.06)

# anatomical frame (x patient left, y anterior, z superior) -> world RAS+ (x right, y anterior, z superior)
ANAT_TO_RAS = np.diag([-1.0, 1.0, 1.0])

_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def check_orientation(code: str) -> str:
    """Validate a NIfTI axis-code string like 'RAS' or 'LPS' (or permuted, 'SAR'); return it
    upper-cased."""
    if not isinstance(code, str) or len(code) != 3:
        raise ValueError(f"orientation must be three axis codes such as 'RAS' or 'LPS', got {code!r}")
    up = code.upper()
    if any(c not in "LRAPSI" for c in up) or any(len(set(up) & pair) != 1 for pair in _AXIS_PAIRS):
        raise ValueError(
            f"orientation {code!r} is not valid: use one letter from each of L/R, A/P and S/I, "
            "e.g. 'RAS', 'LPS', 'LAS', 'RPI'"
        )
    return up


def check_scan_range(name: str) -> str:
    if name not in SCAN_RANGES:
        raise ValueError(f"unknown scan range {name!r}; choose one of {', '.join(SCAN_RANGES)}")
    return name


def check_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class Acquisition:
    preset: str
    scan_range: str
    orientation: str
    phase: str
    in_plane_spacing: float
    slice_thickness: float
    in_plane_size: int
    z_range: tuple[float, float]  # anatomical z covered (mm)
    rotation: np.ndarray  # patient pose: world = rotation @ anat + translation (includes the x mirror)
    translation: np.ndarray
    fov_center_anat: np.ndarray  # anatomical point at the centre of the field of view (x, y)
    noise_std: float
    blur_sigma_vox: float
    fov_circle: bool


def scan_z_range(s: Subject, scan_range: str, rng: np.random.Generator) -> tuple[float, float]:
    """Anatomical z extent of a scan range for this subject (with protocol variation)."""
    top_chest = s.lung_apex + rng.uniform(15, 35)
    if scan_range == "chest_abdomen_pelvis":
        return -rng.uniform(15, 45) * s.height, top_chest
    if scan_range == "thorax":
        return s.level("L1") + rng.uniform(0, 25) * s.height, top_chest
    return s.level("L4") - rng.uniform(0, 25) * s.height, s.dome_right + rng.uniform(12, 30)


def draw_acquisition(s: Subject, seed: int, preset: Preset, scan_range: str | None,
                     orientation: str | None, in_plane_spacing: float | None = None,
                     slice_thickness: float | None = None, phase: str | None = None,
                     noise_std: float | None = None) -> Acquisition:
    """Draw how this study was acquired; every choice comes from its own random stream so that
    overriding one (e.g. the orientation) leaves the others, and the anatomy, unchanged."""

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng([seed, 7, k])

    if scan_range is None:
        scan_range = str(stream(1).choice(SCAN_RANGES, p=SCAN_RANGE_WEIGHTS))
    check_scan_range(scan_range)
    if orientation is None:
        orientation = str(stream(2).choice(DRAWN_ORIENTATIONS, p=DRAWN_ORIENTATION_WEIGHTS))
    orientation = check_orientation(orientation)
    if phase is None:
        phase = str(stream(3).choice(PHASES, p=PHASE_WEIGHTS))
    if phase not in PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}; choose one of {', '.join(PHASES)}")
    z_range = scan_z_range(s, scan_range, stream(6))
    if slice_thickness is None:
        length = z_range[1] - z_range[0]
        fits = [t for t in preset.thicknesses if length / t <= preset.max_slices] or [max(preset.thicknesses)]
        weights = np.array([w for t, w in zip(preset.thicknesses, preset.thickness_weights) if t in fits])
        slice_thickness = float(stream(4).choice(fits, p=weights / weights.sum()))
    if not (0.3 <= float(slice_thickness) <= 20):
        raise ValueError(f"slice thickness must be between 0.3 and 20 mm, got {slice_thickness}")
    rng = stream(5)
    half_width = (170 * s.width + s.fat_mm + 0.3 * s.belly_mm)
    if in_plane_spacing is None:
        fov = 2 * half_width * rng.uniform(1.08, 1.25)
        lo, hi = preset.spacing_limits
        in_plane_spacing = float(np.clip(fov / preset.in_plane_size, lo, hi))
    else:
        rng.uniform()
    if not (0.2 <= float(in_plane_spacing) <= 20):
        raise ValueError(f"in-plane spacing must be between 0.2 and 20 mm, got {in_plane_spacing}")
    # Anatomical x points to the patient's left, world RAS+ x to the patient's right: mirror x.
    rot = rotation(yaw_deg=float(np.clip(rng.normal(0, 2.0), -6, 6))) @ ANAT_TO_RAS
    translation = np.array([rng.uniform(-60, 60), rng.uniform(-80, 40), rng.uniform(-1400, -300)])
    fov_center = np.array([rng.normal(0, 8), 10 * s.depth + rng.normal(0, 8)])
    if noise_std is None:
        noise_std = float(rng.uniform(5, 25))
    else:
        rng.uniform()
    if not (0 <= float(noise_std) <= 200):
        raise ValueError(f"noise std must be between 0 and 200 HU, got {noise_std}")
    return Acquisition(
        preset=preset.name,
        scan_range=scan_range,
        orientation=orientation,
        phase=phase,
        in_plane_spacing=float(in_plane_spacing),
        slice_thickness=float(slice_thickness),
        in_plane_size=preset.in_plane_size,
        z_range=z_range,
        rotation=rot,
        translation=translation,
        fov_center_anat=fov_center,
        noise_std=float(noise_std),
        blur_sigma_vox=float(rng.uniform(0.35, 0.65)),
        fov_circle=bool(rng.random() < 0.3),
    )


def grid_for(acq: Acquisition):
    """Canonical (RAS) grid shape, spacing and origin covering the scan."""
    n = acq.in_plane_size
    sxy, sz = acq.in_plane_spacing, acq.slice_thickness
    z0, z1 = acq.z_range
    nz = max(2, int(round((z1 - z0) / sz)) + 1)
    center_anat = np.array([acq.fov_center_anat[0], acq.fov_center_anat[1], 0.5 * (z0 + z1)])
    center_world = acq.rotation @ center_anat + acq.translation
    origin = np.array([
        center_world[0] - sxy * (n - 1) / 2,
        center_world[1] - sxy * (n - 1) / 2,
        center_world[2] - sz * (nz - 1) / 2,
    ])
    return (n, n, nz), np.array([sxy, sxy, sz]), origin


def _filtered_noise_std(sigma: float) -> float:
    """Std of unit white noise after the in-plane Gaussian used for noise texture."""
    impulse = np.zeros((15, 15, 1))
    impulse[7, 7, 0] = 1
    kernel = ndimage.gaussian_filter(impulse, (sigma, sigma, 0), truncate=2.5)
    return float(np.sqrt((kernel**2).sum()))


def finish_image(image: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Scanner blur, correlated quantum noise, optional reconstruction circle; int16 HU."""
    s = acq.blur_sigma_vox
    img = ndimage.gaussian_filter(image, (s, s, 0.35 * min(1.0, 3.0 / acq.slice_thickness) + 0.15),
                                  truncate=2.5)
    if acq.noise_std > 0:
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, (0.6, 0.6, 0), truncate=2.5)
        noise *= np.float32(acq.noise_std / _filtered_noise_std(0.6))
        img += noise
    if acq.fov_circle:
        n = image.shape[0]
        r = (np.arange(n) - (n - 1) / 2) / (n / 2)
        outside = (r[:, None] ** 2 + r[None, :] ** 2) > 1.0
        img[outside] = -1024
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
