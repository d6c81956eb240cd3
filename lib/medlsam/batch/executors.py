"""Where studies run: in this process, one after the other, or on a pool of Ray actors.

Both take `StudyRef`s and yield each study's summary row as it finishes. Workers write their
results into the shared output folder themselves; only the small rows travel back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Callable, Iterable, Iterator

from medlsam.batch.outputs import BatchOutput, peak_rss_mb
from medlsam.errors import ConfigurationError
from medlsam.batch.processor import BatchSettings, StudyProcessor

log = logging.getLogger(__name__)


class LocalExecutor:
    """The plain sequential loop, in this process, with one model set."""

    name = "sequential"
    workers = 1

    def __init__(self, make_processor: Callable[[], StudyProcessor]):
        self._make = make_processor
        self._processor: StudyProcessor | None = None

    @classmethod
    def from_settings(cls, settings: BatchSettings, out_dir) -> "LocalExecutor":
        return cls(lambda: StudyProcessor.from_settings(settings, out_dir))

    def start(self) -> None:
        """Load the model set (run() does it when needed)."""
        if self._processor is None:
            self._processor = self._make()

    def run(self, refs: Iterable) -> Iterator[dict]:
        self.start()
        for ref in refs:
            yield self._processor.process(ref)

    def worker_info(self) -> list[dict]:
        from medlsam.batch.outputs import worker_name

        return [{"worker": worker_name(), "peak_rss_mb": peak_rss_mb()}]

    def close(self) -> None:
        self._processor = None


def _study_worker_class():
    """The Ray actor class (defined lazily: Ray is an optional dependency)."""
    import ray

    @ray.remote
    class StudyWorker:
        """One model set in one Ray worker process."""

        def __init__(self, settings: BatchSettings, out_dir: str):
            self.processor = StudyProcessor.from_settings(settings, out_dir)

        def process(self, ref, attempt: int = 1) -> dict:
            return self.processor.process(ref, attempt)

        def info(self) -> dict:
            from medlsam.batch.outputs import worker_name

            return {"worker": worker_name(), "peak_rss_mb": peak_rss_mb()}

    return StudyWorker


class RayExecutor:
    """A pool of Ray actors, each holding one model set; a study whose worker dies is re-queued.

    `address`: None or "local" starts a local Ray instance (`init_options` go to `ray.init`),
    anything else joins that cluster ("auto", "ray://head:10001", "10.0.0.1:6379").
    A dead actor is restarted by Ray (up to `max_restarts` times, models reloaded); a study is
    tried at most `max_attempts` times before it is recorded as failed.
    """

    name = "ray"

    def __init__(self, settings: BatchSettings, out_dir, workers: int = 1, address: str | None = None,
                 threads_per_worker: int = 1, gpus_per_worker: float = 0.0, max_attempts: int = 3,
                 max_restarts: int = 3, init_options: dict | None = None, restart_timeout_s: float = 600.0):
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError("Ray is not installed: pip install 'medlsam[ray]' (or ray==2.60.0) "
                                     "to use --ray") from exc
        if workers < 1 or threads_per_worker < 1 or max_attempts < 1 or gpus_per_worker < 0:
            raise ValueError("workers, threads per worker and attempts must be at least 1; GPUs per worker >= 0")
        self.settings = dataclasses.replace(settings, threads=threads_per_worker)
        self.out_dir = str(out_dir)
        self.workers = workers
        self.address = address
        self.threads = threads_per_worker
        self.gpus = gpus_per_worker
        self.max_attempts = max_attempts
        self.max_restarts = max_restarts
        self.init_options = dict(init_options or {})
        self.restart_timeout_s = restart_timeout_s
        self.actors: list = []
        self.deaths: dict[int, int] = {}  # actor index -> times it died under us
        self.requeued = 0
        self._started_ray = False

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            if self.address in (None, "", "local"):
                options = {"include_dashboard": False, "num_cpus": self.workers * self.threads, **self.init_options}
                if self.gpus:
                    options.setdefault("num_gpus", max(1, int(self.workers * self.gpus + 0.999)))
                ray.init(**options)
            else:
                ray.init(address=self.address, **self.init_options)
            self._started_ray = True
        env = {var: str(self.threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        worker_cls = _study_worker_class().options(
            num_cpus=self.threads, num_gpus=self.gpus, max_restarts=self.max_restarts, max_task_retries=0,
            runtime_env={"env_vars": env})
        self.actors = [worker_cls.remote(self.settings, self.out_dir) for _ in range(self.workers)]
        self.deaths = {i: 0 for i in range(self.workers)}

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def worker_info(self, timeout_s: float = 900.0) -> list[dict]:
        """Host:pid and peak memory of each live worker (waits until each has loaded its models)."""
        import ray

        out = []
        for actor in self.actors:
            try:
                out.append(ray.get(actor.info.remote(), timeout=timeout_s))
            except Exception as exc:  # noqa: BLE001 - a dead worker has no info
                out.append({"worker": "unavailable", "error": type(exc).__name__})
        return out

    # --- work -----------------------------------------------------------------------------------
    def run(self, refs: Iterable) -> Iterator[dict]:
        """Keep every live actor busy with one study; yield rows as studies finish.

        An actor whose study failed because the actor died is put on probation: Ray restarts it
        (models reloaded), a cheap ping tells when it is back, and only then does it get studies
        again; meanwhile its study goes to the next free worker."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        if not self.actors:
            self.start()
        queue = deque(refs)
        attempts: dict[str, int] = {}
        idle = list(range(len(self.actors)))
        running: dict = {}  # object ref -> (actor index, study ref)
        recovering: dict[int, float] = {}  # actor index -> when it died
        pings: dict = {}  # object ref -> actor index
        lost: set[int] = set()
        output = BatchOutput(self.out_dir, self.settings.run_key())
        while queue or running:
            while queue and idle:
                index, ref = idle.pop(0), queue.popleft()
                attempts[ref.study_id] = attempts.get(ref.study_id, 0) + 1
                running[self.actors[index].process.remote(ref, attempts[ref.study_id])] = (index, ref)
            for index, since in list(recovering.items()):
                if index not in pings.values():
                    if time.monotonic() - since > self.restart_timeout_s:
                        log.warning("worker %d did not come back within %.0f s; going on without it", index,
                                    self.restart_timeout_s)
                        recovering.pop(index)
                        lost.add(index)
                    else:
                        pings[self.actors[index].info.remote()] = index
            if not running and not pings:
                raise RuntimeError(f"no Ray worker left ({len(lost)} lost after dying more than "
                                   f"{self.max_restarts} times); {len(queue)} studies left: run again to resume")
            done, _ = ray.wait([*running, *pings], num_returns=1, timeout=5.0)
            if not done:
                continue
            if done[0] in pings:
                index = pings.pop(done[0])
                try:
                    ray.get(done[0])
                except RayError:
                    time.sleep(0.5)  # still restarting: ping again
                    continue
                recovering.pop(index, None)
                idle.append(index)
                log.info("worker %d is back", index)
                continue
            index, ref = running.pop(done[0])
            try:
                row = ray.get(done[0])
            except RayTaskError as exc:  # the processor records study errors itself: this is a bug, not a death
                idle.append(index)
                yield output.write_failure(ref, exc, attempts[ref.study_id], worker="ray")
                continue
            except RayError as exc:  # the worker died (killed, OOM, node lost) or Ray killed it for memory
                self.deaths[index] += 1
                log.warning("worker %d died while on %s (attempt %d): %s", index, ref.study_id,
                            attempts[ref.study_id], str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                if self.deaths[index] <= self.max_restarts:
                    recovering[index] = time.monotonic()
                else:
                    lost.add(index)
                if attempts[ref.study_id] < self.max_attempts:
                    self.requeued += 1
                    queue.append(ref)
                    continue
                yield output.write_failure(ref, f"worker died {attempts[ref.study_id]} times on this study "
                                           f"({type(exc).__name__})", attempts[ref.study_id], worker="ray")
                continue
            idle.append(index)
            yield row
