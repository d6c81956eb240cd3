"""A persistent, thread-safe template store kept in step with annotated studies and MedLAM weights."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medlsam.errors import ModelFileMissing
from medlsam.io import load_image
from medlsam.medlam.patches import PatchEmbedder
from medlsam.medlam.templates import TemplateMismatchError, TemplateSet, compute_support

logger = logging.getLogger(__name__)


class EmbedderSource:
    """Loads MedLAM weights lazily and reloads them when the checkpoint file changes (e.g. training)."""

    def __init__(self, checkpoints: str | Path | list, device: str = "cpu", batch_size: int | None = None,
                 precision: str = "auto"):
        # the first existing file wins, e.g. [freshly trained, official, demo]
        self.candidates = [Path(p) for p in (checkpoints if isinstance(checkpoints, list) else [checkpoints])]
        self.device = device
        self.batch_size = batch_size  # patches per forward pass; None: by device and network size
        self.precision = precision  # see medlsam.medlam.patches.PRECISIONS
        self._embedder: PatchEmbedder | None = None
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    @property
    def checkpoint(self) -> Path:
        return next((p for p in self.candidates if p.exists()), self.candidates[-1])

    def get(self) -> PatchEmbedder:
        with self._lock:
            if not self.checkpoint.exists():
                raise ModelFileMissing(
                    f"MedLAM checkpoint not found (looked for {', '.join(map(str, self.candidates))}). "
                    "Put the official medlam.pth there, or train one with `medlsam train` / POST /train/medlam"
                )
            path = self.checkpoint
            stat = path.stat()
            stamp = (str(path), stat.st_mtime_ns, stat.st_size)
            if self._embedder is None or stamp != self._stamp:
                self._embedder = PatchEmbedder.from_checkpoint(path, self.device, batch_size=self.batch_size,
                                                              precision=self.precision)
                self._stamp = stamp
                logger.info("MedLAM weights loaded from %s (%s)", path, self._embedder.fingerprint[:12])
            return self._embedder


@dataclass(frozen=True)
class SupportStudy:
    study_id: str
    image: Path
    label: Path


class TemplateStore:
    """Support templates persisted in one file, updated per organ as final labels are saved."""

    def __init__(self, path: str | Path, label_ids: dict[str, int], embedders: EmbedderSource,
                 max_supports: int = 5):
        if max_supports < 1:
            raise ValueError(f"max_supports must be at least 1, got {max_supports}")
        self.path = Path(path)
        self.label_ids = dict(label_ids)
        self.embedders = embedders
        self.max_supports = max_supports
        self._lock = threading.RLock()  # held for a whole update: readers of templates() wait for it
        self._templates: TemplateSet | None = None
        self._last_summary: dict = {"organs": {}, "max_supports": max_supports}

    # --- state ----------------------------------------------------------------------------------
    def _empty(self, embedder: PatchEmbedder) -> TemplateSet:
        return TemplateSet(embedder.fingerprint, embedder.net.config.to_dict(), max_supports=self.max_supports)

    def _current(self) -> tuple[TemplateSet, PatchEmbedder, bool]:
        """The templates for the current weights; `stale` if they were made with other weights."""
        embedder = self.embedders.get()
        if self._templates is None and self.path.exists():
            try:
                self._templates = TemplateSet.load(self.path, max_supports=self.max_supports)
            except ValueError as exc:
                logger.warning("ignoring unreadable template store %s: %s", self.path, exc)
        templates = self._templates or self._empty(embedder)
        stale = templates.weights_fingerprint != embedder.fingerprint
        return templates, embedder, stale

    def templates(self) -> TemplateSet:
        """Templates usable with the current weights (refuses stale ones with a clear message)."""
        with self._lock:
            templates, _, stale = self._current()
            if stale:
                raise TemplateMismatchError(
                    "the MedLAM weights changed since the templates were built; they are being rebuilt "
                    "from the annotated studies (call sync) — retry shortly"
                )
            return templates

    def summary(self) -> dict:
        """Organs with templates and their supports; never waits for a running update."""
        if not self._lock.acquire(timeout=0.2):
            return {**self._last_summary, "updating": True}
        try:
            templates, embedder, stale = self._current()
            self._last_summary = {
                "organs": templates.summary(),
                "max_supports": self.max_supports,
                "weights_fingerprint": embedder.fingerprint,
                "stale": stale,
            }
            return {**self._last_summary, "updating": False}
        finally:
            self._lock.release()

    # --- updates --------------------------------------------------------------------------------
    def updating(self):
        """Hold the store for an update that starts before `sync`/`add_support` (e.g. downloading the
        supports): meanwhile /info reports `updating` and infer requests wait."""
        return self._lock

    def add_support(self, study: SupportStudy) -> dict[str, int]:
        """(Re)compute one study's contribution; on any error the store is left as it was.

        The contribution is computed before the store is locked, so readers wait only for the merge
        and the write (they do not wait the minute a large study can take)."""
        image = load_image(study.image)
        label = load_image(study.label, what="label")
        embedder = self.embedders.get()
        contributions = compute_support(embedder, image, label, self.label_ids, study.study_id)
        with self._lock:
            templates, current, stale = self._current()
            if current.fingerprint != embedder.fingerprint:  # new weights meanwhile: recompute with them
                embedder = current
                contributions = compute_support(embedder, image, label, self.label_ids, study.study_id)
            if stale:
                templates = self._empty(embedder)
            templates.remove_study(study.study_id)
            templates.add(contributions, self.label_ids)
            templates.save(self.path)
            self._templates = templates
            logger.info("template store: %s contributed %d organs", study.study_id, len(contributions))
            return {name: len(entries) for name, entries in templates.supports.items()}

    def sync(self, studies: list[SupportStudy]) -> dict:
        """Bring the store in line with the annotated studies: add new or re-labelled ones, drop removed
        ones, and rebuild everything when the weights changed. Bad labels are skipped with a warning."""
        report = {"added": [], "removed": [], "failed": {}}
        with self._lock:
            templates, embedder, stale = self._current()
            if stale:
                logger.info("MedLAM weights changed: rebuilding templates from %d studies", len(studies))
                templates = self._empty(embedder)
            known = {s.study_id: s.added_at for entries in templates.supports.values() for s in entries}
            wanted = {s.study_id for s in studies}
            for study_id in set(known) - wanted:
                templates.remove_study(study_id)
                report["removed"].append(study_id)
            for study in studies:
                if study.study_id in known and known[study.study_id] >= os.path.getmtime(study.label):
                    continue
                try:
                    contributions = compute_support(
                        embedder, load_image(study.image), load_image(study.label, what="label"),
                        self.label_ids, study.study_id,
                    )
                except (ValueError, FileNotFoundError) as exc:
                    report["failed"][study.study_id] = str(exc)
                    logger.warning("support %s skipped: %s", study.study_id, exc)
                    continue
                templates.remove_study(study.study_id)
                templates.add(contributions, self.label_ids)
                report["added"].append(study.study_id)
            if report["added"] or report["removed"] or stale or not self.path.exists():
                templates.save(self.path)
            self._templates = templates
        report["organs"] = {name: len(v) for name, v in templates.supports.items()}
        report["time"] = time.time()
        return report
