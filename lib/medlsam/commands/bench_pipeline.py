"""`medlsam bench --pipeline`: ways of answering `/infer/medlsam`, side by side, end to end.

Each configuration is a prompting (`box`, `propagate`, with options) and where its boxes come from
(`@medlam/WPL`, the default; `@registration/SPL`, ...), e.g. `box@medlam/WPL` (the path before this
round) against `box:key_slice_mm=5@registration/SPL`. One default-preset study is localized once per
distinct localizer and mode; each configuration then segments in its own fresh process (so its peak
RSS is its own): load the study, segment, map back. Printed and written as JSON: seconds per phase,
encoder and decoder calls, peak RSS, Dice between the outputs and against the ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from medlsam.io import atomic_write_json, load_nifti

DEFAULT_OUT = Path("runs") / "bench" / "pipeline_bench.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--pipeline (end-to-end comparison of the prompting)")
    g.add_argument("--pipeline", action="store_true",
                   help="compare today's box prompts with the propagated prompts end to end (load, localize, "
                   "encode, decode, post-process) on one default-preset study")
    g.add_argument("--dataset", type=Path, default=None,
                   help="a `medlsam generate` folder to take the query (and, without --templates, the supports) "
                   "from; default: generate 5 supports and one query (chest-abdomen-pelvis) into a temp folder")
    g.add_argument("--study", default=None, help="query study id in --dataset (default: its first non-support)")
    g.add_argument("--templates", type=Path, default=None, help="prebuilt templates (`medlsam templates`)")
    g.add_argument("--compare", nargs="+", default=["box@medlam/WPL", "box:key_slice_mm=5@registration/SPL"],
                   metavar="CONFIG",
                   help="configurations to run: PROMPTING[:OPTIONS][@LOCALIZER[/MODE]], e.g. box, propagate:step_mm=0, "
                   "box:key_slice_mm=5@registration/SPL, box:key_slice_mm=5,one_window=1@registration/SPL "
                   "(one_window=1: every organ in the soft-tissue window; localizer medlam or registration, mode WPL or SPL; "
                   "default @medlam/WPL; options not given are off) (default: the path before the registration "
                   "default, box@medlam/WPL, against the app's default, box:key_slice_mm=5@registration/SPL)")
    g.add_argument("--repeats", type=int, default=1, help="segmentations per configuration (median reported)")


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


SEGMENTER_OPTIONS = ("key_slice_mm",)
# one_window=1: every organ in the default (soft-tissue) window, so each slice takes one encoder pass
# (otherwise lungs and bones get their own windows and passes).
PIPELINE_OPTIONS = ("one_window",)
BOOLEAN_OPTIONS = ("refine_start", "one_window")


LOCALIZERS = ("medlam", "registration")


def parse_localization(text: str) -> tuple[str, dict, str, str]:
    """'box:key_slice_mm=5@registration/SPL' -> ('box', {'key_slice_mm': 5.0}, 'registration', 'SPL');
    without '@': MedLAM, WPL (the app's path before the registration default)."""
    config, _, where = text.partition("@")
    localizer, _, mode = where.partition("/")
    localizer, mode = (localizer or "medlam").lower(), (mode or "WPL").upper()
    if localizer not in LOCALIZERS or mode not in ("WPL", "SPL"):
        raise ValueError(f"--compare {text!r}: after '@' give medlam or registration, optionally /WPL or /SPL")
    return (*parse_config(config), localizer, mode)


def parse_config(text: str) -> tuple[str, dict]:
    """'propagate:step_mm=6,margin_mm=4' -> ('propagate', {'step_mm': 6.0, 'margin_mm': 4.0});
    'box:key_slice_mm=5' -> ('box', {'key_slice_mm': 5.0})."""
    from medlsam.segment import PropagationSettings, check_prompting

    prompting, _, rest = text.partition(":")
    prompting = check_prompting(prompting)
    allowed = (*PropagationSettings.__dataclass_fields__, *SEGMENTER_OPTIONS, *PIPELINE_OPTIONS)
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"--compare {text!r}: expected key=value with keys among {', '.join(allowed)}")
        options[key] = value.lower() in ("1", "true", "yes") if key in BOOLEAN_OPTIONS else float(value)
    PropagationSettings(**{k: v for k, v in options.items()
                           if k not in SEGMENTER_OPTIONS + PIPELINE_OPTIONS})  # validates
    return prompting, options


def _prepare(args, workdir: Path, need_templates: bool = True) -> dict:
    """Query image/label paths, label map and a template file: from --dataset or generated."""
    from medlsam.synthetic import LABEL_MAP, generate_study

    if args.dataset is not None:
        root = Path(args.dataset)
        label_map = json.loads((root / "label_map.json").read_text())
        studies = sorted(p.name[: -len(".nii.gz")] for p in (root / "studies").glob("*.nii.gz"))
        supports = sorted(p.name[: -len(".nii.gz")] for p in (root / "studies" / "labels" / "final").glob("*.nii.gz"))
        query = args.study or next((s for s in studies if s not in supports), None)
        if query is None or query not in studies:
            raise ValueError(f"no query study {args.study or ''} in {root / 'studies'}")
        image, label = root / "studies" / f"{query}.nii.gz", root / "ground_truth" / f"{query}.nii.gz"
        support_pairs = [(root / "studies" / f"{s}.nii.gz", root / "ground_truth" / f"{s}.nii.gz") for s in supports]
        source = f"{root} {query}"
    else:
        from medlsam.io import save_nifti

        label_map = dict(LABEL_MAP)
        support_pairs = []
        for k, seed in enumerate([args.seed + 1000 + i for i in range(5)] + [args.seed]):
            study = generate_study(seed=seed, scan_range="chest_abdomen_pelvis")
            paths = (workdir / f"s{seed}.nii.gz", workdir / f"s{seed}_label.nii.gz")
            save_nifti(study.image, paths[0])
            save_nifti(study.label, paths[1])
            support_pairs.append(paths)
        image, label = support_pairs.pop()
        source = f"generated default chest_abdomen_pelvis study (seed {args.seed}), supports seeds " \
                 f"{args.seed + 1000}..{args.seed + 1004}"
    templates = args.templates
    if templates is None and need_templates:
        templates = workdir / "templates.pt"
        _build_templates(support_pairs, label_map, templates)
    return {"image": str(image), "label": str(label), "label_map": label_map, "templates": str(templates),
            "supports": [[str(a), str(b)] for a, b in support_pairs], "source": source}


def _build_templates(pairs, label_map, path: Path) -> None:
    from medlsam.medlam.patches import PatchEmbedder
    from medlsam.medlam.templates import TemplateSet, compute_support
    from medlsam.paths import default_medlam_checkpoint

    embedder = PatchEmbedder.from_checkpoint(default_medlam_checkpoint(), "cpu")
    templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict(), max_supports=len(pairs))
    for image, label in pairs:
        templates.add(compute_support(embedder, load_nifti(image), load_nifti(label, what="label"), label_map,
                                      Path(image).name, organs=list(label_map)), label_map)
    templates.save(path)


def _localizer(task: dict):
    if task["localizer"] == "registration":  # the supports prepared as the app prepares them
        from medlsam.medlam.store import SupportStudy
        from medlsam.registration.store import prepared_localizer

        return prepared_localizer(task["atlas_dir"], task["label_map"],
                                  [SupportStudy(Path(a).name.split(".nii")[0], Path(a), Path(b)) for a, b in task["supports"]],
                                  len(task["supports"]))
    from medlsam.medlam.localizer import Localizer
    from medlsam.medlam.patches import PatchEmbedder
    from medlsam.medlam.templates import TemplateSet
    from medlsam.paths import default_medlam_checkpoint

    embedder = PatchEmbedder.from_checkpoint(default_medlam_checkpoint(), "cpu")
    return Localizer(embedder, TemplateSet.load(task["templates"], expected_fingerprint=embedder.fingerprint))


def _localize(task: dict) -> dict:
    """Child process: load the study and localize every organ (MedLAM with templates, or registration
    with the supports prepared here; the app keeps them prepared), seed 0."""
    localizer = _localizer(task)
    t0 = time.perf_counter()
    image = load_nifti(task["image"])
    t1 = time.perf_counter()
    localization = localizer.localize(image, mode=task["mode"], seed=0, name="bench")
    t2 = time.perf_counter()
    return {"localization": localization.to_json(), "load_s": round(t1 - t0, 3), "localize_s": round(t2 - t1, 3),
            "max_rss_mb": _max_rss_mb()}


def _segment(task: dict) -> dict:
    """Child process: load the study and segment the given localization with one prompting config."""
    import torch

    from medlsam.localization import StudyLocalization
    from medlsam.pipeline import segment_localization
    from medlsam.segment import PropagationSettings, Segmenter, build_backend

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    backend = build_backend("litemedsam", accelerate=True, threads=task.get("threads"))
    backend.encode(np.zeros((64, 64), np.float32))  # warm-up (the server keeps its backend warm)
    options = dict(task["options"])
    segmenter_options = {k: options.pop(k) for k in SEGMENTER_OPTIONS if k in options}
    one_window = options.pop("one_window", False)
    segmenter = Segmenter(backend, in_plane_margin_mm=8.0, progress=False, prompting=task["prompting"],
                          propagation=PropagationSettings(**options), **segmenter_options)
    localization = StudyLocalization.from_json(task["localization"])
    windows = {o.label_id: "default" for o in localization.present.values()} if one_window else None
    runs = []
    for _ in range(task["repeats"]):
        backend.reset_counters()
        t0 = time.perf_counter()
        image = load_nifti(task["image"])
        t1 = time.perf_counter()
        result = segment_localization(image, localization, segmenter, windows=windows)
        t2 = time.perf_counter()
        stats = result.stats
        segment_s = t2 - t1
        runs.append({
            "load_s": round(t1 - t0, 3),
            "encode_s": round(stats["encode_seconds"], 3),
            "decode_s": round(stats["decode_seconds"], 3),
            "post_s": round(segment_s - stats["encode_seconds"] - stats["decode_seconds"], 3),
            "segment_s": round(segment_s, 3),
            "encoder_calls": int(stats["encoder_calls"]),
            "decoder_calls": int(stats["decoder_calls"]),
            "slices": int(stats["slices"]),
        })
    np.save(task["out"], result.labels)
    return {"runs": runs, "max_rss_mb": _max_rss_mb(), "stats": {k: v for k, v in result.stats.items()
                                                                  if isinstance(v, (int, float, str, bool))}}


def _in_child(fn, task):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, task).result()


def run(args: argparse.Namespace) -> int:
    from medlsam.segment import dice

    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    configs = [parse_localization(c) for c in args.compare]
    names = list(dict.fromkeys(args.compare))
    with tempfile.TemporaryDirectory(prefix="medlsam-bench-") as tmp:
        work = Path(tmp)
        data = _prepare(args, work, need_templates=any(c[2] == "medlam" for c in configs))
        print(f"{data['source']}; {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
              flush=True)
        located = {}
        for where in dict.fromkeys((c[2], c[3]) for c in configs):
            located[where] = loc = _in_child(_localize, {**data, "localizer": where[0], "mode": where[1],
                                                         "atlas_dir": str(work / "atlases")})
            n_present = sum(1 for o in loc["localization"]["organs"].values() if o["present"])
            print(f"{where[0]} ({where[1]}): localized {n_present} present organs in {loc['localize_s']:.1f} s "
                  f"(load {loc['load_s']:.1f} s, peak RSS {loc['max_rss_mb']:.0f} MB)", flush=True)
        results = {}
        for name, (prompting, options, localizer, mode) in zip(names, configs):
            out = work / f"{len(results)}.npy"
            loc = located[(localizer, mode)]
            task = {"image": data["image"], "localization": loc["localization"], "prompting": prompting,
                    "options": options, "repeats": args.repeats, "out": str(out), "threads": args.threads}
            print(f"segmenting: {name}", flush=True)
            results[name] = _in_child(_segment, task)
            results[name]["labels"] = np.load(out)
            results[name]["localize"] = {k: loc[k] for k in ("load_s", "localize_s", "max_rss_mb")}
            results[name]["organs"] = {n: o["id"] for n, o in loc["localization"]["organs"].items() if o["present"]}
        truth = np.asarray(load_nifti(data["label"], what="label").dataobj).astype(np.int32)

    organs = {n: i for r in results.values() for n, i in r["organs"].items()}
    label_ids = {n: int(i) for n, i in data["label_map"].items()}
    in_truth = {n: label_ids[n] for n in label_ids if (truth == label_ids[n]).any()}
    report = {"source": data["source"], "cpu_count": os.cpu_count(), "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "repeats": args.repeats,
              "organs": len(organs), "configs": {}}
    for name, r in results.items():
        median = {k: statistics.median(run[k] for run in r["runs"]) for k in r["runs"][0]}
        median["localize_s"] = r["localize"]["localize_s"]
        median["end_to_end_s"] = round(median["load_s"] + median["localize_s"] + median["segment_s"], 3)
        # an organ the localizer missed or called absent scores 0 (what the user gets)
        gt = {n: round(dice(r["labels"] == i, truth == i), 4) for n, i in in_truth.items()}
        report["configs"][name] = {**median, "max_rss_mb": max(r["max_rss_mb"], r["localize"]["max_rss_mb"]),
                                   "stats": r["stats"],
                                   "dice_vs_truth": gt, "mean_dice_vs_truth": round(float(np.mean(list(gt.values()))), 4)
                                   if gt else None}
    first = names[0]
    for name in names[1:]:
        report["configs"][name][f"dice_vs_{first}"] = {
            n: round(dice(results[name]["labels"] == i, results[first]["labels"] == i), 4) for n, i in organs.items()}
    print_pipeline_report(report, names)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def print_pipeline_report(r: dict, names: list[str]) -> None:
    c = r["configs"]
    print()
    print(f"{r['organs']} organs localized; median of {r['repeats']} run(s) per configuration")
    rows = [("", *names)]
    for key, label in (("load_s", "load (s)"), ("localize_s", "localize (s)"), ("encode_s", "encode (s)"),
                       ("decode_s", "decode (s)"), ("post_s", "post-process (s)"), ("segment_s", "segment total (s)"),
                       ("end_to_end_s", "end to end (s)"), ("encoder_calls", "encoder calls"),
                       ("decoder_calls", "decoder calls"), ("slices", "slices encoded"),
                       ("max_rss_mb", "peak RSS (MB)"), ("mean_dice_vs_truth", "mean Dice vs truth")):
        values = [c[n][key] for n in names]
        rows.append((label, *values))
    width = max(16, *(len(n) + 2 for n in names))
    for row in rows:
        print(f"  {row[0]:20s}" + "".join(f"{str(v):>{width}s}" for v in row[1:]))
    first = names[0]
    for name in names[1:]:
        d = c[name][f"dice_vs_{first}"]
        print(f"  Dice {name} vs {first}: mean {np.mean(list(d.values())):.3f} (min {min(d.values()):.3f})")
    print("  Dice vs truth per organ:")
    organs = list(c[names[0]]["dice_vs_truth"])
    for organ in organs:
        print(f"    {organ:20s}" + "".join(f"{c[n]['dice_vs_truth'][organ]:>{width}.3f}" for n in names))
