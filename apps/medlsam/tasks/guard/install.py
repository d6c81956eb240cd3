"""Wire the guard into the running MONAI Label server.

The app's own FastAPI application (`build_api`: its routes, MONAI Label's other routes run in worker
threads, one OpenAPI schema) answers every API request; MONAI Label's application keeps the DICOMweb
proxy, OHIF and static files. One middleware in front of both decides (tasks/guard/middleware.py).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import sys

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from monailabel.config import settings as ml_settings
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from .auth import auth_router
from .config import GuardSettings
from .middleware import Guard, GuardMiddleware, is_loopback
from .openapi import install_schema_patch
from .routes import build_router, guarded
from .uploads import sweep_stale_temp_files
from .work import WorkQueue

logger = logging.getLogger(__name__)

# MONAI Label's endpoint modules whose routes the app serves (its own or offloaded versions).
# (The whole-slide-image routes are left out: this app serves CT volumes only.)
ENDPOINT_MODULES = ("info", "activelearning", "scoring", "batch_infer", "logs", "train", "model", "datastore",
                    "infer", "session")
# Paths MONAI Label keeps serving itself: the DICOMweb proxy (asynchronous), OHIF's files, static files,
# the API page and /reload.
SERVED_BY_MONAI = ("/proxy", "/ohif", "/static", "/favicon.ico", "/reload")


def offloaded(endpoint):
    """An async endpoint that does blocking work, run in a worker thread with its own event loop."""

    def call(*args, **kwargs):
        with guarded(endpoint.__name__):
            return asyncio.run(endpoint(*args, **kwargs))

    @functools.wraps(endpoint)
    async def run(*args, **kwargs):
        return await run_in_threadpool(call, *args, **kwargs)

    return run


def offloaded_router(own: APIRouter) -> APIRouter:
    """MONAI Label's remaining routes (those `own` does not define), each run in a worker thread."""
    taken = {(r.path, m) for r in own.routes if isinstance(r, APIRoute) for m in r.methods}
    router = APIRouter()
    modules = ENDPOINT_MODULES + (("login",) if ml_settings.MONAI_LABEL_AUTH_ENABLE else ())  # Keycloak login
    for name in modules:
        module = importlib.import_module(f"monailabel.endpoints.{name}")
        for route in module.router.routes:
            if not isinstance(route, APIRoute) or any((route.path, m) in taken for m in route.methods):
                continue
            endpoint = offloaded(route.endpoint) if inspect.iscoroutinefunction(route.endpoint) else route.endpoint
            router.add_api_route(
                route.path, endpoint, methods=list(route.methods), name=route.name, tags=route.tags,
                summary=route.summary, description=route.description, responses=route.responses,
                deprecated=route.deprecated, include_in_schema=route.include_in_schema,
                response_model=route.response_model, status_code=route.status_code)
            taken.update((route.path, m) for m in route.methods)
    return router


def build_api(app_instance, guard: Guard, queue: WorkQueue, prefix: str) -> FastAPI:
    """The app's API: its own routes, then MONAI Label's other routes offloaded; one OpenAPI schema."""
    api = FastAPI(title=ml_settings.MONAI_LABEL_PROJECT_NAME, openapi_url=f"{prefix}/openapi.json", docs_url=None,
                  redoc_url=f"{prefix}/docs", description="MedLSAM on MONAI Label (routes guarded by the app)")
    own = build_router(app_instance, guard.settings, queue)
    if guard.settings.auth_mode == "token":
        own.include_router(auth_router(guard))
    api.include_router(own, prefix=prefix)
    api.include_router(offloaded_router(own), prefix=prefix)
    install_schema_patch(api)
    return api


def replace_middleware(app, guard: Guard, api: FastAPI) -> None:
    """MONAI Label's CORS (any origin, with credentials) out; configured CORS and the guard in, the guard
    sending API requests to `api`. The stack is rebuilt on the next request (the server has built it
    already for start-up)."""
    others = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.user_middleware[:] = [
        Middleware(CORSMiddleware, allow_origins=guard.settings.cors_origins, allow_credentials=True,
                   allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"], allow_headers=["*"],
                   expose_headers=["Retry-After", "Content-Disposition"]),
        Middleware(GuardMiddleware, guard=guard, api=api,
                   served_elsewhere=tuple(ml_settings.MONAI_LABEL_API_STR + p for p in SERVED_BY_MONAI)),
        *others,
    ]
    app.middleware_stack = None


def bound_host() -> str:
    """The --host given to `monailabel start_server` (its default is 0.0.0.0)."""
    argv = sys.argv
    for flag in ("--host", "-i"):
        if flag in argv[:-1]:
            return argv[argv.index(flag) + 1]
    return "0.0.0.0"


def install(app_instance) -> bool:
    """Guard the MONAI Label server running `app_instance`; False when no server is running (e.g. the
    training subprocess, tests that build the app directly)."""
    server = sys.modules.get("monailabel.app")
    fastapi_app = getattr(server, "app", None)
    if fastapi_app is None:
        logger.info("no MONAI Label server in this process: server guard not installed")
        return False
    settings = GuardSettings.from_conf(getattr(app_instance, "conf", {}) or {})
    guard = Guard(settings)
    queue = WorkQueue(settings.workers, settings.queue_length, settings.queue_wait_s, settings.retry_after_s)
    api = build_api(app_instance, guard, queue, ml_settings.MONAI_LABEL_API_STR)
    replace_middleware(fastapi_app, guard, api)
    sweep_stale_temp_files()
    app_instance.work_queue = queue
    host = bound_host()
    logger.info("server guard: auth %s, CORS origins %s, uploads <= %d MB and %d voxels, %d workers + %d queued",
                settings.auth_mode, settings.cors_origins, settings.max_upload_bytes >> 20, settings.max_voxels,
                settings.workers, settings.queue_length)
    if not is_loopback(host) and host != "localhost":
        logger.warning(
            "listening on %s: every machine that reaches this port can list and download the studies and run "
            "infers; %s", host,
            "writes and training need the API token" if settings.auth_mode == "token" else
            "writes and training need MONAI Label's Keycloak roles" if settings.auth_mode == "keycloak" else
            "writes and training are refused from other machines until MEDLSAM_API_TOKEN is set")
    return True
