"""Active-learning strategies for Next Sample (3D Slicer, OHIF): which study to annotate next.

`random` and `first` are MONAI Label's own; `last` is the mirror of `first`; `fewshot` is made for
a localizer fed by a few supports: it proposes the unlabeled study the current supports localize
worst, i.e. the one whose annotation teaches the localizer most.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from medlsam.batch import templates_digest
from medlsam.medlam.localizer import LocalizerSettings
from medlsam.registration import RegistrationLocalizer
from medlsam.registration.store import atlases_digest

from .context import MedLSAMContext

logger = logging.getLogger(__name__)


def strategies(ctx: MedLSAMContext) -> dict[str, Strategy]:
    """The app's strategies; `random` first (OHIF always asks for it, 3D Slicer selects the first)."""
    return {"random": Random(), "fewshot": FewShot(ctx), "first": First(), "last": Last()}


class Last(Strategy):
    """The last unlabeled study in id order."""

    def __init__(self):
        super().__init__("Get Last Sample (unlabeled, by id)")

    def __call__(self, request, datastore):
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        return {"id": images[-1]} if images else None


class FewShot(Strategy):
    """The unlabeled study the supports localize worst.

    Every unlabeled study (at most `max_candidates` per request, chosen at random among those not
    scored yet) is localized with the server's default localizer. Organs whose box lies mostly
    outside the scan are not in it; the study's score is the mean confidence of the organs inside
    (MedLAM: MSS feature similarity; registration: agreement of the supports x image similarity).
    The lowest score wins; a study with no support organ inside at all covers a scan range no
    support covers, and wins first. Scores are kept until the localizer's supports change (a new
    support, new weights), so a registration server never waits for MedLAM templates here."""

    def __init__(self, ctx: MedLSAMContext, max_candidates: int = 12):
        super().__init__("Few-shot: the unlabeled study the current supports localize worst (lowest "
                         "localization confidence, or a scan range no support covers)")
        self.ctx = ctx
        self.max_candidates = max_candidates
        self._scores: dict[str, dict[str, Any]] = {}
        self._key: tuple | None = None
        self._lock = threading.Lock()

    def __call__(self, request, datastore):
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        localizer = self.ctx.localizer({})  # the server's default
        if isinstance(localizer, RegistrationLocalizer):
            key, has_supports = ("registration", atlases_digest(localizer)), bool(localizer.supports)
        else:
            key, has_supports = ("medlam", templates_digest(localizer.templates)), bool(localizer.templates.organs)
        if not has_supports:
            return {"id": images[0], "fewshot": {"reason": "no supports yet: annotate any study (the first by id)"}}
        with self._lock:
            if key != self._key:
                self._scores, self._key = {}, key
            todo = [i for i in images if i not in self._scores]
            if len(todo) > self.max_candidates:
                todo = random.Random(str(key)).sample(todo, self.max_candidates)
            for image_id in todo:
                try:
                    image = self.ctx.load_image(datastore.get_image_uri(image_id))
                    self._scores[image_id] = study_score(localizer.localize(image, mode="WPL"), localizer.settings)
                except Exception as exc:  # noqa: BLE001 - one unreadable study must not stop Next Sample
                    logger.warning("fewshot: %s not scored: %s", image_id, exc)
            scored = {i: self._scores[i] for i in images if i in self._scores}
        if not scored:
            return {"id": images[0], "fewshot": {"reason": "no study could be localized: the first by id"}}
        best = min(scored, key=lambda i: (scored[i]["score"], i))
        return {"id": best, "fewshot": {**scored[best], "scored_studies": len(scored), "unlabeled": len(images)}}


def study_score(localization, settings: LocalizerSettings) -> dict[str, Any]:
    """Mean confidence of the organs inside the scan (0 when none is: a range no support covers)."""
    inside = {n: o.confidence for n, o in localization.organs.items()
              if (o.fraction_inside or 0) >= settings.min_fraction_inside and o.confidence is not None}
    if not inside:
        return {"score": 0.0, "organs_inside": 0,
                "reason": "no organ the supports hold lies inside this scan: it covers a range no support covers"}
    lowest = dict(sorted(inside.items(), key=lambda kv: kv[1])[:3])
    return {"score": round(float(sum(inside.values()) / len(inside)), 4), "organs_inside": len(inside),
            "lowest_confidence": {n: round(float(c), 4) for n, c in lowest.items()},
            "reason": "lowest mean localization confidence of the organs inside the scan"}
