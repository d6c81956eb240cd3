"""Patch extraction on the MedLAM grid and batched, streamed network evaluation.

A MedLAM patch's decoder output is large (the official network: 96 channels at 64^3, ~100 MB per
patch at full resolution), so callers never hold the feature maps of all patches at once: they
iterate `PatchEmbedder.batches`, keep what they need from each batch (a window around the centre,
a similarity map) and let the batch go.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.medlam.network import MedLAMConfig, MedLAMNet

# Down-sampling factor of each decoder feature map (f0, f1, f2) relative to the patch.
FEATURE_STRIDES = (4, 2, 1)
# Peak activation memory of one patch's forward pass with the decoder, per voxel and base channel
# (measured: the official b=24, 64^3 network peaks at ~540 MB per patch in fp32 on a CPU).
ACTIVATION_BYTES_PER_VOXEL_CHANNEL = 90
# Memory a batch's activations may take, and the largest batch, per device type. CPU batches gain
# little from more than a few patches; CUDA wants many.
BATCH_MEMORY_BUDGET = {"cpu": 1.5 * 2**30, "cuda": 12 * 2**30}
MAX_BATCH = {"cpu": 8, "cuda": 64}
# Network precision: "auto" is fp16 autocast on CUDA and exact fp32 on a CPU; "bf16" autocasts to
# bfloat16 (about 3x faster on CPUs with AMX / AVX512-BF16; features agree to ~1e-2).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device (None: plain fp32)."""
    kind = torch.device(device).type
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and kind != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on a CPU")
    if precision == "auto":
        return torch.float16 if kind == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def default_batch_size(config: MedLAMConfig, device: str | torch.device = "cpu", precision: str = "auto") -> int:
    """Patches per forward pass so one batch's activations stay within the device's budget."""
    kind = torch.device(device).type
    voxels = int(np.prod(config.patch_size))
    per_patch = ACTIVATION_BYTES_PER_VOXEL_CHANNEL * voxels * config.base_channels
    if autocast_dtype(precision, device) is not None:
        per_patch //= 2  # 16-bit activations
    budget = BATCH_MEMORY_BUDGET.get(kind, BATCH_MEMORY_BUDGET["cpu"])
    return int(np.clip(budget // per_patch, 1, MAX_BATCH.get(kind, MAX_BATCH["cpu"])))


def extract_patches(array: np.ndarray, centres_zyx: np.ndarray, patch_size) -> np.ndarray:
    """Crop patches of `patch_size` centred on rounded `centres_zyx`; outside the array is 0 (air)."""
    patch = np.asarray(patch_size, dtype=int)
    half = patch // 2
    centres = np.rint(np.atleast_2d(centres_zyx)).astype(int)
    out = np.zeros((len(centres), *patch), dtype=np.float32)
    shape = np.array(array.shape)
    for n, centre in enumerate(centres):
        lo = centre - half
        hi = lo + patch
        src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
        if np.any(src_hi <= src_lo):
            continue  # entirely outside: an all-air patch
        dst_lo = src_lo - lo
        dst_hi = dst_lo + (src_hi - src_lo)
        out[n, dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = array[
            src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]
        ]
    return out


def unique_centres(points_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct patch centres (rounded points) and, per point, the index of its centre.

    Points that round to the same voxel get the same patch, so the network runs once for them.
    """
    centres = np.rint(np.atleast_2d(np.asarray(points_zyx, dtype=np.float64)))
    if len(centres) == 0:
        return centres.reshape(0, 3), np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(centres, axis=0, return_inverse=True)
    return unique, np.asarray(inverse, dtype=np.int64).reshape(-1)


@dataclass
class PatchEmbedding:
    latent: np.ndarray  # [N, 3]
    features: list[torch.Tensor] | None  # per level [N, C, ...], L2-normalised over C


@dataclass
class PatchBatch:
    """One forward pass: rows `rows` of the centres it was asked for."""

    rows: slice
    patches: torch.Tensor  # [B, D, H, W] float32, on the embedder's device
    latent: torch.Tensor  # [B, 3] float32, on the embedder's device
    features: list[torch.Tensor] | None  # per level [B, C, ...] float32, L2-normalised, on the device


class PatchEmbedder:
    """Runs MedLAM on batches of patches (no grad; see PRECISIONS for autocast).

    `batch_size` None picks one from the patch size, the width of the network and the device
    (`default_batch_size`): a few patches on a CPU, many on a GPU.
    """

    def __init__(self, net: MedLAMNet, device: str | torch.device = "cpu", batch_size: int | None = None,
                 precision: str = "auto"):
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = autocast_dtype(precision, self.device)
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size) if batch_size else default_batch_size(net.config, self.device, precision)
        self.forward_calls = 0

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", batch_size: int | None = None,
                        precision: str = "auto") -> "PatchEmbedder":
        """Load MedLAM weights (ours or the official medlam.pth); `fingerprint` identifies them."""
        from medlsam.medlam.checkpoint import load_medlam, weights_fingerprint

        net, _ = load_medlam(path, device=device)
        embedder = cls(net, device=device, batch_size=batch_size, precision=precision)
        embedder.fingerprint = weights_fingerprint(net)
        embedder.checkpoint = str(path)
        return embedder

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.net.config.patch_size)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """x: [B, D, H, W] on the device -> latents [B, 3] and normalised float32 features."""
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            out = self.net(x.unsqueeze(1), features=features)
        self.forward_calls += 1
        feats = [F.normalize(f.float(), dim=1) for f in out.features] if features else None
        return out.latent.float(), feats

    def _to_device(self, patches: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(patches).to(self.device, non_blocking=True)

    def batches(self, array: np.ndarray, centres_zyx: np.ndarray, features: bool) -> Iterator[PatchBatch]:
        """Patches of `array` centred on the rounded `centres_zyx`, cropped and run batch by batch."""
        centres = np.atleast_2d(centres_zyx)
        for start in range(0, len(centres), self.batch_size):
            rows = slice(start, min(start + self.batch_size, len(centres)))
            patches = self._to_device(extract_patches(array, centres[rows], self.patch_size))
            latent, feats = self._forward(patches, features)
            yield PatchBatch(rows=rows, patches=patches, latent=latent, features=feats)

    def latents(self, array: np.ndarray, points_zyx: np.ndarray) -> np.ndarray:
        """RDR latents [N, 3] of the patches centred on the rounded points (encoder only)."""
        centres, inverse = unique_centres(points_zyx)
        out = np.zeros((len(centres), 3), dtype=np.float32)
        for batch in self.batches(array, centres, features=False):
            out[batch.rows] = batch.latent.cpu().numpy()
        return out[inverse]

    @torch.no_grad()
    def __call__(self, patches: np.ndarray, features: bool) -> PatchEmbedding:
        """Embed already-cut patches, keeping every feature map: for a few patches only (tests,
        inspection); templates and localization stream through `batches` instead."""
        latents, feature_batches = [], []
        for start in range(0, len(patches), self.batch_size):
            latent, feats = self._forward(self._to_device(patches[start : start + self.batch_size]), features)
            latents.append(latent.cpu())
            if features:
                feature_batches.append([f.cpu() for f in feats])
        latent = torch.cat(latents).numpy() if latents else np.zeros((0, 3), np.float32)
        feats = None
        if features:
            feats = [torch.cat([b[level] for b in feature_batches]) for level in range(len(FEATURE_STRIDES))]
        return PatchEmbedding(latent=latent, features=feats)


def _clamped_range(lo: int, size: int, length: int, device) -> torch.Tensor:
    """Indices lo .. lo + size - 1, clamped into [0, length): replicate padding by indexing."""
    return torch.arange(lo, lo + size, device=device).clamp_(0, length - 1)


def feature_windows(features: list[torch.Tensor], window_sizes, patch_size) -> list[torch.Tensor]:
    """Windows of each level's feature map centred on the patch centre: [N, C, w, w, w] per level.

    A window reaching past the map repeats the border voxels (replicate padding), without copying
    the whole map.
    """
    out = []
    centre = np.asarray(patch_size) // 2
    for level, (feat, w) in enumerate(zip(features, window_sizes)):
        lo = centre // FEATURE_STRIDES[level] - w // 2
        window = feat
        for axis in range(3):
            index = _clamped_range(int(lo[axis]), int(w), feat.shape[2 + axis], feat.device)
            window = window.index_select(2 + axis, index)
        out.append(window.contiguous())
    return out
