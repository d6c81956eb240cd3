"""`medlsam run`: segment a whole dataset (folder, list, datastore or DICOMweb), resumable, on one
machine or a Ray cluster. See docs/BATCH.md."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medlsam.segment.key_slices import DEFAULT_KEY_SLICE_MM

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="segment every study of a dataset (resumable; optionally on Ray)",
        description="Localize and segment every query study with a few annotated supports (registered to each "
        "query, or MedLAM templates). "
        "Per study: <out>/labels/<id>.nii.gz, <out>/results/<id>.json (boxes, presence, confidence, timings) "
        "and a row in <out>/summary.csv. Run it again with the same --out to resume: finished studies are "
        "skipped, failed ones tried again.",
    )
    sup = p.add_argument_group("supports (one of)")
    sup.add_argument("--templates", type=Path, help="MedLAM template file from `medlsam templates` (MedLAM only)")
    sup.add_argument("--support", nargs=2, action="append", default=[], metavar=("IMAGE", "LABEL"),
                     help="a support image and its label (repeat)")
    sup.add_argument("--datastore", type=Path,
                     help="MONAI Label datastore folder: its final labels are the supports (and, without "
                     "--queries/--dicomweb, its other studies are the queries)")
    sup.add_argument("--label-map", type=Path,
                     help="JSON {organ: id} (default: label_map.json in the datastore or its parent)")
    sup.add_argument("--max-supports", type=int, default=5, help="supports kept per organ (default 5)")

    q = p.add_argument_group("queries (default: the datastore's studies without a final label)")
    q.add_argument("--queries", nargs="+", default=None,
                   help="folders of NIfTI files, .txt lists of paths (one a line) or NIfTI files")
    q.add_argument("--datastore-studies", choices=["unlabeled", "labeled", "all"], default="unlabeled",
                   help="which datastore studies are queries (default: unlabeled)")
    q.add_argument("--dicomweb", metavar="URL", help="DICOMweb server: its CT series are the queries")
    q.add_argument("--series", nargs="+", default=None, metavar="UID",
                   help="with --dicomweb: only these Series Instance UIDs")

    m = p.add_argument_group("method (as the app's /infer/medlsam)")
    m.add_argument("--organs", nargs="*", default=None, help="organ names (default: all the supports hold)")
    m.add_argument("--localizer", choices=["auto", "medlam", "registration"], default="auto",
                   help="registration of the supports to each query (no weights), or MedLAM (weights + "
                   "templates); auto, as the app: MedLAM when --medlam, --templates or the official weights "
                   "are given, else registration (default auto)")
    m.add_argument("--mode", choices=["auto", "WPL", "SPL"], default="auto",
                   help="whole boxes or SPL part boxes (auto, as the app: SPL for registration, WPL for MedLAM)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-mss", action="store_true", help="MedLAM: RDR only")
    m.add_argument("--medlam", type=Path, default=None, help="MedLAM checkpoint (default: official if present, else demo)")
    m.add_argument("--segmenter", default="litemedsam", help="litemedsam, sam_vit_b/l/h or medsam")
    m.add_argument("--segmenter-checkpoint", type=Path, default=None)
    m.add_argument("--model-dir", type=Path, default=None, help="folder with SAM/MedSAM checkpoints")
    m.add_argument("--margin-mm", type=float, default=8.0, help="in-plane box margin in mm (default 8)")
    m.add_argument("--key-slice-mm", type=float, default=DEFAULT_KEY_SLICE_MM, metavar="MM",
                   help="segment slices about this far apart (and each organ's end slices), interpolate between "
                   "(default %(default)s, as the app; 0 = every slice)")
    m.add_argument("--largest-component", action="store_true")
    m.add_argument("--device", default="cpu", help="cpu or cuda")
    m.add_argument("--no-accelerate", action="store_true", help="eager PyTorch encoder instead of ONNX Runtime")

    r = p.add_argument_group("execution")
    r.add_argument("--out", type=Path, required=True, help="output folder (shared by all workers; reuse to resume)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: alone, start a local Ray instance; with an address ('auto', "
                   "'ray://head:10001', 'head:6379') join that cluster")
    r.add_argument("--workers", type=int, default=1, help="Ray workers (actors), one model set each (default 1)")
    r.add_argument("--threads-per-worker", type=int, default=None,
                   help="CPU threads of each worker (Ray: its num_cpus; default 1 on Ray, torch's default otherwise)")
    r.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each Ray worker requests (default 1 with --device cuda, else 0; 0.5 puts two on a GPU)")
    r.add_argument("--ray-object-store-mb", type=int, default=None,
                   help="object store of a local Ray instance in MB (default: Ray's; only small rows travel)")
    r.add_argument("--max-attempts", type=int, default=3, help="tries per study when workers die (default 3)")
    r.add_argument("--limit", type=int, default=None, help="only the first N query studies")
    p.set_defaults(func=run)


def resolve_label_map(args) -> Path:
    if args.label_map:
        return args.label_map
    if args.datastore:
        for candidate in (args.datastore / "label_map.json", args.datastore.parent / "label_map.json"):
            if candidate.exists():
                return candidate
    raise ValueError("--label-map is needed (no label_map.json beside the datastore)")


def query_refs(args) -> list:
    from medlsam.batch.sources import datastore_studies, dicomweb_studies, file_studies

    given = [x for x in (args.queries, args.dicomweb) if x]
    if len(given) > 1:
        raise ValueError("give queries as --queries or --dicomweb, not both")
    if args.series and not args.dicomweb:
        raise ValueError("--series goes with --dicomweb")
    if args.queries:
        refs = file_studies(args.queries)
    elif args.dicomweb:
        refs = dicomweb_studies(args.dicomweb, args.series)
    elif args.datastore:
        refs = datastore_studies(args.datastore, args.datastore_studies)
    else:
        raise ValueError("no queries: give --queries, --dicomweb or --datastore")
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError("--limit must be at least 1")
        refs = refs[: args.limit]
    return refs


def choose_localizer(args) -> str:
    """'medlam' or 'registration' for --localizer; auto as the app: MedLAM when weights other than the
    demo ones are given (--medlam, or the official file in the model folder) or MedLAM templates
    (--templates), else registration."""
    from medlsam.paths import DEMO_MEDLAM, default_medlam_checkpoint

    if args.localizer != "auto":
        return args.localizer
    if args.medlam is not None or args.templates is not None or default_medlam_checkpoint(args.model_dir) != DEMO_MEDLAM:
        return "medlam"
    return "registration"


def prepare_run(args, progress: bool = True):
    """(settings, output, refs): supports prepared (registration) or templates built or loaded (MedLAM),
    saved into --out, output checked."""
    from medlsam.batch.outputs import BatchOutput
    from medlsam.batch.processor import BatchSettings
    from medlsam.localization import resolve_mode

    pairs = [(Path(i), Path(l)) for i, l in args.support]
    if args.templates and pairs:
        raise ValueError("give templates as --templates or as --support pairs, not both")
    refs = query_refs(args)
    if not refs:
        raise ValueError("no query studies found")
    localizer = choose_localizer(args)
    if localizer == "registration" and args.templates:
        raise ValueError("--templates holds MedLAM templates; the registration localizer needs the supports "
                         "themselves (--support or --datastore), or pass --localizer medlam")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    method = (_registration_supports if localizer == "registration" else _medlam_templates)(args, pairs, out, progress)
    organs = args.organs or None
    if organs:
        unknown = [o for o in organs if o not in method["organs"]]
        if unknown:
            raise ValueError(f"organ(s) {unknown} have no support (organs the supports hold: "
                             f"{', '.join(method['organs'])})")
    settings = BatchSettings(
        **method["settings"], organs=organs, mode=resolve_mode(args.mode, localizer),
        seed=args.seed, mss=not args.no_mss, segmenter=args.segmenter,
        segmenter_checkpoint=str(args.segmenter_checkpoint) if args.segmenter_checkpoint else None,
        model_dir=str(args.model_dir) if args.model_dir else None, box_margin_mm=args.margin_mm, key_slice_mm=args.key_slice_mm,
        largest_component=args.largest_component, device=args.device, accelerate=not args.no_accelerate,
        threads=args.threads_per_worker)
    output = BatchOutput(out, settings.run_key())
    output.prepare(settings.to_dict())
    if method.get("save"):
        method["save"]()
    return settings, output, refs


def _medlam_templates(args, pairs, out: Path, progress: bool) -> dict:
    """MedLAM's templates, from --templates or built from the supports (cached in <out>/templates.pt)."""
    from medlsam.batch.processor import templates_digest
    from medlsam.batch.sources import datastore_supports
    from medlsam.batch.supports import build_templates, save_templates
    from medlsam.medlam.patches import PatchEmbedder
    from medlsam.medlam.templates import TemplateSet
    from medlsam.paths import default_medlam_checkpoint

    checkpoint = args.medlam or default_medlam_checkpoint(args.model_dir)
    embedder = PatchEmbedder.from_checkpoint(checkpoint, args.device)
    key = None
    if args.templates:  # a --datastore then only gives the queries
        templates = TemplateSet.load(args.templates, expected_fingerprint=embedder.fingerprint)
    else:
        if args.datastore:
            pairs = pairs + datastore_supports(args.datastore)
        label_map = _read_label_map(resolve_label_map(args))
        templates, key = build_templates(embedder, pairs, label_map, args.max_supports,
                                         cache=out / "templates.pt", progress=progress, organs=args.organs or None)
    return {"organs": list(templates.organs),
            "settings": {"templates_path": str(out / "templates.pt"), "medlam_checkpoint": str(checkpoint),
                         "templates_digest": templates_digest(templates)},
            "save": lambda: save_templates(templates, out / "templates.pt", key)}


def _registration_supports(args, pairs, out: Path, progress: bool) -> dict:
    """The supports prepared for registration in <out>/atlases (kept in step with the given supports)."""
    from medlsam.batch.sources import datastore_supports, strip_nifti
    from medlsam.medlam.store import SupportStudy
    from medlsam.registration.store import atlases_digest, prepared_localizer

    if args.datastore:
        pairs = pairs + datastore_supports(args.datastore)
    if not pairs:
        raise ValueError("no supports: give --support IMAGE LABEL pairs or a --datastore with final labels")
    label_map = _read_label_map(resolve_label_map(args))
    studies = [SupportStudy(strip_nifti(Path(image).name), Path(image), Path(label)) for image, label in pairs]
    if len({s.study_id for s in studies}) != len(studies):
        raise ValueError("two supports share a file name: give each support image its own name")
    if progress:
        print(f"preparing {len(studies)} supports for registration in {out / 'atlases'}", flush=True)
    localizer = prepared_localizer(out / "atlases", label_map, studies, args.max_supports)
    return {"organs": list(localizer.organs),
            "settings": {"templates_path": "", "medlam_checkpoint": "", "localizer": "registration",
                         "atlas_dir": str(out / "atlases"), "label_map": label_map,
                         "max_supports": args.max_supports, "templates_digest": atlases_digest(localizer)}}


def _read_label_map(path: Path) -> dict[str, int]:
    from medlsam.io import load_label_map

    return load_label_map(path)


def make_executor(args, settings, out):
    from medlsam.batch.executors import LocalExecutor, RayExecutor

    if args.ray is None:
        if args.workers != 1:
            raise ValueError("--workers needs --ray (the sequential loop has one worker)")
        return LocalExecutor.from_settings(settings, out)
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if args.device.startswith("cuda") else 0.0)
    return RayExecutor(settings, out, workers=args.workers, address=args.ray,
                       threads_per_worker=args.threads_per_worker or 1, gpus_per_worker=gpus,
                       max_attempts=args.max_attempts,
                       init_options={"object_store_memory": args.ray_object_store_mb * 2**20}
                       if args.ray_object_store_mb and args.ray == "local" else None)


def run(args: argparse.Namespace) -> int:
    from medlsam.batch.runner import run_batch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings, output, refs = prepare_run(args)
    executor = make_executor(args, settings, output.root)
    print(f"medlsam run: {len(refs)} studies -> {output.root} (run key {output.run_key}, "
          f"{'Ray ' + (args.ray if args.ray != 'local' else 'local') + f', {args.workers} workers' if args.ray else 'sequential'})")
    try:
        summary = run_batch(refs, output, executor)
    finally:
        executor.close()
        output.remove_temporaries()  # left by workers killed mid-write (their studies ran again)
    print(json.dumps(summary.to_dict()))
    if summary.failed:
        print(f"{len(summary.failed)} studies failed (errors in {output.results_dir}/<id>.json and summary.csv); "
              "run again to retry them")
    return 1 if summary.failed else 0
