"""MONAI Label app: MedLSAM (MedLAM localization + SAM-family box-prompt segmentation).

Tasks: infer `medlam` (boxes), `sam` (interactive box/point prompts), `medlsam` (localize +
segment); train `medlam` (self-supervised RDR + MSS pretraining on the datastore's images).
Support templates are built from the studies that have a final label and updated on every save.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

from monailabel.config import settings as ml_settings
from monailabel.interfaces.app import MONAILabelApp

from tasks.context import MedLSAMContext
from tasks.datastore import LocalStudyStore, StudyStore
from tasks.dicomweb import client_result, pacs_datastore
from tasks.errors import bad_request, http_error, request_errors
from tasks.infer_medlam import MedLAMInfer
from tasks.infer_medlsam import MedLSAMInfer
from tasks.infer_sam import SAMInfer
from tasks.label_check import FinalLabelCheck
from tasks.settings import AppSettings

logger = logging.getLogger(__name__)


class MedLSAMApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.settings = AppSettings.from_conf(conf or {}, app_dir, studies)
        self.label_map = self.settings.read_label_map()
        self.ctx: MedLSAMContext | None = None  # built once the datastore exists (init_infers)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedLSAM",
            description="Localize any organ from a few annotated supports (MedLAM), segment it with "
            "SAM-family box prompts",
            version="0.1.0",
        )

    # --- MONAI Label hooks ----------------------------------------------------------------------
    def init_datastore(self) -> StudyStore:
        check = FinalLabelCheck(self.label_map)
        if self.studies.startswith(("http://", "https://")):  # DICOMweb: final labels are SEGs (tasks/dicomweb.py)
            return pacs_datastore(self.studies, self.label_map, check)
        return LocalStudyStore(
            self.studies, self.label_map, check,
            extensions=ml_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        self.ctx = MedLSAMContext(self.settings, self.datastore())
        # /info `labels` as a list ordered by id: OHIF v3's MONAI Label panel appends to it (a dict
        # breaks the panel: no models listed); each model's `labels` keeps the {name: id} map
        self.labels = self.label_map.names
        return {"medlam": MedLAMInfer(self.ctx), "sam": SAMInfer(self.ctx), "medlsam": MedLSAMInfer(self.ctx)}

    def init_trainers(self):
        try:
            from tasks.train_medlam import MedLAMTrain
        except ImportError as exc:  # training code not installed
            logger.warning("trainer task unavailable: %s", exc)
            return {}
        return {"medlam": MedLAMTrain(self.ctx)}

    def init_strategies(self):
        return {}

    def on_init_complete(self):
        super().on_init_complete()
        # Templates of new or changed supports are computed in the background so the server answers
        # at once; infer requests wait for them, /info shows "updating" meanwhile.
        started = threading.Event()
        threading.Thread(target=self._sync_templates, args=(started,), name="template-sync", daemon=True).start()
        started.wait(10)  # the update holds the store's lock before the server answers its first request

    def _sync_templates(self, started: threading.Event):
        # Gathering the supports is part of the update (DICOMweb: SEGs are downloaded and decoded),
        # so the store's lock is held from the start: /info shows "updating", infers wait.
        with self.ctx.store.updating():
            started.set()
            try:
                logger.info("template store: %s", self.ctx.store.sync(self.ctx.support_studies()))
            except Exception:  # a broken store must not take the server down; requests report it
                logger.exception("template store sync failed")

    def on_save_label(self, image_id, label_id):
        super().on_save_label(image_id, label_id)
        studies = {s.study_id: s for s in self.ctx.support_studies()}
        if image_id not in studies:
            return {}
        with request_errors("saving the label"):
            organs = self.ctx.store.add_support(studies[image_id])
        return {"templates": organs}

    # --- requests -------------------------------------------------------------------------------
    def infer(self, request, datastore=None):
        if request.get("model") not in self._infers:
            raise bad_request(f"unknown model {request.get('model')!r}; available: {', '.join(self._infers)}", 404)
        image = request.get("image")
        if isinstance(image, str) and image:
            self._check_image_reference(image, datastore or self.datastore())
        return client_result(super().infer(request, datastore), request)

    def _check_image_reference(self, image: str, datastore: StudyStore) -> None:
        """Only datastore ids and uploaded files (server temp folder): never other server paths."""
        real = os.path.realpath(image) if os.path.isabs(image) else ""
        if real and os.path.isfile(real) and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()):
            return
        try:
            datastore.image_file(image)  # 404 unknown id; DICOMweb: 422 non-CT, 503 PACS down
        except Exception as exc:  # noqa: BLE001 - every failure is answered with its HTTP class
            raise http_error(exc, "image") from exc

    def info(self):
        meta = super().info()
        try:
            meta["templates"] = self.ctx.store.summary()
        except (FileNotFoundError, ValueError) as exc:
            meta["templates"] = {"error": str(exc)}
        return meta
