"""Localization results, shared by every localizer and every consumer (app, CLI, eval, batch).

A localizer (MedLAM, registration, ...) answers `localize(image, organs, mode, seed, name)` with a
`StudyLocalization`: one `OrganLocation` per organ, each with a 3D box in the study's voxel
indices and in world millimetres, optional sub-part boxes (SPL), extreme points, a confidence and
a presence verdict. Consumers use the views defined here (present organs, prompt boxes for a mode,
JSON) instead of re-deriving them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import nibabel as nib
import numpy as np

from medlsam.errors import InputError

MODES = ("WPL", "SPL")  # whole-patch (one box per organ) or sub-patch (one box per z part)
EXTREME_POINTS = ("z_min", "z_max", "y_min", "y_max", "x_min", "x_max")


def check_mode(value: Any, default: str = "WPL") -> str:
    """'WPL' or 'SPL' (any case); None or '' gives `default`."""
    mode = str(value or default).strip().upper()
    if mode not in MODES:
        raise InputError(f"mode must be 'WPL' or 'SPL', got {value!r}")
    return mode


def resolve_mode(mode: str, localizer: str) -> str:
    """AUTO: SPL for registration (its part boxes are free: the fused organ mask is split along z, and
    they follow curved organs), WPL for MedLAM (SPL costs about 4x its localization time)."""
    if str(mode).upper() != "AUTO":
        return check_mode(mode)
    return "SPL" if localizer == "registration" else "WPL"


@dataclass(frozen=True)
class Box:
    """An inclusive box in study voxel indices (i, j, k), with its extent in world RAS millimetres."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    lo_world: tuple[float, float, float] | None = None
    hi_world: tuple[float, float, float] | None = None

    @classmethod
    def from_voxels(cls, lo: Sequence[float], hi: Sequence[float], affine: np.ndarray | None = None,
                    shape: Sequence[int] | None = None) -> "Box":
        """Box from (possibly fractional, unordered) corners: floor/ceil, clipped to `shape` if given.

        The world extent is taken before clipping (it says where the organ was found, even outside
        the scan)."""
        lo_f, hi_f = np.minimum(lo, hi).astype(float), np.maximum(lo, hi).astype(float)
        lo_i, hi_i = np.floor(lo_f), np.ceil(hi_f)
        world_lo = world_hi = None
        if affine is not None:
            corners = np.array(np.meshgrid(*zip(lo_i, hi_i), indexing="ij")).reshape(3, -1).T
            world = nib.affines.apply_affine(affine, corners)
            world_lo = tuple(round(float(v), 2) for v in world.min(0))
            world_hi = tuple(round(float(v), 2) for v in world.max(0))
        if shape is not None:
            top = np.asarray(shape) - 1
            lo_i, hi_i = np.clip(lo_i, 0, top), np.clip(hi_i, 0, top)
        return cls(tuple(int(v) for v in lo_i), tuple(int(v) for v in hi_i), world_lo, world_hi)

    @property
    def corners(self) -> tuple[list[int], list[int]]:
        """([i0, j0, k0], [i1, j1, k1]): the form segmenters take."""
        return list(self.lo), list(self.hi)

    def to_json(self) -> dict:
        out = {"box_voxel": [list(self.lo), list(self.hi)]}
        if self.lo_world is not None:
            out["box_world"] = [list(self.lo_world), list(self.hi_world)]
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "Box":
        voxel = data.get("box_voxel")
        try:
            arr = np.asarray(voxel, dtype=float)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.shape != (2, 3) or not np.all(np.isfinite(arr)):
            raise InputError(f"box_voxel must be [[i0, j0, k0], [i1, j1, k1]], got {voxel!r}")
        world = data.get("box_world")
        lo_w = hi_w = None
        if world is not None:
            w = np.asarray(world, dtype=float)
            if w.shape == (2, 3):
                lo_w, hi_w = tuple(float(v) for v in w[0]), tuple(float(v) for v in w[1])
        lo, hi = np.minimum(arr[0], arr[1]), np.maximum(arr[0], arr[1])
        return cls(tuple(int(round(v)) for v in lo), tuple(int(round(v)) for v in hi), lo_w, hi_w)


@dataclass
class OrganLocation:
    """Where one organ is in one study, as a localizer found it."""

    name: str
    label_id: int
    box: Box
    present: bool = True
    absent_reason: str | None = None
    confidence: float | None = None
    fraction_inside: float | None = None
    n_supports: int | None = None
    parts: list[Box] = field(default_factory=list)  # SPL sub-part boxes along z (empty for WPL)
    extreme_points_voxel: np.ndarray | None = None  # (6, 3) in EXTREME_POINTS order
    extreme_points_world: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)  # what a user should know about this box

    def prompt_boxes(self, mode: str) -> list[Box]:
        """The boxes to prompt a segmenter with: the SPL parts in SPL mode (when found), else the box."""
        return list(self.parts) if check_mode(mode) == "SPL" and self.parts else [self.box]

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "id": int(self.label_id),
            "present": bool(self.present),
            "absent_reason": self.absent_reason,
            "confidence": None if self.confidence is None or not np.isfinite(self.confidence)
            else round(float(self.confidence), 4),
            "fraction_inside": None if self.fraction_inside is None else round(float(self.fraction_inside), 4),
            "n_supports": self.n_supports,
            **self.box.to_json(),
            "parts": [p.to_json() for p in self.parts],
            "warnings": list(self.warnings),
        }
        for key, points in (("extreme_points_voxel", self.extreme_points_voxel),
                            ("extreme_points_world", self.extreme_points_world)):
            if points is not None:
                out[key] = {k: np.round(p, 2).tolist() for k, p in zip(EXTREME_POINTS, np.asarray(points))}
        return out

    @classmethod
    def from_json(cls, name: str, data: Mapping) -> "OrganLocation":
        if not isinstance(data, Mapping) or "id" not in data:
            raise InputError(f"organ {name!r} needs an 'id' and a 'box_voxel'")
        try:
            label_id = int(data["id"])
        except (TypeError, ValueError):
            raise InputError(f"organ {name!r}: id must be an integer, got {data['id']!r}") from None

        def points(key):
            value = data.get(key)
            if not isinstance(value, Mapping) or set(value) != set(EXTREME_POINTS):
                return None
            return np.array([value[k] for k in EXTREME_POINTS], dtype=float)

        parts = []
        for part in data.get("parts") or []:
            try:
                parts.append(Box.from_json(part))
            except InputError:
                continue
        present = bool(data.get("present", True))
        if not present and data.get("box_voxel") is None:
            box = Box((0, 0, 0), (0, 0, 0))  # an absent organ may come without a box; it prompts nothing
        else:
            try:
                box = Box.from_json(data)
            except InputError as exc:
                raise InputError(f"organ {name!r}: {exc}") from None
        return cls(
            name=str(name), label_id=label_id, box=box,
            present=present, absent_reason=data.get("absent_reason"),
            confidence=data.get("confidence"), fraction_inside=data.get("fraction_inside"),
            n_supports=data.get("n_supports"), parts=parts,
            warnings=[str(w) for w in data.get("warnings") or [] if isinstance(w, str)],
            extreme_points_voxel=points("extreme_points_voxel"), extreme_points_world=points("extreme_points_world"),
        )


@dataclass
class StudyLocalization:
    """Every requested organ of one study, located in one mode by one localizer."""

    mode: str
    organs: dict[str, OrganLocation]
    localizer: str = "medlam"
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.mode = check_mode(self.mode)

    @property
    def present(self) -> dict[str, OrganLocation]:
        return {n: o for n, o in self.organs.items() if o.present}

    @property
    def absent(self) -> list[str]:
        return sorted(n for n, o in self.organs.items() if not o.present)

    @property
    def label_names(self) -> dict[str, int]:
        """{name: label id} of the present organs (the labels a result volume holds)."""
        return {n: o.label_id for n, o in self.present.items()}

    def prompt_boxes(self, mode: str | None = None) -> dict[int, list[tuple[list[int], list[int]]]]:
        """Label id -> study-voxel boxes [(lo, hi), ...] of the present organs, in this (or `mode`'s) mode."""
        mode = check_mode(mode or self.mode)
        return {o.label_id: [b.corners for b in o.prompt_boxes(mode)] for o in self.present.values()}

    def subset(self, names: Iterable[str]) -> "StudyLocalization":
        names = list(names)
        return StudyLocalization(self.mode, {n: self.organs[n] for n in names if n in self.organs},
                                 self.localizer, dict(self.timings))

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "localizer": self.localizer,
            "organs": {n: o.to_json() for n, o in self.organs.items()},
            "label_names": self.label_names,
            "absent": self.absent,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "StudyLocalization":
        organs = data.get("organs") if isinstance(data, Mapping) else None
        if not isinstance(organs, Mapping) or not organs:
            raise InputError("a localization needs an 'organs' object (as `medlsam localize` writes it)")
        return cls(mode=data.get("mode") or "WPL",
                   organs={str(n): OrganLocation.from_json(n, e) for n, e in organs.items()},
                   localizer=str(data.get("localizer") or "medlam"))


class OrganLocalizer(Protocol):
    """What the app, the CLI, eval and batch runs need from a localizer."""

    name: str

    @property
    def organs(self) -> list[str]:
        """Organs this localizer can find (those with support templates)."""

    def localize(self, image: nib.Nifti1Image, organs: Sequence[str] | None = None, mode: str = "WPL",
                 seed: int = 0, name: str = "image") -> StudyLocalization:
        """Locate `organs` (names; None: all it knows) in `image`."""


def resolve_localizable(organs: Iterable, label_ids: Mapping[str, int], available: Iterable[str],
                        missing: str, listing: Sequence[str]) -> list[str]:
    """Organ names or ids -> distinct names a localizer can find (those in `available`); any other
    organ is an InputError "organ X has no <missing> (<listing>)"."""
    from medlsam.labels import LabelMap

    label_map, available = LabelMap(dict(label_ids), source=missing), set(available)
    names = []
    for organ in organs:
        try:
            name = label_map.resolve(organ)
        except InputError:  # not even an organ of the label map
            name = None
        if name is None or name not in available:
            raise InputError(f"organ {organ!r} has no {missing} ({listing})")
        names.append(name)
    return list(dict.fromkeys(names))
