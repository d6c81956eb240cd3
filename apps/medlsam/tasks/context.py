"""State shared by the app's tasks: label map, MedLAM weights, template store, segmenter."""

from __future__ import annotations

import logging
import os
import tempfile
import threading

import nibabel as nib

from medlsam.io import load_nifti
from medlsam.labels import LabelMap
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.store import EmbedderSource, SupportStudy, TemplateStore
from medlsam.medlam.templates import TemplateMismatchError, TemplateSet
from medlsam.segment import Segmenter, build_backend

from .datastore import StudyStore
from .errors import bad_request
from .requests import int_param, mode_param, organs_param
from .settings import AppSettings

logger = logging.getLogger(__name__)


class MedLSAMContext:
    def __init__(self, settings: AppSettings, datastore: StudyStore):
        self.settings = settings
        self.datastore = datastore
        self.label_map: LabelMap = datastore.label_map
        self.label_ids = self.label_map.to_dict()
        self.embedders = EmbedderSource(settings.medlam_checkpoints, settings.device)
        self.store = TemplateStore(settings.template_store, self.label_ids, self.embedders, settings.max_supports)
        self._segmenter: Segmenter | None = None
        self._segment_lock = threading.Lock()
        self._final_labels_seen = None  # the datastore's final-label version last synced

    def organ_name(self, value) -> str:
        return self.label_map.resolve(value)

    def localization_request(self, request: dict) -> tuple[nib.Nifti1Image, list[str] | None, str, int]:
        """The image, organ names (None: all with templates), mode and seed of a medlam/medlsam request."""
        image = self.load_image(self.image_path(request))
        organs = self.label_map.resolve_all(organs_param(request.get("organs")))
        mode = mode_param(request.get("mode"), self.settings.mode)
        return image, organs, mode, int_param(request, "seed", 0)

    # --- studies --------------------------------------------------------------------------------
    def image_path(self, request: dict) -> str:
        """The request's image file (the app has checked it is a datastore study or an upload)."""
        path = request.get("image")
        if not path or not isinstance(path, str):
            raise bad_request("no image: pass ?image=<id> of a datastore study or upload a file", 400)
        return path

    def load_image(self, path: str) -> nib.Nifti1Image:
        return load_nifti(path)

    def support_studies(self) -> list[SupportStudy]:
        """Datastore studies with a final label."""
        return self.datastore.final_label_studies()

    # --- models ---------------------------------------------------------------------------------
    def templates(self) -> TemplateSet:
        """Current templates; rebuilt from the datastore first if the MedLAM weights changed."""
        self._sync_new_final_labels()
        try:
            return self.store.templates()
        except TemplateMismatchError:
            logger.info("MedLAM weights changed: rebuilding the template store")
            self.store.sync(self.support_studies())
            return self.store.templates()

    def _sync_new_final_labels(self) -> None:
        """Final labels stored by other clients (OHIF's SEG export to the PACS, files copied into the
        datastore) join the template store at the next request."""
        current = self.datastore.final_labels_version()
        if current != self._final_labels_seen:
            report = self.store.sync(self.support_studies())
            if report["added"] or report["removed"]:
                logger.info("template store synced with the datastore: %s", report)
            self._final_labels_seen = current

    def localizer(self, request: dict) -> Localizer:
        settings = LocalizerSettings(mss=str(request.get("mss", "true")).lower() not in ("0", "false", "no"))
        return Localizer(self.embedders.get(), self.templates(), settings)

    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            backend = build_backend(
                self.settings.segmenter, self.settings.segmenter_checkpoint, device=self.settings.device,
                accelerate=self.settings.accelerate, model_dir=self.settings.model_dir,
            )
            self._segmenter = Segmenter(backend, largest_component=self.settings.largest_component, progress=False,
                                        in_plane_margin_mm=self.settings.box_margin_mm,
                                        prompting=self.settings.prompting, propagation=self.settings.propagation)
        return self._segmenter

    @property
    def segment_lock(self) -> threading.Lock:
        """One segmentation at a time: the backend and its caches are shared."""
        return self._segment_lock

    @staticmethod
    def result_file() -> str:
        fd, path = tempfile.mkstemp(suffix=".nii.gz", prefix="medlsam-")
        os.close(fd)
        return path
