"""generate_study: one synthetic CT study (image + label + metadata) from a seed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform

from .acquisition import draw_acquisition, finish_image, grid_for, check_preset
from .anatomy.body import fat_thickness
from .anatomy.build import paint_subject
from .canvas import Canvas
from .intensities import TissueHU
from .labels import ID_TO_NAME, LABEL_MAP
from .subject import draw_subject

GENERATOR_VERSION = 3  # 3: vertebral bodies labelled and bone-bright (2 left them as disc)


@dataclass
class Study:
    image: nib.Nifti1Image  # int16 HU
    label: nib.Nifti1Image  # uint8 organ ids (LABEL_MAP), same grid
    meta: dict = field(default_factory=dict)

    @property
    def labels(self) -> nib.Nifti1Image:
        """Alias of `label`."""
        return self.label


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _table_top(s, acq) -> tuple[float, float]:
    """World y of the table top (just under the patient's most posterior point) and its centre x."""
    z = np.linspace(*acq.z_range, 60)
    y = s.profile("muscle_yp", z) - fat_thickness(s, np.zeros_like(z), s.profile("muscle_yp", z), z)
    pts = np.stack([np.zeros_like(z), y, z], axis=1)
    world = pts @ acq.rotation.T + acq.translation
    # the back rests on the table along most of its length; what lies deeper is pressed flat
    return float(np.percentile(world[:, 1], 65)), float(acq.translation[0])


def generate_study(seed: int, preset: str = "default", scan_range: str | None = None,
                   orientation: str | None = None, *, in_plane_spacing: float | None = None,
                   slice_thickness: float | None = None, phase: str | None = None,
                   noise_std: float | None = None) -> Study:
    """Generate one synthetic CT study.

    The subject (anatomy) depends only on `seed`; acquisition choices left as None are drawn
    from the seed too, each independently, so overriding one changes nothing else. `orientation`
    is a NIfTI axis-code string ('RAS', 'LPS', ...); the affine maps voxels to world RAS mm.
    """
    t0 = time.perf_counter()
    seed = _check_seed(seed)
    pre = check_preset(preset)
    subject = draw_subject(seed)
    acq = draw_acquisition(subject, seed, pre, scan_range, orientation, in_plane_spacing,
                           slice_thickness, phase, noise_std)
    shape, spacing, origin = grid_for(acq)
    canvas = Canvas(shape, spacing, origin, acq.rotation, acq.translation,
                    np.random.default_rng([seed, 11]))
    hu = TissueHU(acq.phase, np.random.default_rng([seed, 12]))
    table_y, table_x = _table_top(subject, acq)
    paint_subject(canvas, subject, hu, table_y, table_x)
    image = finish_image(canvas.image, acq, np.random.default_rng([seed, 13]))
    label = canvas.label

    img = nib.Nifti1Image(image, canvas.affine)
    lab = nib.Nifti1Image(label, canvas.affine)
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(acq.orientation)))
    img = img.as_reoriented(transform)
    lab = lab.as_reoriented(transform)
    for im, dtype in ((img, np.int16), (lab, np.uint8)):
        im.set_data_dtype(dtype)
        im.set_qform(im.affine, code=1)
        im.set_sform(im.affine, code=1)
        im.header.set_xyzt_units("mm")
    img.header["descrip"] = b"medlsam synthetic CT (HU)"

    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(label.ravel(), minlength=max(LABEL_MAP.values()) + 1)
    organs = {ID_TO_NAME[i]: {"voxels": int(c), "volume_ml": round(c * voxel_ml, 2)}
              for i, c in enumerate(counts) if i in ID_TO_NAME and c > 0}
    meta = {
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "preset": pre.name,
        "scan_range": acq.scan_range,
        "orientation": acq.orientation,
        "phase": acq.phase,
        "shape": [int(n) for n in img.shape],
        "spacing": [float(v) for v in img.header.get_zooms()[:3]],
        "in_plane_spacing": acq.in_plane_spacing,
        "slice_thickness": acq.slice_thickness,
        "noise_std": acq.noise_std,
        "organs_present": sorted(organs),
        "organs": organs,
        "subject": {
            "height_scale": subject.height, "width_scale": subject.width, "depth_scale": subject.depth,
            "subcutaneous_fat_mm": subject.fat_mm, "age": subject.age,
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Study(image=img, label=lab, meta=meta)
