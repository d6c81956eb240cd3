"""A support study prepared once for registration: coarse image, cropped label, organ volumes.

Saved as one compressed .npz per support (atomic write) so a template store can keep them and a
query never re-reads or re-resamples a support's full-resolution files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medlsam.errors import InputError
from medlsam.io import atomic_path
from medlsam.medlam.templates import check_label

from .preprocessing import Grid, PreparedImage, nifti_to_sitk, prepare_ct, resample_to
from .registration import RegistrationSettings

FORMAT = "medlsam-registration-atlas"
VERSION = 2  # 2: slice descriptors
LABEL_MARGIN_MM = 10.0


def atlas_key(settings: RegistrationSettings, label_spacing_mm: float) -> dict:
    """What a prepared support depends on: a cached one made otherwise must be rebuilt."""
    return {**settings.cache_key(), "label_spacing_mm": float(label_spacing_mm), "version": VERSION}


@dataclass
class SupportAtlas:
    """One support study: its prepared registration image and its organ label on an LPS grid."""

    study_id: str
    prepared: PreparedImage
    label: sitk.Image  # uint8 organ ids, axis-aligned LPS grid cropped around the organs
    label_ids: dict[str, int]  # the organs this label holds
    volumes_mm3: dict[str, float]  # per organ, measured on the support's own voxels
    settings_key: dict  # see `atlas_key`

    @property
    def organs(self) -> list[str]:
        return list(self.label_ids)

    def organ_box_lps(self, organ: str) -> tuple[np.ndarray, np.ndarray]:
        """LPS box covering the organ's voxels on the support's label grid."""
        if not hasattr(self, "_boxes"):
            found = ndimage.find_objects(sitk.GetArrayViewFromImage(self.label))
            self._boxes = {i + 1: f for i, f in enumerate(found) if f is not None}
        zyx = self._boxes[self.label_ids[organ]]
        grid = Grid.of(self.label)
        lo = grid.origin + np.array([s.start for s in zyx])[::-1] * grid.spacing - grid.spacing / 2
        hi = grid.origin + (np.array([s.stop for s in zyx])[::-1] - 1) * grid.spacing + grid.spacing / 2
        return lo, hi

    @classmethod
    def build(cls, study_id: str, image: nib.Nifti1Image, label: nib.Nifti1Image | np.ndarray,
              label_ids: dict[str, int], settings: RegistrationSettings, label_spacing_mm: float = 2.0,
              organs: list[str] | None = None) -> "SupportAtlas":
        """Prepare a support: validate its label, make the coarse image, crop and resample the label."""
        data = np.asanyarray(label.dataobj) if isinstance(label, nib.Nifti1Image) else np.asarray(label)
        present = check_label(data, image.shape, label_ids, name=f"label of {study_id}")
        by_id = {v: k for k, v in label_ids.items()}
        held = {by_id[int(i)]: int(i) for i in present if organs is None or by_id[int(i)] in organs}
        if not held:
            raise InputError(f"label of {study_id} holds none of the requested organs {organs}")
        voxel_mm3 = float(abs(np.linalg.det(image.affine[:3, :3])))
        counts = np.bincount(data.ravel().astype(np.int64), minlength=max(held.values()) + 1)
        volumes = {name: float(counts[i]) * voxel_mm3 for name, i in held.items()}

        keep = np.isin(data, list(held.values()))
        lab = np.where(keep, data, 0).astype(np.uint8)
        native = nifti_to_sitk(nib.Nifti1Image(lab, image.affine), dtype=np.uint8)
        idx = np.argwhere(keep)
        lo_ijk, hi_ijk = idx.min(axis=0), idx.max(axis=0)
        corners = np.array(np.meshgrid(*zip(lo_ijk, hi_ijk), indexing="ij")).reshape(3, -1).T
        lps = np.array([native.TransformContinuousIndexToPhysicalPoint(c.astype(float).tolist()) for c in corners])
        spacing = np.asarray(native.GetSpacing())
        lo, hi = lps.min(axis=0) - LABEL_MARGIN_MM, lps.max(axis=0) + LABEL_MARGIN_MM
        grid = Grid.covering(lo, hi, min(label_spacing_mm, float(spacing.max())))
        label_img = resample_to(native, grid, sitk.sitkNearestNeighbor, 0, pixel_type=sitk.sitkUInt8)
        prepared = prepare_ct(image, settings.spacing_mm, settings.clamp_hu, name=f"support {study_id}")
        return cls(study_id, prepared, label_img, held, volumes, atlas_key(settings, label_spacing_mm))

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        meta = {"format": FORMAT, "version": VERSION, "study_id": self.study_id, "label_ids": self.label_ids,
                "volumes_mm3": self.volumes_mm3, "settings_key": self.settings_key,
                "grid": self.prepared.grid.to_dict(), "label_grid": Grid.of(self.label).to_dict()}
        arrays = self.prepared.arrays()
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                                    image=arrays["image"], body=arrays["body"], slices=self.prepared.slices,
                                    label=sitk.GetArrayFromImage(self.label))

    @classmethod
    def load(cls, path: str | Path, expected_key: dict | None = None) -> "SupportAtlas":
        """Read a saved support; refuse one prepared with other settings than `expected_key`
        (from `atlas_key`)."""
        path = Path(path)
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = {k: z[k] for k in ("image", "body", "slices", "label")}
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is not a readable registration atlas: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path} is not a registration atlas of format version {VERSION}")
        if expected_key is not None and meta["settings_key"] != expected_key:
            raise ValueError(f"{path} was prepared with {meta['settings_key']}, not {expected_key}")
        prepared = PreparedImage.from_dict({**arrays, "grid": meta["grid"]})
        label_grid = Grid.from_dict(meta["label_grid"])
        label = sitk.GetImageFromArray(arrays["label"].astype(np.uint8))
        label.SetOrigin(label_grid.origin.tolist())
        label.SetSpacing(label_grid.spacing.tolist())
        return cls(meta["study_id"], prepared, label, {k: int(v) for k, v in meta["label_ids"].items()},
                   {k: float(v) for k, v in meta["volumes_mm3"].items()}, meta["settings_key"])
