"""Real CT through the real server: one real study as the only final label, other patients' studies as
queries, `/infer/medlsam` with each localizer; aorta box IoU and Dice, seconds, server peak RSS.

    python scripts/real_ct_server_study.py --ref build/reference_ct --out /tmp/realct_server \
        [--localizers registration medlam] [--queries chest_cta upper_abdomen_slab]

The support is TotalSegmentator's abdomen-pelvis example with its segmentation (files from
scripts/fetch_reference_ct.py); queries: the chest CT angiography (aorta reference) and the 40 mm
upper-abdomen DICOM slab. On the angiography the support covers only the lowest ~45 mm of the scan,
so the aorta is also measured against its reference inside the z range the support covers (the
registration's overlap). Writes <out>/rows.json and <out>/table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_process import running_server  # noqa: E402

from medlsam.evaluation import reference_ct as rc  # noqa: E402
from medlsam.evaluation.metrics import box_iou_mm, dice, mask_box  # noqa: E402
from medlsam.registration import RegistrationLocalizer, RegistrationLocalizerSettings, SupportAtlas  # noqa: E402
from medlsam.synthetic import LABEL_MAP  # noqa: E402

SUPPORT = "abdomen_pelvis"
LOADERS = {"abdomen_pelvis": rc.abdomen_pelvis, "chest_cta": rc.chest_cta, "upper_abdomen_slab": rc.upper_abdomen_slab}


def write_datastore(ref: Path, out: Path, queries: list[str], ids: dict[str, int]) -> dict:
    studies = {name: LOADERS[name](ref, ids) for name in [SUPPORT, *queries]}
    folder = out / "studies"
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for name, study in studies.items():
        nib.save(nib.Nifti1Image(np.asanyarray(study.image.dataobj).astype(np.int16), study.image.affine),
                 folder / f"{name}.nii.gz")
    support = studies[SUPPORT]
    nib.save(nib.Nifti1Image(support.label.astype(np.uint8), support.image.affine),
             folder / "labels" / "final" / f"{SUPPORT}.nii.gz")
    (out / "label_map.json").write_text(json.dumps(ids))
    return studies


def covered_reference(studies: dict, query: str, ids: dict[str, int]) -> np.ndarray:
    """The query's aorta inside the z range the support covers after registration."""
    support, study = studies[SUPPORT], studies[query]
    localizer = RegistrationLocalizer([SupportAtlas.build(SUPPORT, support.image, support.label, ids,
                                                          RegistrationLocalizerSettings().registration)])
    localizer.localize(study.image, organs=["aorta"])
    z0, z1 = localizer.last_registrations[SUPPORT]["overlap_z_lps_mm"]
    to_lps = np.diag([-1.0, -1.0, 1.0]) @ study.image.affine[:3]
    k = np.indices(study.image.shape).reshape(3, -1)
    z = (to_lps[2, :3] @ k + to_lps[2, 3]).reshape(study.image.shape)
    return study.references["aorta"] & (z >= z0) & (z <= z1)


def server_rss_mb(launcher_pid: int) -> float:
    """Peak RSS (VmHWM) of the server's Python processes, the largest one."""
    best = 0.0
    for proc in [psutil.Process(launcher_pid), *psutil.Process(launcher_pid).children(recursive=True)]:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except (OSError, psutil.Error):
            continue
    return round(best)


def infer(url: str, query: str, localizer: str, out: Path) -> tuple[int, dict, np.ndarray | None, float]:
    """/infer/medlsam through MONAI Label's own client: (HTTP status, params, label array, seconds)."""
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    t0 = time.perf_counter()
    try:
        label_file, meta = MONAILabelClient(url, tmpdir=str(out)).infer(
            "medlsam", query, {"organs": ["aorta"], "localizer": localizer})
    except MONAILabelClientException as exc:
        # the client's exception carries the status only in its message ("Status: 422; Response: ...")
        text = str(exc.msg)
        status = exc.status_code or (int(text.split("Status: ")[1].split(";")[0]) if "Status: " in text else 0)
        return status, {"detail": text[:300]}, None, time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    return 200, meta, np.asanyarray(nib.load(label_file).dataobj), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", type=Path, default=ROOT / "build" / "reference_ct")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--localizers", nargs="+", default=["registration", "medlam"])
    p.add_argument("--queries", nargs="+", default=["upper_abdomen_slab", "chest_cta"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ids = rc.reference_label_map(LABEL_MAP)
    studies = write_datastore(args.ref, args.out, args.queries, ids)
    covered = {q: covered_reference(studies, q, ids) for q in args.queries}
    conf = {"label_map": args.out / "label_map.json", "model_dir": args.out / "models", "template_wait_s": 900}
    rows, processes = [], []
    with running_server(args.out / "studies", conf, log_path=args.out / "server.log", timeout=600,
                        process=processes) as url:
        info = httpx.get(f"{url}/info/", timeout=60).json()
        print("server localizer:", info.get("localizer"), flush=True)
        bad = httpx.post(f"{url}/infer/medlsam?image={args.queries[0]}",
                         data={"params": json.dumps({"localizer": "elastix"})}, timeout=60)
        print("localizer=elastix:", bad.status_code, bad.text[:160], flush=True)
        for query in args.queries:
            study = studies[query]
            truth = study.references["aorta"]
            for localizer in args.localizers:
                status, meta, label, seconds = infer(url, query, localizer, args.out)
                row = {"query": query, "localizer": localizer, "status": status, "seconds": round(seconds, 1),
                       "server_peak_rss_mb": server_rss_mb(processes[0].pid)}
                if status == 200:
                    organ = meta["organs"]["aorta"]
                    box = organ["box_voxel"]
                    mask = label == meta["label_names"]["aorta"] if organ["present"] else np.zeros(truth.shape, bool)
                    row.update(localized_by=meta.get("localizer"), present=organ["present"],
                               box_iou=box_iou_mm(box, mask_box(truth), study.image.affine),
                               box_iou_covered=box_iou_mm(box, mask_box(covered[query]), study.image.affine),
                               dice=dice(mask, truth), dice_covered=dice(mask, covered[query]),
                               timings=meta.get("timings"), warnings=organ.get("warnings"))
                else:
                    row["detail"] = meta["detail"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    lines = ["| query | localizer | HTTP | aorta box IoU | Dice | box IoU, covered part | Dice, covered part "
             "| seconds | server peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = (lambda k: f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-")
        lines.append(f"| {r['query']} | {r['localizer']} | {r['status']} | {f('box_iou')} | {f('dice')} | "
                     f"{f('box_iou_covered')} | {f('dice_covered')} | {r['seconds']} | {r['server_peak_rss_mb']} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
