"""State shared by the app's tasks: label map, MedLAM weights, template store, segmenter."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np

from medlsam.io import check_label_map, load_label_map, load_nifti
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.store import EmbedderSource, SupportStudy, TemplateStore
from medlsam.medlam.templates import TemplateMismatchError, TemplateSet, check_label
from medlsam.segment import Segmenter, build_backend

from .errors import bad_request
from .requests import int_param, mode_param, organs_param
from .settings import AppSettings

logger = logging.getLogger(__name__)
FINAL = "final"


class MedLSAMContext:
    def __init__(self, settings: AppSettings, datastore):
        self.settings = settings
        self.datastore = datastore
        self.label_ids = self._read_label_map()
        self.embedders = EmbedderSource(settings.medlam_checkpoints, settings.device, settings.medlam_batch_size,
                                        settings.medlam_precision)
        self.store = TemplateStore(settings.template_store, self.label_ids, self.embedders, settings.max_supports)
        self._segmenter: Segmenter | None = None
        self._segment_lock = threading.Lock()
        self._final_labels_seen = None  # DICOMweb: the PACS's SEGs last synced (see _sync_new_final_labels)

    # --- label map ------------------------------------------------------------------------------
    def _read_label_map(self) -> dict[str, int]:
        if self.settings.label_map is not None:
            return load_label_map(self.settings.label_map)
        from medlsam.synthetic import LABEL_MAP  # the generator's organs, for a datastore without a map

        logger.warning("no label map found (--conf label_map <json>); using the sample generator's organs")
        return check_label_map(dict(LABEL_MAP))

    def organ_name(self, value) -> str:
        by_id = {v: k for k, v in self.label_ids.items()}
        key = str(value).strip()
        name = by_id.get(int(key)) if key.isdigit() else key
        if name not in self.label_ids:
            raise bad_request(f"unknown organ {value!r}; known organs: {', '.join(self.label_ids)}")
        return name

    def localization_request(self, request: dict) -> tuple[nib.Nifti1Image, list[str] | None, str, int]:
        """The image, organ names (None: all with templates), mode and seed of a medlam/medlsam request."""
        image = self.load_image(self.image_path(request))
        organs = [self.organ_name(o) for o in organs_param(request.get("organs")) or []] or None
        mode = mode_param(request.get("mode"), self.settings.mode)
        return image, organs, mode, int_param(request, "seed", 0)

    # --- studies --------------------------------------------------------------------------------
    def image_path(self, request: dict) -> str:
        """The request's image file, refusing anything that is not a datastore study or an upload."""
        path = request.get("image")
        if not path or not isinstance(path, str):
            raise bad_request("no image: pass ?image=<id> of a datastore study or upload a file", 400)
        return path

    def load_image(self, path: str) -> nib.Nifti1Image:
        try:
            return load_nifti(path)
        except FileNotFoundError as exc:
            raise bad_request(str(exc), 404) from exc
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    def support_studies(self) -> list[SupportStudy]:
        """Datastore studies with a final label."""
        studies = []
        for image_id in self.datastore.get_labeled_images(FINAL):
            label_uri = self.datastore.get_label_uri(image_id, FINAL)
            image_uri = self.datastore.get_image_uri(image_id)
            if label_uri and image_uri and os.path.exists(label_uri):
                studies.append(SupportStudy(image_id, Path(image_uri), Path(label_uri)))
        return studies

    def validate_final_label(self, image_id: str, label_file: str) -> None:
        """Refuse a label the template store could not use (422), before the datastore stores it."""
        image_uri = self.datastore.get_image_uri(image_id)
        if not image_uri:
            raise bad_request(f"image {image_id!r} not found in the datastore", 404)
        try:
            label = load_nifti(label_file, what="label")
            image = nib.load(image_uri)
            check_label(np.asanyarray(label.dataobj), image.shape, self.label_ids, name=f"label for {image_id}")
        except (ValueError, FileNotFoundError) as exc:
            raise bad_request(f"label rejected: {exc}") from exc
        if not np.allclose(label.affine, image.affine, atol=1e-3):
            raise bad_request(f"label rejected: its affine differs from the affine of image {image_id!r}")

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
        """DICOMweb: SEGs stored in the PACS by other clients (OHIF's SEG export) join the template
        store at the next request; the datastore tells when its set of final labels changed."""
        snapshot = getattr(self.datastore, "final_label_snapshot", None)
        if snapshot is None:
            return
        current = snapshot()
        if current != self._final_labels_seen:
            report = self.store.sync(self.support_studies())
            if report["added"] or report["removed"]:
                logger.info("template store synced with the PACS: %s", report)
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
                                        in_plane_margin_mm=self.settings.box_margin_mm)
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
