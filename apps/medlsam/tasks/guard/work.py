"""A bounded queue for long requests: a few run at once, a few wait, the rest get 503 + Retry-After."""

from __future__ import annotations

import contextlib
import threading

from fastapi import HTTPException


class WorkQueue:
    """`workers` long requests run at once, `queue_length` more wait (at most `wait_s`); others are
    refused at once with HTTP 503 and a Retry-After header, so a client backs off instead of piling up."""

    def __init__(self, workers: int, queue_length: int, wait_s: float, retry_after_s: int):
        self.workers, self.capacity = workers, workers + queue_length
        self.wait_s, self.retry_after_s = wait_s, retry_after_s
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Long requests running or waiting now."""
        return self._admitted

    def _busy(self, what: str, reason: str) -> HTTPException:
        return HTTPException(
            status_code=503, headers={"Retry-After": str(self.retry_after_s)},
            detail=f"{what}: the server is busy ({reason}); retry in about {self.retry_after_s} s")

    @contextlib.contextmanager
    def slot(self, what: str):
        """Run the body in a worker slot (call from a worker thread, never on the event loop)."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise self._busy(what, f"{self.workers} long requests running and "
                                       f"{self.capacity - self.workers} waiting")
            self._admitted += 1
        try:
            if not self._slots.acquire(timeout=self.wait_s):
                raise self._busy(what, f"waited {self.wait_s:.0f} s for a worker")
            try:
                yield
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._admitted -= 1
