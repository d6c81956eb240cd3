"""Patch-pair sampling for RDR + MSS pretraining (METHOD sections 4, 5, 12).

Each item holds two crops `a` (query) and `b` (support) of one preprocessed volume, their centres
in mm, and optionally an augmented copy of `a` whose voxels carry their original positions in mm
(for MSS), plus points sampled inside `a` with their positions.

Crop centres are drawn evenly over the body: z uniform over the slices that contain body, then
y and x uniform over that slice's body bounding box, so the ends of the scan (pelvis, apex of the
lungs) are seen as often as the middle (METHOD section 12 failure pattern). A fraction
(`uniform_centre_fraction`) is drawn uniformly over the whole volume instead, as random query
crops at inference may be.

Patch convention (shared with inference): a patch "centred" at voxel c covers
[c - P // 2, c - P // 2 + P) along each axis; its centre position is c * spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medlsam.medlam.network import patch_start
from trainers.medlam.augment import CropAugmenter

MIN_BODY_VOXELS_PER_SLICE = 4


@dataclass
class BodyExtent:
    z_range: tuple[int, int]  # first and last slice holding body, inclusive
    yx_lo: np.ndarray  # (D, 2) per-slice body bounding box, inclusive
    yx_hi: np.ndarray  # (D, 2)

    @classmethod
    def of(cls, volume: np.ndarray, threshold: float) -> "BodyExtent":
        body = volume > threshold
        counts = body.reshape(body.shape[0], -1).sum(axis=1)
        slices = np.flatnonzero(counts >= MIN_BODY_VOXELS_PER_SLICE)
        if slices.size == 0:
            raise ValueError(f"no voxel above the body threshold {threshold} (is this an empty scan?)")
        yx_lo = np.zeros((volume.shape[0], 2), dtype=np.int64)
        yx_hi = np.array([[volume.shape[1] - 1, volume.shape[2] - 1]] * volume.shape[0], dtype=np.int64)
        for z in slices:
            ys, xs = np.nonzero(body[z])
            yx_lo[z] = (ys.min(), xs.min())
            yx_hi[z] = (ys.max(), xs.max())
        return cls(z_range=(int(slices[0]), int(slices[-1])), yx_lo=yx_lo, yx_hi=yx_hi)

    def sample_centre(self, rng: np.random.Generator) -> np.ndarray:
        """A voxel index (z, y, x): z uniform over the body's slices, y/x over that slice's box."""
        z = int(rng.integers(self.z_range[0], self.z_range[1] + 1))
        y = int(rng.integers(self.yx_lo[z, 0], self.yx_hi[z, 0] + 1))
        x = int(rng.integers(self.yx_lo[z, 1], self.yx_hi[z, 1] + 1))
        return np.array([z, y, x], dtype=np.int64)


def crop_zero_padded(volume: np.ndarray, start: np.ndarray, size) -> np.ndarray:
    """volume[start : start + size] with zeros wherever the window leaves the volume."""
    size = np.asarray(size, dtype=np.int64)
    start = np.asarray(start, dtype=np.int64)
    out = np.zeros(tuple(size), dtype=np.float32)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, volume.shape)
    if np.any(hi <= lo):
        return out
    src = tuple(slice(a, b) for a, b in zip(lo, hi))
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    out[dst] = volume[src]
    return out


def position_grid_mm(start: np.ndarray, size, spacing_mm) -> np.ndarray:
    """(3, D, H, W) physical positions (mm) of the voxels of a window starting at `start`."""
    axes = [(start[i] + np.arange(size[i])) * spacing_mm[i] for i in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


class PatchPairDataset(Dataset):
    """Map-style dataset of crop pairs. Index i < len draws a plain pair from volume i % n;
    index i + len draws the same plus the augmented copy of crop `a` for MSS (see MSSBatchSampler).
    Every item is a deterministic function of (seed, epoch, index)."""

    def __init__(self, volumes: list[np.ndarray], spacing_mm, cfg, seed: int | None = None):
        if not volumes:
            raise ValueError("no training volumes")
        self.patch = np.asarray(cfg.patch_size, dtype=np.int64)
        self.spacing = np.asarray(spacing_mm, dtype=np.float64)
        self.pad = int(cfg.effective_crop_pad)
        self.points = int(cfg.mss_points)
        self.body_threshold = float(cfg.body_threshold)
        self.uniform_fraction = float(cfg.uniform_centre_fraction)
        self.samples_per_volume = int(cfg.samples_per_volume)
        self.seed = int(cfg.seed if seed is None else seed)
        self.epoch = 0
        self.volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
        self.extents = [BodyExtent.of(v, self.body_threshold) for v in self.volumes]
        self.augmenter = CropAugmenter.from_config(cfg)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not 0 <= index < 2 * n:
            raise IndexError(index)
        with_aug = index >= n
        index = index % n
        volume_id = index % len(self.volumes)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        volume, extent = self.volumes[volume_id], self.extents[volume_id]

        centre_a, centre_b = self._centre(volume, extent, rng), self._centre(volume, extent, rng)
        # crop a is a random shift of the window the augmented copy is taken from
        shift = rng.integers(-self.pad, self.pad + 1, size=3) if with_aug else np.zeros(3, np.int64)
        ori_a_centre = centre_a + shift
        item = {
            "ori_a": torch.from_numpy(crop_zero_padded(volume, patch_start(ori_a_centre, self.patch), self.patch))[None],
            "ori_b": torch.from_numpy(crop_zero_padded(volume, patch_start(centre_b, self.patch), self.patch))[None],
            "centre_a_mm": torch.from_numpy((ori_a_centre * self.spacing).astype(np.float32)),
            "centre_b_mm": torch.from_numpy((centre_b * self.spacing).astype(np.float32)),
            "volume_id": torch.tensor(volume_id),
        }
        if with_aug:
            item.update(self._augmented(volume, centre_a, ori_a_centre, item["ori_a"][0].numpy(), rng))
        return item

    def _centre(self, volume: np.ndarray, extent: BodyExtent, rng) -> np.ndarray:
        if rng.random() < self.uniform_fraction:
            return rng.integers(0, volume.shape).astype(np.int64)
        return extent.sample_centre(rng)

    def _augmented(self, volume, centre, ori_centre, ori_a: np.ndarray, rng) -> dict[str, torch.Tensor]:
        padded_size = self.patch + 2 * self.pad
        padded_start = patch_start(centre, self.patch) - self.pad
        crop = crop_zero_padded(volume, padded_start, padded_size)
        positions = position_grid_mm(padded_start, padded_size, self.spacing)
        aug = self.augmenter(crop, positions, rng)
        inner = tuple(slice(self.pad, self.pad + p) for p in self.patch)
        # points to match: prefer body voxels of crop a
        candidates = np.flatnonzero(ori_a.ravel() > self.body_threshold)
        if candidates.size < self.points:
            candidates = np.arange(ori_a.size)
        flat = rng.choice(candidates, size=self.points, replace=candidates.size < self.points)
        idx = np.stack(np.unravel_index(flat, ori_a.shape), axis=1)
        points_mm = (patch_start(ori_centre, self.patch) + idx) * self.spacing
        return {
            "aug_a": torch.from_numpy(aug.image[inner].copy())[None],
            "aug_pos_mm": torch.from_numpy(aug.positions_mm[(slice(None),) + inner].copy()),
            "aug_valid": torch.from_numpy(aug.valid[inner].copy())[None],
            "point_idx": torch.from_numpy(idx.astype(np.int64)),
            "point_mm": torch.from_numpy(points_mm.astype(np.float32)),
        }


class MSSBatchSampler(Sampler[list[int]]):
    """Groups an index sampler into batches; the first `mss_pairs` items of each batch are asked
    for their augmented copy (index + len(dataset)), so only those pay for augmentation."""

    def __init__(self, sampler, batch_size: int, mss_pairs: int, dataset_len: int):
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.mss_pairs = int(mss_pairs)
        self.dataset_len = int(dataset_len)

    def __iter__(self):
        batch = []
        for index in self.sampler:
            batch.append(index + self.dataset_len if len(batch) < self.mss_pairs else index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def collate_pairs(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items; keys present only on the augmented items are stacked over those items."""
    keys = items[0].keys() | set().union(*(item.keys() for item in items))
    return {key: torch.stack([item[key] for item in items if key in item]) for key in sorted(keys)}
