"""3D segmentation from box prompts with one encoder pass per slice.

The embedding depends only on the (windowed) slice, so every organ box on that slice is decoded
against one embedding in one batched decoder call. `cache=False` reproduces the reference
implementation's cost (one encoder pass per organ per slice) for comparison.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.special import expit
from tqdm import tqdm

from .backends.base import Embedding, SamFamilyBackend
from .postprocess import keep_largest_component
from medlsam.errors import InputError

from .slice_boxes import (
    PAPER_MARGIN_ZYX, Box2D, SliceBoxes, _is_box3d, keep_slices, margin_in_voxels, parse_margin_mm, parse_organ_boxes,
)
from .windows import DEFAULT_WINDOWS, apply_window, check_windows

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    labels: np.ndarray  # uint8 multi-label volume
    probabilities: dict[int, np.ndarray] | None = None  # label -> float32 foreground probability
    stats: dict[str, Any] = field(default_factory=dict)
    view_labels: np.ndarray | None = None  # segment_nifti: the labels on the axial (z, y, x) view


@dataclass
class SliceResult:
    mask: np.ndarray  # bool (H, W)
    probability: np.ndarray  # float32 (H, W)


class Segmenter:
    """Segment organs in a CT volume from 3D boxes (or per-slice 2D boxes) with a SAM-family backend."""

    def __init__(self, backend: SamFamilyBackend, box_margin_zyx: Sequence[int] = PAPER_MARGIN_ZYX,
                 cache: bool = True, largest_component: bool = False,
                 windows: Mapping[str, tuple[float, float]] | None = None, threshold: float = 0.5,
                 progress: bool = True, interactive_cache_size: int = 8, in_plane_margin_mm: float | None = None):
        margin = tuple(int(m) for m in box_margin_zyx)
        if len(margin) != 3 or min(margin) < 0:
            raise ValueError(f"box_margin_zyx must be three non-negative ints, got {box_margin_zyx!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.backend = backend
        self.box_margin_zyx = margin
        # when set, NIfTI studies (segment_nifti) get this in-plane margin in mm instead of pixels
        self.in_plane_margin_mm = parse_margin_mm(in_plane_margin_mm)
        self.cache = bool(cache)
        self.largest_component = bool(largest_component)
        self.windows = check_windows(dict(windows) if windows is not None else dict(DEFAULT_WINDOWS))
        self.threshold = float(threshold)
        self.progress = progress
        self._interactive: OrderedDict[tuple[str, str], Embedding] = OrderedDict()
        self._interactive_size = max(0, int(interactive_cache_size))

    # -- volumes --------------------------------------------------------------------------------
    def segment_volume(self, volume_zyx_hu: np.ndarray, organ_boxes: Mapping[int, Any],
                       window_for_label: Mapping[int, str] | None = None, return_probabilities: bool = False,
                       slices: Iterable[int] | None = None,
                       box_margin_zyx: Sequence[int] | None = None) -> SegmentationResult:
        """Segment every organ of `organ_boxes` in a (z, y, x) HU volume.

        organ_boxes: label -> a 3D box (lo_zyx, hi_zyx), a list of them (SPL parts; expanded by
        `box_margin_zyx`, this call's or the segmenter's), or per-slice 2D boxes {z: (y0, x0, y1, x1)}
        (used as given).
        Overlaps go to the label with the higher probability. `slices` restricts the work to some z.
        """
        volume = self._check_volume(volume_zyx_hu)
        margin = self.box_margin_zyx if box_margin_zyx is None else tuple(int(m) for m in box_margin_zyx)
        prompts = parse_organ_boxes(organ_boxes, volume.shape, margin)
        if slices is not None:
            keep = {int(z) for z in slices}
            prompts = keep_slices(prompts, {label: keep for label in prompts})
        return self.segment_prompt_sets(volume, {"": prompts}, window_for_label, return_probabilities)[""]

    def segment_prompt_sets(self, volume_zyx_hu: np.ndarray, prompt_sets: Mapping[str, Mapping[int, SliceBoxes]],
                            window_for_label: Mapping[int, str] | None = None,
                            return_probabilities: bool = False) -> dict[str, SegmentationResult]:
        """Segment several prompt sets ({label: {z: [2D boxes]}} each) on one volume.

        Each set gets its own multi-label result (overlaps resolved within the set); a slice is
        encoded once for all sets (once per CT window), so comparing prompt sets (e.g. MedLAM boxes
        against manual boxes) costs no extra encoder passes. Stats are shared by the sets.
        """
        volume = self._check_volume(volume_zyx_hu)
        prompt_sets = {name: parse_organ_boxes(prompts, volume.shape) for name, prompts in prompt_sets.items()}
        window_of = self._windows_for({label for p in prompt_sets.values() for label in p}, window_for_label)
        plan: dict[int, list[tuple[str, int, Box2D]]] = defaultdict(list)
        for set_name, prompts in prompt_sets.items():
            for label, per_slice in prompts.items():
                for z, boxes in per_slice.items():
                    plan[z].extend((set_name, label, box) for box in boxes)

        labels = {name: np.zeros(volume.shape, dtype=np.uint8) for name in prompt_sets}
        probabilities = {name: {label: np.zeros(volume.shape, np.float32) for label in prompts}
                         for name, prompts in prompt_sets.items()} if return_probabilities else None
        enc0, dec0 = self.backend.encoder_calls, self.backend.decoder_calls
        enc_s0, dec_s0 = self.backend.encode_seconds, self.backend.decode_seconds
        start = time.perf_counter()
        for z in tqdm(sorted(plan), desc="segment", unit="slice", disable=None if self.progress else True):
            per_set = self._slice_probabilities(volume[z], plan[z], window_of)
            for set_name, slice_probs in per_set.items():
                ids = np.fromiter(slice_probs, dtype=np.uint8)
                stack = np.stack(list(slice_probs.values()))
                best = stack.argmax(axis=0)
                best_prob = np.take_along_axis(stack, best[None], axis=0)[0]
                labels[set_name][z] = np.where(best_prob > self.threshold, ids[best], 0)
                if probabilities is not None:
                    for label, prob in slice_probs.items():
                        probabilities[set_name][label][z] = prob
        if self.largest_component:
            for set_name, prompts in prompt_sets.items():
                keep_largest_component(labels[set_name], prompts.keys())
        stats = {
            "backend": self.backend.name,
            "accelerated": bool(self.backend.accelerated),
            "accelerated_decoder": self.backend.box_decoder is not None,
            "cache": self.cache,
            "organs": len({label for p in prompt_sets.values() for label in p}),
            "slices": len(plan),
            "prompts": sum(len(p) for p in plan.values()),
            "encoder_calls": self.backend.encoder_calls - enc0,
            "decoder_calls": self.backend.decoder_calls - dec0,
            "seconds": round(time.perf_counter() - start, 3),
            "encode_seconds": round(self.backend.encode_seconds - enc_s0, 3),
            "decode_seconds": round(self.backend.decode_seconds - dec_s0, 3),
        }
        log.info("segmented %d organs on %d slices: %d encoder calls, %d decoder calls, %.1f s",
                 stats["organs"], stats["slices"], stats["encoder_calls"], stats["decoder_calls"], stats["seconds"])
        return {name: SegmentationResult(labels=labels[name],
                                         probabilities=probabilities[name] if probabilities is not None else None,
                                         stats=dict(stats))
                for name in prompt_sets}

    def nifti_prompts(self, view, organ_boxes_ijk: Mapping[int, Any]) -> dict[int, SliceBoxes]:
        """Per-slice prompts {label: {z: [2D boxes]}} on `view` (an AxialView) for 3D boxes in the
        study's voxel indices, expanded by the segmenter's margin (in mm in-plane when it has one)."""
        boxes_zyx = {}
        for label, boxes in organ_boxes_ijk.items():
            boxes = [boxes] if _is_box3d(boxes) else boxes
            if not isinstance(boxes, (list, tuple)) or not all(_is_box3d(b) for b in boxes):
                raise InputError(f"label {label}: expected 3D boxes ([i0, j0, k0], [i1, j1, k1]), got {boxes!r}")
            boxes_zyx[label] = [view.box_from_original(lo, hi) for lo, hi in boxes]
        margin = margin_in_voxels(self.box_margin_zyx, self.in_plane_margin_mm, view.spacing_zyx)
        return parse_organ_boxes(boxes_zyx, view.array.shape, margin)

    def segment_nifti(self, img, organ_boxes_ijk: Mapping[int, Any], window_for_label=None,
                      return_probabilities: bool = False,
                      slices_for_label: Mapping[int, Iterable[int]] | None = None) -> SegmentationResult:
        """Like `segment_volume` for a NIfTI study with 3D boxes in its voxel indices (i, j, k).

        The labels (and probabilities) come back on the study's original grid; `view_labels` keeps
        them on the axial view. `slices_for_label` restricts each label to some axial view slices.
        """
        from medlsam.geometry import AxialView

        view = AxialView.from_nifti(img)
        prompts = self.nifti_prompts(view, organ_boxes_ijk)
        if slices_for_label is not None:
            prompts = keep_slices(prompts, slices_for_label)
        result = self.segment_prompt_sets(view.array, {"": prompts}, window_for_label, return_probabilities)[""]
        result.view_labels = result.labels
        result.labels = view.to_original(result.labels)
        if result.probabilities is not None:
            result.probabilities = {k: view.to_original(v) for k, v in result.probabilities.items()}
        return result

    # -- one slice (interactive) ---------------------------------------------------------------
    def segment_slice(self, slice_hu: np.ndarray, box_yx: Sequence[float] | None = None,
                      foreground: Sequence[Sequence[float]] = (), background: Sequence[Sequence[float]] = (),
                      window: str = "default") -> SliceResult:
        """One object on one axial slice from a box (y0, x0, y1, x1) and/or (y, x) points.

        Embeddings of recently seen slices are kept, so repeated clicks on a slice cost one decode.
        """
        slice_hu = np.asarray(slice_hu, dtype=np.float32)
        if slice_hu.ndim != 2:
            raise InputError(f"expected a 2D slice, got shape {slice_hu.shape}")
        if window not in self.windows:
            raise InputError(f"unknown window {window!r}; available: {', '.join(self.windows)}")
        if box_yx is None and not len(foreground) and not len(background):
            raise InputError("a slice prompt needs a box or at least one point")
        boxes = points = point_labels = None
        if box_yx is not None:
            if len(box_yx) != 4:
                raise InputError(f"box must be (y0, x0, y1, x1), got {box_yx!r}")
            y0, x0, y1, x1 = (float(v) for v in box_yx)
            h, w = slice_hu.shape
            y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
            x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
            boxes = np.array([[x0, y0, x1, y1]], dtype=np.float32)
        if len(foreground) or len(background):
            yx = np.array(list(foreground) + list(background), dtype=np.float32).reshape(-1, 2)
            points = yx[None, :, ::-1].copy()
            point_labels = np.array([[1] * len(foreground) + [0] * len(background)], dtype=np.float32)
        emb = self._interactive_embedding(slice_hu, window)
        prob = expit(self.backend.decode(emb, boxes, points, point_labels)[0]).astype(np.float32)
        return SliceResult(mask=prob > self.threshold, probability=prob)

    # -- internals ------------------------------------------------------------------------------
    def _interactive_embedding(self, slice_hu: np.ndarray, window: str) -> Embedding:
        key = (hashlib.sha1(np.ascontiguousarray(slice_hu).tobytes()).hexdigest() + str(slice_hu.shape), window)
        if key in self._interactive:
            self._interactive.move_to_end(key)
            return self._interactive[key]
        emb = self.backend.encode(apply_window(slice_hu, *self.windows[window]))
        if self._interactive_size:
            self._interactive[key] = emb
            while len(self._interactive) > self._interactive_size:
                self._interactive.popitem(last=False)
        return emb

    def _slice_probabilities(self, slice_hu: np.ndarray, prompts: list[tuple[str, int, Box2D]],
                             window_of: dict[int, str]) -> dict[str, dict[int, np.ndarray]]:
        """Foreground probability per prompt set and label on one slice (max over a label's boxes)."""
        # With the cache, prompts sharing a window share one encoder pass and one decoder call;
        # without it, every organ pays its own encoder pass, as in the reference implementation.
        groups: dict[Any, list[tuple[str, int, Box2D]]] = defaultdict(list)
        for set_name, label, box in prompts:
            groups[window_of[label] if self.cache else (set_name, label)].append((set_name, label, box))
        out: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for group in groups.values():
            window = window_of[group[0][1]]
            emb = self.backend.encode(apply_window(slice_hu, *self.windows[window]))
            boxes_xyxy = np.array([(x0, y0, x1, y1) for _, _, (y0, x0, y1, x1) in group], dtype=np.float32)
            probs = expit(self.backend.decode(emb, boxes_xyxy))
            for (set_name, label, _), prob in zip(group, probs):
                found = out[set_name]
                found[label] = np.maximum(found[label], prob) if label in found else prob.astype(np.float32)
        return {name: dict(sorted(found.items())) for name, found in out.items()}

    def _windows_for(self, labels, window_for_label) -> dict[int, str]:
        window_for_label = dict(window_for_label or {})
        out = {}
        for label in sorted(labels):
            name = window_for_label.get(label, "default")
            if name not in self.windows:
                raise InputError(f"label {label}: unknown window {name!r}; available: {', '.join(self.windows)}")
            out[label] = name
        return out

    @staticmethod
    def _check_volume(volume) -> np.ndarray:
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputError(f"expected a 3D (z, y, x) volume, got shape {volume.shape}")
        if not np.issubdtype(volume.dtype, np.number) or np.issubdtype(volume.dtype, np.complexfloating):
            raise InputError(f"expected a real-valued CT volume, got dtype {volume.dtype}")
        if min(volume.shape) < 1:
            raise InputError(f"volume has an empty axis: shape {volume.shape}")
        if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
            raise InputError("volume contains NaN or infinite values")
        return volume
