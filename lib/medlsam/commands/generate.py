"""`medlsam generate`: write the synthetic CT sample dataset, or a preview PNG of a study."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_OUT = Path("sample-datasets")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from medlsam.synthetic import PRESETS, SCAN_RANGES

    p = sub.add_parser(
        "generate",
        help="write synthetic CT studies with organ labels (the sample dataset), or preview a study",
        description="Write COUNT synthetic CT studies (int16 HU NIfTI + uint8 labels) under OUT in "
        "MONAI Label's local datastore layout: OUT/studies/<id>.nii.gz, final labels for the first "
        "SUPPORTS studies in OUT/studies/labels/final/, every label in OUT/ground_truth/, and "
        "OUT/label_map.json. Existing complete studies are kept. With --preview-of, write a PNG "
        "(axial + coronal slices with the label overlay) of a NIfTI study instead, and with --label print "
        "its per-organ HU table.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"dataset folder (default {DEFAULT_OUT})")
    p.add_argument("--count", type=int, default=10, help="number of studies (default 10)")
    p.add_argument("--supports", type=int, default=5,
                   help="how many of them (the first) get final labels; always chest-abdomen-pelvis (default 5)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="tiny: ~96x96 in-plane, thick slices, for tests; default: ~256x256")
    p.add_argument("--scan-range", default=None, choices=SCAN_RANGES,
                   help="scan range of the query studies (default: drawn per study)")
    p.add_argument("--orientation", default=None,
                   help="NIfTI axis codes of every study, e.g. RAS, LPS, LAS, RPI (default: drawn per study)")
    p.add_argument("--preview", action="store_true",
                   help="also write OUT/previews/<id>.png for every study")
    p.add_argument("--preview-of", type=Path, default=None, metavar="IMAGE",
                   help="preview an existing NIfTI study instead of generating (needs --png)")
    p.add_argument("--label", type=Path, default=None, help="label NIfTI overlaid by --preview-of")
    p.add_argument("--png", type=Path, default=None, help="PNG written by --preview-of")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medlsam.synthetic import write_sample_dataset
    from medlsam.synthetic.preview import write_preview

    if args.preview_of is not None:
        if args.png is None:
            raise ValueError("--preview-of needs --png PATH for the picture")
        path = write_preview(args.preview_of, args.png, label=args.label, title=args.preview_of.name)
        print(f"preview written: {path}")
        if args.label is not None:
            from medlsam.io import load_nifti
            from medlsam.synthetic.report import format_hu_table, organ_hu_table

            rows = organ_hu_table(load_nifti(args.preview_of), load_nifti(args.label, what="label"))
            print(format_hu_table(rows))
        return 0
    if args.png is not None or args.label is not None:
        raise ValueError("--png and --label only go with --preview-of")
    summary = write_sample_dataset(
        args.out, args.count, args.supports, seed=args.seed, preset=args.preset,
        progress=not args.quiet, scan_range=args.scan_range, orientation=args.orientation,
    )
    if args.preview:
        root = Path(args.out)
        for sid in summary["studies"]:
            png = root / "previews" / f"{sid}.png"
            if png.exists():
                continue
            write_preview(root / "studies" / f"{sid}.nii.gz", png,
                          label=root / "ground_truth" / f"{sid}.nii.gz", title=sid)
        print(f"previews in {root / 'previews'}")
    print(json.dumps({k: summary[k] for k in ("root", "seconds")} | {
        "studies": len(summary["studies"]), "supports": len(summary["supports"]),
        "generated": len(summary["generated"]), "kept": len(summary["kept"]),
    }))
    return 0
