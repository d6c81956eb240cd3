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

from .propagation import (
    PropagationSettings, TrackedPrompts, box_parts, check_prompting, grow_box, interpolate, keep_prompt_slices, mask_box,
    plan_walks,
)
from .slice_boxes import (
    PAPER_MARGIN_ZYX, Box2D, SliceBoxes, _is_box3d, margin_in_voxels, parse_margin_mm, parse_organ_boxes,
)
from .key_slices import KeySlices, interpolate_probabilities, key_step
from .windows import DEFAULT_WINDOWS, apply_window, check_windows

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    labels: np.ndarray  # uint8 multi-label volume
    probabilities: dict[int, np.ndarray] | None = None  # label -> float32 foreground probability
    stats: dict[str, Any] = field(default_factory=dict)
    view_labels: np.ndarray | None = None  # segment_nifti: the labels on the axial (z, y, x) view
    prompts: dict[int, SliceBoxes] | None = None  # the 2D box prompts actually decoded, {label: {z: [boxes]}}


@dataclass
class SliceResult:
    mask: np.ndarray  # bool (H, W)
    probability: np.ndarray  # float32 (H, W)


class Segmenter:
    """Segment organs in a CT volume from 3D boxes (or per-slice 2D boxes) with a SAM-family backend."""

    def __init__(self, backend: SamFamilyBackend, box_margin_zyx: Sequence[int] = PAPER_MARGIN_ZYX,
                 cache: bool = True, largest_component: bool = False,
                 windows: Mapping[str, tuple[float, float]] | None = None, threshold: float = 0.5,
                 progress: bool = True, interactive_cache_size: int = 8, in_plane_margin_mm: float | None = None,
                 prompting: str = "box", propagation: PropagationSettings | None = None,
                 memo_budget_mb: float = 1024.0, key_slice_mm: float = 0.0):
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
        # "box": every slice of a 3D box gets the box's in-plane extent; "propagate": prompts follow the organ
        self.prompting = check_prompting(prompting)
        self.propagation = propagation or PropagationSettings()
        self.memo_budget_bytes = float(memo_budget_mb) * 2**20
        # "box" prompting of 3D boxes: segment only slices about this far apart (mm) and each organ's end
        # slices, interpolating the rest (key_slices.py); 0: every slice
        if not np.isfinite(key_slice_mm) or key_slice_mm < 0:
            raise ValueError(f"key_slice_mm must be >= 0, got {key_slice_mm}")
        self.key_slice_mm = float(key_slice_mm)

    # -- volumes --------------------------------------------------------------------------------
    def segment_volume(self, volume_zyx_hu: np.ndarray, organ_boxes: Mapping[int, Any],
                       window_for_label: Mapping[int, str] | None = None, return_probabilities: bool = False,
                       slices: Iterable[int] | None = None,
                       box_margin_zyx: Sequence[int] | None = None,
                       spacing_zyx: Sequence[float] | None = None) -> SegmentationResult:
        """Segment every organ of `organ_boxes` in a (z, y, x) HU volume.

        organ_boxes: label -> a 3D box (lo_zyx, hi_zyx), a list of them (SPL parts; expanded by
        `box_margin_zyx`, this call's or the segmenter's), or per-slice 2D boxes {z: (y0, x0, y1, x1)}
        (used as given; then every organ is prompted box by box, whatever `prompting` says).
        Overlaps go to the label with the higher probability. `slices` restricts the work to some z.
        `spacing_zyx` (mm) sizes the propagation's margins and steps (default: 1 mm voxels).
        """
        volume = self._check_volume(volume_zyx_hu)
        margin = self.box_margin_zyx if box_margin_zyx is None else tuple(int(m) for m in box_margin_zyx)
        prompts = self._prompts_for(organ_boxes, volume.shape, margin,
                                    spacing_zyx[0] if spacing_zyx is not None else None)
        if slices is not None:
            keep = {int(z) for z in slices}
            labels = getattr(prompts, "boxes", prompts)
            prompts = keep_prompt_slices(prompts, {label: keep for label in labels})
        return self.segment_prompt_sets(volume, {"": prompts}, window_for_label, return_probabilities,
                                        spacing_zyx=spacing_zyx)[""]

    def _prompts_for(self, organ_boxes: Mapping[int, Any], shape, margin,
                     spacing_z_mm: float | None) -> dict[int, SliceBoxes] | KeySlices | TrackedPrompts:
        """Per-slice 2D boxes as given; 3D boxes tracked when propagating, else one 2D box per slice (on
        key slices when `key_slice_mm` is set)."""
        static = parse_organ_boxes(organ_boxes, shape, margin)  # validates every form
        if any(isinstance(v, Mapping) for v in organ_boxes.values()):
            return static
        if self.prompting != "propagate":
            return self._key_slices(static, spacing_z_mm)
        boxes = {int(label): ([value] if _is_box3d(value) else list(value)) for label, value in organ_boxes.items()}
        return TrackedPrompts(box_parts(boxes, shape, margin))

    def segment_prompt_sets(self, volume_zyx_hu: np.ndarray,
                            prompt_sets: Mapping[str, Mapping[int, SliceBoxes] | TrackedPrompts],
                            window_for_label: Mapping[int, str] | None = None,
                            return_probabilities: bool = False,
                            spacing_zyx: Sequence[float] | None = None) -> dict[str, SegmentationResult]:
        """Segment several prompt sets on one volume: {label: {z: [2D boxes]}} (static prompts) or
        `TrackedPrompts` (3D boxes, propagated along z; `spacing_zyx` sizes its margins and steps).

        Each set gets its own multi-label result (overlaps resolved within the set); static sets
        share one encoder pass per slice (and CT window), so comparing them (e.g. MedLAM boxes
        against manual boxes) costs no extra encoder passes. Stats cover all sets.
        """
        volume = self._check_volume(volume_zyx_hu)
        tracked = {n: p for n, p in prompt_sets.items() if isinstance(p, TrackedPrompts)}
        keyed = {n: p for n, p in prompt_sets.items() if isinstance(p, KeySlices)}
        static = {n: parse_organ_boxes(keyed[n].boxes if n in keyed else p, volume.shape)
                  for n, p in prompt_sets.items() if n not in tracked}
        keyed = {n: KeySlices(static[n], p.step) for n, p in keyed.items()}
        all_labels = {label for p in static.values() for label in p} | {label for p in tracked.values() for label in p.boxes}
        window_of = self._windows_for(all_labels, window_for_label)
        enc0, dec0 = self.backend.encoder_calls, self.backend.decoder_calls
        enc_s0, dec_s0 = self.backend.encode_seconds, self.backend.decode_seconds
        start = time.perf_counter()
        results: dict[str, SegmentationResult] = {}
        encoded: set[int] = set()
        extra: dict[str, int] = defaultdict(int)
        # static sets first; their embeddings stay in the memo (within budget) for the tracked sets
        memo = _EmbeddingMemo(self, volume, self.memo_budget_bytes if tracked else 0)
        if static:
            results.update(self._segment_static(volume, static, window_of, return_probabilities, encoded, memo,
                                                keyed, extra))
        for name, prompts in tracked.items():
            results[name] = self._segment_tracked(volume, prompts, window_of, spacing_zyx, return_probabilities,
                                                  encoded, extra, memo)
            memo.release(lambda key: True)
        if self.largest_component:
            for name, result in results.items():
                labels = prompt_sets[name].boxes if name in tracked else static[name]
                keep_largest_component(result.labels, labels.keys())
        stats = {
            "backend": self.backend.name,
            "accelerated": bool(self.backend.accelerated),
            "accelerated_decoder": self.backend.box_decoder is not None,
            "cache": self.cache,
            "prompting": "propagate" if tracked else "box",
            "key_slice_mm": self.key_slice_mm if keyed else 0.0,
            "organs": len(all_labels),
            "slices": len(encoded),
            "prompts": sum(len(boxes) for r in results.values() for per in (r.prompts or {}).values()
                           for boxes in per.values()),
            "encoder_calls": self.backend.encoder_calls - enc0,
            "decoder_calls": self.backend.decoder_calls - dec0,
            "seconds": round(time.perf_counter() - start, 3),
            "encode_seconds": round(self.backend.encode_seconds - enc_s0, 3),
            "decode_seconds": round(self.backend.decode_seconds - dec_s0, 3),
            **dict(extra),
        }
        log.info("segmented %d organs on %d slices: %d encoder calls, %d decoder calls, %.1f s",
                 stats["organs"], stats["slices"], stats["encoder_calls"], stats["decoder_calls"], stats["seconds"])
        for result in results.values():
            result.stats = dict(stats)
        return {name: results[name] for name in prompt_sets}

    def _segment_static(self, volume: np.ndarray, prompt_sets: Mapping[str, Mapping[int, SliceBoxes]],
                        window_of: Mapping[int, str], return_probabilities: bool,
                        encoded: set[int], memo: "_EmbeddingMemo", keyed: Mapping[str, KeySlices] | None = None,
                        extra: dict[str, int] | None = None) -> dict[str, SegmentationResult]:
        """Static prompt sets: every prompted slice once, all sets' boxes decoded against one embedding.
        Sets in `keyed` are segmented on their key slices only and interpolated in between."""
        keyed = dict(keyed or {})
        prompted = {name: keyed[name].key_prompts() if name in keyed else prompts
                    for name, prompts in prompt_sets.items()}
        plan: dict[int, list[tuple[str, int, Box2D]]] = defaultdict(list)
        for set_name, prompts in prompted.items():
            for label, per_slice in prompts.items():
                for z, boxes in per_slice.items():
                    plan[z].extend((set_name, label, box) for box in boxes)
        labels = {name: np.zeros(volume.shape, dtype=np.uint8) for name in prompt_sets}
        probabilities = {name: {label: np.zeros(volume.shape, np.float32) for label in prompts}
                         for name, prompts in prompt_sets.items()} if return_probabilities else None
        previous_key: dict[str, tuple[int, dict[int, np.ndarray]]] = {}
        interpolated = 0

        def store(set_name: str, z: int, slice_probs: Mapping[int, np.ndarray]) -> None:
            labels[set_name][z] = self._resolve(slice_probs)
            if probabilities is not None:
                for label, prob in slice_probs.items():
                    probabilities[set_name][label][z] = prob

        for z in tqdm(sorted(plan), desc="segment", unit="slice", disable=None if self.progress else True):
            encoded.add(z)
            per_set = self._slice_probabilities(volume[z], plan[z], window_of, z, memo)
            for set_name, slice_probs in per_set.items():
                store(set_name, z, slice_probs)
                if set_name not in keyed:
                    continue
                if set_name in previous_key:  # the slices since the set's previous key slice
                    a, probs_a = previous_key[set_name]
                    for zz, wanted in keyed[set_name].between(a, z).items():
                        between = interpolate_probabilities(a, probs_a, z, slice_probs, zz, wanted)
                        if between:
                            store(set_name, zz, between)
                            interpolated += 1
                previous_key[set_name] = (z, slice_probs)
        if extra is not None and keyed:
            extra["key_slices"] = extra.get("key_slices", 0) + len(set().union(*(k.keys() for k in keyed.values())))
            extra["interpolated_slices"] = extra.get("interpolated_slices", 0) + interpolated
        return {name: SegmentationResult(labels=labels[name],
                                         probabilities=probabilities[name] if probabilities is not None else None,
                                         prompts={label: dict(per) for label, per in prompted[name].items()})
                for name in prompt_sets}

    def _resolve(self, slice_probs: Mapping[int, np.ndarray]) -> np.ndarray:
        """One slice's label map: each pixel to the most probable label, if above the threshold."""
        ids = np.fromiter(slice_probs, dtype=np.uint8)
        stack = np.stack(list(slice_probs.values()))
        best = stack.argmax(axis=0)
        best_prob = np.take_along_axis(stack, best[None], axis=0)[0]
        return np.where(best_prob > self.threshold, ids[best], 0).astype(np.uint8)

    # -- propagation ----------------------------------------------------------------------------
    def _segment_tracked(self, volume: np.ndarray, prompts: TrackedPrompts, window_of: Mapping[int, str],
                         spacing_zyx: Sequence[float] | None, return_probabilities: bool,
                         encoded: set[int], extra: dict[str, int], memo: "_EmbeddingMemo") -> SegmentationResult:
        """Walk every organ part from its start slice outwards (propagation.py), then interpolate."""
        settings = self.propagation
        step = settings.step_slices(spacing_zyx[0] if spacing_zyx is not None else None)
        margin = settings.margin_px(spacing_zyx)
        min_area = settings.min_area_px(spacing_zyx)
        walks = plan_walks(prompts, window_of, step)
        decoded: dict[int, dict[int, np.ndarray]] = defaultdict(dict)  # label -> z -> probability
        used: dict[int, SliceBoxes] = defaultdict(dict)
        starts = [w.keys[w.start] for w in walks]
        heads: dict[int, dict[int, tuple[int, Box2D]]] = {1: {}, -1: {}}  # direction -> walk -> (key index, box)

        def accept(z: int, group: list[int], boxes: list[Box2D], direction: int | None) -> None:
            results = self._decode_walks(memo, volume, z, [(walks[i].window, b) for i, b in zip(group, boxes)])
            if direction is None and settings.refine_start:  # the start: re-prompt with its own mask's box
                tight = [mask_box(p > self.threshold) for p, _ in results]
                redo = [k for k, t in enumerate(tight) if t is not None]
                if redo:
                    boxes = list(boxes)
                    for k in redo:
                        boxes[k] = grow_box(tight[k], margin, walks[group[k]].limit)
                    again = self._decode_walks(memo, volume, z, [(walks[group[k]].window, boxes[k]) for k in redo])
                    for k, r in zip(redo, again):
                        results[k] = r
            encoded.add(z)
            for i, box, (prob, score) in zip(group, boxes, results):
                walk, mask = walks[i], prob > self.threshold
                found = mask_box(mask)
                if found is None or int(mask.sum()) < min_area or score < settings.min_score:
                    for d in ((1, -1) if direction is None else (direction,)):
                        walk.ends[d] = z
                    continue
                walk.accepted[z] = box
                _keep_max(decoded[walk.label], z, prob)
                used[walk.label].setdefault(z, []).append(box)
                for d in ((1, -1) if direction is None else (direction,)):
                    index = walk.keys.index(z) + d
                    if 0 <= index < len(walk.keys):
                        heads[d][i] = (index, found)
                    else:
                        walk.ends[d] = None
                        heads[d].pop(i, None)

        by_start: dict[int, list[int]] = defaultdict(list)
        for i, z in enumerate(starts):
            by_start[z].append(i)
        bar = tqdm(total=len({z for w in walks for z in w.keys}), desc="segment", unit="slice",
                   disable=None if self.progress else True)
        for z in sorted(by_start):
            accept(z, by_start[z], [walks[i].limit for i in by_start[z]], None)
            bar.update(1)
        for direction in (1, -1):
            # up: slices above the highest start are needed once; down: each slice once, in order
            while heads[direction]:
                pending = heads[direction]
                z = (min if direction == 1 else max)(walks[i].keys[k] for i, (k, _) in pending.items())
                group = [i for i, (k, _) in pending.items() if walks[i].keys[k] == z]
                boxes = [grow_box(pending[i][1], margin, walks[i].limit) for i in group]
                for i in group:
                    pending.pop(i)
                accept(z, group, boxes, direction)
                bar.update(1)
                if direction == 1:
                    top = max(starts)
                    memo.release(lambda key, z=z, top=top: key[0] <= z and key[0] >= top)
                else:
                    memo.release(lambda key, z=z: key[0] >= z)
        bar.close()

        labels = np.zeros(volume.shape, np.uint8)
        full = {label: interpolate(decoded[label], walks, label, volume.shape[0]) for label in prompts.boxes}
        probabilities = ({label: np.zeros(volume.shape, np.float32) for label in prompts.boxes}
                         if return_probabilities else None)
        for z in sorted({z for per in full.values() for z in per}):
            slice_probs = {label: per[z] for label, per in sorted(full.items()) if z in per}
            labels[z] = self._resolve(slice_probs)
            if probabilities is not None:
                for label, prob in slice_probs.items():
                    probabilities[label][z] = prob
        extra["key_slices"] = extra.get("key_slices", 0) + len({z for per in decoded.values() for z in per})
        extra["interpolated_slices"] = extra.get("interpolated_slices", 0) + len(
            {z for per in full.values() for z in per} - {z for per in decoded.values() for z in per})
        extra["memo_peak_mb"] = max(extra.get("memo_peak_mb", 0), int(memo.peak_bytes / 2**20))
        return SegmentationResult(labels=labels, probabilities=probabilities,
                                  prompts={label: dict(sorted(per.items())) for label, per in used.items()})

    def _decode_walks(self, memo: "_EmbeddingMemo", volume: np.ndarray, z: int,
                      prompts: list[tuple[str, Box2D]]) -> list[tuple[np.ndarray, float]]:
        """(probability, predicted IoU) per (window, box) on slice z; one decoder call per window."""
        out: list[tuple[np.ndarray, float] | None] = [None] * len(prompts)
        by_window: dict[str, list[int]] = defaultdict(list)
        for k, (window, _) in enumerate(prompts):
            by_window[window].append(k)
        for window, ks in by_window.items():
            emb = memo.get(z, window)
            boxes_xyxy = np.array([(x0, y0, x1, y1) for (y0, x0, y1, x1) in (prompts[k][1] for k in ks)], np.float32)
            logits, scores = self.backend.decode_scored(emb, boxes_xyxy)
            for k, logit, score in zip(ks, logits, scores):
                out[k] = (expit(logit).astype(np.float32), float(score))
        return out  # type: ignore[return-value]

    def nifti_prompts(self, view, organ_boxes_ijk: Mapping[int, Any]) -> dict[int, SliceBoxes] | TrackedPrompts:
        """Prompts on `view` (an AxialView) for 3D boxes in the study's voxel indices, expanded by the
        segmenter's margin (in mm in-plane when it has one): one 2D box per slice {label: {z: [boxes]}}
        with `prompting="box"`, `TrackedPrompts` (3D boxes to propagate along) with "propagate"."""
        boxes_zyx = {}
        for label, boxes in organ_boxes_ijk.items():
            boxes = [boxes] if _is_box3d(boxes) else boxes
            if not isinstance(boxes, (list, tuple)) or not all(_is_box3d(b) for b in boxes):
                raise InputError(f"label {label}: expected 3D boxes ([i0, j0, k0], [i1, j1, k1]), got {boxes!r}")
            boxes_zyx[label] = [view.box_from_original(lo, hi) for lo, hi in boxes]
        margin = margin_in_voxels(self.box_margin_zyx, self.in_plane_margin_mm, view.spacing_zyx)
        static = parse_organ_boxes(boxes_zyx, view.array.shape, margin)  # validates labels and boxes
        if self.prompting == "propagate":
            return TrackedPrompts(box_parts(boxes_zyx, view.array.shape, margin))
        return self._key_slices(static, view.spacing_zyx[0])

    def _key_slices(self, static: dict[int, SliceBoxes], spacing_z_mm: float | None) -> dict[int, SliceBoxes] | KeySlices:
        step = key_step(self.key_slice_mm, spacing_z_mm)
        return KeySlices(static, step) if step > 1 else static

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
            prompts = keep_prompt_slices(prompts, slices_for_label)
        result = self.segment_prompt_sets(view.array, {"": prompts}, window_for_label, return_probabilities,
                                          spacing_zyx=view.spacing_zyx)[""]
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
                             window_of: dict[int, str], z: int | None = None,
                             memo: "_EmbeddingMemo | None" = None) -> dict[str, dict[int, np.ndarray]]:
        """Foreground probability per prompt set and label on one slice (max over a label's boxes)."""
        # With the cache, prompts sharing a window share one encoder pass and one decoder call;
        # without it, every organ pays its own encoder pass, as in the reference implementation.
        groups: dict[Any, list[tuple[str, int, Box2D]]] = defaultdict(list)
        for set_name, label, box in prompts:
            groups[window_of[label] if self.cache else (set_name, label)].append((set_name, label, box))
        out: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for group in groups.values():
            window = window_of[group[0][1]]
            if memo is not None and self.cache:
                emb = memo.get(z, window)
            else:
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


def _keep_max(per_slice: dict[int, np.ndarray], z: int, prob: np.ndarray) -> None:
    per_slice[z] = np.maximum(per_slice[z], prob) if z in per_slice else prob


class _EmbeddingMemo:
    """Slice embeddings a propagation will need again (its two sweeps share slices), within a byte
    budget: beyond it an embedding is simply computed again when needed."""

    def __init__(self, segmenter: Segmenter, volume: np.ndarray, budget_bytes: float):
        self.segmenter = segmenter
        self.volume = volume
        self.budget = budget_bytes
        self.items: dict[tuple[int, str], Embedding] = {}
        self.bytes = 0
        self.peak_bytes = 0

    @staticmethod
    def _size(emb: Embedding) -> int:
        features = getattr(emb, "features", emb)
        if hasattr(features, "element_size"):
            return int(features.element_size() * features.nelement())
        return int(getattr(features, "nbytes", 0))

    def get(self, z: int, window: str) -> Embedding:
        key = (int(z), window)
        if key in self.items:
            return self.items[key]
        seg = self.segmenter
        emb = seg.backend.encode(apply_window(self.volume[z], *seg.windows[window]))
        size = self._size(emb)
        if self.bytes + size <= self.budget:
            self.items[key] = emb
            self.bytes += size
            self.peak_bytes = max(self.peak_bytes, self.bytes)
        return emb

    def release(self, drop) -> None:
        """Forget the embeddings whose (z, window) key `drop` accepts."""
        for key in [k for k in self.items if drop(k)]:
            self.bytes -= self._size(self.items.pop(key))
