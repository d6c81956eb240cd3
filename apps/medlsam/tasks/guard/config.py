"""Settings of the server guard: `--conf key value` of the app, plus environment variables."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from monailabel.config import settings as ml_settings

logger = logging.getLogger(__name__)

TOKEN_ENV = "MEDLSAM_API_TOKEN"
# OHIF's development server and a viewer on the server's own host are the usual browser clients.
DEFAULT_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:3000")


def _list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _positive(conf: dict, key: str, default: float, cast=int):
    value = cast(conf.get(key, default))
    if value <= 0:
        raise ValueError(f"--conf {key} must be positive, got {value}")
    return value


@dataclass
class GuardSettings:
    api_token: str | None = None  # shared secret for writes and training (None: see `auth_mode`)
    cors_origins: list[str] = field(default_factory=lambda: list(DEFAULT_ORIGINS))
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names beside loopback and IPs
    max_upload_bytes: int = 1024 << 20
    max_voxels: int = 512 * 512 * 2048
    workers: int = 2  # long requests (infer, label save, image upload) running at once
    queue_length: int = 8  # long requests waiting for a worker; more get 503 + Retry-After
    queue_wait_s: float = 600.0  # longest a long request waits for a worker before 503
    retry_after_s: int = 15

    @property
    def auth_mode(self) -> str:
        """`keycloak` (MONAI Label's own auth), `token` (MEDLSAM_API_TOKEN) or `loopback` (no auth:
        writes only from this machine)."""
        if ml_settings.MONAI_LABEL_AUTH_ENABLE:
            return "keycloak"
        return "token" if self.api_token else "loopback"

    @classmethod
    def from_conf(cls, conf: dict) -> "GuardSettings":
        token = os.environ.get(TOKEN_ENV, "").strip() or None
        if conf.get("api_token_file"):
            token = Path(conf["api_token_file"]).read_text().strip() or None
        if token is not None and len(token) < 16:
            raise ValueError(f"the API token ({TOKEN_ENV} or --conf api_token_file) must have at least 16 characters")
        origins = _list(conf.get("cors_origins")) or list(DEFAULT_ORIGINS)
        # MONAI Label's setting is honoured too; its URLs carry a trailing slash that browsers never send
        origins += [str(o) for o in ml_settings.MONAI_LABEL_CORS_ORIGINS]
        return cls(
            api_token=token,
            cors_origins=sorted({o.rstrip("/") for o in origins}),
            allowed_hosts=[h.lower() for h in _list(conf.get("allowed_hosts"))],
            max_upload_bytes=_positive(conf, "max_upload_mb", 1024) << 20,
            max_voxels=_positive(conf, "max_voxels", 512 * 512 * 2048),
            workers=_positive(conf, "workers", 2),
            queue_length=_positive(conf, "queue_length", 8),
            queue_wait_s=_positive(conf, "queue_wait_s", 600.0, float),
        )
