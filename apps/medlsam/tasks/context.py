"""State shared by the app's tasks: label map, MedLAM weights, template store, registration supports
(atlas store), the localizer a request gets, segmenter."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import zlib

import nibabel as nib
import numpy as np

from medlsam.errors import BusyError, InputError
from medlsam.geometry import check_ct_intensities
from medlsam.io import load_image
from medlsam.labels import LabelMap
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.store import EmbedderSource, SupportStudy, TemplateStore
from medlsam.medlam.templates import TemplateMismatchError, TemplateSet
from medlsam.registration import RegistrationLocalizer
from medlsam.registration.store import AtlasStore
from medlsam.segment import Segmenter, build_backend

from .datastore import StudyStore
from .errors import bad_request
from .localizers import localizer_param, resolve
from .requests import int_param, mode_param, organs_param
from .settings import AppSettings

logger = logging.getLogger(__name__)


class MedLSAMContext:
    def __init__(self, settings: AppSettings, datastore: StudyStore):
        self.settings = settings
        self.datastore = datastore
        self.label_map: LabelMap = datastore.label_map
        self.label_ids = self.label_map.to_dict()
        # what clients get: values 1..N in label-id order (3D Slicer maps result values 1..N to the
        # names sorted by value; OHIF maps them through the models' /info labels)
        self.client_labels = self.label_map.consecutive()
        self.embedders = EmbedderSource(settings.medlam_checkpoints, settings.device, settings.medlam_batch_size,
                                        settings.medlam_precision)
        self.store = TemplateStore(settings.template_store, self.label_ids, self.embedders, settings.max_supports)
        self.atlases = AtlasStore(settings.atlas_store, self.label_ids, max_supports=settings.max_supports)
        self._atlas_labels_seen = None  # the datastore's final-label version the atlas store last synced
        self._segmenter: Segmenter | None = None
        self._segment_lock = threading.Lock()
        self._final_labels_seen = None  # the datastore's final-label version last synced
        self._rebuild_guard = threading.Lock()
        self._rebuild_started: float | None = None  # monotonic start of the running rebuild

    def organ_name(self, value) -> str:
        return self.label_map.resolve(value)

    def localization_request(self, request: dict) -> tuple[nib.Nifti1Image, list[str] | None, str, int]:
        """The image, organ names (None: all with templates), mode and seed of a medlam/medlsam request."""
        image = self.load_image(self.image_path(request))
        organs = self.label_map.resolve_all(organs_param(request.get("organs")))
        mode = mode_param(request.get("mode"), self.settings.mode, self.localizer_name(request))
        return image, organs, mode, int_param(request, "seed", 0)

    # --- studies --------------------------------------------------------------------------------
    def image_path(self, request: dict) -> str:
        """The request's image file (the app has checked it is a datastore study or an upload)."""
        path = request.get("image")
        if not path or not isinstance(path, str):
            raise bad_request("no image: pass ?image=<id> of a datastore study or upload a file", 400)
        return path

    def load_image(self, path: str) -> nib.Nifti1Image:
        """The study (NIfTI, NRRD or a DICOM folder), read once into memory and checked the same way
        for every task: a readable 3D volume, finite voxels, CT intensities (Hounsfield units).
        Refusals are InputErrors (HTTP 422)."""
        image = load_image(path)
        try:
            data = np.asanyarray(image.dataobj)
        except (EOFError, OSError, zlib.error, ValueError) as exc:  # truncated or corrupt voxel data
            raise InputError(f"image {os.path.basename(path)}: its voxel data cannot be read "
                             f"(truncated or corrupt file): {exc}") from exc
        check_ct_intensities(data, f"image {os.path.basename(path)}")
        return nib.Nifti1Image(data, image.affine, image.header)

    def support_studies(self) -> list[SupportStudy]:
        """Datastore studies with a final label."""
        return self.datastore.final_label_studies()

    # --- models ---------------------------------------------------------------------------------
    def templates(self) -> TemplateSet:
        """Current templates. A request waits at most `template_wait_s` for an update that holds the
        store (start-up sync, a final label being added, a rebuild for new weights), then gets a
        BusyError (HTTP 409 with Retry-After). New weights start one rebuild in the background."""
        deadline = time.monotonic() + self.settings.template_wait_s
        lock = self.store.updating()
        while True:
            if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise BusyError(self._busy_message(), retry_after=10)
            try:
                try:
                    self.store.templates()
                except TemplateMismatchError:
                    pass  # stale: rebuilt below, outside the lock
                else:
                    self._sync_new_final_labels()
                    return self.store.templates()
            finally:
                lock.release()
            self._start_rebuild()
            if time.monotonic() >= deadline:
                raise BusyError(self._busy_message(), retry_after=30)
            time.sleep(0.05)  # let the rebuild take the lock

    def _busy_message(self) -> str:
        if self._rebuild_started is not None:
            return (f"the MedLAM weights changed and the templates are being rebuilt from the supports "
                    f"(running for {time.monotonic() - self._rebuild_started:.0f} s); retry shortly")
        return "the template store is being updated (start-up sync or a new final label); retry shortly"

    def _start_rebuild(self) -> None:
        """Rebuild the templates for new weights in one background thread (not inside a request)."""
        with self._rebuild_guard:
            if self._rebuild_started is not None:
                return
            self._rebuild_started = time.monotonic()

        def rebuild():
            try:
                logger.info("MedLAM weights changed: rebuilding the template store")
                with self.store.updating():
                    self.store.sync(self.support_studies())
            except Exception:  # noqa: BLE001 - requests report the store's state; the log has the cause
                logger.exception("template rebuild failed")
            finally:
                with self._rebuild_guard:
                    self._rebuild_started = None

        threading.Thread(target=rebuild, name="template-rebuild", daemon=True).start()

    def _sync_new_final_labels(self) -> None:
        """Final labels stored by other clients (OHIF's SEG export to the PACS, files copied into the
        datastore) join the template store at the next request."""
        current = self.datastore.final_labels_version()
        if current != self._final_labels_seen:
            report = self.store.sync(self.support_studies())
            if report["added"] or report["removed"]:
                logger.info("template store synced with the datastore: %s", report)
            self._final_labels_seen = current

    def localizer_name(self, request: dict | None = None) -> str:
        """'medlam' or 'registration': the request's `localizer` param, else `--conf localizer`
        ('auto' resolved, see tasks/localizers.py). Unknown values are a 422."""
        choice = localizer_param((request or {}).get("localizer"), self.settings.localizer)
        return resolve(choice, self.settings, self.embedders.checkpoint)

    def localizer(self, request: dict) -> Localizer | RegistrationLocalizer:
        """The localizer for a request (see `localizer_name`), with its supports up to date."""
        if self.localizer_name(request) == "registration":
            return self.registration_localizer()
        settings = LocalizerSettings(mss=str(request.get("mss", "true")).lower() not in ("0", "false", "no"))
        return Localizer(self.embedders.get(), self.templates(), settings)

    def registration_localizer(self) -> RegistrationLocalizer:
        """The registration localizer over the prepared supports; new or changed final labels are
        prepared first. Waits at most `template_wait_s` for a running update (then HTTP 409)."""
        lock = self.atlases.updating()
        if not lock.acquire(timeout=self.settings.template_wait_s):
            raise BusyError("the registration supports are being prepared (start-up or a new final label); "
                            "retry shortly", retry_after=10)
        try:
            self.sync_atlases()
            return self.atlases.localizer()
        finally:
            lock.release()

    def sync_atlases(self) -> None:
        """Prepare the supports of final labels added or changed since the last sync (drop removed ones)."""
        with self.atlases.updating():
            current = self.datastore.final_labels_version()
            if current != self._atlas_labels_seen:
                report = self.atlases.sync(self.support_studies())
                if report["added"] or report["removed"] or report["failed"]:
                    logger.info("atlas store synced with the datastore: %s", report)
                self._atlas_labels_seen = current

    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            backend = build_backend(
                self.settings.segmenter, self.settings.segmenter_checkpoint, device=self.settings.device,
                accelerate=self.settings.accelerate, model_dir=self.settings.model_dir,
            )
            self._segmenter = Segmenter(backend, largest_component=self.settings.largest_component, progress=False,
                                        in_plane_margin_mm=self.settings.box_margin_mm,
                                        prompting=self.settings.prompting, propagation=self.settings.propagation,
                                        key_slice_mm=self.settings.key_slice_mm)
        return self._segmenter

    @property
    def segment_lock(self) -> threading.Lock:
        """One segmentation at a time: the backend and its caches are shared."""
        return self._segment_lock

    def client_volume(self, labels) -> tuple[np.ndarray, dict]:
        """A label volume with label-map ids as clients get it: values renumbered 1..N
        (`client_labels`), `label_names` = the whole map (so names stay right when organs are
        absent), `label_info` = the organs present in ascending value order (how MONAI Label's DICOM
        SEG conversion names segments)."""
        volume = self.label_map.to_consecutive(labels)
        names = {v: n for n, v in self.client_labels.items()}
        present = [int(v) for v in np.unique(volume) if v]
        return volume, {"label_names": dict(self.client_labels),
                        "label_info": [{"name": names[v], "idx": v} for v in present]}

    @staticmethod
    def result_file() -> str:
        fd, path = tempfile.mkstemp(suffix=".nii.gz", prefix="medlsam-")
        os.close(fd)
        return path
