"""Start and stop a real `monailabel start_server` process for integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "medlsam"
MONAILABEL = Path(sys.executable).parent / "monailabel"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    studies: Path, conf: dict[str, str] | None = None, log_path: Path | None = None, timeout: float = 180.0,
    env: dict[str, str] | None = None, process: list | None = None,
) -> Iterator[str]:
    """Run the MedLSAM app on `studies` on a free loopback port; yield its base URL. `env` adds
    environment variables; `process`, if given, receives the launcher's Popen (its process group
    holds the server and its training subprocesses)."""
    port = free_port()
    cmd = [str(MONAILABEL), "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for key, value in (conf or {}).items():
        cmd += ["--conf", key, str(value)]
    # the monailabel launcher runs `python -m monailabel.main`: our venv must come first on PATH
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
               PATH=f"{MONAILABEL.parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {}))
    log_path = log_path or (Path(studies).parent / f"server-{port}.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if process is not None:
        process.append(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not up after {timeout} s; log:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()


def kill_now(proc: subprocess.Popen) -> None:
    """kill -9 the server's whole process group (server and training subprocesses), as a crash would."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop(proc: subprocess.Popen, grace: float = 20.0) -> int:
    """Stop the server's process group: SIGINT (uvicorn's clean shutdown), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def wait_for_templates(url: str, timeout: float = 900.0) -> dict:
    """Wait until the app's template store has finished its background update; return /info."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = httpx.get(f"{url}/info/", timeout=30).json()
        except httpx.TimeoutException:  # a starved machine; the deadline below still bounds the wait
            info = {"templates": {"updating": True}}
        if not info.get("templates", {}).get("updating"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"template store still updating after {timeout} s")
        time.sleep(1.0)
