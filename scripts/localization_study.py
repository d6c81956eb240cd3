"""Held-out MedLAM localization study: per-organ 3D box IoU with RDR only and with RDR+MSS, and how
well the presence test separates organs in the scan from organs outside it.

Works on a dataset written by `medlsam generate` (studies/, ground_truth/, label_map.json) and a
template file written by `medlsam templates`. Every query is localized twice (MSS off / on) with the
presence test disabled, so every organ gets a box; IoU is measured in mm against the ground-truth box.
Rows are saved after each study: a rerun with the same --out skips the studies already done.

    medlsam generate --out /tmp/heldout --count 25 --supports 5 --seed 0
    medlsam templates --datastore /tmp/heldout/studies --label-map /tmp/heldout/label_map.json --out /tmp/heldout/templates.pt
    python scripts/localization_study.py --data /tmp/heldout --templates /tmp/heldout/templates.pt \
        --queries synct_0005-synct_0024 --out /tmp/heldout/study
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medlsam.evaluation.metrics import box_iou_mm, mask_box
from medlsam.io import atomic_write_bytes, load_label_map, load_nifti
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.patches import PatchEmbedder
from medlsam.medlam.templates import TemplateSet
from medlsam.paths import default_medlam_checkpoint

MIN_PRESENT_VOXELS = 50  # an organ cut to fewer voxels by the scan range counts as absent


def query_ids(spec: str) -> list[str]:
    """'synct_0005-synct_0024' (inclusive range) or 'a,b,c'."""
    if "-" in spec and "," not in spec:
        first, last = spec.split("-")
        prefix = first.rstrip("0123456789")
        width = len(first) - len(prefix)
        return [f"{prefix}{i:0{width}d}" for i in range(int(first[len(prefix):]), int(last[len(prefix):]) + 1)]
    return [s for s in spec.split(",") if s]


def localize_study(localizers: dict[str, Localizer], data: Path, study: str, label_ids: dict[str, int],
                   seed: int) -> list[dict]:
    image = load_nifti(data / "studies" / f"{study}.nii.gz")
    truth = np.asanyarray(load_nifti(data / "ground_truth" / f"{study}.nii.gz", what="label").dataobj)
    rows = []
    for method, localizer in localizers.items():
        localization = localizer.localize(image, seed=seed)
        for organ, found in localization.organs.items():
            mask = truth == label_ids[organ]
            truth_box = mask_box(mask)
            rows.append({
                "study": study, "method": method, "organ": organ, "voxels": int(mask.sum()),
                "iou": None if truth_box is None else box_iou_mm(found.box.corners, truth_box, image.affine),
                "confidence": found.confidence, "fraction_inside": found.fraction_inside,
            })
    return rows


def iou_table(rows: list[dict], organs: list[str]) -> str:
    lines = ["| organ | RDR only | RDR + MSS | n |", "|---|---|---|---|"]
    means = {"rdr": [], "rdr+mss": []}
    for organ in organs:
        by = {m: [r["iou"] for r in rows if r["organ"] == organ and r["method"] == m and r["iou"] is not None]
              for m in means}
        if not by["rdr+mss"]:
            continue
        for m in means:
            means[m].append(float(np.mean(by[m])))
        lines.append(f"| {organ} | {means['rdr'][-1]:.3f} | {means['rdr+mss'][-1]:.3f} | {len(by['rdr+mss'])} |")
    studies = len({r["study"] for r in rows})
    lines.append(f"| **mean over {len(means['rdr'])} organs** | **{np.mean(means['rdr']):.3f}** | "
                 f"**{np.mean(means['rdr+mss']):.3f}** | {studies} studies |")
    return "\n".join(lines)


def presence_report(rows: list[dict], settings: LocalizerSettings) -> str:
    """Recall of present and of absent organs under the app's default presence test (MSS rows)."""
    tp = fn = tn = fp = 0
    for r in (r for r in rows if r["method"] == "rdr+mss"):
        kept = r["fraction_inside"] >= settings.min_fraction_inside and r["confidence"] >= settings.presence_threshold
        present = r["voxels"] > MIN_PRESENT_VOXELS
        tp += kept and present
        fn += (not kept) and present
        tn += (not kept) and not present
        fp += kept and not present
    return (f"presence test (similarity >= {settings.presence_threshold}, box inside >= {settings.min_fraction_inside}): "
            f"present organs kept {tp}/{tp + fn} ({tp / max(1, tp + fn):.1%}), "
            f"absent organs flagged {tn}/{tn + fp} ({tn / max(1, tn + fp):.1%})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dataset folder from `medlsam generate`")
    p.add_argument("--templates", type=Path, required=True, help="template file from `medlsam templates`")
    p.add_argument("--queries", required=True, help="query study ids: 'synct_0005-synct_0024' or 'a,b,c'")
    p.add_argument("--medlam", type=Path, default=None, help="MedLAM checkpoint (default: official, else demo)")
    p.add_argument("--out", type=Path, required=True, help="output folder (rows.json, table.md)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    label_ids = load_label_map(args.data / "label_map.json")
    embedder = PatchEmbedder.from_checkpoint(args.medlam or default_medlam_checkpoint())
    templates = TemplateSet.load(args.templates, embedder.fingerprint)
    open_box = dict(presence_threshold=-1.0, min_fraction_inside=0.0)  # a box for every organ
    localizers = {"rdr": Localizer(embedder, templates, LocalizerSettings(mss=False, **open_box)),
                  "rdr+mss": Localizer(embedder, templates, LocalizerSettings(mss=True, **open_box))}

    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    done = {r["study"] for r in rows}
    studies = query_ids(args.queries)
    for i, study in enumerate(tqdm(studies, desc="queries", unit="study")):
        if study in done:
            continue
        t0 = time.perf_counter()
        rows += localize_study(localizers, args.data, study, label_ids, seed=i)
        atomic_write_bytes(rows_path, json.dumps(rows).encode())
        tqdm.write(f"{study}: {time.perf_counter() - t0:.1f} s")

    organs = [o for o in label_ids if any(r["organ"] == o for r in rows)]
    report = iou_table(rows, organs) + "\n\n" + presence_report(rows, LocalizerSettings()) + "\n"
    atomic_write_bytes(args.out / "table.md", report.encode())
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
