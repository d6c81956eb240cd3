"""Implicit shape primitives: approximate signed distances (mm, negative inside)."""

from __future__ import annotations

import numpy as np


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix: roll about x, then pitch about y, then yaw about z (degrees)."""
    a, b, c = np.deg2rad([roll_deg, pitch_deg, yaw_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def frame_with_axis(direction) -> np.ndarray:
    """Rotation whose third column is the unit vector `direction` (local z -> direction)."""
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)
    helper = np.array([1.0, 0, 0]) if abs(d[0]) < 0.9 else np.array([0, 1.0, 0])
    u = np.cross(helper, d)
    u /= np.linalg.norm(u)
    v = np.cross(d, u)
    return np.stack([u, v, d], axis=1)


def to_local(x, y, z, center, rot=None):
    """Coordinates relative to `center`, expressed in the frame whose axes are rot's columns."""
    dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
    if rot is None:
        return dx, dy, dz
    r = np.asarray(rot, np.float32)
    return (
        r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
        r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
        r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
    )


def ellipsoid(lx, ly, lz, radii) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (local coordinates)."""
    a, b, c = (np.float32(r) for r in radii)
    k0 = np.sqrt((lx / a) ** 2 + (ly / b) ** 2 + (lz / c) ** 2)
    k1 = np.sqrt((lx / a**2) ** 2 + (ly / b**2) ** 2 + (lz / c**2) ** 2)
    return k0 * (k0 - 1) / np.maximum(k1, 1e-6)


def ellipse2d(dx, dy, a, b, boxiness: float = 0.0) -> np.ndarray:
    """Approximate signed distance to an ellipse with half-axes a, b (arrays allowed), made
    squarer by `boxiness` in [0, 1] (a blend of the p=2 and p=4 superellipse norms); the
    level-set value divided by its gradient norm, using only cheap arithmetic."""
    ax, ay = dx / a, dy / b
    ax2, ay2 = ax * ax, ay * ay
    k2 = np.sqrt(ax2 + ay2)
    inv2 = 1.0 / np.maximum(k2, 1e-6)
    gx, gy = ax * inv2 / a, ay * inv2 / b
    if boxiness:
        k4 = np.sqrt(np.sqrt(ax2 * ax2 + ay2 * ay2))
        inv4 = 1.0 / np.maximum(k4, 1e-6) ** 3
        w = np.float32(boxiness)
        k = (1 - w) * k2 + w * k4
        gx = (1 - w) * gx + w * ax2 * ax * inv4 / a
        gy = (1 - w) * gy + w * ay2 * ay * inv4 / b
    else:
        k = k2
    return (k - 1) / np.maximum(np.sqrt(gx * gx + gy * gy), 1e-6)


def smooth_union(d1, d2, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two signed distances (blend radius k mm)."""
    h = np.clip(0.5 + 0.5 * (d2 - d1) / k, 0, 1)
    return d2 + (d1 - d2) * h - k * h * (1 - h)


def catmull_rom(points, samples_per_segment: int = 6) -> np.ndarray:
    """A smooth curve through control points (n, k): returns the densely sampled curve."""
    p = np.asarray(points, float)
    if len(p) < 3:
        t = np.linspace(0, 1, samples_per_segment + 1)[:, None]
        return p[0] + t * (p[-1] - p[0])
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    t = np.linspace(0, 1, samples_per_segment, endpoint=False)[:, None]
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        out.append(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
            )
        )
    out.append(p[-1:])
    return np.vstack(out)


def tube(x, y, z, curve, radii):
    """Signed distance to a tube around a polyline `curve` (n, 3) with per-point `radii` (n,).

    Returns (distance, u) where u in [0, 1] is the arc-length position of the nearest point.
    Points far from a segment's bounding box skip that segment's exact distance.
    """
    x, y, z = np.broadcast_arrays(x, y, z)
    curve = np.asarray(curve, np.float32)
    radii = np.asarray(radii, np.float32)
    seglen = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    cum = np.concatenate([[0], np.cumsum(seglen)]) / max(float(seglen.sum()), 1e-6)
    best = np.full(np.shape(x), np.inf, np.float32)
    best_u = np.zeros(np.shape(x), np.float32)
    flat = [np.ravel(x), np.ravel(y), np.ravel(z)]
    bestf, bestuf = best.reshape(-1), best_u.reshape(-1)
    rmax = float(radii.max())
    for i in range(len(curve) - 1):
        a, b = curve[i], curve[i + 1]
        lo = np.minimum(a, b) - rmax - 1
        hi = np.maximum(a, b) + rmax + 1
        near = np.nonzero(
            (flat[0] > lo[0]) & (flat[0] < hi[0]) & (flat[1] > lo[1]) & (flat[1] < hi[1])
            & (flat[2] > lo[2]) & (flat[2] < hi[2])
        )[0]
        if near.size == 0:
            continue
        px, py, pz = flat[0][near] - a[0], flat[1][near] - a[1], flat[2][near] - a[2]
        ab = b - a
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-9), 0, 1)
        dist = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        dist -= radii[i] + t * (radii[i + 1] - radii[i])
        better = dist < bestf[near]
        idx = near[better]
        bestf[idx] = dist[better]
        bestuf[idx] = cum[i] + t[better] * (cum[i + 1] - cum[i])
    return best, best_u


def curve_bbox(curve, radii, margin: float = 2.0):
    curve = np.asarray(curve)
    r = float(np.max(radii)) + margin
    return curve.min(axis=0) - r, curve.max(axis=0) + r


def dmax(*arrays) -> np.ndarray:
    """Elementwise maximum of broadcastable arrays (intersection of signed distances)."""
    out = arrays[0]
    for a in arrays[1:]:
        out = np.maximum(out, a)
    return out


def dmin(*arrays) -> np.ndarray:
    """Elementwise minimum of broadcastable arrays (union of signed distances)."""
    out = arrays[0]
    for a in arrays[1:]:
        out = np.minimum(out, a)
    return out
