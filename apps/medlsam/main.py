"""MONAI Label app: MedLSAM (MedLAM localization + SAM-family box-prompt segmentation).

Tasks: infer `medlsam` (localize + segment, the default auto-segmentation model), `sam` / `sam_2d`
(interactive box / point prompts, listed where 3D Slicer and OHIF look for interactive models),
`medlam` (boxes); train `medlam` (self-supervised RDR + MSS pretraining on the datastore's images);
Next Sample strategies `random`, `fewshot`, `first`, `last`; scoring `dice` (per-organ Dice of the
app's result against the final label). Support templates are built from the studies that have a
final label and updated on every save; so are the registration localizer's prepared supports
(`--conf localizer medlam|registration|auto`, per request `localizer`; tasks/localizers.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid

from monailabel.config import settings as ml_settings
from monailabel.interfaces.app import MONAILabelApp

from tasks.context import MedLSAMContext
from tasks.datastore import LocalStudyStore, StudyStore
from tasks.dicomweb import client_result, pacs_datastore
from tasks.errors import bad_request, http_error, request_errors
from tasks.guard import install as install_guard
from tasks.infer_medlam import MedLAMInfer
from tasks.infer_medlsam import MedLSAMInfer
from tasks.infer_sam import SAM2DInfer, SAMInfer
from tasks.label_check import FinalLabelCheck
from tasks.scoring import OrganDice, score_study
from tasks.settings import AppSettings
from tasks.strategies import strategies

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
        # MONAI Label re-runs every scoring method in a subprocess (a second app) after each Next
        # Sample and training; our Dice runs in-process whenever a label is saved instead.
        self._auto_update_scoring = False

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
        # order matters: 3D Slicer and OHIF select the first model of a kind, so medlsam comes first
        return {"medlsam": MedLSAMInfer(self.ctx), "sam": SAMInfer(self.ctx), "sam_2d": SAM2DInfer(self.ctx),
                "medlam": MedLAMInfer(self.ctx)}

    def init_trainers(self):
        try:
            from tasks.train_medlam import MedLAMTrain
        except ImportError as exc:  # training code not installed
            logger.warning("trainer task unavailable: %s", exc)
            return {}
        return {"medlam": MedLAMTrain(self.ctx)}

    def init_strategies(self):
        return strategies(self.ctx)

    def init_scoring_methods(self):
        return {"dice": OrganDice(self.label_map)}

    def init_batch_infer(self):
        # /batch/infer/medlsam runs medlsam.batch (docs/BATCH.md); other models keep MONAI Label's task
        from tasks.batch_infer import MedLSAMBatchInfer

        return MedLSAMBatchInfer(self.ctx)

    def on_init_complete(self):
        super().on_init_complete()
        # MONAI Label's routes take paths as ids and block the event loop: the app's own replace them
        # (tasks/guard); only in the server process (not in training / scoring subprocesses).
        install_guard(self)
        # Templates of new or changed supports are computed in the background so the server answers
        # at once; infer requests wait for them, /info shows "updating" meanwhile.
        started = threading.Event()
        threading.Thread(target=self._sync_templates, args=(started,), name="template-sync", daemon=True).start()
        started.wait(10)  # the update holds the store's lock before the server answers its first request

    def _sync_templates(self, started: threading.Event):
        # Gathering the supports is part of the update (DICOMweb: SEGs are downloaded and decoded),
        # so the store's lock is held from the start: /info shows "updating", infers wait.
        # The default localizer's supports come first: with registration (seconds per support) the
        # server answers /infer/medlsam while the MedLAM templates (minutes on a CPU) are still built.
        registration = self.ctx.localizer_name() == "registration"
        if registration:
            with self.ctx.atlases.updating():
                started.set()
                self._sync_atlases()
        with self.ctx.store.updating():
            started.set()
            try:
                logger.info("template store: %s", self.ctx.store.sync(self.ctx.support_studies()))
            except Exception:  # a broken store must not take the server down; requests report it
                logger.exception("template store sync failed")

    def _sync_atlases(self):
        try:
            self.ctx.sync_atlases()
            logger.info("atlas store: %s", self.ctx.atlases.summary())
        except Exception:  # noqa: BLE001 - requests retry the sync and report the cause
            logger.exception("atlas store sync failed")

    def on_save_label(self, image_id, label_id):
        super().on_save_label(image_id, label_id)
        datastore = self.datastore()
        out = dict(getattr(datastore, "save_reports", {}).pop(image_id, {}))
        studies = {s.study_id: s for s in self.ctx.support_studies()}
        if image_id in studies:
            with request_errors("saving the label"):
                out["templates"] = self.ctx.store.add_support(studies[image_id])
            if self.ctx.localizer_name() == "registration":
                with request_errors("saving the label"):
                    self.ctx.sync_atlases()
        try:
            scored = score_study(datastore, self.label_map, image_id)
        except Exception:  # noqa: BLE001 - a failed score must not fail the save
            logger.exception("dice of %s not computed", image_id)
            scored = None
        if scored:
            out.update(dice=scored["dice"], organ_dice=scored["organ_dice"])
        return out

    # --- requests -------------------------------------------------------------------------------
    def infer(self, request, datastore=None):
        if request.get("model") not in self._infers:
            raise bad_request(f"unknown model {request.get('model')!r}; available: {', '.join(self._infers)}", 404)
        datastore = datastore or self.datastore()
        image = request.get("image")
        if isinstance(image, str) and image:
            if request.get("session"):
                self._check_session_image(image)
            else:
                self._check_image_reference(image, datastore)
                self._keep_original(request, image, datastore)
        result = super().infer(request, datastore)
        self._name_dicom_seg_segments(request, result)
        return client_result(result, request)

    @staticmethod
    def _keep_original(request: dict, image: str, datastore: StudyStore) -> None:
        """medlsam's result on a datastore study without a final label is saved as its `original`
        label: 3D Slicer shows it on Next Sample, and the Dice against the final label says how
        much each organ needed correcting (tasks/scoring.py)."""
        if request.get("model") != "medlsam" or "save_label" in request or os.path.isabs(image):
            return
        if image not in datastore.get_labeled_images():
            request["save_label"] = True

    @staticmethod
    def _name_dicom_seg_segments(request: dict, result: dict) -> None:
        # MONAI Label's `output=dicom_seg` names segment i after the request's label_info[i] and
        # refuses a request without one; an empty list sent by the client is filled with the organs
        # of this result (the same list object is read after infer).
        wanted = request.get("label_info")
        if isinstance(wanted, list) and not wanted:
            wanted.extend((result.get("params") or {}).get("label_info") or [])

    def _check_session_image(self, image: str) -> None:
        """A session image (`PUT /session/`, 3D Slicer's local volumes): a path inside the session
        store, in a folder named by a session id; anything else 404."""
        sessions = self.sessions()
        store = os.path.realpath(sessions.store_path) if sessions else ""
        real = os.path.realpath(image)
        parts = os.path.relpath(real, store).split(os.sep) if store else [".."]
        try:
            valid = parts[0] != ".." and len(parts) >= 2 and str(uuid.UUID(parts[0])) == parts[0].lower()
        except ValueError:
            valid = False
        if not valid or not os.path.exists(real):
            raise bad_request("image: the session's image is not in the session store", 404)

    def _check_image_reference(self, image: str, datastore: StudyStore) -> None:
        """Only datastore ids and uploaded files (server temp folder): never other server paths."""
        real = os.path.realpath(image) if os.path.isabs(image) else ""
        if real and os.path.isfile(real) and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()):
            return
        try:
            datastore.image_file(image)  # 404 unknown id; DICOMweb: 422 non-CT, 503 PACS down
        except Exception as exc:  # noqa: BLE001 - every failure is answered with its HTTP class
            raise http_error(exc, "image") from exc

    def check_batch_request(self, model: str, images, params: dict) -> None:
        """Refuse (HTTP 4xx) a /batch/infer/medlsam request naming unknown studies or organs before it
        starts in the background, where the error would only show in the task's status."""
        if model == "medlsam":
            from tasks.batch_infer import check_request

            check_request(self.ctx, self.datastore(), {"images": getattr(images, "value", images), **params})

    def check_train_request(self, model: str, params: dict) -> None:
        """Refuse (InputError) a training request the trainer would fail on, before it starts."""
        if model == "medlam":
            from tasks.train_medlam import parse_options

            parse_options(params)

    def info(self):
        meta = super().info()
        meta.pop("config", None)  # 3D Slicer refuses servers whose /info has a top-level `config`
        try:
            meta["templates"] = self.ctx.store.summary()
        except (FileNotFoundError, ValueError) as exc:
            meta["templates"] = {"error": str(exc)}
        meta["localizer"] = {"configured": self.settings.localizer, "default": self.ctx.localizer_name()}
        lock = self.ctx.atlases.updating()
        if lock.acquire(timeout=0.2):
            try:
                meta["atlases"] = {**self.ctx.atlases.summary(), "updating": False}
            finally:
                lock.release()
        else:
            meta["atlases"] = {"updating": True}
        return meta
