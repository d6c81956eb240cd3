"""DICOMweb mode of the app: a PACS (e.g. Orthanc) as the datastore, final labels as DICOM SEG.

- `PacsDatastore`: MONAI Label's DICOMWebDatastore, plus
  * final labels = the newest SEG in the PACS that references a series; decoded with
    `medlsam.dicom.read_seg` onto the series' own voxel grid, segment names mapped to the label map
    (so the template store reads them like local NIfTI labels, via `get_labeled_images` /
    `get_label_uri`);
  * saves checked first (`validate`), segments named after the organs (MONAI Label's conversion
    names them "unknown" unless told), then converted by dcmqi's itkimage2segimage and stored with
    STOW-RS by MONAI Label's own code;
  * clear HTTP errors: unknown series 404, non-CT series 422, PACS unreachable 503, PACS error 502;
  * series lists refreshed every few seconds, not every two hours.
- `client_result`: infer results in the format a client asked for (OHIF v3 asks for raw uint8
  NRRD with `result_extension`; without it the label never shows as an overlay).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pydicom
import requests
import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.config import settings as ml_settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.utils.convert import binary_to_image
from pydicom.dataset import Dataset

from medlsam.dicom import read_seg, referenced_series_uid, sitk_from_nifti
from medlsam.errors import InputError
from medlsam.io import atomic_path, save_nifti
from medlsam.labels import LabelMap
from medlsam.medlam.store import SupportStudy

from .errors import bad_request
from .label_check import FinalLabelCheck

logger = logging.getLogger(__name__)
FINAL = "final"
LIST_TTL_S = 5.0  # how long series / SEG lists are reused before asking the PACS again


def ensure_dcmqi_on_path() -> str:
    """dcmqi's itkimage2segimage (PyPI wheel `dcmqi`) on PATH, so MONAI Label never downloads it."""
    found = shutil.which("itkimage2segimage")
    if found:
        return found
    try:
        import dcmqi
    except ImportError:
        raise RuntimeError("itkimage2segimage not found: install the PyPI package dcmqi into this environment "
                           "(pip install dcmqi); MONAI Label would otherwise try to download it") from None
    bin_dir = Path(dcmqi.__file__).parent / "bin"
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    found = shutil.which("itkimage2segimage")
    if not found:
        raise RuntimeError(f"dcmqi is installed but {bin_dir}/itkimage2segimage is missing or not executable")
    return found


def pacs_errors(method: Callable) -> Callable:
    """Turn PACS connection problems inside a datastore method into 502/503 with a message."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except HTTPException:
            raise
        except requests.exceptions.ConnectionError as exc:
            raise bad_request(f"the DICOMweb server {self.name()} is not reachable ({type(exc).__name__}); "
                              "is the PACS running?", 503) from exc
        except requests.exceptions.Timeout as exc:
            raise bad_request(f"the DICOMweb server {self.name()} did not answer in time", 504) from exc
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise bad_request(f"the DICOMweb server {self.name()} answered HTTP {status} to "
                              f"{exc.request.method if exc.request else ''} {exc.request.url if exc.request else ''}",
                              502) from exc

    return wrapper


class PacsDatastore(DICOMWebDatastore):
    """DICOMWebDatastore whose final labels are DICOM SEGs mapped to the app's label map."""

    def __init__(self, url: str, label_map: LabelMap, check_final_label: FinalLabelCheck,
                 cache_path: str | None = None, search_filter: dict | None = None):
        ensure_dcmqi_on_path()
        self.label_map = label_map
        self.check_final_label = check_final_label
        client = DICOMwebClientX(url=url, session=None, qido_url_prefix=ml_settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=ml_settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=ml_settings.MONAI_LABEL_STOW_PREFIX)
        # dicomweb-client retries every failed call 5 times with exponential back-off (30 s for a
        # PACS that is down); one quick retry keeps a clear 503 quick
        client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
        self._seg_refs: dict[str, dict] = {}  # SEG series uid -> {image, study, when} (SEGs never change)
        self._unusable_segs: dict[str, str] = {}  # SEG series uid -> why it cannot be a label
        self._lists: dict[str, tuple[float, Any]] = {}
        self._lock = threading.RLock()
        self._image_locks: dict[str, threading.Lock] = {}
        cache = cache_path or ml_settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip() or None
        super().__init__(client=client, search_filter=search_filter or dict(ml_settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER),
                         cache_path=cache, fetch_by_frame=False, convert_to_nifti=True)
        self._seg_dir = Path(self._datastore_path) / "seg_labels"

    # --- lists ----------------------------------------------------------------------------------
    def _cached(self, key: str, compute: Callable[[], Any], fresh: bool = False):
        with self._lock:
            hit = self._lists.get(key)
            if hit and not fresh and time.monotonic() - hit[0] < LIST_TTL_S:
                return hit[1]
        value = compute()
        with self._lock:
            self._lists[key] = (time.monotonic(), value)
        return value

    def _series(self, filters: dict) -> list[Dataset]:
        return [Dataset.from_json(d) for d in self._client.search_for_series(search_filters=filters)]

    @pacs_errors
    def list_images(self, fresh: bool = False) -> list[str]:
        return self._cached("images", lambda: [str(d.SeriesInstanceUID) for d in self._series(self._search_filter)],
                            fresh)

    def _seg_index(self, fresh: bool = False) -> dict[str, str]:
        """Image series uid -> the newest SEG series uid referencing it."""

        def compute():
            images = set(self.list_images(fresh))
            newest: dict[str, tuple[str, str]] = {}
            for seg in self._series({"Modality": "SEG"}):
                seg_uid = str(seg.SeriesInstanceUID)
                ref = self._seg_refs.get(seg_uid)
                if ref is None:
                    meta = Dataset.from_json(self._client.retrieve_series_metadata(str(seg.StudyInstanceUID), seg_uid)[0])
                    when = "".join(str(meta.get(k, "")) for k in ("SeriesDate", "SeriesTime"))
                    ref = {"image": referenced_series_uid(meta), "study": str(seg.StudyInstanceUID), "when": when}
                    self._seg_refs[seg_uid] = ref
                if ref["image"] not in images:
                    logger.debug("SEG %s ignored: it references no series of this datastore", seg_uid)
                    continue
                key = (ref["when"], seg_uid)
                if ref["image"] not in newest or key > newest[ref["image"]]:
                    newest[ref["image"]] = key
            return {image: key[1] for image, key in newest.items()}

        return self._cached("segs", compute, fresh)

    # --- StudyStore -----------------------------------------------------------------------------
    def image_file(self, image_id: str) -> str:
        self.check_image(image_id)
        return self.get_image_uri(image_id)

    def final_label_studies(self) -> list[SupportStudy]:
        studies = []
        for image_id in self.get_labeled_images(FINAL):
            label_uri = self.get_label_uri(image_id, FINAL)
            image_uri = self.get_image_uri(image_id)
            if label_uri and image_uri and os.path.exists(label_uri):
                studies.append(SupportStudy(image_id, Path(image_uri), Path(label_uri)))
        return studies

    @pacs_errors
    def final_labels_version(self) -> tuple:
        """(image series, newest SEG series) pairs: changes whenever a SEG is stored or removed.

        Always asks the PACS (two QIDO searches, milliseconds next to an inference): a SEG another
        client stored a moment ago must count at the very next request, not after the list cache expires."""
        return tuple(sorted(self._seg_index(fresh=True).items()))

    @pacs_errors
    def get_labeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        if label_tag not in (None, FINAL):
            return super(DICOMWebDatastore, self).get_labeled_images(label_tag, labels)
        return sorted(self._seg_index())

    @pacs_errors
    def get_unlabeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images()))

    def status(self) -> dict[str, Any]:
        """Counts for /info; a PACS that is down gives an error entry instead of a failed /info."""
        try:
            return {"total": len(self.list_images()), "completed": len(self.get_labeled_images()),
                    "label_tags": {FINAL: len(self.get_labeled_images())}, "pacs": self.name()}
        except HTTPException as exc:
            return {"total": None, "completed": None, "pacs": self.name(), "error": exc.detail}

    # --- checks ---------------------------------------------------------------------------------
    @pacs_errors
    def check_image(self, image_id: str) -> None:
        """404 for a series the PACS does not have, 422 for one the datastore does not serve (not CT)."""
        if image_id in self.list_images() or image_id in self.list_images(fresh=True):
            return
        found = self._series({"SeriesInstanceUID": image_id})
        if not found:
            raise bad_request(f"series {image_id!r} not found in the PACS {self.name()}", 404)
        modality = str(found[0].get("Modality", "unknown"))
        raise bad_request(f"series {image_id!r} has modality {modality}: MedLSAM segments "
                          f"{self._search_filter.get('Modality', 'CT')} series only", 422)

    # --- images and labels ----------------------------------------------------------------------
    @pacs_errors
    def get_image_uri(self, image_id: str) -> str:
        with self._lock:
            lock = self._image_locks.setdefault(image_id, threading.Lock())
        with lock:  # one download / conversion per series at a time
            return super().get_image_uri(image_id)

    @pacs_errors
    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """For `final`: the newest SEG of the image series (label_id or image_id; a SEG uid also
        works) as a NIfTI label with the app's ids on the image's grid; "" if there is none."""
        if label_tag != FINAL:
            return super(DICOMWebDatastore, self).get_label_uri(label_id, label_tag)
        index = self._seg_index()
        image = image_id or label_id
        if image not in index:
            image = next((i for i, s in index.items() if s == label_id), image)
        seg_uid = index.get(image)
        if not seg_uid:
            return ""
        out = self._seg_dir / f"{seg_uid}.nii.gz"
        if seg_uid in self._unusable_segs:
            return ""
        if not out.exists():
            try:
                self._decode_seg(image, seg_uid, out)
            except HTTPException as exc:
                if exc.status_code != 422:
                    raise
                # one unusable SEG in the PACS must not stop the others (or inference) from working
                logger.warning("SEG %s of series %s skipped: %s", seg_uid, image, exc.detail)
                self._unusable_segs[seg_uid] = exc.detail
                return ""
        return str(out)

    def _decode_seg(self, image_id: str, seg_uid: str, out: Path) -> None:
        reference = nib.load(self.get_image_uri(image_id))
        instances = self._client.retrieve_series(self._seg_refs[seg_uid]["study"], seg_uid)
        if not instances:
            raise bad_request(f"SEG series {seg_uid} has no instances", 502)
        try:
            labels, report = read_seg(instances[0], reference, self.label_map.to_dict())
        except ValueError as exc:
            raise bad_request(f"SEG {seg_uid} of series {image_id}: {exc}") from exc
        logger.info("SEG %s -> label of %s: organs %s, ignored %s", seg_uid, image_id, sorted(report["mapped"]),
                    report["ignored"])
        save_nifti(nib.Nifti1Image(labels, reference.affine), out)

    @pacs_errors
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        label_info = dict(label_info or {})
        converted = ""
        if label_filename.endswith(".bin"):  # OHIF sends raw voxels in the series' order
            converted = binary_to_image(self.get_image_uri(image_id), label_filename)
            label_filename = converted
        try:
            if label_tag == FINAL:
                try:
                    self.check_final_label(self.get_image_uri(image_id), label_filename, image_id)
                except InputError as exc:
                    raise bad_request(str(exc)) from exc
                label_info.setdefault("label_info", self._segment_info(label_filename))
                label_info.setdefault("model_name", "MedLSAM")
            try:
                result = super().save_label(image_id, label_filename, label_tag, label_info)
            except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
                raise bad_request(f"could not store the label as DICOM SEG in {self.name()}: {exc}", 502) from exc
            if label_tag == FINAL:
                seg_uid = label_info.get("SeriesInstanceUID")
                if not seg_uid:
                    raise bad_request(f"the PACS {self.name()} did not confirm storing the SEG", 502)
                logger.info("final label of %s stored as SEG %s", image_id, seg_uid)
                self._seg_index(fresh=True)
            return result
        finally:
            if converted and os.path.exists(converted):
                os.unlink(converted)

    def _segment_info(self, label_file: str) -> list[dict]:
        """MONAI Label's SEG conversion names segment i after label_info[i] (ids in ascending order)."""
        names = {v: k for k, v in self.label_map.items()}
        data = np.asanyarray(nib.load(label_file).dataobj)
        ids = sorted(int(v) for v in np.unique(data) if v != 0)
        return [{"name": names.get(i, f"label_{i}"), "description": names.get(i, f"label {i}")} for i in ids]


def pacs_datastore(url: str, label_map: LabelMap, check_final_label: FinalLabelCheck) -> PacsDatastore:
    return PacsDatastore(url.rstrip("/"), label_map, check_final_label)


# --- results in the client's format --------------------------------------------------------------
NRRD_SUFFIXES = (".nrrd", ".seg.nrrd")
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}


def client_result(result: dict, request: dict) -> dict:
    """Rewrite an infer result file as the client asked (`result_extension`, `result_dtype`,
    `result_compress`): OHIF v3 parses the body as raw NRRD and copies its bytes straight into the
    series' labelmap volume (column fastest, then row, then slice), so the label must be an
    uncompressed uint8 NRRD in the series' own voxel order, which is the order of the NIfTI
    MONAI Label made from the series."""
    path = result.get("file")
    extension = str(request.get("result_extension") or "")
    if not path or not os.path.exists(path) or not extension.endswith(".nrrd"):
        return result
    dtype_name = str(request.get("result_dtype") or "uint8")
    if dtype_name not in DTYPES:
        raise bad_request(f"result_dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    compress = str(request.get("result_compress", "false")).lower() in ("1", "true", "yes")
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    dtype = DTYPES[dtype_name]
    if np.issubdtype(dtype, np.integer) and data.size and (data.max() > np.iinfo(dtype).max or data.min() < 0):
        raise bad_request(f"label values up to {int(data.max())} do not fit result_dtype {dtype_name}")
    image = sitk_from_nifti(img, data.astype(dtype))
    fd, out = tempfile.mkstemp(prefix="medlsam-", suffix=extension)
    os.close(fd)
    with atomic_path(out) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    os.unlink(path)
    return {**result, "file": out}
