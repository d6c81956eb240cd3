"""Support templates: per-organ extreme-point latents and MSS feature windows.

Each annotated *support* study contributes, for every organ its label contains, the MedLAM
latent coordinates and normalised feature windows of patches centred on the organ's six extreme
points (WPL) and on the extreme points of its z sub-parts (SPL). A template averages those
contributions over the (at most `max_supports` most recent) supports that contain the organ, so
a support missing an organ simply does not vote for it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medlsam.errors import InputError
from medlsam.geometry import MedLAMGrid
from medlsam.io import atomic_path
from medlsam.localization import EXTREME_POINTS  # noqa: F401  (their order, used by extreme_points)
from medlsam.medlam.patches import PatchEmbedder, feature_windows, unique_centres

FORMAT = "medlsam-templates"
VERSION = 2  # 2: intensity windows
DEFAULT_WINDOW_SIZES = (3, 3, 5)  # feature window per level (1/4, 1/2, full resolution)
MAX_SPL_PARTS = 6
INTENSITY_WINDOW_MM = 54.0  # intensity patch compared by normalised cross-correlation in the MSS search


class TemplateMismatchError(InputError):
    """Templates were computed with other MedLAM weights or settings."""


@dataclass
class PointSet:
    """Latents [P, 3], per-level feature windows [P, C, w, w, w] and intensity windows
    [P, 1, n, n, n] (zero mean, unit norm: for normalised cross-correlation) of P points."""

    latents: torch.Tensor
    windows: list[torch.Tensor]
    intensity: torch.Tensor

    def to_dict(self) -> dict:
        return {"latents": self.latents.float(), "windows": [w.half() for w in self.windows],
                "intensity": self.intensity.half()}

    @classmethod
    def from_dict(cls, d: dict) -> "PointSet":
        return cls(latents=d["latents"].float(), windows=[w.float() for w in d["windows"]],
                   intensity=d["intensity"].float())

    def subset(self, index) -> "PointSet":
        return PointSet(self.latents[index], [w[index] for w in self.windows], self.intensity[index])

    @staticmethod
    def concat(sets: list["PointSet"]) -> "PointSet":
        return PointSet(
            torch.cat([s.latents for s in sets]),
            [torch.cat([s.windows[level] for s in sets]) for level in range(len(sets[0].windows))],
            torch.cat([s.intensity for s in sets]),
        )


@dataclass
class SupportOrgan:
    """One support study's contribution to one organ."""

    study_id: str
    extent_mm: np.ndarray  # (3,) box size z, y, x
    wpl: PointSet  # 6 extreme points
    spl: list[PointSet]  # one 6-point set per z sub-part
    added_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {
            "study_id": self.study_id,
            "extent_mm": torch.as_tensor(self.extent_mm, dtype=torch.float32),
            "wpl": self.wpl.to_dict(),
            "spl": [p.to_dict() for p in self.spl],
            "added_at": float(self.added_at),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SupportOrgan":
        return cls(
            study_id=str(d["study_id"]),
            extent_mm=d["extent_mm"].numpy().astype(np.float64),
            wpl=PointSet.from_dict(d["wpl"]),
            spl=[PointSet.from_dict(p) for p in d["spl"]],
            added_at=float(d["added_at"]),
        )


@dataclass
class OrganTemplate:
    """The average over supports that a query is localised against."""

    name: str
    label_id: int
    n_supports: int
    extent_mm: np.ndarray
    wpl: PointSet
    spl: list[PointSet]


def _average(point_sets: list[PointSet]) -> PointSet:
    latents = torch.stack([p.latents for p in point_sets]).mean(0)
    windows = [
        F.normalize(torch.stack([p.windows[level] for p in point_sets]).mean(0), dim=1)
        for level in range(len(point_sets[0].windows))
    ]
    intensity = normalize_intensity(torch.stack([p.intensity for p in point_sets]).mean(0))
    return PointSet(latents=latents, windows=windows, intensity=intensity)


def normalize_intensity(windows: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit L2 norm per window [P, 1, n, n, n] (flat windows stay zero)."""
    centred = windows - windows.mean(dim=(1, 2, 3, 4), keepdim=True)
    return centred / centred.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None, None, None]


def intensity_window_size(spacing_mm, window_mm: float = INTENSITY_WINDOW_MM) -> int:
    """Odd number of grid voxels covering about `window_mm` (at the smallest spacing)."""
    n = int(round(window_mm / float(min(spacing_mm))))
    return max(3, n + (n + 1) % 2)


class TemplateSet:
    """Per-organ support contributions, tied to one set of MedLAM weights."""

    def __init__(self, weights_fingerprint: str, medlam_config: dict, window_sizes=DEFAULT_WINDOW_SIZES,
                 spl_interval_mm: float = 40.0, max_supports: int | None = None):
        self.weights_fingerprint = weights_fingerprint
        self.medlam_config = dict(medlam_config)
        self.window_sizes = tuple(int(w) for w in window_sizes)
        self.spl_interval_mm = float(spl_interval_mm)
        self.max_supports = max_supports
        self.label_ids: dict[str, int] = {}
        self.supports: dict[str, list[SupportOrgan]] = {}

    # --- content ---------------------------------------------------------------------------
    def add(self, contributions: dict[str, SupportOrgan], label_ids: dict[str, int]) -> None:
        """Add one support study's organs; a study already present is replaced organ by organ."""
        for name, contribution in contributions.items():
            entries = [s for s in self.supports.get(name, []) if s.study_id != contribution.study_id]
            entries.append(contribution)
            entries.sort(key=lambda s: s.added_at)
            if self.max_supports:
                entries = entries[-self.max_supports :]
            self.supports[name] = entries
            self.label_ids[name] = int(label_ids[name])

    def remove_study(self, study_id: str) -> None:
        for name in list(self.supports):
            self.supports[name] = [s for s in self.supports[name] if s.study_id != study_id]
            if not self.supports[name]:
                del self.supports[name], self.label_ids[name]

    @property
    def organs(self) -> list[str]:
        return sorted(self.supports, key=lambda n: self.label_ids[n])

    def template(self, name: str) -> OrganTemplate:
        """The averaged template of one organ; KeyError-free: raises ValueError naming the organ."""
        entries = self.supports.get(name)
        if not entries:
            known = ", ".join(self.organs) or "none"
            raise InputError(f"organ {name!r} has no support template (organs with templates: {known})")
        # SPL parts only average between supports that split the organ into the same number of parts.
        n_parts = Counter(len(s.spl) for s in entries).most_common(1)[0][0]
        spl_entries = [s for s in entries if len(s.spl) == n_parts]
        return OrganTemplate(
            name=name,
            label_id=self.label_ids[name],
            n_supports=len(entries),
            extent_mm=np.mean([s.extent_mm for s in entries], axis=0),
            wpl=_average([s.wpl for s in entries]),
            spl=[_average([s.spl[k] for s in spl_entries]) for k in range(n_parts)],
        )

    def summary(self) -> dict[str, dict]:
        """Which organs have templates, from how many and which supports."""
        return {
            name: {
                "label_id": self.label_ids[name],
                "supports": len(self.supports[name]),
                "study_ids": [s.study_id for s in self.supports[name]],
            }
            for name in self.organs
        }

    # --- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write atomically to one versioned file."""
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "weights_fingerprint": self.weights_fingerprint,
            "medlam_config": self.medlam_config,
            "window_sizes": list(self.window_sizes),
            "spl_interval_mm": self.spl_interval_mm,
            "label_ids": dict(self.label_ids),
            "supports": {name: [s.to_dict() for s in entries] for name, entries in self.supports.items()},
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None,
             max_supports: int | None = None) -> "TemplateSet":
        """Read a template file; refuse one made with other MedLAM weights than `expected_fingerprint`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"template file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable MedLSAM template file: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a MedLSAM template file")
        if payload.get("version") != VERSION:
            raise ValueError(f"{path} has template format version {payload.get('version')}, expected {VERSION}")
        if expected_fingerprint and payload["weights_fingerprint"] != expected_fingerprint:
            raise TemplateMismatchError(
                f"templates in {path} were computed with other MedLAM weights "
                f"({payload['weights_fingerprint'][:12]}...) than the loaded ones ({expected_fingerprint[:12]}...); "
                "rebuild them from the support studies with the current weights"
            )
        out = cls(payload["weights_fingerprint"], payload["medlam_config"], payload["window_sizes"],
                  payload["spl_interval_mm"], max_supports=max_supports)
        out.label_ids = {k: int(v) for k, v in payload["label_ids"].items()}
        out.supports = {k: [SupportOrgan.from_dict(s) for s in v] for k, v in payload["supports"].items()}
        if max_supports:
            out.supports = {k: v[-max_supports:] for k, v in out.supports.items()}
        return out


# --- computing a support's contribution -------------------------------------------------------
def extreme_points(points_zyx: np.ndarray) -> np.ndarray:
    """Six extreme points [z_min, z_max, y_min, y_max, x_min, x_max] of a point cloud (6, 3).

    Each is the centroid of the points on the extreme plane, so it lies on the organ.
    """
    out = np.empty((6, 3))
    for axis in range(3):
        values = points_zyx[:, axis]
        for k, extreme in enumerate((values.min(), values.max())):
            out[2 * axis + k] = points_zyx[np.abs(values - extreme) < 1e-6].mean(axis=0)
    return out


def spl_parts(points_zyx: np.ndarray, spacing_z_mm: float, interval_mm: float) -> list[np.ndarray]:
    """Split an organ along z into up to 6 parts at least `interval_mm` thick; 6 extreme points each."""
    z = points_zyx[:, 0]
    extent = (z.max() - z.min()) * spacing_z_mm
    n_parts = int(np.clip(np.floor(extent / interval_mm), 1, MAX_SPL_PARTS))
    edges = np.linspace(z.min(), z.max(), n_parts + 1)
    parts, last = [], None
    for k in range(n_parts):
        upper = z <= edges[k + 1] + 1e-6 if k == n_parts - 1 else z < edges[k + 1]
        members = points_zyx[(z >= edges[k] - 1e-6) & upper]
        last = extreme_points(members) if len(members) else last
        parts.append(last if last is not None else extreme_points(points_zyx))
    return parts


def check_label(label: np.ndarray, image_shape, label_ids: dict[str, int], name: str = "label") -> np.ndarray:
    """Validate a support label against its image and the label map; return the ids it holds."""
    if tuple(label.shape) != tuple(image_shape):
        raise InputError(f"{name} has shape {tuple(label.shape)} but its image has shape {tuple(image_shape)}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.allclose(label, np.rint(label)):
            raise InputError(f"{name} must hold integer label ids")
    present = np.unique(label).astype(int)
    present = present[present != 0]
    if present.size == 0:
        raise InputError(f"{name} has no foreground: nothing to learn a template from")
    unknown = sorted(set(present.tolist()) - set(label_ids.values()))
    if unknown:
        raise InputError(f"{name} contains label ids {unknown} that are not in the label map {label_ids}")
    return present


def organ_voxels(label: np.ndarray, ids: list[int]) -> dict[int, np.ndarray]:
    """Voxel indices [N, 3] (float64) of each label id, searched only inside its bounding box."""
    if not ids:
        return {}
    if not np.issubdtype(label.dtype, np.integer):
        label = np.rint(label).astype(np.int64)
    boxes = ndimage.find_objects(label, max_label=max(ids))
    out = {}
    for i in ids:
        box = boxes[i - 1]
        offset = [s.start for s in box]
        out[i] = (np.argwhere(label[box] == i) + offset).astype(np.float64)
    return out


def embed_points(embedder: PatchEmbedder, array: np.ndarray, points_zyx: np.ndarray, window_sizes
                 ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Latents [N, 3], feature windows (per level [N, C, w, w, w]) and normalised intensity windows
    [N, 1, n, n, n] of the patches centred on `points_zyx`.

    Streams the patches batch by batch and keeps only the windows, so memory does not grow with
    the number of points beyond the windows themselves; points sharing a patch centre share a pass.
    """
    config = embedder.net.config
    centres, inverse = unique_centres(points_zyx)
    n = intensity_window_size(config.spacing_mm)
    lo = np.asarray(config.patch_size) // 2 - n // 2
    latents = torch.zeros((len(centres), 3))
    windows: list[torch.Tensor] | None = None
    intensity = torch.zeros((len(centres), 1, n, n, n))
    for batch in embedder.batches(array, centres, features=True):
        cut = [w.cpu() for w in feature_windows(batch.features, window_sizes, config.patch_size)]
        if windows is None:
            windows = [torch.zeros((len(centres), *w.shape[1:])) for w in cut]
        for level, w in enumerate(cut):
            windows[level][batch.rows] = w
        latents[batch.rows] = batch.latent.cpu()
        intensity[batch.rows, 0] = batch.patches[:, lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n].cpu()
    index = torch.from_numpy(inverse)
    return latents[index], [w[index] for w in windows], normalize_intensity(intensity[index])


def compute_support(
    embedder: PatchEmbedder,
    image: nib.Nifti1Image,
    label: nib.Nifti1Image | np.ndarray,
    label_ids: dict[str, int],
    study_id: str,
    window_sizes=DEFAULT_WINDOW_SIZES,
    spl_interval_mm: float = 40.0,
    organs: list[str] | None = None,
) -> dict[str, SupportOrgan]:
    """Compute one support study's contribution for every organ of `label_ids` its label contains."""
    config = embedder.net.config
    grid = MedLAMGrid.from_nifti(image, config.spacing_mm, config.patch_size, name=f"support {study_id}")
    label_array = np.asanyarray(label.dataobj) if isinstance(label, nib.Nifti1Image) else np.asarray(label)
    present = check_label(label_array, image.shape, label_ids, name=f"label of {study_id}")
    by_id = {v: k for k, v in label_ids.items()}
    wanted = [by_id[i] for i in present if organs is None or by_id[i] in organs]

    point_groups: list[tuple[str, np.ndarray, np.ndarray, list[np.ndarray]]] = []
    voxels = organ_voxels(label_array, [label_ids[n] for n in wanted])
    for name in wanted:
        pts = grid.from_original(voxels[label_ids[name]])
        extent = (pts.max(0) - pts.min(0)) * grid.spacing_mm + grid.spacing_mm * np.minimum(grid.scale, 1.0)
        point_groups.append((name, extreme_points(pts), extent, spl_parts(pts, grid.spacing_mm[0], spl_interval_mm)))

    all_points = np.concatenate([np.concatenate([g[1], *g[3]]) for g in point_groups])
    latents, windows, intensity = embed_points(embedder, grid.array, all_points, window_sizes)

    out, start = {}, 0

    def take(n: int) -> PointSet:
        nonlocal start
        sl = slice(start, start + n)
        start += n
        return PointSet(latents=latents[sl].clone(), windows=[w[sl].clone() for w in windows],
                        intensity=intensity[sl].clone())

    for name, _, extent, parts in point_groups:
        wpl = take(6)
        spl = [take(6) for _ in parts]
        out[name] = SupportOrgan(study_id=study_id, extent_mm=extent, wpl=wpl, spl=spl)
    return out
