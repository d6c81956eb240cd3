"""`medlsam segment`: CT image + organ boxes JSON (from `medlsam localize`) -> label NIfTI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medlsam.io import atomic_write_json, load_nifti, save_nifti


def add_parser(sub: argparse._SubParsersAction) -> None:
    from medlsam.commands import add_box_margin_options
    from medlsam.segment import BACKENDS, DEFAULT_WINDOWS

    p = sub.add_parser(
        "segment",
        help="segment organs from 3D boxes with LiteMedSAM / SAM / MedSAM",
        description="Turn each organ's 3D box into one box prompt per axial slice (expanded by "
        "--margin), segment every slice once with a SAM-family model and write one label NIfTI "
        "on the image's voxel grid.",
    )
    p.add_argument("image", type=Path, help="CT NIfTI file (Hounsfield units)")
    p.add_argument("boxes", type=Path, help="boxes JSON as written by `medlsam localize --out`")
    p.add_argument("-o", "--out", type=Path, required=True, help="label NIfTI to write (.nii.gz)")
    p.add_argument("--model", choices=BACKENDS, default="litemedsam", help="segmentation backend")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: bundled / model folder)")
    p.add_argument("--model-dir", type=Path, default=None, help="folder with SAM/MedSAM checkpoints")
    p.add_argument("--organs", nargs="*", default=None, help="organ names or ids to segment (default: all present)")
    add_box_margin_options(p)
    p.add_argument("--whole-box", action="store_true", help="use each organ's whole box even when SPL parts exist")
    p.add_argument("--window", default="default", choices=["auto", *DEFAULT_WINDOWS],
                   help="CT window for all organs; 'auto' picks lung/bone windows from organ names")
    p.add_argument("--largest-component", action="store_true", help="keep each organ's largest 3D component")
    p.add_argument("--no-cache", action="store_true", help="re-encode each slice per organ (reference behaviour)")
    p.add_argument("--no-accelerate", action="store_true", help="eager PyTorch encoder instead of ONNX Runtime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--stats", type=Path, default=None, help="also write run statistics as JSON")
    p.set_defaults(func=run)


def read_boxes(path: Path) -> dict[str, dict]:
    """The 'organs' mapping of a localize boxes file, checked."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"boxes file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"boxes file {path} is not valid JSON: {exc}") from exc
    organs = raw.get("organs") if isinstance(raw, dict) else None
    if not isinstance(organs, dict) or not organs:
        raise ValueError(f"boxes file {path} has no 'organs' object (expected `medlsam localize` output)")
    for name, entry in organs.items():
        if not isinstance(entry, dict) or "id" not in entry:
            raise ValueError(f"boxes file {path}: organ {name!r} needs an 'id'")
        if entry.get("present", True) and not _valid_box(entry.get("box_voxel")):
            raise ValueError(f"boxes file {path}: organ {name!r} has no valid box_voxel [[i0,j0,k0],[i1,j1,k1]]")
    return organs


def _valid_box(box) -> bool:
    try:
        arr = np.asarray(box, dtype=float)
    except (TypeError, ValueError):
        return False
    return arr.shape == (2, 3) and bool(np.all(np.isfinite(arr)))


def select_organ_boxes(organs: dict[str, dict], wanted: list[str] | None, whole_box: bool):
    """({id: [(lo_ijk, hi_ijk), ...]}, {id: name}) for the present (and wanted) organs."""
    if wanted:
        known = {name: name for name in organs} | {str(e["id"]): name for name, e in organs.items()}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"unknown organ(s) {unknown}; the boxes file has {sorted(organs)}")
        chosen = {known[w] for w in wanted}
    else:
        chosen = set(organs)
    boxes, names = {}, {}
    for name, entry in organs.items():
        if name not in chosen or not entry.get("present", True):
            continue
        parts = [p["box_voxel"] for p in entry.get("parts") or [] if _valid_box(p.get("box_voxel"))]
        chosen_boxes = [entry["box_voxel"]] if whole_box or not parts else parts
        boxes[int(entry["id"])] = [(tuple(b[0]), tuple(b[1])) for b in chosen_boxes]
        names[int(entry["id"])] = name
    return boxes, names


def run(args: argparse.Namespace) -> int:
    from medlsam.segment import Segmenter, build_backend, window_for_organ_name

    image = load_nifti(args.image)
    organs = read_boxes(args.boxes)
    boxes, names = select_organ_boxes(organs, args.organs, args.whole_box)
    if not boxes:
        raise ValueError(f"no present organ to segment in {args.boxes}")
    if args.window == "auto":
        windows = {label: window_for_organ_name(name) for label, name in names.items()}
    else:
        windows = {label: args.window for label in names}
    backend = build_backend(args.model, checkpoint=args.checkpoint, device=args.device,
                            accelerate=not args.no_accelerate, model_dir=args.model_dir)
    segmenter = Segmenter(backend, box_margin_zyx=args.margin, cache=not args.no_cache,
                          largest_component=args.largest_component, in_plane_margin_mm=args.margin_mm)
    result = segmenter.segment_nifti(image, boxes, window_for_label=windows)
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
