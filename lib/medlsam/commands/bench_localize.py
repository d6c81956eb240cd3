"""`medlsam bench-localize`: MedLAM template building and localization, seconds and peak memory.

For each MedLAM layout (the committed demo weights; an official-layout state dict, random unless
given) four phases run, each in a fresh Python process so that its peak resident memory (VmHWM)
is its own: loading the weights, building templates from the supports, localizing
every templated organ of the query with WPL, and with SPL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path("runs") / "bench" / "localization_bench.json"
DEFAULT_DATA = Path("runs") / "bench" / "localization_data"
PHASES = ("load", "templates", "localize_wpl", "localize_spl")
# An SPL interval longer than any organ: one part per organ, whose points are the WPL points.
WPL_ONLY_SPL_INTERVAL_MM = 1e6
OFFICIAL_LAYOUT = {"base_channels": 24, "patch_size": (64, 64, 64), "spacing_mm": (3.0, 3.0, 3.0)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from medlsam.medlam.patches import PRECISIONS

    p = sub.add_parser(
        "bench-localize",
        help="benchmark MedLAM templates and localization: seconds and peak RSS per phase",
        description="Generate (or reuse) default-preset chest-abdomen-pelvis studies: N supports and "
        "one query. For the demo MedLAM and an official-layout state dict (base 24, 64^3 patches at "
        "3 mm; random values unless --official is given), run each phase in its own process: load "
        "weights, build templates from the supports, localize all templated organs with WPL and "
        "with SPL. Prints a table and writes JSON.",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"dataset folder, generated if absent (default {DEFAULT_DATA})")
    p.add_argument("--supports", type=int, default=5, help="supports (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    p.add_argument("--preset", default="default", help="generator preset (default: default; tiny for a smoke run)")
    p.add_argument("--demo", type=Path, default=None, help="demo-layout checkpoint (default: the committed demo)")
    p.add_argument("--official", type=Path, default=None,
                   help="official-layout checkpoint (default: a random state dict of that layout, made once)")
    p.add_argument("--official-supports", type=int, default=None,
                   help="build the official layout's templates from only the first N supports (its CPU "
                   "cost is ~80x the demo's per patch; peak memory does not depend on N)")
    p.add_argument("--official-wpl-only", action="store_true",
                   help="build the official layout's templates without SPL sub-parts (each organ one part, "
                   "about 3x fewer patches; WPL localization is unaffected, its SPL phase is skipped)")
    p.add_argument("--layouts", nargs="+", choices=["demo", "official"], default=["demo", "official"])
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--organs", nargs="*", default=None, help="organ names (default: every organ of the supports)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="patches per forward pass (default: by device)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["auto"],
                   help="network precisions to run, each a column of runs (default auto: fp32 on a CPU); "
                   "localization boxes are compared with the first one's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each phase (default: torch's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    p.add_argument("--library", type=Path, default=None,
                   help="run the phases with the medlsam package under this folder (e.g. an older "
                   "checkout's lib/, for before/after numbers)")
    p.set_defaults(func=run)


# --- the parent: data, checkpoints, one subprocess per phase ------------------------------------
def prepare_data(folder: Path, n_supports: int, seed: int, preset: str = "default") -> tuple[list[tuple[Path, Path]], Path]:
    """(support image, label) pairs and the query image of a generated dataset."""
    from medlsam.synthetic import write_sample_dataset

    write_sample_dataset(folder, n_studies=n_supports + 1, n_supports=n_supports, seed=seed, preset=preset,
                         progress=True, scan_range="chest_abdomen_pelvis")
    studies = folder / "studies"
    images = sorted(studies.glob("*.nii.gz"))
    supports = [(i, studies / "labels" / "final" / i.name) for i in images
                if (studies / "labels" / "final" / i.name).exists()]
    queries = [i for i in images if not (studies / "labels" / "final" / i.name).exists()]
    return supports, queries[0]


def official_layout_checkpoint(path: Path) -> Path:
    """A random state dict with exactly the official medlam.pth layout (DataParallel `module.` keys)."""
    if path.exists():
        return path
    import torch

    from medlsam.io import atomic_path
    from medlsam.medlam.network import MedLAMConfig, MedLAMNet

    torch.manual_seed(0)
    net = MedLAMNet(MedLAMConfig(**OFFICIAL_LAYOUT))
    with atomic_path(path) as tmp:
        torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp)
    return path


def run_phase(spec: dict, threads: int | None, library: Path | None = None) -> dict:
    """Run one phase in a fresh interpreter (this file as a script); its own report."""
    with tempfile.TemporaryDirectory(prefix="medlsam-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if library:
            env["PYTHONPATH"] = os.pathsep.join([str(Path(library).resolve()), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(Path(__file__).resolve()), str(spec_path), str(result_path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result_path.exists():
            return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
        return json.loads(result_path.read_text())


def run(args: argparse.Namespace) -> int:
    import torch

    from medlsam.io import atomic_write_json
    from medlsam.paths import DEMO_MEDLAM

    if args.supports < 1 or (args.official_supports is not None and args.official_supports < 1):
        raise ValueError("--supports and --official-supports must be at least 1")
    supports, query = prepare_data(args.data, args.supports, args.seed, args.preset)
    checkpoints = {
        "demo": args.demo or DEMO_MEDLAM,
        "official": args.official or official_layout_checkpoint(args.data / "official_layout_random.pth"),
    }
    work = args.out.parent / (args.out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "device": args.device,
        "device_name": _device_name(args.device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "library": str(args.library) if args.library else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "preset": args.preset,
        "supports": [str(s[0]) for s in supports],
        "query": str(query),
        "layouts": {},
    }
    for layout in args.layouts:
        used = supports[: args.official_supports] if layout == "official" and args.official_supports else supports
        wpl_only = layout == "official" and args.official_wpl_only
        phases_run = [p for p in args.phases if not (wpl_only and p == "localize_spl")]
        runs = {}
        for precision in args.precisions:
            templates = work / f"templates_{layout}_{precision}.pt"
            base = {"checkpoint": str(checkpoints[layout]), "device": args.device, "batch_size": args.batch_size,
                    "precision": precision, "threads": args.threads, "templates": str(templates),
                    "organs": args.organs, "supports": [[str(i), str(l)] for i, l in used], "query": str(query),
                    "spl_interval_mm": WPL_ONLY_SPL_INTERVAL_MM if wpl_only else None}
            phases = {}
            for phase in phases_run:
                print(f"[{layout} {precision}] {phase} ...", flush=True)
                phases[phase] = run_phase({**base, "phase": phase}, args.threads, args.library)
                print(f"[{layout} {precision}] {phase}: {_summary(phases[phase])}", flush=True)
            runs[precision] = phases
        report["layouts"][layout] = {"checkpoint": str(checkpoints[layout]), "supports": len(used), "runs": runs,
                                     "wpl_only_templates": wpl_only, "box_agreement": box_agreement(runs)}
    print_report(report)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _summary(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error']}): {r.get('stderr_tail', '')[-300:]}"
    return f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"


# --- the worker: one phase, measured from inside -------------------------------------------------
def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own address space
    (ru_maxrss would also count the parent's memory at fork time, which survives exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def phase_worker(spec_path: Path, result_path: Path) -> int:
    """Run the phase described in `spec_path`; write seconds, CPU seconds and peak RSS as JSON."""
    import torch

    from medlsam.io import load_nifti
    from medlsam.medlam.localizer import Localizer
    from medlsam.medlam.patches import PatchEmbedder
    from medlsam.medlam.templates import TemplateSet, compute_support
    from medlsam.synthetic import LABEL_MAP

    spec = json.loads(spec_path.read_text())
    phase = spec["phase"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rss_before = _peak_rss_mb()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    options = {"batch_size": spec["batch_size"]} if spec.get("batch_size") else {}
    if spec.get("precision", "auto") != "auto":  # (a library from before precisions knows only auto)
        options["precision"] = spec["precision"]
    embedder = PatchEmbedder.from_checkpoint(spec["checkpoint"], spec["device"], **options)
    extra: dict = {"batch_size": embedder.batch_size, "config": embedder.net.config.to_dict()}
    if phase != "load":
        if phase == "templates":
            start, cpu_start = time.perf_counter(), _cpu_seconds()  # not the weights' loading
            rss_before = _peak_rss_mb()
            spl = {"spl_interval_mm": spec["spl_interval_mm"]} if spec.get("spl_interval_mm") else {}
            templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict(), **spl)
            for image_path, label_path in spec["supports"]:
                image, label = load_nifti(image_path), load_nifti(label_path, what="label")
                templates.add(compute_support(embedder, image, label, dict(LABEL_MAP), Path(image_path).name.split(".")[0],
                                              organs=spec.get("organs"), **spl), dict(LABEL_MAP))
            templates.save(spec["templates"])
            extra.update(organs=len(templates.organs), points=_template_points(templates))
        else:
            templates = TemplateSet.load(spec["templates"], expected_fingerprint=embedder.fingerprint)
            image = load_nifti(spec["query"])
            mode = "WPL" if phase == "localize_wpl" else "SPL"
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            rss_before = _peak_rss_mb()
            result = Localizer(embedder, templates).localize(image, organs=spec.get("organs"), mode=mode)
            extra.update(organs=len(_organs(result)), boxes=_boxes(result))
    seconds = time.perf_counter() - start
    report = {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu_start, 2),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_phase_mb": rss_before,
        "forward_calls": embedder.forward_calls,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        **extra,
    }
    result_path.write_text(json.dumps(report))
    return 0


def _organs(result) -> dict:
    return result["organs"] if isinstance(result, dict) else result.organs


def _boxes(result) -> dict[str, list]:
    """Each organ's study-voxel box [[i0, j0, k0], [i1, j1, k1]]."""
    out = {}
    for name, organ in _organs(result).items():
        box = organ["box_voxel"] if isinstance(organ, dict) else organ.box.corners
        out[name] = [[int(v) for v in corner] for corner in box]
    return out


def box_iou(a, b) -> float:
    """IoU of two inclusive voxel boxes."""
    lo, hi = [max(x, y) for x, y in zip(a[0], b[0])], [min(x, y) for x, y in zip(a[1], b[1])]
    inter = 1
    for l, h in zip(lo, hi):
        inter *= max(0, h - l + 1)
    vol = lambda box: (box[1][0] - box[0][0] + 1) * (box[1][1] - box[0][1] + 1) * (box[1][2] - box[0][2] + 1)
    return inter / (vol(a) + vol(b) - inter)


def box_agreement(runs: dict[str, dict]) -> dict:
    """Per precision after the first and localize phase: mean and min box IoU with the first's boxes."""
    names = list(runs)
    out = {}
    for other in names[1:]:
        for phase in ("localize_wpl", "localize_spl"):
            a, b = runs[names[0]].get(phase, {}), runs[other].get(phase, {})
            if "boxes" not in a or "boxes" not in b:
                continue
            ious = [box_iou(a["boxes"][n], b["boxes"][n]) for n in a["boxes"] if n in b["boxes"]]
            out[f"{other}_vs_{names[0]}_{phase}"] = {
                "mean_iou": round(sum(ious) / len(ious), 4), "min_iou": round(min(ious), 4),
                "identical": sum(a["boxes"][n] == b["boxes"].get(n) for n in a["boxes"]), "organs": len(ious)}
    return out


def _template_points(templates) -> int:
    return sum(6 * (1 + len(s.spl)) for entries in templates.supports.values() for s in entries)


def print_report(r: dict) -> None:
    print()
    print(f"device {r['device']} ({r['device_name']}), {r['cpu_count']} CPUs, torch {r['torch']}, "
          f"{r['threads']} threads, OMP_WAIT_POLICY={r.get('omp_wait_policy')}; {len(r['supports'])} supports, "
          f"query {Path(r['query']).name}")
    for layout, entry in r["layouts"].items():
        wpl_only = " (WPL points only)" if entry.get("wpl_only_templates") else ""
        print(f"  {layout}: {entry['checkpoint']}, templates from {entry['supports']} supports{wpl_only}")
    print(f"  {'layout':9s} {'precision':9s} {'phase':13s} {'seconds':>8s} {'CPU s':>8s} {'peak RSS MB':>12s} "
          f"{'forward':>8s} {'batch':>6s} {'load avg':>9s}")
    for layout, entry in r["layouts"].items():
        for precision, phases in entry["runs"].items():
            for phase, p in phases.items():
                if "error" in p:
                    print(f"  {layout:9s} {precision:9s} {phase:13s} FAILED: {p['error']}")
                    continue
                print(f"  {layout:9s} {precision:9s} {phase:13s} {p['seconds']:8.1f} {p['cpu_seconds']:8.1f} "
                      f"{p['peak_rss_mb']:12.0f} {p['forward_calls']:8d} {p['batch_size']:6d} "
                      f"{p['load_average'][0]:9.1f}")
        for key, agreement in entry["box_agreement"].items():
            print(f"  {layout:9s} boxes {key}: mean IoU {agreement['mean_iou']}, min {agreement['min_iou']}, "
                  f"{agreement['identical']}/{agreement['organs']} identical")


if __name__ == "__main__":  # a phase worker: python bench_localize.py SPEC RESULT
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # this folder's modules (eval.py, train.py, ...) must not shadow others
    sys.exit(phase_worker(Path(sys.argv[1]), Path(sys.argv[2])))
