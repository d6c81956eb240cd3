"""The output folder of a batch run, shared by every worker.

    <out>/labels/<id>.nii.gz    the label volume on the study's own voxel grid
    <out>/results/<id>.json     MedLSAMResult.report() + status, run key, worker, timings
                                (status "error": the error instead); written after the label, so
                                a result file with status "ok" means the study is finished
    <out>/summary.csv           one row per finished or failed attempt, appended by the driver only
    <out>/run.json              the run's settings and key
    <out>/templates.pt          the support templates the run used (workers load them from here)

Workers write labels and results with atomic renames: a worker killed mid-write leaves the
previous file (or none), never half a file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np

from medlsam.io import atomic_write_json, save_nifti

log = logging.getLogger(__name__)

CSV_COLUMNS = ("study_id", "status", "organs_present", "organs_absent", "foreground_voxels", "load_s",
               "localize_s", "segment_s", "total_s", "attempt", "worker", "worker_peak_rss_mb", "finished_at",
               "label", "error")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)


class BatchOutput:
    """Paths and writers of one run's output folder."""

    def __init__(self, root: str | os.PathLike, run_key: str = ""):
        self.root = Path(root)
        self.run_key = run_key

    @property
    def labels_dir(self) -> Path:
        return self.root / "labels"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def templates_file(self) -> Path:
        return self.root / "templates.pt"

    def label_path(self, study_id: str) -> Path:
        return self.labels_dir / f"{study_id}.nii.gz"

    def result_path(self, study_id: str) -> Path:
        return self.results_dir / f"{study_id}.json"

    # --- state ----------------------------------------------------------------------------------
    def prepare(self, settings: dict) -> None:
        """Create the folders, refuse a folder holding another run's results, remove temporary files
        left by writers that were killed (only call it while no worker of this folder runs)."""
        self.labels_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.root / "run.json"
        if run_file.exists():
            previous = json.loads(run_file.read_text()).get("run_key")
            if previous and previous != self.run_key and any(self.results_dir.glob("*.json")):
                raise ValueError(
                    f"{self.root} holds results of a run with other settings or templates (run key {previous} "
                    f"!= {self.run_key}); use another output folder or delete {self.results_dir}")
        atomic_write_json(run_file, {"run_key": self.run_key, "settings": settings})
        self.remove_temporaries()

    def remove_temporaries(self) -> int:
        """Delete the temporary files of writers that were killed (only while no worker writes here)."""
        stale = [p for folder in (self.root, self.labels_dir, self.results_dir) for p in folder.glob(".*.tmp*")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def read_result(self, study_id: str) -> dict | None:
        path = self.result_path(study_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            log.warning("ignoring unreadable result %s (the study runs again)", path)
            return None

    def is_finished(self, study_id: str) -> bool:
        """True when the study has an "ok" result of this run key and its label file."""
        result = self.read_result(study_id)
        return bool(result and result.get("status") == "ok" and result.get("run_key") == self.run_key
                    and self.label_path(study_id).exists())

    # --- writers (workers) ----------------------------------------------------------------------
    def write_success(self, ref, affine: np.ndarray, result, timings: dict, attempt: int = 1) -> dict:
        """Label first, then the result JSON (the 'finished' mark); returns the CSV row."""
        t0 = time.perf_counter()
        save_nifti(nib.Nifti1Image(result.labels.astype(np.uint8, copy=False), affine), self.label_path(ref.study_id))
        report = result.report()
        report["timings"] = {**timings, **report["timings"], "write_s": round(time.perf_counter() - t0, 3)}
        record = {"study_id": ref.study_id, "source": ref.source, "status": "ok", "run_key": self.run_key,
                  "label": str(self.label_path(ref.study_id).relative_to(self.root)), "attempt": attempt,
                  "worker": worker_name(), "worker_peak_rss_mb": peak_rss_mb(),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **report}
        atomic_write_json(self.result_path(ref.study_id), record)
        return summary_row(record)

    def write_failure(self, ref, error: BaseException | str, attempt: int = 1, worker: str | None = None) -> dict:
        """Record a failed study (its error, where it happened); returns the CSV row."""
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
            trace = traceback.format_exception(type(error), error, error.__traceback__)[-6:]
        else:
            message, trace = str(error), []
        record = {"study_id": ref.study_id, "source": ref.source, "status": "error", "run_key": self.run_key,
                  "error": message, "traceback": "".join(trace), "attempt": attempt,
                  "worker": worker or worker_name(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.result_path(ref.study_id), record)
        return summary_row(record)

    # --- the summary CSV (driver) ---------------------------------------------------------------
    def csv_rows(self) -> list[dict]:
        if not self.summary_csv.exists():
            return []
        with open(self.summary_csv, newline="") as fh:
            return list(csv.DictReader(fh))

    def append_rows(self, rows: Iterable[dict]) -> None:
        """Append rows to summary.csv (header on first write), flushed and synced row by row."""
        new = not self.summary_csv.exists() or self.summary_csv.stat().st_size == 0
        with open(self.summary_csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())

    def reconcile_csv(self, study_ids: Iterable[str]) -> int:
        """Add the rows of finished studies whose row is missing (a driver stopped between a worker's
        result file and its CSV row); returns how many were added."""
        listed = {r["study_id"] for r in self.csv_rows() if r.get("status") == "ok"}
        missing = [summary_row(self.read_result(s)) for s in study_ids if s not in listed and self.is_finished(s)]
        if missing:
            self.append_rows(missing)
        return len(missing)


def summary_row(record: dict[str, Any]) -> dict:
    """The summary.csv row of a result record."""
    timings = record.get("timings") or {}
    return {
        "study_id": record["study_id"],
        "status": record["status"],
        "organs_present": len(record.get("label_names") or {}),
        "organs_absent": len(record.get("absent") or []),
        "foreground_voxels": sum((record.get("voxels") or {}).values()),
        "load_s": timings.get("load_s", ""),
        "localize_s": timings.get("localize_s", ""),
        "segment_s": timings.get("segment_s", ""),
        "total_s": timings.get("total_s", ""),
        "attempt": record.get("attempt", 1),
        "worker": record.get("worker", ""),
        "worker_peak_rss_mb": record.get("worker_peak_rss_mb", ""),
        "finished_at": record.get("finished_at", ""),
        "label": record.get("label", ""),
        "error": record.get("error", ""),
    }
