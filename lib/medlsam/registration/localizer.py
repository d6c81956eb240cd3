"""Localization by registration: every support is registered to the query, its organ labels are warped
onto the query, and the supports are fused per organ into boxes, SPL part boxes, presence and a
confidence. Needs no trained weights, only the annotated supports."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medlsam.medlam.templates import EXTREME_POINTS, extreme_points, spl_parts

from .atlas import SupportAtlas
from .fusion import FusedOrgan, fuse_organ, organ_boxes
from .mapping import QueryFrame, box_lps, query_label_grid, voxels_to_lps, warp_image, warp_label
from .preprocessing import AIR_HU, Grid, nifti_to_sitk, prepare_ct
from .registration import RegistrationSettings, register

logger = logging.getLogger(__name__)


@dataclass
class RegistrationLocalizerSettings:
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    label_spacing_mm: float = 2.0  # grid the supports' labels are kept on
    query_label_spacing_mm: float = 2.0  # grid the labels are warped onto in the query
    fusion: str = "vote"  # "vote" (majority of warped masks) or "median" (of the support boxes)
    vote_fraction: float = 0.5
    # presence: the fused organ must hold this fraction of the volume the supports expect, and at
    # least half of the supports must map some of the organ into the query
    min_fraction_inside: float = 0.2
    spl_interval_mm: float = 40.0
    threads: int | None = None  # SimpleITK threads (None: leave the global setting alone)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


class RegistrationLocalizer:
    """Localizes organs of a query study by registering annotated supports to it."""

    def __init__(self, supports: list[SupportAtlas], settings: RegistrationLocalizerSettings | None = None,
                 label_ids: dict[str, int] | None = None):
        self.supports = list(supports)
        self.settings = settings or RegistrationLocalizerSettings()
        ids: dict[str, int] = {}
        for s in self.supports:
            ids.update(s.label_ids)
        self.label_ids = dict(label_ids) if label_ids else ids
        self.last_timings: dict[str, float] = {}
        self.last_registrations: dict[str, dict] = {}  # per support: overlap, metric values (diagnostics)

    @property
    def organs(self) -> list[str]:
        held = {o for s in self.supports for o in s.label_ids}
        return sorted(held, key=lambda n: self.label_ids.get(n, 0))

    def _resolve_organs(self, organs) -> list[str]:
        if not organs:
            if not self.organs:
                raise ValueError("no supports yet: save a final label for at least one study first")
            return self.organs
        by_id = {v: k for k, v in self.label_ids.items()}
        names = []
        for organ in organs:
            key = str(organ)
            name = by_id.get(int(key)) if key.isdigit() else key
            if name is None or name not in self.organs:
                raise ValueError(f"organ {organ!r} has no support "
                                 f"(organs with supports: {', '.join(self.organs) or 'none'})")
            names.append(name)
        return list(dict.fromkeys(names))

    def localize(self, image: nib.Nifti1Image, organs=None, mode: str = "WPL", seed: int = 0,
                 name: str = "image") -> dict:
        """Localize `organs` (names or ids; default every organ a support holds) in `image`.

        Returns {"mode", "organs": {name: {...}}}: inclusive boxes in the study's voxel indices and
        world RAS mm, SPL part boxes, presence with a reason, confidence.
        """
        mode = mode.upper()
        if mode not in ("WPL", "SPL"):
            raise ValueError(f"mode must be 'WPL' or 'SPL', got {mode!r}")
        names = self._resolve_organs(organs)
        s = self.settings
        if s.threads:
            sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(int(s.threads))
        reg = RegistrationSettings(**{**s.registration.__dict__, "seed": int(seed)})
        timings = {}
        t0 = time.perf_counter()
        native = nifti_to_sitk(image)
        query = prepare_ct(native, reg.spacing_mm, reg.clamp_hu, name=name)
        label_grid = query_label_grid(native, s.query_label_spacing_mm)
        del native
        frame = QueryFrame(image)
        timings["prepare_s"] = time.perf_counter() - t0

        wanted = set(names)
        used = [a for a in self.supports if wanted & set(a.label_ids)]
        self.last_registrations = {}
        warped, boxes, volume_scale, similarity_maps = {}, {}, {}, {}
        query_array = sitk.GetArrayFromImage(query.image)
        t1 = time.perf_counter()
        for atlas in used:
            result = register(query, atlas.prepared, reg)
            self.last_registrations[atlas.study_id] = {
                "overlap_z_lps_mm": [round(v, 1) for v in result.overlap_mm],
                "z_offset_mm": round(result.z_offset_mm, 1),
                "metric": {k: round(v, 4) for k, v in result.metric.items()}}
            warped[atlas.study_id] = warp_label(atlas.label, label_grid, result.transform)
            boxes[atlas.study_id] = organ_boxes(warped[atlas.study_id])
            matrix = np.asarray(result.affine.GetMatrix()).reshape(3, 3)
            volume_scale[atlas.study_id] = abs(float(np.linalg.det(matrix)))
            similarity_maps[atlas.study_id] = warp_image(atlas.prepared.image, query.grid, result.transform, AIR_HU)
        timings["register_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        voxel_mm3 = float(np.prod(label_grid.spacing))
        out = {"mode": mode, "organs": {}}
        for organ in names:
            holders = [a for a in used if organ in a.label_ids]
            fused = fuse_organ(
                [warped[a.study_id] for a in holders], [boxes[a.study_id] for a in holders], self.label_ids[organ],
                [a.volumes_mm3[organ] / volume_scale[a.study_id] for a in holders], voxel_mm3,
                s.fusion, s.vote_fraction,
            )
            sims = [self._local_similarity(query_array, similarity_maps[a.study_id], query.grid, label_grid, fused)
                    for a in holders]
            out["organs"][organ] = self._organ_result(organ, fused, label_grid, frame, mode, float(np.mean(sims)))
        timings["fuse_s"] = time.perf_counter() - t2
        self.last_timings = {k: round(v, 3) for k, v in timings.items()}
        return out

    @staticmethod
    def _local_similarity(query: np.ndarray, warped: np.ndarray, grid: Grid, label_grid: Grid,
                          fused: FusedOrgan) -> float:
        """Correlation of the query with a warped support around the organ (20 mm margin)."""
        if fused.box is None:
            return 0.0
        lo, hi = box_lps(label_grid, *fused.box)
        a = np.floor((lo - 20.0 - grid.origin) / grid.spacing).astype(int)[::-1]
        b = np.ceil((hi + 20.0 - grid.origin) / grid.spacing).astype(int)[::-1]
        a = np.clip(a, 0, np.array(query.shape) - 1)
        b = np.clip(b + 1, 1, np.array(query.shape))
        region = tuple(slice(x, y) for x, y in zip(a, b))
        return _ncc(query[region], warped[region])

    def _organ_result(self, organ: str, fused: FusedOrgan, grid: Grid, frame: QueryFrame, mode: str,
                      similarity: float) -> dict:
        s = self.settings
        reasons = []
        needed = max(1, int(np.ceil(s.vote_fraction * fused.n_supports - 1e-9)))
        if fused.box is None:
            reasons.append("no support maps this organ into the scan")
        else:
            if fused.n_found < needed:
                reasons.append(f"only {fused.n_found} of {fused.n_supports} supports map this organ into the scan")
            if fused.fraction_inside < s.min_fraction_inside:
                reasons.append(f"only {fused.fraction_inside:.0%} of the organ's expected volume lies inside the scan")
        entry = {
            "id": self.label_ids[organ],
            "present": not reasons,
            "absent_reason": "; ".join(reasons) or None,
            "confidence": round(float(fused.agreement * max(0.0, similarity)), 4),
            "agreement": round(fused.agreement, 4),
            "similarity": round(similarity, 4),
            "fraction_inside": round(fused.fraction_inside, 4),
            "n_supports": fused.n_supports,
            "box_voxel": None, "box_world": None,
            "extreme_points_voxel": None, "extreme_points_world": None,
            "parts": [],
        }
        if fused.box is None:
            return entry
        lo, hi = box_lps(grid, *fused.box)
        entry["box_voxel"] = frame.voxel_box(lo, hi)
        entry["box_world"] = frame.world_box(lo, hi)
        idx = np.argwhere(fused.mask) + fused.offset  # (z, y, x) on the label grid
        lps = voxels_to_lps(grid, idx)
        # extreme points in (z, y, x) order of LPS coordinates, as the MedLAM templates use
        ext_zyx = extreme_points(lps[:, ::-1])
        ext_lps = ext_zyx[:, ::-1]
        entry["extreme_points_voxel"] = {k: np.round(p, 2).tolist() for k, p in zip(EXTREME_POINTS, frame.to_voxel(ext_lps))}
        entry["extreme_points_world"] = {k: np.round(p * [-1, -1, 1], 2).tolist() for k, p in zip(EXTREME_POINTS, ext_lps)}
        if mode == "SPL":
            for part in spl_parts(lps[:, ::-1], 1.0, s.spl_interval_mm):
                plo = part.min(axis=0)[::-1] - grid.spacing / 2
                phi = part.max(axis=0)[::-1] + grid.spacing / 2
                entry["parts"].append({"box_voxel": frame.voxel_box(plo, phi), "box_world": frame.world_box(plo, phi)})
        return entry
