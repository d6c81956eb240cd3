"""`medlsam localize`: organ boxes for CT studies from support templates (no annotation)."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib

from medlsam.io import atomic_write_json, load_nifti, save_nifti
from medlsam.medlam.box_volume import boxes_to_label_volume
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.patches import PRECISIONS, PatchEmbedder
from medlsam.medlam.templates import TemplateSet
from medlsam.paths import default_medlam_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "localize",
        help="localize organs (3D boxes) in CT studies",
        description="MedLAM: RDR coarse localization + MSS refinement of each organ's six extreme "
        "points, from support templates built with `medlsam templates`.",
    )
    p.add_argument("images", nargs="+", type=Path, help="query CT NIfTI file(s)")
    p.add_argument("--templates", type=Path, required=True, help="template file from `medlsam templates`")
    p.add_argument("--medlam", type=Path, default=None, help="MedLAM checkpoint the templates were built with")
    p.add_argument("--organs", nargs="*", default=None, help="organ names or ids (default: all with templates)")
    p.add_argument("--mode", choices=["WPL", "SPL"], default="WPL", help="whole-patch or sub-patch localization")
    p.add_argument("--seed", type=int, default=0, help="seed of the random RDR crops")
    p.add_argument("--no-mss", action="store_true", help="RDR only (skip Multi-Scale Similarity refinement)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (one file per image: <stem>.boxes.json if a folder)")
    p.add_argument("--box-label", type=Path, default=None, help="also write the boxes as a label NIfTI (folder for several images)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="MedLAM patches per forward pass (default: a few on a CPU, more on a GPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: fp16 autocast on CUDA, exact fp32 on a CPU; bf16: faster on CPUs with AMX")
    p.set_defaults(func=run)


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def run(args: argparse.Namespace) -> int:
    embedder = PatchEmbedder.from_checkpoint(args.medlam or default_medlam_checkpoint(), args.device,
                                             batch_size=args.batch_size, precision=args.precision)
    templates = TemplateSet.load(args.templates, expected_fingerprint=embedder.fingerprint)
    localizer = Localizer(embedder, templates, LocalizerSettings(mss=not args.no_mss))
    several = len(args.images) > 1
    for path in args.images:
        image = load_nifti(path)
        localization = localizer.localize(image, organs=args.organs, mode=args.mode, seed=args.seed, name=path.name)
        print(f"{path.name}  ({args.mode}{'' if not args.no_mss else ', RDR only'})")
        print(f"  {'organ':22s} {'present':8s} {'conf':>6s}  box_voxel [[i0,j0,k0],[i1,j1,k1]]")
        for name, organ in localization.organs.items():
            conf = "-" if organ.confidence is None else f"{organ.confidence:.2f}"
            flag = "yes" if organ.present else "NO"
            print(f"  {name:22s} {flag:8s} {conf:>6s}  {list(map(list, organ.box.corners))}"
                  + (f"  ({organ.absent_reason})" if not organ.present else ""))
        if args.out:
            target = args.out / f"{_stem(path)}.boxes.json" if several or args.out.is_dir() else args.out
            atomic_write_json(target, {**localization.to_json(), "image": str(path)})
        if args.box_label:
            target = args.box_label / f"{_stem(path)}.boxes.nii.gz" if several or args.box_label.is_dir() else args.box_label
            volume = boxes_to_label_volume(localization, image.shape)
            save_nifti(nib.Nifti1Image(volume, image.affine), target)
    return 0
