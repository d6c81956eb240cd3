"""Batch throughput: the plain sequential loop vs Ray with 1 and 2 workers, side by side in one run.

Every mode gets the same CPU cores in total (sequential and 1 worker: all of --cores threads;
2 workers: half each), the same generated studies and the same templates. Prints a Markdown
table (studies/min with and without worker start-up, peak memory per worker, label agreement
with the sequential run) and writes it as JSON.

    .venv/bin/python scripts/batch_bench.py --studies 6 --organs liver spleen --out runs/batch_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs") / "batch_bench")
    p.add_argument("--studies", type=int, default=6, help="query studies (generated)")
    p.add_argument("--supports", type=int, default=2, help="support studies (generated)")
    p.add_argument("--preset", default="tiny", help="generator preset (tiny, default, ...)")
    p.add_argument("--organs", nargs="*", default=["liver", "spleen"], help="organs to segment (default liver spleen)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores every mode gets in total")
    p.add_argument("--modes", nargs="+", default=["sequential", "ray2", "ray1"],
                   help="sequential, ray1, ray2 (rayN: N workers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=21)
    return p.parse_args(argv)


def prepare(args):
    """Generated dataset + the run's templates (built once, copied into every mode's folder)."""
    from medlsam.batch import BatchSettings, datastore_studies, datastore_supports, templates_digest
    from medlsam.batch.supports import build_templates, save_templates
    from medlsam.io import load_label_map
    from medlsam.medlam.patches import PatchEmbedder
    from medlsam.paths import DEMO_MEDLAM
    from medlsam.synthetic import write_sample_dataset

    data = args.out / "data"
    write_sample_dataset(data, n_studies=args.studies + args.supports, n_supports=args.supports, seed=args.seed,
                         preset=args.preset, progress=False)
    label_map = load_label_map(data / "label_map.json")
    embedder = PatchEmbedder.from_checkpoint(DEMO_MEDLAM, args.device)
    templates, _ = build_templates(embedder, datastore_supports(data / "studies"), label_map, organs=args.organs,
                                   progress=False)
    save_templates(templates, args.out / "templates.pt")
    settings = BatchSettings(templates_path="", medlam_checkpoint=str(DEMO_MEDLAM), organs=args.organs,
                             device=args.device, templates_digest=templates_digest(templates))
    return settings, datastore_studies(data / "studies")


def run_mode(mode: str, settings, refs, args) -> dict:
    import dataclasses

    from medlsam.batch import BatchOutput, LocalExecutor, RayExecutor, run_batch

    out = args.out / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(args.out / "templates.pt", out / "templates.pt")
    workers = 1 if mode == "sequential" else int(mode[3:])
    threads = max(1, args.cores // workers)
    settings = dataclasses.replace(settings, templates_path=str(out / "templates.pt"), threads=threads)
    output = BatchOutput(out, settings.run_key())
    output.prepare(settings.to_dict())
    t0 = time.perf_counter()
    if mode == "sequential":
        executor = LocalExecutor.from_settings(settings, out)
        executor.start()  # load the models now: start-up is timed apart
    else:
        executor = RayExecutor(settings, out, workers=workers, threads_per_worker=threads,
                               gpus_per_worker=1.0 if args.device.startswith("cuda") else 0.0,
                               init_options={"object_store_memory": 100 * 2**20, "log_to_driver": False})
        executor.start()
        executor.worker_info()  # waits until every actor has loaded its models
    startup = time.perf_counter() - t0
    try:
        summary = run_batch(refs, output, executor, progress=True)
        workers_info = executor.worker_info()
    finally:
        executor.close()
    total = time.perf_counter() - t0
    rows = output.csv_rows()
    peak = {}
    for row in rows:
        peak[row["worker"]] = max(peak.get(row["worker"], 0.0), float(row["worker_peak_rss_mb"] or 0))
    for info in workers_info:
        if "peak_rss_mb" in info:
            peak[info["worker"]] = max(peak.get(info["worker"], 0.0), info["peak_rss_mb"])
    done = summary.ok + len(summary.failed)
    return {
        "mode": mode, "workers": workers, "threads_per_worker": threads, "studies": done, "failed": summary.failed,
        "startup_s": round(startup, 1), "processing_s": round(summary.seconds, 1), "total_s": round(total, 1),
        "studies_per_min": round(60 * done / summary.seconds, 2) if summary.seconds else None,
        "studies_per_min_with_startup": round(60 * done / total, 2),
        "peak_rss_mb_per_worker": sorted(peak.values(), reverse=True),
        "mean_study_s": round(float(np.mean([float(r["total_s"] or 0) + float(r["load_s"] or 0) for r in rows])), 1),
    }


def agreement(args, mode: str) -> float | None:
    ref, other = args.out / "sequential" / "labels", args.out / mode / "labels"
    if not ref.exists() or mode == "sequential":
        return None
    same = total = 0
    for path in sorted(ref.glob("*.nii.gz")):
        a = np.asarray(nib.load(path).dataobj)
        b = np.asarray(nib.load(other / path.name).dataobj)
        same, total = same + int((a == b).sum()), total + a.size
    return round(same / total, 6) if total else None


def table(results: list[dict], base: float | None) -> str:
    lines = ["| mode | workers x threads | studies/min (steady) | vs sequential | studies/min incl. start-up | "
             "start-up s | mean s/study | peak RSS MB per worker | voxels equal to sequential |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['studies_per_min'] / base:.2f}x" if base and r["studies_per_min"] else "-"
        agree = "-" if r.get("agreement") is None else f"{100 * r['agreement']:.4f} %"
        lines.append(f"| {r['mode']} | {r['workers']} x {r['threads_per_worker']} | {r['studies_per_min']} | {ratio} | "
                     f"{r['studies_per_min_with_startup']} | {r['startup_s']} | {r['mean_study_s']} | "
                     f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb_per_worker'])} | {agree} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings, refs = prepare(args)
    print(f"{len(refs)} {args.preset} studies, organs {args.organs}, {args.cores} cores per mode, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible")
    results = []
    for mode in args.modes:
        print(f"--- {mode}", flush=True)
        result = run_mode(mode, settings, refs, args)
        result["agreement"] = agreement(args, mode)
        results.append(result)
        print(json.dumps(result), flush=True)
    base = next((r["studies_per_min"] for r in results if r["mode"] == "sequential"), None)
    text = table(results, base)
    print(text)
    report = {"studies": len(refs), "preset": args.preset, "organs": args.organs, "cores": args.cores,
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "results": results, "table": text}
    (args.out / "batch_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'batch_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
