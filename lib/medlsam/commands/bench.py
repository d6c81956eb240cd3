"""`medlsam bench`: the embedding cache and the accelerated encoder, measured side by side in one run;
`--pipeline`: today's box prompts against the propagated ones, end to end (bench_pipeline.py)."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlsam.io import atomic_write_json, load_nifti
from medlsam.segment.postprocess import dice

DEFAULT_OUT = Path("runs") / "bench" / "segment_bench.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark segmentation: embedding cache vs per-organ recompute, eager vs accelerated encoder",
        description="On a generated study (or --image/--labels), segment every organ from its "
        "ground-truth box twice: with one encoder pass per slice (cache) and with one pass per "
        "organ per slice (the reference's way); then time the encoder per slice in eager fp32 and "
        "with ONNX Runtime and compare their masks. Prints a table and writes JSON.",
    )
    p.add_argument("--image", type=Path, default=None, help="CT NIfTI (default: generate a study)")
    p.add_argument("--labels", type=Path, default=None, help="label NIfTI matching --image (ground-truth boxes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated study")
    p.add_argument("--scan-range", default="abdomen", help="scan range of the generated study (default abdomen)")
    p.add_argument("--organs", nargs="*", default=None, help="organ names to include (default: all labelled)")
    p.add_argument("--auto-windows", action="store_true",
                   help="lung/bone windows by organ name (a slice is then encoded once per window)")
    p.add_argument("--model", default="litemedsam", help="segmentation backend (default litemedsam)")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--z-step", type=int, default=1,
                   help="segment every Nth covered slice in both cache modes (same slices; 1 = all)")
    p.add_argument("--speed-slices", type=int, default=8, help="slices for the eager vs accelerated comparison")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON report (default {DEFAULT_OUT}; with --pipeline runs/bench/pipeline_bench.json)")
    from medlsam.commands import bench_pipeline

    bench_pipeline.add_arguments(p)
    p.set_defaults(func=run)


def _load_study(args):
    """(image, labels, {name: id}) from files or a freshly generated default study."""
    if args.image or args.labels:
        if not (args.image and args.labels):
            raise ValueError("--image and --labels go together")
        image, labels = load_nifti(args.image), load_nifti(args.labels, what="labels")
        if image.shape != labels.shape:
            raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
        ids = np.unique(np.asarray(labels.dataobj)).astype(int)
        return image, labels, {f"label_{i}": int(i) for i in ids if i > 0}, str(args.image)
    from medlsam.synthetic import LABEL_MAP, generate_study

    study = generate_study(seed=args.seed, scan_range=args.scan_range)
    source = f"generated {study.meta['preset']} {study.meta['scan_range']} study (seed {args.seed})"
    return study.image, study.label, dict(LABEL_MAP), source


def _max_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def _phase(fn):
    """Run fn() under tracemalloc; returns (result, seconds, python peak MB, process max RSS MB)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, round(seconds, 3), round(peak / 2**20, 1), _max_rss_mb()


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


@dataclass
class _Case:
    """The benchmarked study: its axial view, ground truth, organ boxes and windows."""

    source: str
    view: Any
    truth: np.ndarray
    names: dict[int, str]
    boxes: dict[int, list]
    windows: dict[int, str]


def run(args: argparse.Namespace) -> int:
    if args.pipeline:
        from medlsam.commands import bench_pipeline

        args.out = args.out or bench_pipeline.DEFAULT_OUT
        return bench_pipeline.run(args)
    args.out = args.out or DEFAULT_OUT
    import torch

    from medlsam.segment import Segmenter, build_backend

    if args.z_step < 1 or args.speed_slices < 1:
        raise ValueError("--z-step and --speed-slices must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    case = _prepare_case(args)
    print(f"{case.source}: shape (z, y, x) {case.view.array.shape}, {len(case.boxes)} organs, backend {args.model}, "
          f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")

    t0 = time.perf_counter()
    fast = build_backend(args.model, args.checkpoint, accelerate=True, threads=args.threads)
    setup_fast = round(time.perf_counter() - t0, 2)
    eager = build_backend(args.model, args.checkpoint, accelerate=False)
    if not fast.accelerated:
        print("note: the accelerated encoder is unavailable here; both columns run eager")

    covered = covered_slices(Segmenter(fast, cache=True), case.view.array.shape, case.boxes)
    subset = covered[:: args.z_step]
    cache_report, cached_labels = _cache_phase(case, fast, subset)
    speed_report = _speed_phase(case, eager, fast, subset, args.speed_slices, setup_fast)
    gt_dice = {case.names[k]: round(dice(cached_labels[subset] == k, case.truth[subset] == k), 4) for k in case.boxes}
    report = {
        "source": case.source,
        "shape_zyx": list(case.view.array.shape),
        "backend": args.model,
        "organs": len(case.boxes),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "slices_covered": len(covered),
        "slices_segmented": len(subset),
        "z_step": args.z_step,
        "windows": sorted(set(case.windows.values())),
        "cache": cache_report,
        "encoder_speed": speed_report,
        "dice_vs_ground_truth": gt_dice,
        "max_rss_mb": _max_rss_mb(),
    }
    print_report(report)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _prepare_case(args) -> _Case:
    from medlsam.geometry import AxialView
    from medlsam.segment import boxes_from_labels, window_for_organ_name

    image, labels_img, label_map, source = _load_study(args)
    view = AxialView.from_nifti(image)
    truth = AxialView.from_nifti(labels_img, dtype=None).array
    names = {i: n for n, i in label_map.items()}
    if args.organs:
        unknown = sorted(set(args.organs) - set(label_map))
        if unknown:
            raise ValueError(f"unknown organ(s) {unknown}; known: {sorted(label_map)}")
        names = {label_map[n]: n for n in args.organs}
    boxes = {int(k): [v] for k, v in boxes_from_labels(truth).items() if k in names}
    if not boxes:
        raise ValueError("the label volume has no organ to benchmark")
    windows = {k: window_for_organ_name(names[k]) if args.auto_windows else "default" for k in boxes}
    return _Case(source, view, truth, names, boxes, windows)


def _cache_phase(case: _Case, backend, subset: list[int]) -> tuple[dict, np.ndarray]:
    """One encoder pass per slice vs one per organ per slice: same slices, same encoder."""
    from medlsam.segment import Segmenter

    volume = case.view.array
    print(f"[1/3] cache: {len(subset)} slices, one encoder pass each", flush=True)
    cached, t_cached, mem_cached, rss_cached = _phase(
        lambda: Segmenter(backend, cache=True).segment_volume(volume, case.boxes, case.windows, slices=subset))
    print(f"      done in {t_cached:.1f} s; [2/3] per-organ recompute (reference) on the same slices", flush=True)
    recompute, t_recompute, mem_recompute, rss_recompute = _phase(
        lambda: Segmenter(backend, cache=False).segment_volume(volume, case.boxes, case.windows, slices=subset))
    print(f"      done in {t_recompute:.1f} s", flush=True)
    report = {
        "with_cache": {**cached.stats, "wall_seconds": t_cached, "python_peak_mb": mem_cached,
                       "max_rss_mb": rss_cached},
        "per_organ_recompute": {**recompute.stats, "wall_seconds": t_recompute,
                                "python_peak_mb": mem_recompute, "max_rss_mb": rss_recompute},
        "encoder_call_ratio": _ratio(recompute.stats["encoder_calls"], cached.stats["encoder_calls"]),
        "wall_time_ratio": _ratio(t_recompute, t_cached),
        "identical_masks": bool(np.array_equal(cached.labels, recompute.labels)),
    }
    return report, cached.labels


def _speed_phase(case: _Case, eager, fast, subset: list[int], n_slices: int, setup_fast: float) -> dict:
    """Encoder time per slice, eager fp32 vs accelerated, interleaved slice by slice; masks compared."""
    from medlsam.segment import Segmenter

    volume, boxes, windows = case.view.array, case.boxes, case.windows
    picks = sorted({subset[int(i)] for i in np.linspace(0, len(subset) - 1, min(n_slices, len(subset)))})
    print(f"[3/3] eager vs accelerated on {len(picks)} slices", flush=True)
    seg_eager, seg_fast = Segmenter(eager, progress=False), Segmenter(fast, progress=False)
    eager_times, fast_times, eager_slice, fast_slice = [], [], [], []
    eager_labels, fast_labels = np.zeros(volume.shape, np.uint8), np.zeros(volume.shape, np.uint8)
    seg_eager.segment_volume(volume, boxes, windows, slices=picks[:1])  # warm-up
    seg_fast.segment_volume(volume, boxes, windows, slices=picks[:1])
    for z in picks:
        for seg, times, per_slice, labels in ((seg_eager, eager_times, eager_slice, eager_labels),
                                              (seg_fast, fast_times, fast_slice, fast_labels)):
            r = seg.segment_volume(volume, boxes, windows, slices=[z])
            times.append(r.stats["encode_seconds"] / max(r.stats["encoder_calls"], 1))
            per_slice.append(r.stats["seconds"])
            labels[z] = r.labels[z]
    agreement = {case.names[k]: round(dice(eager_labels[picks] == k, fast_labels[picks] == k), 4)
                 for k in boxes if (eager_labels[picks] == k).any() or (fast_labels[picks] == k).any()}
    median_eager, median_fast = statistics.median(eager_times), statistics.median(fast_times)
    return {
        "slices": picks,
        "accelerated": bool(fast.accelerated),
        "accelerated_setup_seconds": setup_fast,
        "eager_seconds_per_slice": round(median_eager, 4),
        "accelerated_seconds_per_slice": round(median_fast, 4),
        "speedup": _ratio(median_eager, median_fast),
        "eager_slice_seconds_all_organs": round(statistics.median(eager_slice), 4),
        "accelerated_slice_seconds_all_organs": round(statistics.median(fast_slice), 4),
        "slice_speedup_all_organs": _ratio(statistics.median(eager_slice), statistics.median(fast_slice)),
        "dice_eager_vs_accelerated": agreement,
        "min_dice_eager_vs_accelerated": min(agreement.values()) if agreement else None,
    }


def covered_slices(segmenter, shape, boxes) -> list[int]:
    """The slices the segmenter would process for `boxes` (after the box margin and clipping)."""
    from medlsam.segment import parse_organ_boxes

    prompts = parse_organ_boxes(boxes, shape, segmenter.box_margin_zyx)
    return sorted({z for per_slice in prompts.values() for z in per_slice})


def print_report(r: dict) -> None:
    c, s = r["cache"], r["encoder_speed"]
    w, p = c["with_cache"], c["per_organ_recompute"]
    print()
    print(f"{r['organs']} organs, {r['slices_segmented']} of {r['slices_covered']} covered slices segmented "
          f"(z-step {r['z_step']}), {r['torch_threads']} threads")
    rows = [
        ("", "cache (ours)", "per-organ (reference)", "ratio"),
        ("encoder calls", w["encoder_calls"], p["encoder_calls"], f"{c['encoder_call_ratio']}x"),
        ("decoder calls", w["decoder_calls"], p["decoder_calls"], ""),
        ("wall time (s)", w["wall_seconds"], p["wall_seconds"], f"{c['wall_time_ratio']}x"),
        ("encoder time (s)", w["encode_seconds"], p["encode_seconds"], ""),
        ("python peak (MB)", w["python_peak_mb"], p["python_peak_mb"], ""),
        ("process max RSS (MB)", w["max_rss_mb"], p["max_rss_mb"], ""),
    ]
    for row in rows:
        print(f"  {row[0]:22s} {str(row[1]):>14s} {str(row[2]):>22s} {str(row[3]):>8s}")
    print(f"  identical masks: {'yes' if c['identical_masks'] else 'NO'}")
    print()
    label = "ONNX Runtime fp32" if s["accelerated"] else "accelerated (unavailable)"
    print(f"  {'encoder s/slice':22s} {'eager fp32':>14s} {label:>22s} {'speed-up':>8s}")
    print(f"  {'median of ' + str(len(s['slices'])):22s} {s['eager_seconds_per_slice']:>14.3f} "
          f"{s['accelerated_seconds_per_slice']:>22.3f} {str(s['speedup']) + 'x':>8s}")
    print(f"  {'slice s, all organs':22s} {s['eager_slice_seconds_all_organs']:>14.3f} "
          f"{s['accelerated_slice_seconds_all_organs']:>22.3f} {str(s['slice_speedup_all_organs']) + 'x':>8s}")
    print(f"  Dice eager vs accelerated: min {s['min_dice_eager_vs_accelerated']} over "
          f"{len(s['dice_eager_vs_accelerated'])} organs (one-time export/load {s['accelerated_setup_seconds']} s)")
    gt = r["dice_vs_ground_truth"]
    print("  Dice vs ground truth (cache run): " + ", ".join(f"{k} {v:.3f}" for k, v in gt.items()))
    print(f"  process max RSS: {r['max_rss_mb']} MB")
