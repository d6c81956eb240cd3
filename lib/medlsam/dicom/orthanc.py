"""Run Orthanc (Debian's package) as a plain process with our own configuration, and feed it.

Orthanc 1.10 has no bind-address option: it listens on every interface, and our configuration
makes it refuse non-local clients ("RemoteAccessAllowed": false) and keeps its DICOM port off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import httpx

from medlsam.io import atomic_write_json

logger = logging.getLogger(__name__)

PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def find_orthanc() -> str:
    """Path of the Orthanc executable (Debian's package puts it in /usr/sbin)."""
    exe = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)),
                                         None)
    if not exe:
        raise FileNotFoundError("Orthanc is not installed: run `make dicomweb-deps` "
                                "(apt-get install orthanc orthanc-dicomweb)")
    return exe


def find_dicomweb_plugin() -> str:
    for path in PLUGIN_CANDIDATES:
        if os.path.exists(path):
            return path
    raise FileNotFoundError("Orthanc's DICOMweb plugin is not installed (looked for "
                            f"{', '.join(PLUGIN_CANDIDATES)}): apt-get install orthanc-dicomweb")


def orthanc_config(storage_dir: str | os.PathLike, http_port: int, name: str = "MedLSAM",
                   users: dict[str, str] | None = None) -> dict:
    """Our Orthanc configuration: storage in `storage_dir`, HTTP on `http_port`, local clients only,
    no DICOM port, DICOMweb at /dicom-web/; with `users` ({name: password}) HTTP basic auth is required."""
    storage = Path(storage_dir).resolve()
    return {
        "Name": name,
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "HttpServerEnabled": True,
        "HttpPort": int(http_port),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "DicomServerEnabled": False,
        "HttpCompressionEnabled": False,
        "Plugins": [find_dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{int(http_port)}",
                     "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "StableAge": 2,
    }


@dataclass
class OrthancServer:
    """A running Orthanc process (see `start_orthanc`)."""

    process: subprocess.Popen
    port: int
    storage_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 10.0) -> int:
        """Stop Orthanc (SIGTERM, then SIGKILL after `grace` s); returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_orthanc(storage_dir: str | os.PathLike, port: int = 8042, timeout: float = 30.0,
                  users: dict[str, str] | None = None) -> OrthancServer:
    """Write the configuration into `storage_dir`, start Orthanc and wait until its DICOMweb answers
    (`users`: {name: password} for HTTP basic auth; the first one is used to check)."""
    storage = Path(storage_dir).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    config_path = storage / "orthanc.json"
    atomic_write_json(config_path, orthanc_config(storage, port, users=users))
    auth = next(iter(users.items())) if users else None
    log_path = storage / "orthanc.log"
    with contextlib.suppress(httpx.HTTPError):
        if httpx.get(f"http://127.0.0.1:{port}/system", timeout=2).status_code < 500:
            raise RuntimeError(f"port {port} is already in use (another Orthanc?); stop it or choose another port")
    log = open(log_path, "ab")
    proc = subprocess.Popen([find_orthanc(), str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=storage, start_new_session=True)
    log.close()
    server = OrthancServer(proc, int(port), storage, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.dicomweb_url}/studies", timeout=2, auth=auth).status_code == 200:
                logger.info("Orthanc %s up on port %d (storage %s)", proc.pid, port, storage)
                return server
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"Orthanc not answering after {timeout} s; log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_orthanc(storage_dir: str | os.PathLike, port: int = 8042) -> Iterator[OrthancServer]:
    server = start_orthanc(storage_dir, port)
    try:
        yield server
    finally:
        server.stop()


def instance_count(url: str) -> int:
    """How many DICOM instances the Orthanc at `url` holds."""
    response = httpx.get(f"{url.rstrip('/')}/statistics", timeout=10)
    response.raise_for_status()
    return int(response.json()["CountInstances"])


def upload(url: str, files: Iterable[str | os.PathLike], auth: tuple[str, str] | None = None) -> int:
    """POST each DICOM file to Orthanc's REST API (/instances); returns how many were stored."""
    count = 0
    with httpx.Client(base_url=url.rstrip("/"), timeout=60, auth=auth) as client:
        for path in files:
            response = client.post("/instances", content=Path(path).read_bytes(),
                                   headers={"Content-Type": "application/dicom"})
            if response.status_code != 200:
                raise ValueError(f"Orthanc refused {path}: HTTP {response.status_code} {response.text[:200]}")
            count += 1
    return count
