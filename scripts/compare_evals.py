"""Per-organ DSC (and box IoU) of several `medlsam eval` folders side by side, as one markdown table.

    python scripts/compare_evals.py "MedLAM box=runs/deploy:medlam_box/litemedsam" \
        "registration SPL + key slices=runs/reg:medlam/litemedsam" --iou "runs/deploy:medlam" --out table.md

Each column is NAME=FOLDER:PAIR (a pair of that folder's summary.json); `--iou NAME=FOLDER:LOCALIZATION`
adds box IoU columns. The mean row is the mean over organs of the per-organ means (as `medlsam eval`).
With `--common`, every column is recomputed from the per-study files (`studies/<id>.json`) of the
studies all folders share, and a second table gives per column the median seconds per study
(localization + segmentation) and encoder calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _column(spec: str) -> tuple[str, dict]:
    name, _, where = spec.partition("=")
    folder, _, key = where.rpartition(":")
    if not (name and folder and key):
        raise SystemExit(f"expected NAME=FOLDER:KEY, got {spec!r}")
    folder = Path(folder)
    if (folder / "summary.json").exists():
        summary = json.loads((folder / "summary.json").read_text())
    else:  # a run still going: its finished studies (with --common)
        first = next(iter(sorted((folder / "studies").glob("*.json"))), None)
        if first is None:
            raise SystemExit(f"{folder}: neither summary.json nor studies/*.json")
        summary = {"organs": {n: o["id"] for n, o in json.loads(first.read_text())["organs"].items()}}
    return name, {"summary": summary, "key": key, "folder": folder}


def _studies(col: dict) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((col["folder"] / "studies").glob("*.json"))}


def restrict_to_common(columns: list[dict]) -> list[str]:
    """Replace each column's summary by one recomputed over the studies every column has; their ids."""
    per_column = [_studies(c) for c in columns]
    common = sorted(set.intersection(*(set(s) for s in per_column)))
    if not common:
        raise SystemExit("the folders share no evaluated study")
    for col, studies in zip(columns, per_column):
        organs = col["summary"]["organs"]
        chosen = [studies[i] for i in common]

        def mean_of(values):
            values = [v for v in values if v is not None]
            return {"mean": sum(values) / len(values) if values else None, "n": len(values)}

        dsc = {o: {"dsc": mean_of(s["organs"][o]["metrics"].get(col["key"], {}).get("dsc") for s in chosen
                                  if s["organs"][o]["in_truth"])} for o in organs}
        iou = {o: {"iou": mean_of(s["organs"][o]["localization"].get(col["key"], {}).get("iou") for s in chosen
                                  if s["organs"][o]["in_truth"])} for o in organs}
        seconds, calls = [], []
        backbone = col["key"].partition("/")[2]
        for s in chosen:
            segment = s["timings"].get("segment_s", {})
            if backbone in segment:
                seconds.append(s["timings"].get("localize_s", 0.0) + segment[backbone])
                calls.append(s["segmentation"][backbone]["encoder_calls"])
        col["summary"] = {"organs": organs, "pairs": {col["key"]: {"organs": dsc}},
                          "localization": {col["key"]: {"organs": iou}}}
        col["cost"] = {"studies": len(chosen), "median_s": statistics.median(seconds) if seconds else None,
                       "median_encoder_calls": statistics.median(calls) if calls else None}
    return common


def cost_table(columns: dict) -> str:
    lines = ["| | studies | median s per study (localize + segment) | median encoder calls |", "|---|---:|---:|---:|"]
    for name, col in columns.items():
        c = col.get("cost")
        if c and c["median_s"] is not None:
            lines.append(f"| {name} | {c['studies']} | {c['median_s']:.1f} | {c['median_encoder_calls']:.0f} |")
    return "\n".join(lines)


def _dsc(col: dict, organ: str) -> float | None:
    entry = col["summary"]["pairs"][col["key"]]["organs"].get(organ)
    return None if entry is None or not entry["dsc"]["n"] else entry["dsc"]["mean"]


def _iou(col: dict, organ: str) -> float | None:
    entry = col["summary"]["localization"][col["key"]]["organs"].get(organ)
    return None if entry is None or not entry["iou"]["n"] else entry["iou"]["mean"]


def table(dsc_cols: dict, iou_cols: dict) -> str:
    first = next(iter(dsc_cols.values()))["summary"]
    organs = first["organs"]
    head = [f"DSC % {n}" for n in dsc_cols] + [f"box IoU {n}" for n in iou_cols]
    lines = ["| organ | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    sums: list[list[float]] = [[] for _ in head]
    for organ in organs:
        values = [_dsc(c, organ) for c in dsc_cols.values()] + [_iou(c, organ) for c in iou_cols.values()]
        if all(v is None for v in values):
            continue
        cells = []
        for k, v in enumerate(values):
            if v is None:
                cells.append("-")
                continue
            sums[k].append(v)
            cells.append(f"{100 * v:.1f}" if k < len(dsc_cols) else f"{v:.3f}")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    means = [(f"{100 * sum(s) / len(s):.1f}" if k < len(dsc_cols) else f"{sum(s) / len(s):.3f}") if s else "-"
             for k, s in enumerate(sums)]
    lines.append("| **mean** | " + " | ".join(f"**{m}**" for m in means) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("columns", nargs="+", help="NAME=FOLDER:PAIR (e.g. 'box=runs/x:medlam_box/litemedsam')")
    p.add_argument("--iou", nargs="*", default=[], help="NAME=FOLDER:LOCALIZATION box IoU columns")
    p.add_argument("--common", action="store_true",
                   help="compare only the studies every folder evaluated (recomputed from studies/*.json)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    dsc_cols, iou_cols = dict(map(_column, args.columns)), dict(map(_column, args.iou))
    text = ""
    if args.common:
        common = restrict_to_common(list(dsc_cols.values()) + list(iou_cols.values()))
        text = f"{len(common)} studies every folder evaluated: {', '.join(common)}\n\n"
    text += table(dsc_cols, iou_cols)
    if args.common:
        text += "\n\n" + cost_table(dsc_cols)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
