"""Preview PNG of a study: axial slices at several levels and a coronal slice, label overlay."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .labels import ID_TO_NAME


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    can = nib.as_closest_canonical(img)
    return np.asanyarray(can.dataobj), np.asarray(can.header.get_zooms()[:3], float)


def _radiological(plane: np.ndarray) -> np.ndarray:
    """A canonical (RAS) plane [x, second axis] as displayed by radiologists: the patient's right
    on the viewer's left, the second axis (anterior or superior) up."""
    return np.flipud(plane[::-1, :].T)


def _pick_axial_levels(label: np.ndarray | None, nz: int) -> list[int]:
    """Slices through heart, liver/spleen, kidneys and bladder when present, else evenly spaced."""
    levels = []
    if label is not None:
        for names in (("heart", "lung_left"), ("liver", "spleen"), ("kidney_left", "kidney_right"),
                      ("urinary_bladder", "femoral_head_left")):
            ids = [i for i, n in ID_TO_NAME.items() if n in names]
            zs = np.nonzero(np.isin(label, ids).any(axis=(0, 1)))[0]
            if zs.size:
                levels.append(int(np.median(zs)))
    levels = sorted(set(levels))
    if len(levels) < 2:
        levels = [int(nz * f) for f in (0.2, 0.4, 0.6, 0.8)]
    return levels[:4]


def write_preview(image: nib.Nifti1Image | str | os.PathLike, png_path: str | os.PathLike,
                  label: nib.Nifti1Image | str | os.PathLike | None = None, title: str = "") -> Path:
    """Write a PNG with up to four axial slices (radiological view: anterior up, patient left on
    the right) and one coronal slice, soft-tissue window, labels overlaid in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from ..io import atomic_path, load_nifti

    if not isinstance(image, nib.Nifti1Image):
        image = load_nifti(image, what="image")
    if label is not None and not isinstance(label, nib.Nifti1Image):
        label = load_nifti(label, what="label")
    arr, zooms = _canonical(image)
    lab = None
    if label is not None:
        if label.shape != image.shape:
            raise ValueError(f"label shape {label.shape} does not match image shape {image.shape}")
        lab, _ = _canonical(label)
        lab = lab.astype(np.int32)
    arr = np.asarray(arr, np.float32)
    levels = _pick_axial_levels(lab, arr.shape[2])
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    cmap = ListedColormap(colors)
    lo, hi = 40 - 200, 40 + 200

    fig, axes = plt.subplots(1, len(levels) + 1, figsize=(4 * (len(levels) + 1.3), 4.6),
                             gridspec_kw={"width_ratios": [1] * len(levels) + [1.3]})
    for ax, k in zip(axes, levels):
        ax.imshow(_radiological(arr[:, :, k]), cmap="gray", vmin=lo, vmax=hi,
                  aspect=zooms[1] / zooms[0], interpolation="nearest")
        if lab is not None:
            sl = _radiological(lab[:, :, k]).astype(float)
            ax.imshow(np.ma.masked_equal(sl, 0), cmap=cmap, vmin=0, vmax=19, alpha=0.35,
                      aspect=zooms[1] / zooms[0], interpolation="nearest")
        ax.set_title(f"axial {k}", fontsize=9)
        ax.axis("off")
    ax = axes[-1]
    j = arr.shape[1] // 2
    if lab is not None and np.any(lab):
        j = int(np.median(np.nonzero(np.isin(lab, [3, 4, 1, 17]))[1])) if np.isin(lab, [3, 4, 1, 17]).any() else j
    ax.imshow(_radiological(arr[:, j, :]), cmap="gray", vmin=lo, vmax=hi, aspect=zooms[2] / zooms[0],
              interpolation="nearest")
    present = []
    if lab is not None:
        sl = _radiological(lab[:, j, :]).astype(float)
        ax.imshow(np.ma.masked_equal(sl, 0), cmap=cmap, vmin=0, vmax=19, alpha=0.35,
                  aspect=zooms[2] / zooms[0], interpolation="nearest")
        present = [i for i in np.unique(lab) if i in ID_TO_NAME]
    ax.set_title(f"coronal {j}", fontsize=9)
    ax.axis("off")
    if present:
        handles = [Patch(color=cmap(i / 19), label=ID_TO_NAME[i]) for i in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if present else 0, 1, 1))
    png_path = Path(png_path)
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return png_path
