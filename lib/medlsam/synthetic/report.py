"""Per-organ HU statistics of a labeled study (for previews, notes and sanity checks)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from .labels import ID_TO_NAME


def organ_hu_table(image: nib.Nifti1Image, label: nib.Nifti1Image) -> list[dict]:
    """One row per labeled organ present: voxels, volume (ml) and HU median / mean / std / p5 / p95."""
    if image.shape != label.shape:
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape}")
    img = np.asarray(image.dataobj)
    lab = np.asarray(label.dataobj)
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    rows = []
    for organ_id in np.unique(lab):
        if organ_id == 0:
            continue
        vals = img[lab == organ_id].astype(np.float64)
        p5, med, p95 = np.percentile(vals, [5, 50, 95])
        rows.append({
            "organ": ID_TO_NAME.get(int(organ_id), f"label_{int(organ_id)}"),
            "voxels": int(vals.size),
            "volume_ml": round(vals.size * voxel_ml, 1),
            "median": float(med), "mean": round(float(vals.mean()), 1), "std": round(float(vals.std()), 1),
            "p5": float(p5), "p95": float(p95),
        })
    return rows


def format_hu_table(rows: list[dict]) -> str:
    head = f"{'organ':<20} {'voxels':>8} {'ml':>8} {'median':>7} {'mean':>7} {'std':>6} {'p5':>6} {'p95':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['organ']:<20} {r['voxels']:>8} {r['volume_ml']:>8.1f} {r['median']:>7.0f} "
                     f"{r['mean']:>7.0f} {r['std']:>6.0f} {r['p5']:>6.0f} {r['p95']:>6.0f}")
    return "\n".join(lines)
