"""A persistent, thread-safe store of prepared supports (one .npz each) kept in step with the
annotated studies: what the registration localizer of a datastore works from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from medlsam.io import load_nifti
from medlsam.medlam.store import SupportStudy

from .atlas import SupportAtlas, atlas_key
from .localizer import RegistrationLocalizer, RegistrationLocalizerSettings

logger = logging.getLogger(__name__)


def atlases_digest(localizer: RegistrationLocalizer) -> str:
    """A short fingerprint of a registration localizer's supports (batch runs key on it); the organ
    volumes make a re-labelled support change it too."""
    content = {"supports": sorted(a.study_id for a in localizer.supports),
               "volumes": {a.study_id: {o: round(v, 1) for o, v in sorted(a.volumes_mm3.items())}
                           for a in localizer.supports},
               "per_organ": localizer.organ_supports, "settings": repr(localizer.settings)}
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared_localizer(folder: str | Path, label_ids: dict[str, int], studies: list[SupportStudy],
                       max_supports: int = 5) -> RegistrationLocalizer:
    """The registration localizer over `studies`, prepared in `folder` (kept in step with them, reused
    when started again); supports whose label is unusable are skipped with a warning."""
    store = AtlasStore(folder, label_ids, max_supports=max(1, max_supports))
    report = store.sync(studies)
    if report["failed"]:
        logger.warning("supports skipped: %s", report["failed"])
    if not store.selected():
        raise ValueError(f"no support could be prepared for registration ({report['failed'] or 'none given'}): "
                         "nothing to localize with")
    return store.localizer()


def _file_name(study_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", study_id) + ".npz"


class AtlasStore:
    """Prepared supports in `folder`, rebuilt when a label changes or the preparation settings do."""

    def __init__(self, folder: str | Path, label_ids: dict[str, int],
                 settings: RegistrationLocalizerSettings | None = None, max_supports: int = 5):
        if max_supports < 1:
            raise ValueError(f"max_supports must be at least 1, got {max_supports}")
        self.folder = Path(folder)
        self.label_ids = dict(label_ids)
        self.settings = settings or RegistrationLocalizerSettings()
        self.max_supports = max_supports
        self.key = atlas_key(self.settings.registration, self.settings.label_spacing_mm)
        self._lock = threading.RLock()
        self._atlases: dict[str, tuple[float, SupportAtlas]] | None = None  # study id -> (added at, atlas)

    def _loaded(self) -> dict[str, tuple[float, SupportAtlas]]:
        if self._atlases is None:
            self._atlases = {}
            for path in sorted(self.folder.glob("*.npz")):
                try:
                    atlas = SupportAtlas.load(path, self.key)
                except (ValueError, OSError) as exc:  # other settings or unreadable: rebuilt by sync
                    logger.info("atlas store: ignoring %s (%s)", path.name, exc)
                    continue
                self._atlases[atlas.study_id] = (path.stat().st_mtime, atlas)
        return self._atlases

    def per_organ(self) -> dict[str, list[SupportAtlas]]:
        """Per organ, the newest `max_supports` supports holding it (newest first)."""
        with self._lock:
            entries = sorted(self._loaded().values(), key=lambda e: e[0], reverse=True)
            out = {}
            for organ in self.label_ids:
                holders = [a for _, a in entries if organ in a.label_ids][: self.max_supports]
                if holders:
                    out[organ] = holders
            return out

    def selected(self) -> list[SupportAtlas]:
        """Every support some organ uses (each is registered once per query)."""
        chosen: dict[str, SupportAtlas] = {}
        for holders in self.per_organ().values():
            chosen.update({a.study_id: a for a in holders})
        return list(chosen.values())

    def localizer(self) -> RegistrationLocalizer:
        per_organ = self.per_organ()
        return RegistrationLocalizer(self.selected(), self.settings, self.label_ids,
                                     organ_supports={o: [a.study_id for a in h] for o, h in per_organ.items()})

    def summary(self) -> dict:
        """Organs with supports: how many and which."""
        organs = {}
        for organ, holders in sorted(self.per_organ().items(), key=lambda kv: self.label_ids[kv[0]]):
            organs[organ] = {"label_id": self.label_ids[organ], "supports": len(holders),
                             "study_ids": [a.study_id for a in holders]}
        return {"organs": organs, "max_supports": self.max_supports}

    def updating(self):
        """Hold the store for a longer update (infer requests wait meanwhile)."""
        return self._lock

    def add_support(self, study: SupportStudy) -> list[str]:
        """Prepare one study (replacing an older preparation); returns the organs it holds."""
        atlas = SupportAtlas.build(study.study_id, load_nifti(study.image), load_nifti(study.label, what="label"),
                                   self.label_ids, self.settings.registration, self.settings.label_spacing_mm)
        path = self.folder / _file_name(study.study_id)
        with self._lock:
            atlas.save(path)
            self._loaded()[study.study_id] = (path.stat().st_mtime, atlas)
        logger.info("atlas store: %s prepared (%d organs)", study.study_id, len(atlas.label_ids))
        return atlas.organs

    def remove_study(self, study_id: str) -> None:
        with self._lock:
            self._loaded().pop(study_id, None)
            (self.folder / _file_name(study_id)).unlink(missing_ok=True)

    def sync(self, studies: list[SupportStudy]) -> dict:
        """Prepare new or re-labelled studies, drop removed ones; bad labels are skipped with a reason."""
        report = {"added": [], "removed": [], "failed": {}}
        with self._lock:
            known = {sid: added for sid, (added, _) in self._loaded().items()}
            wanted = {s.study_id for s in studies}
            for study_id in set(known) - wanted:
                self.remove_study(study_id)
                report["removed"].append(study_id)
            for study in studies:
                if study.study_id in known and known[study.study_id] >= os.path.getmtime(study.label):
                    continue
                try:
                    self.add_support(study)
                except (ValueError, FileNotFoundError) as exc:
                    report["failed"][study.study_id] = str(exc)
                    logger.warning("support %s skipped: %s", study.study_id, exc)
                    continue
                report["added"].append(study.study_id)
        report["organs"] = {name: entry["supports"] for name, entry in self.summary()["organs"].items()}
        report["time"] = time.time()
        return report
