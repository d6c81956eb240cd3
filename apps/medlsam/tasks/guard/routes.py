"""The app's own versions of MONAI Label's datastore, infer, logs, model, session and train routes.

Same paths, parameters and answers as MONAI Label 0.8.5 (its clients keep working), but: ids and
tags are checked (tasks/guard/ids.py), uploads are capped and header-checked and their temporary
files always removed, params must be a JSON object of finite numbers, every client mistake is a
4xx with a message, and the work runs in worker threads (long work through the bounded WorkQueue),
never on the event loop. MONAI Label's role checks (its Keycloak auth) are kept on every route.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from monailabel.config import settings as ml_settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException
from monailabel.utils.others.generic import get_mime_type
from requests_toolbelt import MultipartEncoder
from starlette.background import BackgroundTask

from medlsam.errors import InputError, NotFoundError

from ..errors import http_error
from . import ids
from .export import dataset_entries, stream_zip
from .uploads import (CORRUPT_FILE_ERRORS, UPLOAD_PREFIX, check_ct_file, check_finite, check_image_header,
                      json_object, saved_upload, write_upload)
from .work import WorkQueue

logger = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"[^\w.-]")
USER = RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_USER)
ANNOTATOR = RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)
ADMIN = RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_ADMIN)
MAX_LOG_LINES = 1_000_000
MAX_LOG_REFRESH_S = 3600


class InferOutput(str, Enum):
    image = "image"
    json = "json"
    all = "all"
    dicom_seg = "dicom_seg"


class DatastoreOutput(str, Enum):
    train = "train"
    stats = "stats"
    all = "all"


def answer(exc: BaseException, what: str) -> HTTPException:
    """The HTTP answer for an error: MONAI Label's not-found errors are 404, a truncated or corrupt
    file 422, the rest as tasks/errors.http_error maps them."""
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(404, detail=f"{what}: {exc.msg if hasattr(exc, 'msg') else exc}")
    if isinstance(exc, CORRUPT_FILE_ERRORS):
        return HTTPException(422, detail=f"{what}: the uploaded file is truncated or corrupt "
                                         f"({type(exc).__name__}: {exc})")
    if isinstance(exc, MONAILabelException):
        return HTTPException(422, detail=f"{what}: {getattr(exc, 'msg', exc)}")
    if isinstance(exc, NotImplementedError):
        return HTTPException(405, detail=f"{what}: not supported by this datastore")
    return http_error(exc, what)


class guarded:
    """`with guarded("what"):` - every exception leaves as an HTTPException with the right class."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and not isinstance(exc, HTTPException) and isinstance(exc, Exception):
            raise answer(exc, self.what) from exc
        return False


def _remove(path: str | None) -> None:
    if path and os.path.isfile(path):
        os.unlink(path)


def _file_response(path: str, folder: str | None, what: str) -> FileResponse:
    if not path or not os.path.isfile(path) or (folder and not ids.inside(path, folder)):
        raise HTTPException(404, detail=f"{what} not found")
    return FileResponse(path, media_type=get_mime_type(path), filename=os.path.basename(path))


def _checksum_matches(path: str, check_sum: str) -> bool:
    algo, _, digest = check_sum.rpartition(":")
    algo = (algo or "SHA256").lower()
    if algo not in hashlib.algorithms_guaranteed:
        raise InputError(f"check_sum algorithm {algo!r} unknown; use one of {sorted(hashlib.algorithms_guaranteed)}")
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == digest.lower()


def build_router(app, settings, queue: WorkQueue) -> APIRouter:
    """Routes bound to the MONAI Label app instance `app` (a MedLSAMApp)."""
    router = APIRouter()

    def datastore():
        return app.datastore()

    def folder() -> str | None:
        return ids.datastore_folder(datastore())

    # --- datastore: listing and images ---------------------------------------------------------
    @router.get("/datastore/", tags=["Datastore"], summary="Get All Images/Labels from datastore")
    def list_datastore(output: Optional[DatastoreOutput] = None, user: User = Depends(USER)):
        d = datastore()
        if output == DatastoreOutput.all:
            return d.json()
        return d.datalist() if output == DatastoreOutput.train else d.status()

    def add_image(image: Optional[str], params: str, file: UploadFile, user: User):
        d = datastore()
        with guarded("adding an image"):
            if not ids.is_folder_store(d):
                raise HTTPException(405, detail="images are added to the PACS, not through this server")
            suffix = ids.image_suffix(file.filename)
            image_id = image or os.path.basename(file.filename or "")[: -len(suffix)]
            ids.check_new_image_id(image_id, d, suffix)
            info = json_object(params)
            if user and user.username:
                info["user"] = user.username
            with saved_upload(file, suffix, settings.max_upload_bytes, "image") as path, queue.slot("adding an image"):
                check_ct_file(path, settings.max_voxels, f"image {image_id!r}")
                return {"image": d.add_image(image_id, str(path), info)}

    @router.put("/datastore/image", tags=["Datastore"], summary="Upload new Image (a CT volume: .nii.gz, .nii, .nrrd)")
    def put_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                  user: User = Depends(ANNOTATOR)):
        return add_image(image, params, file, user)

    @router.put("/datastore/", tags=["Datastore"], include_in_schema=False, deprecated=True)
    def put_image_alias(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                        user: User = Depends(ANNOTATOR)):
        return add_image(image, params, file, user)

    def remove_image(id: str):
        d = datastore()
        with guarded("removing an image"):
            if not ids.is_folder_store(d):
                raise HTTPException(405, detail="images are removed in the PACS, not through this server")
            ids.check_known_image(d, id)
            d.remove_image(id)
        return {}

    @router.delete("/datastore/image", tags=["Datastore"], summary="Remove Image and corresponding labels")
    def delete_image(id: str, user: User = Depends(ADMIN)):
        return remove_image(id)

    @router.delete("/datastore/", tags=["Datastore"], include_in_schema=False, deprecated=True)
    def delete_image_alias(id: str, user: User = Depends(ADMIN)):
        return remove_image(id)

    @router.head("/datastore/image", tags=["Datastore"], summary="Check If Image Exists")
    def head_image(image: str, check_sum: Optional[str] = None, user: User = Depends(USER)):
        with guarded("image"):
            ids.check_known_image(datastore(), image)
            path = datastore().get_image_uri(image)
            _file_response(path, folder(), f"image {image!r}")
            if check_sum and not _checksum_matches(path, check_sum):
                raise HTTPException(404, detail="Image NOT Found (checksum failed)")
        return {}

    @router.get("/datastore/image", tags=["Datastore"], summary="Download Image")
    def get_image(image: str, user: User = Depends(USER)):
        with guarded("image"):
            ids.check_known_image(datastore(), image)
            return _file_response(datastore().get_image_uri(image), folder(), f"image {image!r}")

    @router.get("/datastore/image/info", tags=["Datastore"], summary="Get Image Info")
    def get_image_info(image: str, user: User = Depends(USER)):
        with guarded("image info"):
            ids.check_known_image(datastore(), image)
            return datastore().get_image_info(image)

    @router.put("/datastore/image/info", tags=["Datastore"], summary="Update Image Info")
    def put_image_info(image: str, info: str = Form("{}"), user: User = Depends(ANNOTATOR)):
        with guarded("image info"):
            ids.check_known_image(datastore(), image)
            values = json_object(info, "info")
            if user and user.username:
                values["user"] = user.username
            return datastore().update_image_info(image, values)

    # --- datastore: labels ------------------------------------------------------------------------
    @router.put("/datastore/label", tags=["Datastore"], summary="Save Finished Label")
    def put_label(image: str, params: str = Form("{}"), tag: str = "final", label: UploadFile = File(...),
                  user: User = Depends(ANNOTATOR)):
        d = datastore()
        with guarded("saving the label"):
            ids.check_known_image(d, image)
            tag = ids.check_tag(tag or "final")
            info = json_object(params)
            suffix = ids.upload_suffix(label.filename)
            with saved_upload(label, suffix, settings.max_upload_bytes, "label") as path, queue.slot("saving a label"):
                if suffix.endswith((".nii", ".nii.gz", ".nrrd")):  # a declared size over the cap: refused unread
                    try:
                        check_image_header(path, settings.max_voxels, "label")
                    except InputError as exc:
                        raise InputError(f"label rejected: {exc}") from None
                label_id = d.save_label(image, str(path), tag, info)
                result = app.on_save_label(image, label_id) or {}
        result.update({"image": image, "label": label_id})
        return result

    @router.delete("/datastore/label", tags=["Datastore"], summary="Remove Label")
    def delete_label(id: str, tag: str, user: User = Depends(ADMIN)):
        with guarded("removing a label"):
            ids.check_known_label(datastore(), id, tag)
            datastore().remove_label(id, tag)
        return {}

    @router.head("/datastore/label", tags=["Datastore"], summary="Check If Label Exists")
    def head_label(image: str, tag: str, user: User = Depends(USER)):
        with guarded("label"):
            ids.check_known_label(datastore(), image, tag)
            _file_response(datastore().get_label_uri(image, tag), folder(), f"label {tag!r} of {image!r}")
        return {}

    @router.get("/datastore/label", tags=["Datastore"], summary="Download Label")
    def get_label(label: str, tag: str, user: User = Depends(USER)):
        with guarded("label"):
            ids.check_known_label(datastore(), label, tag)
            return _file_response(datastore().get_label_uri(label, tag), folder(), f"label {tag!r} of {label!r}")

    @router.get("/datastore/label/info", tags=["Datastore"], summary="Get Label Info")
    def get_label_info(label: str, tag: str, user: User = Depends(USER)):
        with guarded("label info"):
            ids.check_known_label(datastore(), label, tag)
            return datastore().get_label_info(label, tag)

    def update_label_info(label: str, tag: str, info: str, user: User):
        with guarded("label info"):
            ids.check_known_label(datastore(), label, tag)
            values = json_object(info, "info")
            if user and user.username:
                values["user"] = user.username
            return datastore().update_label_info(label, tag, values)

    @router.put("/datastore/label/info", tags=["Datastore"], summary="Update Label Info")
    def put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(ANNOTATOR)):
        return update_label_info(label, tag, info, user)

    @router.put("/datastore/updatelabelinfo", tags=["Datastore"], include_in_schema=False, deprecated=True)
    def put_label_info_alias(label: str, tag: str, params: str = Form("{}"), user: User = Depends(ANNOTATOR)):
        return update_label_info(label, tag, params, user)

    @router.get("/datastore/dataset", tags=["Datastore"], summary="Download full dataset as ZIP archive (streamed)")
    def get_dataset(limit_cases: Optional[int] = None, user: User = Depends(ANNOTATOR)):
        d = datastore()
        if not ids.is_folder_store(d):
            raise HTTPException(404, detail="no dataset archive for a DICOMweb datastore: export from the PACS")
        entries = dataset_entries(d, limit_cases)
        if not entries:
            raise HTTPException(404, detail="the datastore has no labeled images to export")
        return StreamingResponse(stream_zip(entries, d.json()), media_type="application/zip",
                                 headers={"Content-Disposition": 'attachment; filename="dataset.zip"'})

    # --- infer ------------------------------------------------------------------------------------
    @router.post("/infer/{model}", tags=["Infer"], summary="Run Inference for supported model")
    def infer(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
              params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
              output: Optional[InferOutput] = None, user: User = Depends(USER)):
        uploads: list[str] = []
        try:
            with guarded(model):
                request: dict[str, Any] = json_object(params)
                request.update(model=model, image=image)
                if output == InferOutput.dicom_seg and ids.is_folder_store(datastore()):
                    raise InputError("output=dicom_seg needs a DICOMweb datastore")
                if file is not None:
                    request["image"] = _keep_upload(file, ids.image_suffix(file.filename), "image", uploads)
                    check_image_header(Path(request["image"]), settings.max_voxels, "uploaded image")
                elif session_id:
                    _session_image(request, session_id)
                elif not image:
                    raise InputError("no image: pass ?image=<id> of a datastore study, a session_id or upload a file")
                else:
                    ids.check_image_reference(image)
                if label is not None:
                    request["label"] = _keep_upload(label, ids.upload_suffix(label.filename), "label", uploads)
                with queue.slot(f"infer {model}"):
                    result = app.infer(request)
            return _infer_response(result, request, output, background_tasks)
        finally:
            for path in uploads:
                _remove(path)

    def _keep_upload(upload: UploadFile, suffix: str, what: str, uploads: list[str]) -> str:
        """The upload in a temporary file the caller removes (listed in `uploads` at once)."""
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=suffix)
        os.close(fd)
        uploads.append(name)
        write_upload(upload, name, settings.max_upload_bytes, what)
        return name

    def _session_image(request: dict, session_id: str) -> None:
        ids.check_session_id(session_id)
        sessions = app.sessions()
        session = sessions.get_session(session_id) if sessions is not None else None
        if session is None:
            raise NotFoundError(f"session {session_id!r} not found (expired or never created)")
        request["image"] = session.image
        request["session"] = session.to_json()

    def _infer_response(result: dict | None, request: dict, output, background_tasks: BackgroundTasks):
        if not result:
            raise HTTPException(500, detail="the infer task returned no result")
        res_file = result.get("file") or result.get("label")
        res_json = result.get("params") or {}
        own_file = bool(res_file) and os.path.isfile(res_file)
        try:
            if output == InferOutput.json:
                return JSONResponse(res_json)
            if output == InferOutput.dicom_seg:
                seg = _dicom_seg(res_file, request, res_json)
                background_tasks.add_task(_remove, seg)
                return FileResponse(seg, media_type="application/dicom", filename=os.path.basename(seg))
            if not own_file:
                return JSONResponse(res_json)
            if output == InferOutput.image:
                keep, own_file = own_file, False  # removed after sending
                return FileResponse(res_file, media_type=get_mime_type(res_file), filename=os.path.basename(res_file),
                                    background=BackgroundTask(_remove, res_file) if keep else None)
            with open(res_file, "rb") as f:
                fields = {"params": (None, json.dumps(res_json, allow_nan=False), "application/json"),
                          "image": (os.path.basename(res_file), f.read(), get_mime_type(res_file))}
            encoder = MultipartEncoder(fields=fields)
            return Response(content=encoder.to_string(), media_type=encoder.content_type)
        finally:
            if own_file:
                _remove(res_file)

    def _dicom_seg(res_file: str, request: dict, res_json: dict) -> str:
        from monailabel.datastore.dicom import DICOMWebDatastore
        from monailabel.datastore.utils.convert import nifti_to_dicom_seg

        d = datastore()
        if not isinstance(d, DICOMWebDatastore):
            raise HTTPException(422, detail="output=dicom_seg needs a DICOMweb datastore")
        label_info = request.get("label_info") or res_json.get("label_info")
        if not label_info:
            raise HTTPException(422, detail="output=dicom_seg needs label_info (in params or the result)")
        image_uri = d.get_image_uri(request["image"] if not os.path.isabs(str(request["image"])) else "")
        series_dir = re.sub(r"(\.nii\.gz|\.nii|\.nrrd)$", "", image_uri)
        with guarded("dicom_seg"):
            return nifti_to_dicom_seg(series_dir, res_file, label_info, use_itk=True)

    # --- sessions ---------------------------------------------------------------------------------
    def sessions():
        store = app.sessions()
        if store is None:
            raise HTTPException(404, detail="sessions are disabled on this server (MONAI_LABEL_SESSIONS)")
        return store

    @router.get("/session/{session_id}", tags=["Session"], summary="Get Session ID")
    def get_session(session_id: str, update_ts: bool = False, image: bool = False, user: User = Depends(USER)):
        with guarded("session"):
            ids.check_session_id(session_id)
            info = sessions().get_session(session_id, update_ts=update_ts)
            if info is None:
                raise NotFoundError(f"session {session_id!r} not found (expired or never created)")
            if image:
                if os.path.isdir(info.image):
                    raise InputError("this session holds a folder of DICOM files; download them one by one")
                return _file_response(info.image, sessions().store_path, "session image")
            return info.to_json()

    @router.put("/session/", tags=["Session"], summary="Create new session with Image")
    def put_session(files: list[UploadFile] = File(...), uncompress: bool = False, expiry: int = 0,
                    user: User = Depends(USER)):
        store = sessions()
        with guarded("session"):
            if uncompress:
                raise InputError("uncompress is not supported: upload the image files themselves")
            if not 0 <= expiry <= 7 * 24 * 3600:
                raise InputError(f"expiry must be between 0 and {7 * 24 * 3600} seconds, got {expiry}")
            received = tempfile.mkdtemp(prefix="medlsam-session-")
            try:
                for n, upload in enumerate(files):
                    name = SAFE_NAME.sub("_", os.path.basename(upload.filename or "")).lstrip(".")[-120:]
                    name = f"{n:05d}-{name or 'image'}" if len(files) > 1 else (name or "image.nii.gz")
                    write_upload(upload, os.path.join(received, name), settings.max_upload_bytes, "session file")
                source = received if len(files) > 1 else os.path.join(received, os.listdir(received)[0])
                session_id, info = store.add_session(source, expiry, False)
            finally:
                shutil.rmtree(received, ignore_errors=True)
        return {"session_id": session_id, "session_info": info.to_json()}

    @router.delete("/session/{session_id}", tags=["Session"], summary="Delete Session")
    def delete_session(session_id: str, user: User = Depends(USER)):
        with guarded("session"):
            ids.check_session_id(session_id)
            info = sessions().get_session(session_id)
            if info is None:
                raise NotFoundError(f"session {session_id!r} not found")
            sessions().remove_session(session_id)
            return info.to_json()

    # --- models and training --------------------------------------------------------------------
    @router.put("/model/{model}", tags=["Model"], summary="Not supported: weights change by training or --conf")
    def put_model(model: str, user: User = Depends(ANNOTATOR)):
        raise HTTPException(405, headers={"Allow": "GET"}, detail=(
            f"model {model!r}: this app does not take weights over HTTP; set --conf medlam_checkpoint, "
            "train with POST /train/medlam, or pin a published version with --conf medlam_version"))

    @router.delete("/model/{model}", tags=["Model"], summary="Not supported: weights change by training or --conf")
    def delete_model(model: str, user: User = Depends(ANNOTATOR)):
        raise HTTPException(405, headers={"Allow": "GET"}, detail=(
            f"model {model!r}: weights are not deleted over HTTP; pin a version with --conf medlam_version"))

    @router.post("/train/{model}", tags=["Train"], summary="Run Training Task for specific model")
    def train_model(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                    enqueue: Optional[bool] = False, user: User = Depends(ADMIN)):
        from monailabel.endpoints.train import run_model

        with guarded(f"train {model}"):
            trainers = app.info().get("trainers", {})
            if model not in trainers:
                raise NotFoundError(f"trainer {model!r} not found; available: {', '.join(trainers) or 'none'}")
            _check_train_request(model, params, run_sync)
            return run_model(model, params, False, enqueue)

    @router.post("/train/", tags=["Train"], include_in_schema=False, deprecated=True)
    def train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = Depends(ADMIN)):
        from monailabel.endpoints.train import run

        with guarded("train"):
            for model in app.info().get("trainers", {}):
                _check_train_request(model, (params or {}).get(model), run_sync)
            return run(params, False)

    # --- next sample, scoring, batch runs, GPU info -----------------------------------------------
    def _known(kind: str, name: str) -> None:
        known = app.info().get(kind, {})
        if name not in known:
            what = {"strategies": "strategy", "scoring": "scoring method", "models": "model"}.get(kind, kind)
            raise NotFoundError(f"{what} {name!r} not found; available: {', '.join(known) or 'none'}")

    @router.post("/activelearning/{strategy}", tags=["ActiveLearning"],
                 summary="Run Active Learning strategy to get next sample")
    def next_sample(strategy: str, params: Optional[dict] = None, user: User = Depends(USER)):
        from monailabel.endpoints.activelearning import sample

        with guarded(f"strategy {strategy}"):
            _known("strategies", strategy)
            check_finite(params or {}, "params")
            with queue.slot(f"next sample ({strategy})"):
                return sample(strategy, params, user.username if user else None)

    @router.post("/scoring/{method}", tags=["Scoring"], summary="Run Scoring Task for specific method")
    def run_scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                    user: User = Depends(ANNOTATOR)):
        from monailabel.endpoints.scoring import run_method

        with guarded(f"scoring {method}"):
            _known("scoring", method)
            _no_sync(run_sync, "scoring")
            check_finite(params or {}, "params")
            return run_method(method, params, False)

    @router.post("/scoring/", tags=["Scoring"], include_in_schema=False, deprecated=True)
    def run_all_scoring(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                        user: User = Depends(ANNOTATOR)):
        from monailabel.endpoints.scoring import run

        with guarded("scoring"):
            _no_sync(run_sync, "scoring")
            check_finite(params or {}, "params")
            return run(params, False)

    @router.post("/batch/infer/{model}", tags=["Infer"], summary="Run Batch Inference Task (in the background)")
    def run_batch(model: str, images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
                  params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = Depends(ADMIN)):
        from monailabel.endpoints.batch_infer import run

        with guarded(f"batch infer {model}"):
            _known("models", model)
            _no_sync(run_sync, "batch inference")
            check_finite(params or {}, "params")
            check = getattr(app, "check_batch_request", None)
            if check is not None:
                check(model, images, params or {})
            return run(model, images, params, False)

    @router.get("/logs/", tags=["Logs"], summary="Get Logs")
    def get_logs(lines: Optional[int] = 300, html: Optional[bool] = True, text: Optional[bool] = False,
                 refresh: Optional[int] = 0, user: User = Depends(ADMIN)):
        from monailabel.endpoints.logs import get_logs as read_logs

        with guarded("logs"):
            # MONAI Label keeps the last `lines` lines in a deque, which overflows past a C ssize_t.
            if lines is not None and not 0 <= lines <= MAX_LOG_LINES:
                raise InputError(f"lines must be between 0 (the whole file) and {MAX_LOG_LINES}, got {lines}")
            if refresh is not None and not 0 <= refresh <= MAX_LOG_REFRESH_S:
                raise InputError(f"refresh must be between 0 and {MAX_LOG_REFRESH_S} seconds, got {refresh}")
            log_file = os.path.join(ml_settings.MONAI_LABEL_APP_DIR, "logs", "app.log")
            return read_logs(log_file, lines or 0, html, text, refresh or 0)

    @router.get("/logs/gpu", tags=["Logs"], summary="Get GPU Info (nvidia-smi)")
    def gpu_info(user: User = Depends(ADMIN)):
        if shutil.which("nvidia-smi") is None:
            raise HTTPException(404, detail="no GPU information: nvidia-smi is not installed on this server")
        done = subprocess.run(["nvidia-smi"], capture_output=True, timeout=30)
        return Response(content=done.stdout.decode("utf-8", "replace"), media_type="text/plain")

    def _no_sync(run_sync: Optional[bool], what: str) -> None:
        if run_sync:
            raise InputError(f"run_sync is not supported: {what} runs in the background; follow it with GET")

    def _check_train_request(model: str, params: Optional[dict], run_sync: Optional[bool]) -> None:
        _no_sync(run_sync, "training")
        check_finite(params or {}, "params")
        check = getattr(app, "check_train_request", None)
        if check is not None:
            check(model, params or {})

    return router
