"""`medlsam templates`: build a support-template file from annotated studies."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from medlsam.batch.sources import datastore_supports
from medlsam.io import load_label_map, load_nifti
from medlsam.medlam.patches import PRECISIONS, PatchEmbedder
from medlsam.medlam.templates import TemplateSet, compute_support
from medlsam.paths import default_medlam_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "templates",
        help="build support templates from annotated studies",
        description="Compute MedLAM support templates (six extreme points per organ, averaged over "
        "the supports that contain it) from image/label pairs.",
    )
    p.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "LABEL"), default=[],
                   help="a support image and its label (repeat for each support)")
    p.add_argument("--datastore", type=Path,
                   help="a MONAI Label datastore folder: every image with labels/final/<same name> is a support")
    p.add_argument("--label-map", type=Path, required=True, help="JSON {organ name: label id}")
    p.add_argument("--medlam", type=Path, default=None, help="MedLAM checkpoint (default: official if present, else demo)")
    p.add_argument("--max-supports", type=int, default=5, help="supports kept per organ (default 5)")
    p.add_argument("--out", type=Path, required=True, help="template file to write")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="MedLAM patches per forward pass (default: a few on a CPU, more on a GPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: fp16 autocast on CUDA, exact fp32 on a CPU; bf16: faster on CPUs with AMX")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pairs = [(Path(i), Path(l)) for i, l in args.support]
    if args.datastore:
        pairs += datastore_supports(args.datastore)
    if not pairs:
        raise ValueError("no supports given: use --support IMAGE LABEL or --datastore FOLDER")
    label_ids = load_label_map(args.label_map)
    embedder = PatchEmbedder.from_checkpoint(args.medlam or default_medlam_checkpoint(), args.device,
                                             batch_size=args.batch_size, precision=args.precision)
    templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict(), max_supports=args.max_supports)
    for image_path, label_path in tqdm(pairs, desc="supports", unit="study"):
        image = load_nifti(image_path)
        label = load_nifti(label_path, what="label")
        study_id = image_path.name.split(".")[0]
        templates.add(compute_support(embedder, image, label, label_ids, study_id), label_ids)
    templates.save(args.out)
    for name, info in templates.summary().items():
        print(f"{name:24s} id {info['label_id']:3d}  supports {info['supports']}")
    print(f"wrote {args.out}")
    return 0
