"""Aggregate per-study results into the paper's tables: Markdown, CSV and a JSON summary."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsam.evaluation.metrics import summarize
from medlsam.evaluation.plots import localizer_label, pretty_pair, summary_localizer
from medlsam.evaluation.runner import EvalSettings, pair_name
from medlsam.io import atomic_write_bytes, atomic_write_json


def _nan_mean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def aggregate(results: Sequence[dict], settings: EvalSettings, extra: dict | None = None) -> dict:
    """Per-organ mean/std of box IoU, DSC and HD95 for every (localization, backbone) pair."""
    organs = list(settings.organs)
    summary = {
        "settings": settings.to_dict(),
        "n_studies": len(results),
        "studies": [r["study_id"] for r in results],
        "organs": dict(settings.organs),
        "localization": {},
        "pairs": {},
        "timings": {},
        **(extra or {}),
    }
    for loc in settings.localizations:
        table = {}
        for name in organs:
            entries = [r["organs"][name] for r in results]
            in_truth = [e for e in entries if e["in_truth"]]
            statuses = [e["localization"].get(loc, {}).get("status") for e in in_truth]
            row = {
                "iou": summarize(e["localization"][loc]["iou"] for e in in_truth),
                "n": len(in_truth),
                "found": statuses.count("found"),
                "missed": len(in_truth) - statuses.count("found"),
            }
            if loc in ("medlam", "medlam_box"):
                absent = [e["localization"].get(loc, {}).get("status") for e in entries if not e["in_truth"]]
                row["false_alarms"] = absent.count("found")
                row["correctly_absent"] = len(absent) - absent.count("found")
            table[name] = row
        totals = {k: sum(row[k] for row in table.values())
                  for k in ("n", "found", "missed", "false_alarms", "correctly_absent") if k in next(iter(table.values()))}
        summary["localization"][loc] = {
            "organs": table,
            "totals": totals,
            "mean_over_organs": {"iou": _nan_mean(row["iou"]["mean"] for row in table.values())},
        }
    for loc, backbone in settings.pairs:
        key = pair_name(loc, backbone)
        table = {}
        for name in organs:
            scored = [r["organs"][name]["metrics"][key] for r in results if r["organs"][name]["in_truth"]]
            table[name] = {
                "dsc": summarize(m["dsc"] for m in scored),
                "hd95": summarize(m["hd95"] for m in scored),
                "n": len(scored),
                "empty_predictions": sum(1 for m in scored if m["pred_voxels"] == 0 and m["dsc"] is not None),
            }
        summary["pairs"][key] = {
            "localization": loc,
            "backbone": backbone,
            "organs": table,
            "mean_over_organs": {m: _nan_mean(row[m]["mean"] for row in table.values()) for m in ("dsc", "hd95")},
        }
    per_study = {r["study_id"]: r["timings"] for r in results}
    totals = [t["total_s"] for t in per_study.values()]
    summary["timings"] = {
        "per_study": per_study,
        "mean_total_s": _nan_mean(totals),
        "sum_total_s": float(np.sum(totals)) if totals else 0.0,
        "mean_localize_s": _nan_mean(t.get("localize_s") for t in per_study.values()),
        "mean_segment_s": {b: _nan_mean(t["segment_s"].get(b) for t in per_study.values()) for b in settings.backbones},
    }
    return summary


# -- formatting ----------------------------------------------------------------------------------
def _pm(stats: dict, scale: float = 1.0, digits: int = 1) -> str:
    if not stats["n"] or not np.isfinite(stats["mean"]):
        return "-"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float, digits: int = 1, scale: float = 1.0) -> str:
    return f"{value * scale:.{digits}f}" if value is not None and np.isfinite(value) else "-"


def markdown_tables(summary: dict) -> dict[str, str]:
    """{"iou", "dsc", "hd95"} Markdown tables laid out like the paper's (organs x pairs, mean row)."""
    organs = list(summary["organs"])
    locs, pairs = summary["localization"], summary["pairs"]
    found_by = summary_localizer(summary)
    if "medlam" in locs and "medlam_box" in locs:  # the same boxes, prompted two ways: one IoU column
        locs = {k: v for k, v in locs.items() if k != "medlam_box"}
    out = {}
    if locs:
        header = ["Organ", "n"] + [f"{pretty_pair(l, found_by)} IoU" for l in locs] + \
                 ([f"{localizer_label(found_by)} missed"] if "medlam" in locs else [])
        rows = []
        for name in organs:
            row = [name, locs[next(iter(locs))]["organs"][name]["n"]]
            row += [_pm(locs[l]["organs"][name]["iou"], 1, 3) for l in locs]
            if "medlam" in locs:
                row.append(locs["medlam"]["organs"][name]["missed"])
            rows.append(row)
        mean_row = ["**Mean**", ""] + [_fmt(locs[l]["mean_over_organs"]["iou"], 3) for l in locs]
        if "medlam" in locs:
            mean_row.append(locs["medlam"]["totals"]["missed"])
        out["iou"] = _md_table(header, rows + [mean_row])
    for metric, scale, digits, unit in (("dsc", 100.0, 1, "%"), ("hd95", 1.0, 1, "mm")):
        header = ["Organ"] + [f"{pretty_pair(p, found_by)} ({unit})" for p in pairs]
        rows = [[name] + [_pm(pairs[p]["organs"][name][metric], scale, digits) for p in pairs] for name in organs]
        rows.append(["**Mean**"] + [_fmt(pairs[p]["mean_over_organs"][metric], digits, scale) for p in pairs])
        out[metric] = _md_table(header, rows)
    return out


def markdown_report(summary: dict, figures: dict[str, str] | None = None, title: str = "MedLSAM evaluation") -> str:
    s = summary["settings"]
    tables = markdown_tables(summary)
    found_by = summary_localizer(summary)
    boxes_of = localizer_label(found_by)
    lines = [f"# {title}", ""]
    lines.append(
        f"{summary['n_studies']} query studies; localization {s['mode']}; "
        + ("paper protocol: boxes prompted and scores computed only on slices whose ground truth exceeds "
           if s["eval_slices"] == "paper" else
           f"deployment protocol: {boxes_of} boxes segmented as the app does (any slice of the box may be prompted), "
           "scores over the whole volume; "
           "manual boxes on slices whose ground truth exceeds ")
        + f"gt_slice_threshold = {s['gt_slice_threshold']:g} px; manual boxes: ground truth + U{{0..{s['max_shift_px']:g}}} px "
        + (f"at {s['shift_reference_px']:g} px scale" if s["shift_reference_px"] else "native px")
        + f"; seed {s['seed']}."
    )
    if {"medlam", "medlam_box"} & set(s.get("localizations", ())) and s.get("box_margin_zyx"):
        z, y, x = s["box_margin_zyx"]
        in_plane = f"{s['in_plane_margin_mm']:g} mm" if s.get("in_plane_margin_mm") is not None else f"{y} x {x} px"
        lines.append(f"{boxes_of} boxes grown by {z} slices along z and {in_plane} in-plane.")
        if "medlam_box" in s.get("localizations", ()):
            lines.append(f"{boxes_of} (box prompts): the same {boxes_of} boxes, every slice prompted with the 3D box's "
                         "in-plane extent (the paper's and the previous default prompting), for comparison.")
        if "medlam" not in s.get("localizations", ()):
            pass
        elif s.get("prompting") == "propagate":
            p = s.get("propagation") or {}
            step = f"key slices about {p.get('step_mm'):g} mm apart, interpolated between" if p.get("step_mm") \
                else "every slice"
            lines.append(f"{boxes_of} boxes prompted by propagation: the start slice gets the box, every further slice "
                         f"the previous slice's mask box + {p.get('margin_mm', 0):g} mm, walks end below predicted "
                         f"IoU {p.get('min_score', 0):g}; {step}.")
        else:
            parts = "its SPL part's" if s.get("mode") == "SPL" else "the 3D box's"
            keyed = (f" Only key slices about {s['key_slice_mm']:g} mm apart (and each organ's end slices) are "
                     "prompted; the masks between them are interpolated." if s.get("key_slice_mm") else "")
            lines.append(f"{boxes_of} boxes prompted as boxes: every slice gets {parts} in-plane extent.{keyed}")
    if s.get("slice_step_mm"):
        lines.append(f"Subsampled: only axial slices about {s['slice_step_mm']:g} mm apart were prompted and scored "
                     "(DSC is estimated from them; HD95 is computed on the stacked subsample, an approximation).")
    if summary.get("supports"):
        lines.append(f"Supports ({len(summary['supports'])}): {', '.join(summary['supports'])}.")
    if summary.get("medlam_checkpoint"):
        lines.append(f"MedLAM checkpoint: `{summary['medlam_checkpoint']}`.")
    lines.append("")
    if "iou" in tables:
        lines += ["## Localization: 3D box IoU (mean ± std)", "",
                  "Organs the localizer marked absent although present count as IoU 0 (column *missed*).", "",
                  tables["iou"], ""]
        presence = (summary["localization"].get("medlam") or summary["localization"].get("medlam_box") or {}).get("totals")
        if presence:
            lines += [f"{boxes_of} presence check: {presence['found']} of {presence['n']} present organs found, "
                      f"{presence['missed']} missed; {presence['false_alarms']} false alarms, "
                      f"{presence['correctly_absent']} absent organs correctly marked absent.", ""]
    lines += ["## Segmentation: DSC (%, mean ± std)", "",
              "Missed organs count as DSC 0.", "", tables["dsc"], "",
              "## Segmentation: HD95 (mm, mean ± std)", "",
              "Only over organs with a non-empty prediction (HD95 is undefined otherwise); "
              "empty predictions per pair: "
              + ", ".join(f"{pretty_pair(p, found_by)} {sum(r['empty_predictions'] for r in v['organs'].values())}"
                          for p, v in summary["pairs"].items()) + ".", "", tables["hd95"], ""]
    t = summary["timings"]
    lines += ["## Timings", "",
              f"Mean per study: total {_fmt(t['mean_total_s'])} s, localization {_fmt(t['mean_localize_s'])} s, "
              + ", ".join(f"segmentation with {b} {_fmt(v)} s" for b, v in t["mean_segment_s"].items())
              + f" (all studies: {_fmt(t['sum_total_s'] / 60.0)} min of this run's study time). "
              "Per-study timings: `timings.csv`.", ""]
    if figures:
        lines += ["## Figures", "", "Paths relative to this report's folder.", ""]
        lines += [f"- {name}: `{path}`" for name, path in figures.items()] + [""]
    return "\n".join(lines)


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and not np.isfinite(v) else
                         (round(v, 6) if isinstance(v, float) else v) for v in row])
    return buffer.getvalue().encode()


def write_csv_tables(summary: dict, results: Sequence[dict], out_dir: Path) -> dict[str, str]:
    """iou.csv, dsc.csv, hd95.csv (organ rows, pair columns, a mean row), per_study.csv, timings.csv."""
    out_dir = Path(out_dir)
    organs = list(summary["organs"])
    written = {}
    locs, pairs = summary["localization"], summary["pairs"]
    if locs:
        header = ["organ", "n"]
        for loc in locs:
            header += [f"{loc}_iou_mean", f"{loc}_iou_std", f"{loc}_missed"]
        rows = []
        for name in organs:
            row = [name, locs[next(iter(locs))]["organs"][name]["n"]]
            for loc in locs:
                r = locs[loc]["organs"][name]
                row += [r["iou"]["mean"], r["iou"]["std"], r["missed"]]
            rows.append(row)
        mean_row = ["mean", ""]
        for loc in locs:
            mean_row += [locs[loc]["mean_over_organs"]["iou"], "", locs[loc]["totals"]["missed"]]
        atomic_write_bytes(out_dir / "iou.csv", _csv_bytes(header, rows + [mean_row]))
        written["iou"] = str(out_dir / "iou.csv")
    for metric in ("dsc", "hd95"):
        header = ["organ"]
        for p in pairs:
            header += [f"{p}_{metric}_mean", f"{p}_{metric}_std", f"{p}_n"]
        rows = []
        for name in organs:
            row = [name]
            for p in pairs:
                r = pairs[p]["organs"][name]
                row += [r[metric]["mean"], r[metric]["std"], r[metric]["n"]]
            rows.append(row)
        mean_row = ["mean"]
        for p in pairs:
            mean_row += [pairs[p]["mean_over_organs"][metric], "", ""]
        atomic_write_bytes(out_dir / f"{metric}.csv", _csv_bytes(header, rows + [mean_row]))
        written[metric] = str(out_dir / f"{metric}.csv")

    header = ["study", "organ", "in_truth", "localization", "backbone", "status", "iou", "dsc", "hd95_mm",
              "pred_voxels", "truth_voxels"]
    rows = []
    for r in results:
        for name, o in r["organs"].items():
            for loc, loc_entry in o["localization"].items():
                for p, m in o["metrics"].items() or [(None, None)]:
                    if p is not None and not p.startswith(loc + "/"):
                        continue
                    rows.append([r["study_id"], name, o["in_truth"], loc, p.split("/", 1)[1] if p else "",
                                 loc_entry.get("status"), loc_entry.get("iou"), m and m["dsc"], m and m["hd95"],
                                 m and m["pred_voxels"], o["truth_voxels"]])
    atomic_write_bytes(out_dir / "per_study.csv", _csv_bytes(header, rows))
    written["per_study"] = str(out_dir / "per_study.csv")

    backbones = summary["settings"]["backbones"]
    header = ["study", "load_s", "localize_s"] + [f"segment_{b}_s" for b in backbones] + ["metrics_s", "total_s"]
    rows = [[sid, t.get("load_s"), t.get("localize_s")] + [t["segment_s"].get(b) for b in backbones]
            + [t.get("metrics_s"), t.get("total_s")] for sid, t in summary["timings"]["per_study"].items()]
    atomic_write_bytes(out_dir / "timings.csv", _csv_bytes(header, rows))
    written["timings"] = str(out_dir / "timings.csv")
    return written


def _json_ready(obj):
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_report(results: Sequence[dict], settings: EvalSettings, out_dir: Path, extra: dict | None = None,
                 plots: bool = True) -> dict:
    """Write summary.json, report.md, the CSV tables and the bar plots; returns the summary."""
    from medlsam.evaluation.plots import summary_plots

    out_dir = Path(out_dir)
    summary = aggregate(results, settings, extra)
    figures = summary_plots(summary, out_dir) if plots else {}
    figures = {name: str(Path(path).relative_to(out_dir)) for name, path in figures.items()}
    overlay_dir = out_dir / "overlays"
    overlays = sorted(str(p.relative_to(out_dir)) for p in overlay_dir.rglob("*.png")) if overlay_dir.exists() else []
    if overlays:
        figures["overlays"] = "overlays/<study>/<organ>.png"
    summary["files"] = {"figures": figures, "overlays": overlays}
    summary["files"].update(write_csv_tables(summary, results, out_dir))
    summary["markdown"] = markdown_tables(summary)
    atomic_write_bytes(out_dir / "report.md", markdown_report(summary, figures).encode())
    summary["files"]["report"] = str(out_dir / "report.md")
    atomic_write_json(out_dir / "summary.json", _json_ready(summary))
    return summary
