"""Whole-dataset segmentation: `medlsam run`, resumable, sequential or on Ray (docs/BATCH.md).

    sources.py    query studies (folders, lists, datastore, DICOMweb) as picklable StudyRefs
    supports.py   the run's templates (template file or support studies)
    processor.py  BatchSettings and the per-worker StudyProcessor (one model set, run_medlsam)
    outputs.py    the shared output folder: labels, per-study JSON, summary.csv (atomic writes)
    executors.py  LocalExecutor (sequential) and RayExecutor (actor pool, re-queue on worker death)
    runner.py     run_batch: skip finished studies, progress, summary rows
"""

from .executors import LocalExecutor, RayExecutor
from .outputs import BatchOutput
from .processor import BatchSettings, StudyProcessor, templates_digest
from .runner import BatchSummary, run_batch
from .sources import StudyRef, datastore_studies, datastore_supports, dicomweb_studies, file_studies

__all__ = [
    "BatchOutput", "BatchSettings", "BatchSummary", "LocalExecutor", "RayExecutor", "StudyProcessor", "StudyRef",
    "datastore_studies", "datastore_supports", "dicomweb_studies", "file_studies", "run_batch", "templates_digest",
]
