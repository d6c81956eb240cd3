"""`medlsam eval`: the paper's tables (box IoU, DSC, HD95), bar plots and overlays on a labeled dataset."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from medlsam.commands import add_box_margin_options, add_prompting_options

    p = sub.add_parser(
        "eval",
        help="evaluate localization and segmentation on a labeled dataset (IoU, DSC, HD95)",
        description="Split a labeled dataset into supports and queries, localize every organ of each query "
        "with MedLAM and simulate 'manual' boxes from the ground truth (+0-20 px), segment both with each "
        "backbone, and write per-organ tables (Markdown, CSV, JSON), bar plots and overlays. An "
        "interrupted run resumes where it stopped when started again with the same --out.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--images", nargs="+", required=True,
                      help="image folder(s), NIfTI files or .txt lists of paths (one per line)")
    data.add_argument("--labels", nargs="+", required=True,
                      help="ground-truth label folder(s) (paired by file name), files or .txt lists (paired in order)")
    data.add_argument("--label-map", type=Path, required=True, help="JSON {organ name: label id}")
    data.add_argument("--organs", nargs="*", default=None, help="organ names or ids to evaluate (default: all)")
    sup = data.add_mutually_exclusive_group()
    sup.add_argument("--supports", type=int, default=5, help="number of supports drawn with --seed (default 5)")
    sup.add_argument("--support-ids", nargs="+", default=None, help="study ids to use as supports")
    sup.add_argument("--templates", type=Path, default=None,
                     help="prebuilt template file (from `medlsam templates`); every study is then a query")
    data.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N query studies")

    method = p.add_argument_group("method")
    method.add_argument("--localization", nargs="+", choices=["medlam", "medlam_box", "manual"],
                        default=["medlam", "manual"],
                        help="box sources to compare (default medlam manual); medlam_box: the localizer's whole (WPL) "
                        "boxes prompted the paper's way (the 3D box on every slice), beside --prompting's, from one localization")
    method.add_argument("--backbones", nargs="+", default=["litemedsam"],
                        help="segmentation backbones: litemedsam (default), sam_vit_b/l/h, medsam")
    method.add_argument("--checkpoint", action="append", default=[], metavar="BACKBONE=PATH",
                        help="checkpoint file of a backbone (repeatable), e.g. medsam=/models/medsam_vit_b.pth")
    method.add_argument("--model-dir", type=Path, default=None, help="folder with SAM/MedSAM checkpoints")
    method.add_argument("--medlam", type=Path, default=None, help="MedLAM checkpoint (default: official, else demo)")
    method.add_argument("--localizer", choices=["medlam", "registration"], default="medlam",
                        help="what finds the boxes of the medlam localization: MedLAM (weights + templates, default) "
                        "or registration of the supports to each query (no weights; supports cached in <out>/atlases)")
    method.add_argument("--mode", choices=["WPL", "SPL"], default="WPL", help="whole-patch or sub-patch localization")
    method.add_argument("--gt-slice-threshold", type=float, default=0,
                        help="slices whose ground-truth area is at most this many pixels get no box and are not "
                        "scored (paper: WORD 100, StructSeg 10; default 0)")
    method.add_argument("--eval-slices", choices=["paper", "box"], default="paper",
                        help="paper: MedLAM boxes are only prompted on slices that hold the organ (the reference "
                        "protocol); box: on every slice of the expanded box (what deployment does)")
    add_box_margin_options(method)
    add_prompting_options(method)
    method.add_argument("--box-shift", type=float, default=20, help="manual boxes: max outward shift per side (px)")
    method.add_argument("--box-shift-reference", type=float, default=1024,
                        help="image size the shift is measured at (MedSAM: 1024); 0 = native pixels")
    method.add_argument("--slice-step-mm", type=float, default=0,
                        help="subsample: prompt and score only axial slices about this many mm apart "
                        "(0 = every slice; HD95 then becomes approximate)")
    method.add_argument("--seed", type=int, default=0, help="seed of the support draw, RDR crops and box shifts")
    method.add_argument("--no-accelerate", action="store_true", help="eager PyTorch encoder instead of ONNX Runtime")
    method.add_argument("--device", default="cpu")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output folder (reused to resume)")
    out.add_argument("--overlay-studies", type=int, default=1, help="studies to draw overlays for (default 1)")
    out.add_argument("--overlay-slices", type=int, default=3, help="slices per organ in each overlay (default 3)")
    p.set_defaults(func=run)


def _resolve_organs(label_map: dict[str, int], wanted: list[str] | None) -> dict[str, int]:
    from medlsam.labels import LabelMap

    names = LabelMap(label_map).resolve_all(wanted)
    return dict(label_map) if names is None else {n: label_map[n] for n in names}


def _checkpoints(entries: list[str], backbones: list[str]) -> dict[str, Path]:
    out = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise ValueError(f"--checkpoint expects BACKBONE=PATH, got {entry!r}")
        if name not in backbones:
            raise ValueError(f"--checkpoint for {name!r}, which is not among --backbones {backbones}")
        out[name] = Path(path)
    return out


def build_templates(embedder, supports, label_map, organs, out_dir: Path, cache_key: dict):
    """Support templates of `organs` for this run, cached in <out>/templates.pt for resumed runs."""
    from medlsam.io import atomic_write_json, load_nifti
    from medlsam.medlam.templates import TemplateSet, compute_support

    path, meta = out_dir / "templates.pt", out_dir / "templates.json"
    if path.exists() and meta.exists():
        import json

        if json.loads(meta.read_text()) == cache_key:
            try:
                return TemplateSet.load(path, expected_fingerprint=embedder.fingerprint)
            except ValueError as exc:  # e.g. written by an older template format: rebuild it
                log.warning("rebuilding %s: %s", path, exc)
    templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict(), max_supports=len(supports))
    for study in tqdm(supports, desc="supports", unit="study"):
        image, label = load_nifti(study.image), load_nifti(study.label, what="label")
        held = set(np.unique(np.asanyarray(label.dataobj)).astype(int).tolist())
        if not held & set(organs.values()):
            log.warning("support %s holds none of the evaluated organs; skipped", study.study_id)
            continue
        templates.add(compute_support(embedder, image, label, label_map, study.study_id, organs=list(organs)),
                      label_map)
    if not templates.organs:
        raise ValueError("no support holds any of the evaluated organs: nothing to localize with")
    templates.save(path)
    atomic_write_json(meta, cache_key)
    return templates


def run(args: argparse.Namespace) -> int:
    from medlsam.evaluation.datasets import pair_studies, split_supports
    from medlsam.evaluation.report import markdown_tables, write_report
    from medlsam.commands import propagation_from_args
    from medlsam.evaluation.runner import EvalSettings, run_evaluation
    from medlsam.io import load_label_map

    started = time.perf_counter()
    label_map = load_label_map(args.label_map)
    organs = _resolve_organs(label_map, args.organs)
    studies = pair_studies(args.images, args.labels)
    use_medlam = bool({"medlam", "medlam_box"} & set(args.localization))
    if args.templates is not None or not use_medlam:
        supports, queries = [], list(studies)
    else:
        supports, queries = split_supports(studies, args.supports, args.support_ids, args.seed)
    if args.max_queries is not None:
        if args.max_queries < 1:
            raise ValueError("--max-queries must be at least 1")
        queries = queries[: args.max_queries]
    if args.overlay_studies < 0 or args.overlay_slices < 1:
        raise ValueError("--overlay-studies must be >= 0 and --overlay-slices >= 1")
    from medlsam.segment import BACKENDS

    unknown = [b for b in args.backbones if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backbone(s) {unknown}; choose from {', '.join(BACKENDS)}")
    checkpoints = _checkpoints(args.checkpoint, args.backbones)
    args.out.mkdir(parents=True, exist_ok=True)

    extra: dict = {"supports": [s.study_id for s in supports]}
    localizer = None
    if use_medlam and args.localizer == "registration":
        if args.templates is not None:
            raise ValueError("--templates holds MedLAM templates; --localizer registration needs supports "
                             "(--supports or --support-ids)")
        from medlsam.medlam.store import SupportStudy
        from medlsam.registration.store import prepared_localizer

        localizer = prepared_localizer(args.out / "atlases", label_map,
                                       [SupportStudy(s.study_id, Path(s.image), Path(s.label)) for s in supports],
                                       len(supports))
        extra["localizer"] = {"name": "registration", "supports": sorted(a.study_id for a in localizer.supports)}
    elif use_medlam:
        from medlsam.medlam.localizer import Localizer
        from medlsam.medlam.patches import PatchEmbedder
        from medlsam.medlam.templates import TemplateSet
        from medlsam.paths import default_medlam_checkpoint

        checkpoint = args.medlam or default_medlam_checkpoint()
        embedder = PatchEmbedder.from_checkpoint(checkpoint, args.device)
        extra["medlam_checkpoint"] = str(checkpoint)
        extra["medlam_fingerprint"] = embedder.fingerprint
        if args.templates is not None:
            templates = TemplateSet.load(args.templates, expected_fingerprint=embedder.fingerprint)
            extra["supports"] = sorted({s.study_id for v in templates.supports.values() for s in v})
            extra["templates"] = str(args.templates)
        else:
            templates = build_templates(embedder, supports, label_map, organs, args.out,
                                        {"fingerprint": embedder.fingerprint, "organs": organs,
                                         "supports": [str(s.image) for s in supports],
                                         "labels": [str(s.label) for s in supports], "label_map": label_map})
        localizer = Localizer(embedder, templates)
        extra["localizer"] = asdict(localizer.settings)

    settings = EvalSettings(
        organs=organs, localizations=tuple(args.localization), backbones=tuple(args.backbones), mode=args.mode,
        gt_slice_threshold=args.gt_slice_threshold, eval_slices=args.eval_slices, seed=args.seed,
        max_shift_px=args.box_shift, shift_reference_px=args.box_shift_reference or None,
        box_margin_zyx=tuple(args.margin), in_plane_margin_mm=args.margin_mm, slice_step_mm=args.slice_step_mm,
        prompting=args.prompting, propagation=asdict(propagation_from_args(args)), key_slice_mm=args.key_slice_mm,
        extra={k: extra[k] for k in ("supports", "medlam_fingerprint", "localizer") if k in extra}
        | {"checkpoints": {k: str(v) for k, v in checkpoints.items()}},
    )
    backends = build_backends(args.backbones, checkpoints, args)
    print(f"evaluating {len(queries)} query studies ({len(supports)} supports), {len(organs)} organs, "
          f"pairs: {', '.join(f'{l}/{b}' for l, b in settings.pairs)} -> {args.out}")
    results = run_evaluation(queries, settings, backends, args.out, localizer,
                             overlay_studies=args.overlay_studies, overlay_slices=args.overlay_slices)
    summary = write_report(results, settings, args.out, extra)
    tables = markdown_tables(summary)
    for name in ("iou", "dsc"):
        if name in tables:
            print(f"\n{'Box IoU' if name == 'iou' else 'DSC (%)'}\n{tables[name]}")
    print(f"\nwrote {args.out / 'report.md'}, summary.json, CSV tables and plots "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


def build_backends(names: list[str], checkpoints: dict[str, Path], args) -> dict:
    from medlsam.segment import build_backend

    return {name: build_backend(name, checkpoint=checkpoints.get(name), device=args.device,
                                accelerate=not args.no_accelerate, model_dir=args.model_dir)
            for name in dict.fromkeys(names)}
