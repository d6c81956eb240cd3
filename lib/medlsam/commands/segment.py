"""`medlsam segment`: CT image + organ boxes JSON (from `medlsam localize`) -> label NIfTI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medlsam.errors import InputError
from medlsam.io import atomic_write_json, load_nifti, save_nifti
from medlsam.labels import LabelMap
from medlsam.localization import StudyLocalization


def add_parser(sub: argparse._SubParsersAction) -> None:
    from medlsam.commands import add_box_margin_options, add_prompting_options
    from medlsam.segment import BACKENDS, DEFAULT_WINDOWS

    p = sub.add_parser(
        "segment",
        help="segment organs from 3D boxes with LiteMedSAM / SAM / MedSAM",
        description="Segment each organ inside its 3D box (expanded by --margin) slice by slice with a "
        "SAM-family model, as the app does: by default the box prompt of each slice follows the organ from "
        "the box's centre slice (--prompting propagate); --prompting box gives every slice the box's "
        "whole in-plane extent. Writes one label NIfTI on the image's voxel grid.",
    )
    p.add_argument("image", type=Path, help="CT NIfTI file (Hounsfield units)")
    p.add_argument("boxes", type=Path, help="boxes JSON as written by `medlsam localize --out`")
    p.add_argument("-o", "--out", type=Path, required=True, help="label NIfTI to write (.nii.gz)")
    p.add_argument("--model", choices=BACKENDS, default="litemedsam", help="segmentation backend")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: bundled / model folder)")
    p.add_argument("--model-dir", type=Path, default=None, help="folder with SAM/MedSAM checkpoints")
    p.add_argument("--organs", nargs="*", default=None, help="organ names or ids to segment (default: all present)")
    add_box_margin_options(p)
    add_prompting_options(p)
    p.add_argument("--whole-box", action="store_true", help="use each organ's whole box even when SPL parts exist")
    p.add_argument("--window", default="auto", choices=["auto", *DEFAULT_WINDOWS],
                   help="CT window: 'auto' (as the app) picks lung/bone windows from organ names; "
                   "a window name uses it for every organ")
    p.add_argument("--largest-component", action="store_true", help="keep each organ's largest 3D component")
    p.add_argument("--no-cache", action="store_true", help="re-encode each slice per organ (reference behaviour)")
    p.add_argument("--no-accelerate", action="store_true", help="eager PyTorch encoder instead of ONNX Runtime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--stats", type=Path, default=None, help="also write run statistics as JSON")
    p.set_defaults(func=run)


def read_localization(path: Path) -> StudyLocalization:
    """The localization in a boxes file written by `medlsam localize --out`, checked."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"boxes file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"boxes file {path} is not valid JSON: {exc}") from exc
    try:
        return StudyLocalization.from_json(raw)
    except InputError as exc:
        raise InputError(f"boxes file {path}: {exc}") from exc


def select_organs(localization: StudyLocalization, wanted: list[str] | None) -> StudyLocalization:
    """The organs of `wanted` (names or ids; None: all) of a localization."""
    if not wanted:
        return localization
    label_map = LabelMap({n: o.label_id for n, o in localization.organs.items()}, source="the boxes file")
    return localization.subset(label_map.resolve_all(wanted))


def run(args: argparse.Namespace) -> int:
    from medlsam.commands import propagation_from_args
    from medlsam.pipeline import organ_windows, segment_localization
    from medlsam.segment import Segmenter, build_backend

    image = load_nifti(args.image)
    localization = select_organs(read_localization(args.boxes), args.organs)
    if not localization.present:
        raise InputError(f"no present organ to segment in {args.boxes}")
    names = {o.label_id: n for n, o in localization.present.items()}
    backend = build_backend(args.model, checkpoint=args.checkpoint, device=args.device,
                            accelerate=not args.no_accelerate, model_dir=args.model_dir)
    segmenter = Segmenter(backend, box_margin_zyx=args.margin, cache=not args.no_cache,
                          largest_component=args.largest_component, in_plane_margin_mm=args.margin_mm,
                          prompting=args.prompting, propagation=propagation_from_args(args),
                          key_slice_mm=args.key_slice_mm)
    mode = "WPL" if args.whole_box else localization.mode
    windows = None if args.window == "auto" else {label: args.window for label in organ_windows(localization)}
    result = segment_localization(image, localization, segmenter, mode=mode, windows=windows)
    save_nifti(nib.Nifti1Image(result.labels.astype(np.uint8), image.affine), args.out)

    stats = dict(result.stats)
    stats["voxels"] = {names[label]: int((result.labels == label).sum()) for label in sorted(names)}
    print(f"{args.image.name}: {stats['organs']} organs on {stats['slices']} slices with {stats['backend']}"
          f"{' (ONNX Runtime)' if stats['accelerated'] else ''}: {stats['encoder_calls']} encoder calls, "
          f"{stats['decoder_calls']} decoder calls, {stats['seconds']:.1f} s")
    for name, count in stats["voxels"].items():
        print(f"  {name:22s} {count:9d} voxels")
    print(f"wrote {args.out}")
    if args.stats:
        atomic_write_json(args.stats, stats)
    return 0
