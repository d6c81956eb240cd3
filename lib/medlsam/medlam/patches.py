"""Patch extraction on the MedLAM grid and batched network evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.medlam.network import MedLAMNet

# Down-sampling factor of each decoder feature map (f0, f1, f2) relative to the patch.
FEATURE_STRIDES = (4, 2, 1)


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


@dataclass
class PatchEmbedding:
    latent: np.ndarray  # [N, 3]
    features: list[torch.Tensor] | None  # per level [N, C, ...], L2-normalised over C


class PatchEmbedder:
    """Runs MedLAM on batches of patches (no grad; fp16 autocast only on CUDA)."""

    def __init__(self, net: MedLAMNet, device: str | torch.device = "cpu", batch_size: int = 8):
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.forward_calls = 0

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", batch_size: int = 8) -> "PatchEmbedder":
        """Load MedLAM weights (ours or the official medlam.pth); `fingerprint` identifies them."""
        from medlsam.medlam.checkpoint import load_medlam, weights_fingerprint

        net, _ = load_medlam(path, device=device)
        embedder = cls(net, device=device, batch_size=batch_size)
        embedder.fingerprint = weights_fingerprint(net)
        embedder.checkpoint = str(path)
        return embedder

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.net.config.patch_size)

    @torch.no_grad()
    def __call__(self, patches: np.ndarray, features: bool) -> PatchEmbedding:
        latents, feature_batches = [], []
        for start in range(0, len(patches), self.batch_size):
            x = torch.from_numpy(patches[start : start + self.batch_size]).unsqueeze(1).to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                out = self.net(x, features=features)
            self.forward_calls += 1
            latents.append(out.latent.float().cpu())
            if features:
                feature_batches.append([F.normalize(f.float(), dim=1).cpu() for f in out.features])
        latent = torch.cat(latents).numpy() if latents else np.zeros((0, 3), np.float32)
        feats = None
        if features:
            feats = [torch.cat([b[level] for b in feature_batches]) for level in range(len(FEATURE_STRIDES))]
        return PatchEmbedding(latent=latent, features=feats)


def feature_windows(features: list[torch.Tensor], window_sizes, patch_size) -> list[torch.Tensor]:
    """Windows of each level's feature map centred on the patch centre: [N, C, w, w, w] per level."""
    out = []
    centre = np.asarray(patch_size) // 2
    for level, (feat, w) in enumerate(zip(features, window_sizes)):
        c = centre // FEATURE_STRIDES[level]
        lo = c - w // 2
        # replicate-pad so windows at the border keep their size
        padded = F.pad(feat, (w, w, w, w, w, w), mode="replicate")
        lo = lo + w
        out.append(padded[:, :, lo[0]:lo[0] + w, lo[1]:lo[1] + w, lo[2]:lo[2] + w].contiguous())
    return out
