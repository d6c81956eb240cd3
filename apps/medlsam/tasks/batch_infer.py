"""`POST /batch/infer/medlsam`: MONAI Label's batch endpoint on the app's datastore, through the same
batch runner as `medlsam run` (same per-study label, JSON and summary row; resumable).

Request (query `images` or params): `images` "unlabeled" (no final label: every study that is not
a support), "labeled", "all" or a list of image ids; params `organs`, `mode`, `seed`, `mss`, `localizer` as for
/infer/medlsam; `output` (a folder on the server; default <model_dir>/batch/<datastore>);
`save_label` (default true: each label is also stored in the datastore with tag `label_tag`,
default "original", as MONAI Label's own batch inference does). Other models keep MONAI Label's
default batch task. docs/BATCH.md has the details.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from medlsam.batch import BatchOutput, LocalExecutor, StudyProcessor, StudyRef, run_batch, templates_digest
from medlsam.io import load_nifti
from medlsam.registration import RegistrationLocalizer
from medlsam.registration.store import atlases_digest

from .context import MedLSAMContext
from .errors import bad_request, request_errors
from .requests import int_param, mode_param, organs_param

logger = logging.getLogger(__name__)
MODEL = "medlsam"
FINAL = "final"


@dataclass(frozen=True)
class DatastoreStudy(StudyRef):
    """A study of the app's datastore, fetched (DICOMweb: downloaded) only when a worker loads it."""

    kind: str = "datastore"
    datastore: Any = field(default=None, compare=False, repr=False)

    def load(self):
        return load_nifti(self.datastore.image_file(self.study_id))


class _LockedProcessor:
    """Studies take the app's segmentation lock one at a time: /infer requests share the models."""

    def __init__(self, processor: StudyProcessor, lock):
        self.processor, self.lock = processor, lock

    def process(self, ref, attempt: int = 1) -> dict:
        with self.lock:
            return self.processor.process(ref, attempt)


def select_images(request: dict, datastore) -> list[str]:
    """The study ids a batch request names: "unlabeled", "labeled", "all" or a list (unknown ids: 404)."""
    images = request.get("images", "all")
    if isinstance(images, str) and images in ("unlabeled", "labeled", "all"):
        if images == "unlabeled":
            return datastore.get_unlabeled_images(FINAL)
        if images == "labeled":
            return datastore.get_labeled_images(FINAL)
        return datastore.list_images()
    if isinstance(images, str):
        images = [i for i in images.split(",") if i.strip()]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise bad_request(f"images must be 'unlabeled', 'labeled', 'all' or a list of image ids, got {images!r}")
    known = set(datastore.list_images())
    unknown = [i for i in images if i not in known]
    if unknown:
        raise bad_request(f"image(s) not in the datastore: {', '.join(unknown[:5])}", 404)
    return images


def check_request(ctx: MedLSAMContext, datastore, request: dict) -> None:
    """The checks a batch request must pass before it starts: known images, organs and mode."""
    with request_errors("batch medlsam"):
        select_images(request, datastore)
        ctx.label_map.resolve_all(organs_param(request.get("organs")))
        mode_param(request.get("mode"), ctx.settings.mode, ctx.localizer_name(request))


def default_output(ctx: MedLSAMContext) -> Path:
    """<model_dir>/batch/<name of the template store>: one folder per datastore, beside its templates."""
    return Path(ctx.settings.model_dir) / "batch" / Path(ctx.settings.template_store).stem


class MedLSAMBatchInfer(BatchInferTask):
    def __init__(self, ctx: MedLSAMContext):
        self.ctx = ctx

    def get_images(self, request, datastore):
        return select_images(request, datastore)

    def __call__(self, request, datastore, infer):
        if request.get("model") != MODEL:
            return super().__call__(request, datastore, infer)
        ctx = self.ctx
        with request_errors("batch medlsam"):
            ids = sorted(set(self.get_images(request, datastore)))
            organs = ctx.label_map.resolve_all(organs_param(request.get("organs")))
            seed = int_param(request, "seed", 0)
            localizer = ctx.localizer(request)
            registration = isinstance(localizer, RegistrationLocalizer)
            mode = mode_param(request.get("mode"), ctx.settings.mode, ctx.localizer_name(request))
            settings = {
                "organs": organs, "mode": mode, "seed": seed,
                **({"localizer": "registration"} if registration else {"mss": localizer.settings.mss}),
                "segmenter": ctx.settings.segmenter, "segmenter_checkpoint": str(ctx.settings.segmenter_checkpoint),
                "box_margin_mm": ctx.settings.box_margin_mm, "largest_component": ctx.settings.largest_component,
                "prompting": ctx.settings.prompting, "key_slice_mm": ctx.settings.key_slice_mm,
                "templates_digest": atlases_digest(localizer) if registration else templates_digest(localizer.templates),
                "source": "/batch/infer/medlsam",
            }
            output = BatchOutput(Path(request.get("output") or default_output(ctx)),
                                 run_key_of(settings))
            output.prepare(settings)
            processor = StudyProcessor(output, localizer, ctx.segmenter(), organs, mode, seed)
        refs = [DatastoreStudy(i, i, datastore=datastore) for i in ids]
        save = str(request.get("save_label", True)).lower() not in ("0", "false", "no")
        tag = request.get("label_tag") or "original"

        def store_label(row: dict) -> None:
            if save and row["status"] == "ok":
                report = output.read_result(row["study_id"]) or {}
                datastore.save_label(row["study_id"], str(output.label_path(row["study_id"])), tag,
                                     {"model": MODEL, "params": {k: report.get(k) for k in ("label_names", "absent")}})

        logger.info("batch medlsam: %d studies -> %s", len(refs), output.root)
        summary = run_batch(refs, output, LocalExecutor(lambda: _LockedProcessor(processor, ctx.segment_lock)),
                            progress=False, on_row=store_label)
        result = {"output": str(output.root), "run_key": output.run_key, **summary.to_dict()}
        logger.info("batch medlsam: %s", result)
        return result


def run_key_of(settings: dict) -> str:
    import hashlib
    import json

    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
