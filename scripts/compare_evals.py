"""Per-organ DSC (and box IoU) of several `medlsam eval` folders side by side, as one markdown table.

    python scripts/compare_evals.py "MedLAM box=runs/deploy:medlam_box/litemedsam" \
        "registration SPL + key slices=runs/reg:medlam/litemedsam" --iou "runs/deploy:medlam" --out table.md

Each column is NAME=FOLDER:PAIR (a pair of that folder's summary.json); `--iou NAME=FOLDER:LOCALIZATION`
adds box IoU columns. The mean row is the mean over organs of the per-organ means (as `medlsam eval`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _column(spec: str) -> tuple[str, dict]:
    name, _, where = spec.partition("=")
    folder, _, key = where.rpartition(":")
    if not (name and folder and key):
        raise SystemExit(f"expected NAME=FOLDER:KEY, got {spec!r}")
    return name, {"summary": json.loads((Path(folder) / "summary.json").read_text()), "key": key}


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
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    text = table(dict(map(_column, args.columns)), dict(map(_column, args.iou)))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
