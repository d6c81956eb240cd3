"""Published MedLAM weight versions of the trainer task, and the stats file clients read.

<model_dir>/medlam_trained/
    medlam.pt            the latest published version (what the infer tasks load by default)
    versions/vNNN.pt     every published version, with vNNN.json (when, from what, validation)
    rejected/<time>.pt   weights that validated worse than the ones in use, with their .json
    train_stats.json     progress of the current / last run (MONAI Label's train_stats keys)
`--conf medlam_version N` pins version N (0: the untrained base weights), see settings.py.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import time
from pathlib import Path

from medlsam.io import atomic_path, atomic_write_json

VERSION_FILE = re.compile(r"v(\d{3,})\.pt")


def _copy(source: str | Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


class WeightVersions:
    def __init__(self, trained_dir: Path):
        self.dir = Path(trained_dir)
        self.latest = self.dir / "medlam.pt"
        self.versions_dir = self.dir / "versions"
        self.rejected_dir = self.dir / "rejected"

    def versions(self) -> list[int]:
        found = (VERSION_FILE.fullmatch(p.name) for p in self.versions_dir.glob("v*.pt"))
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, version: int) -> Path:
        return self.versions_dir / f"v{version:03d}.pt"

    def publish(self, source: str | Path, info: dict) -> int:
        """Store `source` as the next version, then make it the latest (each step one atomic rename:
        a crash in between leaves the previous latest in use)."""
        version = max(self.versions(), default=0) + 1
        _copy(source, self.path(version))
        atomic_write_json(self.path(version).with_suffix(".json"), {**info, "version": version})
        _copy(source, self.latest)
        return version

    def reject(self, source: str | Path, info: dict) -> Path:
        """Keep weights that were not published aside, with the reason."""
        target = self.rejected_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.pt"
        _copy(source, target)
        atomic_write_json(target.with_suffix(".json"), info)
        return target


class TrainStats:
    """train_stats.json, rewritten (atomically) as a run goes: the keys 3D Slicer and OHIF read
    (`epoch`, `total_epochs`, `best_metric` in 0..1, `start_ts`, `current_time` while running,
    `total_time` once finished) plus the app's own (`status`, `validation`, `published`, ...)."""

    def __init__(self, path: Path, total_epochs: int, **extra):
        self.path = Path(path)
        self.started = time.time()
        self.data: dict = {"status": "starting", "epoch": 0, "total_epochs": int(total_epochs), "best_metric": 0.0,
                           "start_ts": int(self.started), **extra}
        self.update()

    def _elapsed(self) -> str:
        return str(datetime.timedelta(seconds=int(time.time() - self.started)))

    def update(self, **values) -> None:
        self.data.update(values)
        self.data["current_time"] = self._elapsed()
        atomic_write_json(self.path, self.data)

    def finish(self, **values) -> dict:
        self.data.update(values)
        self.data.pop("current_time", None)
        self.data["total_time"] = self._elapsed()
        atomic_write_json(self.path, self.data)
        return self.data

    @staticmethod
    def read(path: Path) -> dict:
        try:
            return json.loads(Path(path).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
