"""Augmentation of a padded crop that tracks every voxel's physical position (METHOD section 5).

The crop is stacked with three position channels (mm, z y x) and a validity channel, and one
MONAI spatial transform (affine scale/rotation and/or elastic deformation) resamples all channels
together, so after the transform each voxel still knows where in the original volume it came from.
Positions are linear in the index, so bilinear resampling reproduces them exactly; voxels that
came from outside the crop get validity < 1 and are ignored by the MSS loss.
Intensity remapping and noise then act on the image channel only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Rand3DElastic, RandGaussianNoise, RandHistogramShift

ELASTIC_SIGMA = (5.0, 7.0)  # smoothing of the random displacement field, voxels


@dataclass
class AugmentedCrop:
    image: np.ndarray  # (D, H, W) float32
    positions_mm: np.ndarray  # (3, D, H, W) float32: where each voxel came from
    valid: np.ndarray  # (D, H, W) bool: came from inside the crop


class CropAugmenter:
    """Random intensity remap, noise, affine and elastic deformation with position tracking."""

    def __init__(
        self,
        intensity_prob: float = 0.5,
        noise_prob: float = 0.5,
        noise_std: float = 0.1,
        affine_prob: float = 0.5,
        affine_scale: float = 0.1,
        affine_rotate_deg: float = 15.0,
        elastic_prob: float = 0.5,
        elastic_magnitude: float = 100.0,
    ):
        self.intensity_prob = intensity_prob
        self.noise_prob = noise_prob
        self.affine_prob = affine_prob
        self.elastic_prob = elastic_prob
        rotate = [np.deg2rad(affine_rotate_deg)] * 3
        scale = [affine_scale] * 3
        common = dict(sigma_range=ELASTIC_SIGMA, prob=1.0, mode="bilinear", padding_mode="zeros")
        self._spatial = {
            (True, True): Rand3DElastic(
                magnitude_range=(0.0, elastic_magnitude), rotate_range=rotate, scale_range=scale, **common
            ),
            (True, False): Rand3DElastic(
                magnitude_range=(0.0, 0.0), rotate_range=rotate, scale_range=scale, **common
            ),
            (False, True): Rand3DElastic(magnitude_range=(0.0, elastic_magnitude), **common),
        }
        self._remap = RandHistogramShift(num_control_points=(5, 10), prob=1.0)
        self._noise = RandGaussianNoise(prob=1.0, mean=0.0, std=noise_std)

    @classmethod
    def from_config(cls, cfg) -> "CropAugmenter":
        return cls(
            intensity_prob=cfg.intensity_prob,
            noise_prob=cfg.noise_prob,
            noise_std=cfg.noise_std,
            affine_prob=cfg.affine_prob,
            affine_scale=cfg.affine_scale,
            affine_rotate_deg=cfg.affine_rotate_deg,
            elastic_prob=cfg.elastic_prob,
            elastic_magnitude=cfg.elastic_magnitude,
        )

    def __call__(self, image: np.ndarray, positions_mm: np.ndarray, rng: np.random.Generator) -> AugmentedCrop:
        """image (D, H, W), positions_mm (3, D, H, W) -> augmented copies (same grid)."""
        stack = np.concatenate(
            [image[None], positions_mm, np.ones((1,) + image.shape, dtype=np.float32)], axis=0
        ).astype(np.float32)
        key = (bool(rng.random() < self.affine_prob), bool(rng.random() < self.elastic_prob))
        if key in self._spatial:
            transform = self._spatial[key]
            transform.set_random_state(seed=int(rng.integers(2**31)))
            stack = _as_numpy(transform(torch.from_numpy(stack)))
        out = stack[0]
        if rng.random() < self.intensity_prob and float(out.max() - out.min()) > 1e-6:
            self._remap.set_random_state(seed=int(rng.integers(2**31)))
            out = _as_numpy(self._remap(torch.from_numpy(out[None])))[0]
        if rng.random() < self.noise_prob:
            self._noise.set_random_state(seed=int(rng.integers(2**31)))
            out = _as_numpy(self._noise(torch.from_numpy(out[None])))[0]
        return AugmentedCrop(
            image=np.ascontiguousarray(out, dtype=np.float32),
            positions_mm=np.ascontiguousarray(stack[1:4], dtype=np.float32),
            valid=stack[4] > 0.999,
        )


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
