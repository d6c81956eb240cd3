"""The voxel canvas a phantom is painted on (canonical RAS grid) and the painting rules.

A subject lives in *anatomical* mm (x patient left, y anterior, z superior); the patient's pose
(the mirror to RAS+, whose x points to the patient's right, a small rotation about the long axis
and a translation) maps it to world RAS mm; the canvas grid is axis-aligned in world.
Structures are painted back to front: each paint blends its intensity in with its partial-volume
occupancy, and where occupancy >= 0.5 it takes the voxel's label (one id per voxel) and,
optionally, its compartment (which later structures may be restricted to).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .fields import periodic_texture, upsample_linear

# compartments: where a structure may be painted
OUTSIDE, WALL, THORAX, ABDOMEN, BONE, VESSEL = 0, 1, 2, 3, 4, 5
BODY = (WALL, THORAX, ABDOMEN)
CAVITY = (THORAX, ABDOMEN)

_CHUNK_VOXELS = 3_000_000
_TEX_SHAPE = (96, 96, 48)


@dataclass
class Block:
    """A box of canvas voxels with the anatomical coordinates of their centres."""

    canvas: "Canvas"
    i: np.ndarray  # voxel indices along each canvas axis
    j: np.ndarray
    k: np.ndarray
    x: np.ndarray  # anatomical mm, broadcastable: x, y (ni, nj, 1); z (1, 1, nk)
    y: np.ndarray
    z: np.ndarray

    @property
    def shape(self):
        return (len(self.i), len(self.j), len(self.k))

    def full(self, arr) -> np.ndarray:
        """A coordinate (or any broadcastable) array expanded to the block's full shape."""
        return np.broadcast_to(arr, self.shape)

    @property
    def slices(self):
        return (
            slice(int(self.i[0]), int(self.i[-1]) + 1),
            slice(int(self.j[0]), int(self.j[-1]) + 1),
            slice(int(self.k[0]), int(self.k[-1]) + 1),
        )

    @property
    def edge(self) -> float:
        return self.canvas.edge_mm

    def smooth(self, fn, step_mm: float = 6.0) -> np.ndarray:
        """Evaluate a smooth function of anatomical coordinates on a coarse sub-grid of the block
        and interpolate it to every voxel (fields that vary over >~2 steps lose nothing)."""
        idx = []
        for n, s in zip(self.shape, self.canvas.spacing):
            step = max(1, int(round(step_mm / s)))
            grid = np.arange(0, n, step)
            if grid[-1] != n - 1:
                grid = np.append(grid, n - 1)
            idx.append(grid)
        xc, yc, zc = self.canvas.anat_coords(self.i[idx[0]], self.j[idx[1]], self.k[idx[2]])
        coarse_shape = tuple(len(g) for g in idx)
        values = np.asarray(fn(xc, yc, zc), np.float32)
        if values.ndim == 4:
            values = np.broadcast_to(values, values.shape[:1] + coarse_shape)
            return np.stack([upsample_linear(v, idx, self.shape) for v in values])
        return upsample_linear(np.broadcast_to(values, coarse_shape), idx, self.shape)

    def texture(self, key: str, coarse: bool = False) -> np.ndarray:
        """Correlated unit-variance grain for this block, decorrelated between structures by key."""
        tile = self.canvas.tex_coarse if coarse else self.canvas.tex_fine
        off = zlib.crc32(key.encode())
        ti = (self.i + off % 97) % tile.shape[0]
        tj = (self.j + (off // 97) % 89) % tile.shape[1]
        tk = (self.k + (off // 8633) % 43) % tile.shape[2]
        return tile[np.ix_(ti, tj, tk)]


class Canvas:
    """Image, label and compartment arrays on a canonical (RAS-aligned) voxel grid."""

    def __init__(self, shape, spacing, origin, pose_rotation, pose_translation, rng):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)  # world mm of voxel (0, 0, 0)
        self.rot = np.asarray(pose_rotation, float)  # world = rot @ anat + trans (orthogonal)
        if not np.allclose(self.rot[2], [0, 0, 1]) or not np.allclose(self.rot[:, 2], [0, 0, 1]):
            raise ValueError("the patient pose may only rotate about the z axis")
        self.trans = np.asarray(pose_translation, float)
        self.edge_mm = float(np.prod(self.spacing) ** (1 / 3))
        self.image = np.full(self.shape, -1000.0, np.float32)
        self.label = np.zeros(self.shape, np.uint8)
        self.comp = np.zeros(self.shape, np.uint8)
        self.fields: dict[str, np.ndarray] = {}  # full-grid fields shared between painters
        sig_fine = 0.9 / np.minimum(self.spacing, 3.0) * np.array([1.0, 1.0, 1.0])
        self.tex_fine = periodic_texture(rng, _TEX_SHAPE, np.maximum(sig_fine, 0.6))
        self.tex_coarse = periodic_texture(rng, _TEX_SHAPE, np.maximum(4.0 / self.spacing, 0.8))

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def world_axes(self, i, j, k):
        return (
            self.origin[0] + np.asarray(i) * self.spacing[0],
            self.origin[1] + np.asarray(j) * self.spacing[1],
            self.origin[2] + np.asarray(k) * self.spacing[2],
        )

    def anat_coords(self, i, j, k):
        """Anatomical mm of voxel centres i x j x k (outer product) as broadcastable float32
        arrays: x and y of shape (ni, nj, 1), z of shape (1, 1, nk). The pose only rotates
        about the body's long axis, so anatomical z is a function of the slice alone."""
        wx, wy, wz = self.world_axes(i, j, k)
        m = self.rot.T
        c = -m @ self.trans
        wx = wx.astype(np.float32)[:, None, None]
        wy = wy.astype(np.float32)[None, :, None]
        x = np.float32(m[0, 0]) * wx + (np.float32(m[0, 1]) * wy + np.float32(c[0]))
        y = np.float32(m[1, 0]) * wx + (np.float32(m[1, 1]) * wy + np.float32(c[1]))
        z = (wz.astype(np.float32) + np.float32(c[2]))[None, None, :]
        return x, y, z

    def index_box(self, lo, hi, margin_vox: int = 2):
        """Voxel index ranges covering an anatomical box, or None when it misses the grid."""
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        world = corners @ self.rot.T + self.trans
        idx = (world - self.origin) / self.spacing
        start = np.floor(idx.min(axis=0)).astype(int) - margin_vox
        stop = np.ceil(idx.max(axis=0)).astype(int) + margin_vox + 1
        start = np.maximum(start, 0)
        stop = np.minimum(stop, self.shape)
        if np.any(stop <= start):
            return None
        return start, stop

    def blocks(self, lo, hi):
        """Blocks covering an anatomical box, chunked along the slice axis to bound memory."""
        box = self.index_box(lo, hi)
        if box is None:
            return
        (i0, j0, k0), (i1, j1, k1) = box
        per_slice = (i1 - i0) * (j1 - j0)
        step = max(1, _CHUNK_VOXELS // max(per_slice, 1))
        i, j = np.arange(i0, i1), np.arange(j0, j1)
        for ks in range(k0, k1, step):
            k = np.arange(ks, min(ks + step, k1))
            x, y, z = self.anat_coords(i, j, k)
            yield Block(self, i, j, k, x, y, z)

    def paint(self, lo, hi, fn, label=None, allowed=None, set_comp=None):
        """Paint a structure over the anatomical box [lo, hi].

        fn(block) -> (occupancy, hu) or (occupancy, hu, comp) or None; occupancy in [0, 1].
        label: id written where occupancy >= 0.5 (0 clears); None leaves labels alone.
        allowed: compartments the structure may occupy (others clip it).
        set_comp: compartment written where occupancy >= 0.5 (fn's comp array wins if given).
        """
        lut = None
        if allowed is not None:
            lut = np.zeros(256, np.float32)
            lut[list(allowed)] = 1.0
        for blk in self.blocks(lo, hi):
            res = fn(blk)
            if res is None:
                continue
            occ, hu = blk.full(res[0]), res[1]
            comp_values = res[2] if len(res) > 2 else None
            sl = blk.slices
            if lut is not None:
                occ = occ * lut[self.comp[sl]]
            img = self.image[sl]
            img += occ * (np.asarray(hu, np.float32) - img)
            hard = occ >= 0.5
            if label is not None:
                self.label[sl][hard] = label
            if comp_values is not None:
                self.comp[sl][hard] = np.broadcast_to(comp_values, hard.shape)[hard]
            elif set_comp is not None:
                self.comp[sl][hard] = set_comp
