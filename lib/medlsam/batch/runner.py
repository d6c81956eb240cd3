"""The batch loop: skip finished studies, run the rest on an executor, log each row, show progress."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tqdm import tqdm

from medlsam.batch.outputs import BatchOutput

log = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    total: int
    skipped: int  # finished by an earlier run
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def studies_per_minute(self) -> float:
        done = self.ok + len(self.failed)
        return round(60.0 * done / self.seconds, 2) if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "skipped": self.skipped, "ok": self.ok, "failed": list(self.failed),
                "seconds": round(self.seconds, 2), "studies_per_minute": self.studies_per_minute}


def check_unique_ids(refs: Sequence) -> None:
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.study_id in seen:
            raise ValueError(f"two query studies have the id {ref.study_id!r} ({seen[ref.study_id]}, {ref.source}): "
                             "output files are named by id")
        seen[ref.study_id] = ref.source


def pending_studies(refs: Sequence, output: BatchOutput) -> list:
    """The studies without a finished result of this run (failed ones are tried again)."""
    return [ref for ref in refs if not output.is_finished(ref.study_id)]


def run_batch(refs: Sequence, output: BatchOutput, executor, progress: bool = True,
              on_row: Callable[[dict], None] | None = None) -> BatchSummary:
    """Run every unfinished study of `refs` on `executor`; append each outcome to summary.csv.

    `output.prepare(...)` must have been called (it fixes the run key). Returns the counts."""
    check_unique_ids(refs)
    added = output.reconcile_csv(ref.study_id for ref in refs)
    if added:
        log.info("summary.csv: added %d rows of studies finished by an interrupted run", added)
    todo = pending_studies(refs, output)
    summary = BatchSummary(total=len(refs), skipped=len(refs) - len(todo))
    if not todo:
        return summary
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"medlsam run ({executor.name}, {executor.workers} worker"
               f"{'s' if executor.workers != 1 else ''})", unit="study", disable=None if progress else True,
               smoothing=0.1)
    try:
        for row in executor.run(todo):
            output.append_rows([row])
            if row["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed.append(row["study_id"])
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix_str(f"{60.0 * bar.n / elapsed:.1f} studies/min, {len(summary.failed)} failed")
            if on_row is not None:
                on_row(row)
        output.remove_temporaries()  # every study is done: what is left was written by killed workers
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
    return summary
