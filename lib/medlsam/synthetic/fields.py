"""Smooth random fields and small numeric helpers used to shape and texture the phantom.

Fields that define anatomy (deformations, vessel networks, bowel loops) live in anatomical
millimetres, so a subject looks the same whatever the voxel grid or orientation it is written in.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class LatticeNoise:
    """A smooth zero-mean random field over a box in anatomical mm (cubic B-spline of a lattice).

    `channels` independent fields share one lattice; values have roughly unit standard deviation.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, cell_mm: float, channels: int = 1):
        self.lo = np.asarray(lo, dtype=np.float64) - 2 * cell_mm
        hi = np.asarray(hi, dtype=np.float64) + 2 * cell_mm
        self.cell = float(cell_mm)
        shape = np.maximum(np.ceil((hi - self.lo) / self.cell).astype(int) + 1, 4)
        # A cubic B-spline of white coefficients has std ~0.42x the coefficients'; undo that.
        self.coef = (rng.standard_normal((channels, *shape)) / 0.42).astype(np.float32)

    def __call__(self, x, y, z) -> np.ndarray:
        """Sample at anatomical points; returns (channels, *x.shape)."""
        x, y, z = np.broadcast_arrays(x, y, z)
        inv = np.float32(1.0 / self.cell)
        pts = np.stack(
            [
                (x.astype(np.float32) - np.float32(self.lo[0])) * inv,
                (y.astype(np.float32) - np.float32(self.lo[1])) * inv,
                (z.astype(np.float32) - np.float32(self.lo[2])) * inv,
            ]
        ).reshape(3, -1)
        out = [ndimage.map_coordinates(c, pts, order=3, mode="nearest", prefilter=False)
               for c in self.coef]
        return np.stack(out).reshape((len(out),) + x.shape)


def soft_inside(signed_dist, edge_mm: float) -> np.ndarray:
    """Partial-volume occupancy of a voxel whose centre is `signed_dist` mm from a surface
    (negative inside): 1 deep inside, 0 outside, a linear ramp `edge_mm` wide across it."""
    return np.clip(0.5 - np.asarray(signed_dist, np.float32) / edge_mm, 0.0, 1.0)


def smoothstep(edge0: float, edge1: float, x) -> np.ndarray:
    t = np.clip((np.asarray(x, np.float32) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def upsample_linear(coarse: np.ndarray, index_lists, full_shape) -> np.ndarray:
    """Linear interpolation of values known at integer `index_lists` (one sorted list per axis,
    first 0 and last n-1) to every index of `full_shape`; separable, one axis at a time."""
    out = coarse
    for axis, (idx, n) in enumerate(zip(index_lists, full_shape)):
        idx = np.asarray(idx)
        if len(idx) == n:
            continue
        target = np.arange(n)
        seg = np.clip(np.searchsorted(idx, target, side="right") - 1, 0, len(idx) - 2)
        w = ((target - idx[seg]) / (idx[seg + 1] - idx[seg])).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = n
        w = w.reshape(shape)
        a = np.take(out, seg, axis=axis)
        b = np.take(out, seg + 1, axis=axis)
        out = a + (b - a) * w
    return out


def periodic_texture(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """A tileable Gaussian-correlated noise block (unit std), made by filtering in Fourier space."""
    white = rng.standard_normal(shape).astype(np.float32)
    spectrum = np.fft.rfftn(white)
    freqs = np.meshgrid(
        *[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij"
    )
    gain = np.exp(-2 * np.pi**2 * sum((f * s) ** 2 for f, s in zip(freqs, sigma_vox)))
    tex = np.fft.irfftn(spectrum * gain, s=shape).astype(np.float32)
    tex -= tex.mean()
    tex /= tex.std() + 1e-6
    return tex
