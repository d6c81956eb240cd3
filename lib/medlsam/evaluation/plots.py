"""Figures: per-organ bar charts (like the paper's Fig. 5) and slice overlays (like Fig. 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from medlsam.io import atomic_path  # noqa: E402
from medlsam.segment import DEFAULT_WINDOWS, apply_window, window_for_organ_name  # noqa: E402

LOCALIZER_LABELS = {"medlam": "MedLAM", "registration": "Registration"}
_PREDICTION_CMAP = ListedColormap(["orange"])


def localizer_label(localizer: str | None) -> str:
    """'registration' -> 'Registration'; the label of the localizer whose boxes the `medlam` pairs hold."""
    return LOCALIZER_LABELS.get(localizer or "medlam", str(localizer))


def summary_localizer(summary: dict) -> str:
    """The localizer an eval summary's boxes came from (summaries before it was recorded: MedLAM)."""
    return (summary.get("localizer") or {}).get("name", "medlam")


def pretty_pair(pair: str, localizer: str | None = "medlam") -> str:
    """'medlam/litemedsam' -> 'MedLAM + litemedsam' ('Registration + ...' when registration made the boxes)."""
    loc, _, backbone = pair.partition("/")
    found_by = localizer_label(localizer)
    label = {"medlam": found_by, "medlam_box": f"{found_by} (box prompts)", "manual": "Manual"}.get(loc, loc)
    return f"{label} + {backbone}" if backbone else label


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def grouped_bars(path: Path, organs: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 ylabel: str, title: str, ylim: tuple[float, float] | None = None) -> Path:
    """One group of bars per organ, one bar per series ({name: (means, stds)}), std as error bars."""
    n_series = max(1, len(series))
    width = 0.8 / n_series
    x = np.arange(len(organs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(organs) * max(1, n_series / 2) + 2), 4.2))
    for k, (name, (means, stds)) in enumerate(series.items()):
        means = np.nan_to_num(np.asarray(means, dtype=float), nan=0.0)
        stds = np.nan_to_num(np.asarray(stds, dtype=float), nan=0.0)
        ax.bar(x + (k - (n_series - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name,
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, organs, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars stay visible
    return _save(fig, path)


def summary_plots(summary: dict, out_dir: Path) -> dict[str, str]:
    """Bar charts of box IoU, DSC and HD95 per organ from a report summary; returns {name: path}."""
    out_dir = Path(out_dir)
    organs = list(summary["organs"])
    found_by = summary_localizer(summary)
    paths = {}

    def series(metric: str, keys: Sequence[str], table: str) -> dict:
        out = {}
        for key in keys:
            stats = [summary[table][key]["organs"][o][metric] for o in organs]
            out[pretty_pair(key, found_by)] = ([s["mean"] for s in stats], [s["std"] for s in stats])
        return out

    locs = list(summary["localization"])
    if locs:
        paths["iou"] = str(grouped_bars(out_dir / "iou_bars.png", organs, series("iou", locs, "localization"),
                                        "box IoU", "Localization: mean 3D box IoU per organ", (0, 1)))
    pairs = list(summary["pairs"])
    paths["dsc"] = str(grouped_bars(out_dir / "dsc_bars.png", organs, series("dsc", pairs, "pairs"),
                                    "DSC", "Segmentation: mean Dice per organ", (0, 1)))
    paths["hd95"] = str(grouped_bars(out_dir / "hd95_bars.png", organs, series("hd95", pairs, "pairs"),
                                     "HD95 (mm)", "Segmentation: mean 95% Hausdorff distance per organ"))
    return paths


def pick_slices(slices: Sequence[int], count: int) -> list[int]:
    """Up to `count` slices spread over the organ's extent (interior quantiles, no duplicates)."""
    slices = sorted(slices)
    if not slices or count < 1:
        return []
    picks = [slices[int(round(q * (len(slices) - 1)))] for q in np.linspace(0.2, 0.8, count)] if count > 1 \
        else [slices[len(slices) // 2]]
    return sorted(dict.fromkeys(picks))


def _crop_window(masks: Sequence[np.ndarray], boxes: Sequence[tuple], shape, pad: int = 12):
    """Rows/cols around everything drawn on a slice (at least a quarter of the slice wide)."""
    ys, xs = [], []
    for mask in masks:
        yy, xx = np.nonzero(mask)
        ys.extend([yy.min(), yy.max()] if yy.size else [])
        xs.extend([xx.min(), xx.max()] if xx.size else [])
    for y0, x0, y1, x1 in boxes:
        ys.extend([y0, y1])
        xs.extend([x0, x1])
    h, w = shape
    if not ys:
        return slice(0, h), slice(0, w)
    half_min = max(h, w) // 8
    cy, cx = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
    ry = max((max(ys) - min(ys)) / 2 + pad, half_min)
    rx = max((max(xs) - min(xs)) / 2 + pad, half_min)
    r0, r1 = int(max(0, cy - ry)), int(min(h, cy + ry + 1))
    c0, c1 = int(max(0, cx - rx)), int(min(w, cx + rx + 1))
    return slice(r0, r1), slice(c0, c1)


def organ_overlay(path: Path, organ: str, image_slices: Mapping[int, np.ndarray],
                  truth_slices: Mapping[int, np.ndarray], panels: Mapping[str, Mapping[int, tuple]],
                  localizer: str | None = "medlam") -> Path:
    """Rows = slices; columns = ground truth, then each pair's prediction with its box prompt.

    panels: {pair: {z: (pred_mask, box or None)}}.
    """
    window = DEFAULT_WINDOWS[window_for_organ_name(organ)]
    rows, cols = len(image_slices), 1 + len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for r, z in enumerate(sorted(image_slices)):
        truth = truth_slices[z]
        drawn_boxes = [p[z][1] for p in panels.values() if p[z][1] is not None]
        crop = _crop_window([truth] + [p[z][0] for p in panels.values()], drawn_boxes, truth.shape)
        grey = apply_window(image_slices[z], *window)[crop]
        columns = [("ground truth", truth, None)] + [(pretty_pair(k, localizer), v[z][0], v[z][1])
                                                  for k, v in panels.items()]
        for c, (title, mask, box) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            shown = mask[crop]
            if shown.any():
                ax.imshow(np.ma.masked_where(~shown, shown), cmap=_PREDICTION_CMAP, vmin=0, vmax=1, alpha=0.5,
                          interpolation="nearest")
            if truth[crop].any():
                ax.contour(truth[crop].astype(float), levels=[0.5], colors="lime", linewidths=0.9)
            if box is not None:
                y0, x0, y1, x1 = box
                ax.add_patch(Rectangle((x0 - crop[1].start - 0.5, y0 - crop[0].start - 0.5), x1 - x0 + 1,
                                       y1 - y0 + 1, fill=False, edgecolor="deepskyblue", linewidth=1.2))
            if c > 0:
                inter = np.count_nonzero(mask & truth)
                total = np.count_nonzero(mask) + np.count_nonzero(truth)
                title += f"\nslice DSC {2 * inter / total:.2f}" if total else ""
            ax.set_title(title if r == 0 or c > 0 else "", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"z={z}", fontsize=7)
    fig.suptitle(f"{organ} (green: ground truth, orange: prediction, blue: box prompt)", fontsize=8)
    return _save(fig, path)


def study_overlays(out_dir: Path, view, truth_view: np.ndarray, present: Mapping[str, int],
                   counted: Mapping[str, Sequence[int]], prompt_sets: Mapping[str, Mapping[str, dict]],
                   predictions: Mapping[str, Mapping[str, np.ndarray]], settings, n_slices: int = 3,
                   localizer: str | None = "medlam") -> list[Path]:
    """One overlay PNG per present organ of a study, on up to `n_slices` of its slices."""
    written = []
    for name, label_id in present.items():
        zs = pick_slices(counted.get(name) or np.flatnonzero((truth_view == label_id).any(axis=(1, 2))), n_slices)
        if not zs:
            continue
        panels = {}
        for backbone, by_loc in predictions.items():
            for loc, labels in by_loc.items():
                boxes = prompt_sets.get(loc, {}).get(name, {})
                panels[f"{loc}/{backbone}"] = {z: (labels[z] == label_id, boxes[z][0] if boxes.get(z) else None)
                                               for z in zs}
        written.append(organ_overlay(Path(out_dir) / f"{name}.png", name, {z: view.array[z] for z in zs},
                                     {z: truth_view[z] == label_id for z in zs}, panels, localizer))
    return written
