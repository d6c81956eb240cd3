"""Registration localizer study: real CT pairs (box IoU, Dice with LiteMedSAM) and held-out generated
studies (box IoU per organ, presence, time, peak memory).

    # real CT (files from scripts/fetch_reference_ct.py)
    python scripts/registration_study.py real --ref build/reference_ct --out /tmp/regstudy/real
    # generated: 5 supports, held-out queries (medlsam generate --out D --count 25 --supports 5 --seed 4242)
    python scripts/registration_study.py generated --data D --supports synct_0000-synct_0004 \
        --queries synct_0005-synct_0024 --out /tmp/regstudy/gen [--medlam-rows rows.json]

Box IoU is measured in mm against the reference mask's tight box (as scripts/localization_study.py);
an organ the localizer gives no box counts 0. Rows are saved after each query: a rerun with the same
--out skips what is done. Support preparation is cached in <out>/atlas/.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medlsam.evaluation.metrics import box_iou_mm, dice, mask_box
from medlsam.io import atomic_write_bytes, load_label_map, load_nifti
from medlsam.registration import RegistrationLocalizer, RegistrationLocalizerSettings, SupportAtlas, atlas_key
from medlsam.registration.preprocessing import index_to_lps_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localization_study import MIN_PRESENT_VOXELS, query_ids  # noqa: E402

REAL_PAIRS = [  # (support, query): see medlsam.evaluation.reference_ct
    ("abdomen_pelvis", "chest_cta"),
    ("chest_cta", "abdomen_pelvis"),
    ("abdomen_pelvis", "upper_abdomen_slab"),
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def settings_from(args) -> RegistrationLocalizerSettings:
    s = RegistrationLocalizerSettings(threads=args.threads, fusion=args.fusion)
    s.registration.bspline = args.bspline
    return s


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def atlas_for(cache: Path, study_id: str, build, settings: RegistrationLocalizerSettings) -> SupportAtlas:
    """A cached support atlas, built (and saved) on first use."""
    path = cache / f"{study_id}.npz"
    if path.exists():
        try:
            return SupportAtlas.load(path, atlas_key(settings.registration, settings.label_spacing_mm))
        except ValueError:
            pass
    atlas = build()
    atlas.save(path)
    return atlas


def covered_mask(shape, affine, z_range_lps) -> np.ndarray:
    """Voxels of a study whose centres lie in an LPS z range (the part of the query a support covers)."""
    to_lps = index_to_lps_matrix(nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine))
    k = np.indices(shape, sparse=True)
    z = to_lps[2, 0] * k[0] + to_lps[2, 1] * k[1] + to_lps[2, 2] * k[2] + to_lps[2, 3]
    return np.broadcast_to((z >= z_range_lps[0]) & (z <= z_range_lps[1]), shape)


# --- real CT ----------------------------------------------------------------------------------------
def run_real(args) -> int:
    from medlsam.evaluation import reference_ct as rc
    from medlsam.pipeline import segment_localization
    from medlsam.segment import Segmenter, build_backend
    from medlsam.synthetic import LABEL_MAP

    label_ids = rc.reference_label_map(LABEL_MAP)
    loaders = {"abdomen_pelvis": rc.abdomen_pelvis, "chest_cta": rc.chest_cta, "upper_abdomen_slab": rc.upper_abdomen_slab}
    settings = settings_from(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.json"
    rows = load_rows(rows_path)
    done = {r["pair"] for r in rows}
    segmenter = None
    for support_name, query_name in REAL_PAIRS:
        pair = f"{support_name} -> {query_name}"
        if pair in done:
            continue
        support = loaders[support_name](args.ref, label_ids)
        query = loaders[query_name](args.ref, label_ids)
        atlas = atlas_for(args.out / "atlas", support_name, lambda: SupportAtlas.build(
            support_name, support.image, support.label, label_ids, settings.registration, settings.label_spacing_mm),
            settings)
        localizer = RegistrationLocalizer([atlas], settings, label_ids)
        t0, c0 = time.perf_counter(), time.process_time()
        result = localizer.localize(query.image, mode=args.mode, seed=0)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        z_range = localizer.last_registrations[support_name]["overlap_z_lps_mm"]
        covered = covered_mask(query.image.shape, query.image.affine, z_range)
        measured = result.subset([o for o in result.organs if o in query.references])
        labels = None
        if args.segment and measured.present:
            if segmenter is None:
                segmenter = Segmenter(build_backend("litemedsam", threads=args.threads), in_plane_margin_mm=8.0,
                                      progress=False)
            labels = segment_localization(query.image, measured, segmenter).labels
        for organ, entry in result.organs.items():
            ref = query.references.get(organ)
            box = [list(entry.box.lo), list(entry.box.hi)]
            row = {"pair": pair, "organ": organ, "present": entry.present, "absent_reason": entry.absent_reason,
                   "confidence": entry.confidence, "box_voxel": box, "seconds": round(seconds, 1),
                   "cpu_s": round(cpu, 1), "peak_rss_mb": round(peak_rss_mb()), "coverage_z_lps": z_range}
            if ref is not None and ref.any():
                truth_box = mask_box(ref)
                reach = ref & covered
                reach_box = mask_box(reach)
                row.update({
                    "reference_voxels": int(ref.sum()),
                    "iou": box_iou_mm(box, truth_box, query.image.affine),
                    "iou_covered": box_iou_mm(box, reach_box, query.image.affine) if reach_box else None,
                    "iou_bound": box_iou_mm(reach_box, truth_box, query.image.affine) if reach_box else 0.0,
                    "covered_fraction": round(float(reach.sum() / ref.sum()), 3),
                })
                if labels is not None:
                    pred = (labels == entry.label_id) if entry.present else np.zeros(ref.shape, bool)
                    row["dice"] = dice(pred, ref)
                    row["dice_covered"] = dice(pred & covered, reach) if reach.any() else None
            rows.append(row)
        atomic_write_bytes(rows_path, json.dumps(rows).encode())
        print(f"{pair}: {seconds:.1f} s ({cpu:.1f} s CPU), support covers query z {z_range} (LPS mm)", flush=True)
    report = real_table(rows)
    atomic_write_bytes(args.out / "table.md", report.encode())
    print(report)
    return 0


def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def real_table(rows: list[dict]) -> str:
    lines = ["| support -> query | organ | box IoU | box IoU, covered part | IoU bound | Dice | Dice, covered part | present | confidence |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "iou" not in r:
            continue
        lines.append(f"| {r['pair']} | {r['organ']} | {_fmt(r['iou'])} | {_fmt(r.get('iou_covered'))} | "
                     f"{_fmt(r.get('iou_bound'))} | {_fmt(r.get('dice'))} | {_fmt(r.get('dice_covered'))} | "
                     f"{r['present']} | {_fmt(r['confidence'])} |")
    lines.append("")
    lines.append("Presence of the organs without a reference mask in the query:")
    for pair in dict.fromkeys(r["pair"] for r in rows):
        flagged = [f"{r['organ']}{'' if r['present'] else ' (absent)'}" for r in rows if r["pair"] == pair and "iou" not in r]
        first = next(r for r in rows if r["pair"] == pair)
        lines.append(f"- {pair} ({first['seconds']} s, {first['cpu_s']} s CPU): {', '.join(flagged) or 'none'}")
    return "\n".join(lines) + "\n"


# --- generated studies ------------------------------------------------------------------------------
def run_generated(args) -> int:
    label_ids = load_label_map(args.data / "label_map.json")
    settings = settings_from(args)
    cache = args.out / "atlas"
    atlases = []
    for sid in query_ids(args.supports):
        def build(sid=sid):
            label_path = args.data / "studies" / "labels" / "final" / f"{sid}.nii.gz"
            return SupportAtlas.build(sid, load_nifti(args.data / "studies" / f"{sid}.nii.gz"),
                                      load_nifti(label_path, what="label"), label_ids, settings.registration,
                                      settings.label_spacing_mm)
        atlases.append(atlas_for(cache, sid, build, settings))
    localizer = RegistrationLocalizer(atlases, settings, label_ids)
    rows_path = args.out / "rows.json"
    rows = load_rows(rows_path)
    done = {r["study"] for r in rows}
    for i, study in enumerate(query_ids(args.queries)):
        if study in done:
            continue
        image = load_nifti(args.data / "studies" / f"{study}.nii.gz")
        truth = np.asanyarray(load_nifti(args.data / "ground_truth" / f"{study}.nii.gz", what="label").dataobj)
        t0, c0 = time.perf_counter(), time.process_time()
        result = localizer.localize(image, mode=args.mode, seed=i)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        for organ, found in result.organs.items():
            mask = truth == label_ids[organ]
            truth_box = mask_box(mask)
            box = [list(found.box.lo), list(found.box.hi)]
            rows.append({
                "study": study, "organ": organ, "voxels": int(mask.sum()),
                "iou": None if truth_box is None else box_iou_mm(box, truth_box, image.affine),
                "present": found.present, "confidence": found.confidence,
                "fraction_inside": found.fraction_inside, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                "peak_rss_mb": round(peak_rss_mb()), "shape": list(image.shape), "timings": result.timings,
            })
        atomic_write_bytes(rows_path, json.dumps(rows).encode())
        ious = [r["iou"] for r in rows if r["study"] == study and r["iou"] is not None]
        print(f"{study} {tuple(image.shape)}: mean IoU {np.mean(ious):.3f}, {seconds:.1f} s ({cpu:.1f} s CPU), "
              f"peak RSS {peak_rss_mb():.0f} MB {result.timings}", flush=True)
    organs = [o for o in label_ids if any(r["organ"] == o for r in rows)]
    medlam = load_rows(args.medlam_rows) if args.medlam_rows else []
    report = generated_table(rows, organs, medlam) + "\n" + presence_line(rows) + "\n" + cost_line(rows) + "\n"
    atomic_write_bytes(args.out / "table.md", report.encode())
    print(report)
    return 0


def generated_table(rows: list[dict], organs: list[str], medlam: list[dict]) -> str:
    studies = sorted({r["study"] for r in rows})
    medlam = [r for r in medlam if r.get("method") == "rdr+mss" and r["study"] in studies]
    head = "| organ | registration | MedLAM (RDR + MSS) | n |" if medlam else "| organ | registration | n |"
    lines = [head, "|---|---|---|---|" if medlam else "|---|---|---|"]
    means, mmeans = [], []
    for organ in organs:
        ious = [r["iou"] for r in rows if r["organ"] == organ and r["iou"] is not None]
        if not ious:
            continue
        means.append(float(np.mean(ious)))
        if medlam:
            m = [r["iou"] for r in medlam if r["organ"] == organ and r["iou"] is not None]
            mmeans.append(float(np.mean(m)) if m else float("nan"))
            lines.append(f"| {organ} | {means[-1]:.3f} | {mmeans[-1]:.3f} | {len(ious)} |")
        else:
            lines.append(f"| {organ} | {means[-1]:.3f} | {len(ious)} |")
    if medlam:
        lines.append(f"| **mean over {len(means)} organs** | **{np.mean(means):.3f}** | **{np.nanmean(mmeans):.3f}** | "
                     f"{len(studies)} studies |")
    else:
        lines.append(f"| **mean over {len(means)} organs** | **{np.mean(means):.3f}** | {len(studies)} studies |")
    return "\n".join(lines)


def presence_line(rows: list[dict]) -> str:
    tp = sum(r["present"] and r["voxels"] > MIN_PRESENT_VOXELS for r in rows)
    fn = sum((not r["present"]) and r["voxels"] > MIN_PRESENT_VOXELS for r in rows)
    tn = sum((not r["present"]) and r["voxels"] <= MIN_PRESENT_VOXELS for r in rows)
    fp = sum(r["present"] and r["voxels"] <= MIN_PRESENT_VOXELS for r in rows)
    return (f"presence: present organs kept {tp}/{tp + fn} ({tp / max(1, tp + fn):.1%}), "
            f"absent organs flagged {tn}/{tn + fp} ({tn / max(1, tn + fp):.1%})")


def cost_line(rows: list[dict]) -> str:
    per = {r["study"]: r for r in rows}
    secs = [r["seconds"] for r in per.values()]
    cpus = [r["cpu_s"] for r in per.values()]
    return (f"time per query: median {np.median(secs):.1f} s (max {np.max(secs):.1f} s), CPU median {np.median(cpus):.1f} s; "
            f"peak RSS {max(r['peak_rss_mb'] for r in per.values())} MB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("real", "generated"):
        q = sub.add_parser(name)
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--mode", default="WPL", choices=["WPL", "SPL"])
        q.add_argument("--fusion", default="vote", choices=["vote", "median"])
        q.add_argument("--bspline", action="store_true", help="add the coarse B-spline stage")
        if name == "real":
            q.add_argument("--ref", type=Path, default=Path("build/reference_ct"))
            q.add_argument("--segment", action="store_true", help="also segment with LiteMedSAM (Dice)")
        else:
            q.add_argument("--data", type=Path, required=True)
            q.add_argument("--supports", default="synct_0000-synct_0004")
            q.add_argument("--queries", default="synct_0005-synct_0024")
            q.add_argument("--medlam-rows", type=Path, default=None, help="rows.json of scripts/localization_study.py")
    args = p.parse_args()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)
    return run_real(args) if args.what == "real" else run_generated(args)


if __name__ == "__main__":
    raise SystemExit(main())
