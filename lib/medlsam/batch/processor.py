"""One worker's model set and the per-study step: load, localize + segment (`run_medlsam`), write.

`BatchSettings` is what a worker needs to build its models (file paths and options, picklable);
`StudyProcessor` holds one localizer (MedLAM with the run's templates, or registration of the run's
prepared supports) and one segmenter for its whole life, so a worker loads its models once, not per
study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medlsam.batch.outputs import BatchOutput
from medlsam.localization import check_mode
from medlsam.segment.key_slices import DEFAULT_KEY_SLICE_MM
from medlsam.pipeline import run_medlsam

log = logging.getLogger(__name__)

# settings that do not change a study's result (left out of the run key)
_NOT_IN_KEY = ("device", "threads", "accelerate", "templates_path", "atlas_dir")
# added with the registration localizer: left out of the key at their MedLAM defaults, so the keys of
# earlier MedLAM runs stay valid
_KEY_DEFAULTS = {"localizer": "medlam", "label_map": None, "max_supports": None}


@dataclass
class BatchSettings:
    """How every study of a run is localized and segmented (the same for every worker)."""

    templates_path: str
    medlam_checkpoint: str
    organs: list[str] | None = None  # None: every organ with a template
    mode: str = "WPL"
    seed: int = 0
    mss: bool = True
    segmenter: str = "litemedsam"
    segmenter_checkpoint: str | None = None
    model_dir: str | None = None
    box_margin_mm: float | None = 8.0  # the app's default in-plane margin
    key_slice_mm: float = DEFAULT_KEY_SLICE_MM  # the app's default: key slices this far apart, interpolated between
    largest_component: bool = False
    device: str = "cpu"
    accelerate: bool = True  # ONNX Runtime encoder on CPU
    threads: int | None = None  # torch / ONNX Runtime threads of each worker (None: leave as is)
    templates_digest: str = ""  # what the templates file (or the prepared supports) holds
    extra: dict = field(default_factory=dict)
    localizer: str = "medlam"  # or "registration": the supports prepared in atlas_dir, no weights
    atlas_dir: str | None = None
    label_map: dict | None = None  # registration: {organ: label id}
    max_supports: int | None = None  # registration: supports kept per organ

    def __post_init__(self):
        self.mode = check_mode(self.mode)
        if self.localizer not in ("medlam", "registration"):
            raise ValueError(f"localizer must be 'medlam' or 'registration', got {self.localizer!r}")
        if self.localizer == "registration" and not (self.atlas_dir and self.label_map):
            raise ValueError("the registration localizer needs atlas_dir and label_map")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads per worker must be at least 1, got {self.threads}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    def run_key(self) -> str:
        """A fingerprint of everything that changes a study's labels: results of another key are not reused."""
        data = {k: v for k, v in self.to_dict().items()
                if k not in _NOT_IN_KEY and not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def templates_digest(templates) -> str:
    """A short fingerprint of a TemplateSet's content: weights, organs, supports and when they were added."""
    content = {"weights": templates.weights_fingerprint,
               "supports": {n: [(s.study_id, s.added_at) for s in entries] for n, entries in templates.supports.items()}}
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def limit_threads(threads: int | None) -> None:
    """Pin torch (and OpenMP/MKL libraries started later) to `threads` so workers do not oversubscribe."""
    if not threads:
        return
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def load_localizer(settings: BatchSettings):
    """The run's localizer: registration over the supports prepared in `atlas_dir`, or MedLAM with the
    run's templates."""
    if settings.localizer == "registration":
        from medlsam.registration.store import AtlasStore

        store = AtlasStore(settings.atlas_dir, settings.label_map, max_supports=settings.max_supports or 5)
        if not store.selected():
            raise ValueError(f"no prepared support in {settings.atlas_dir}: nothing to localize with")
        return store.localizer()
    from medlsam.medlam.localizer import Localizer, LocalizerSettings
    from medlsam.medlam.patches import PatchEmbedder
    from medlsam.medlam.templates import TemplateSet

    embedder = PatchEmbedder.from_checkpoint(settings.medlam_checkpoint, settings.device)
    templates = TemplateSet.load(settings.templates_path, expected_fingerprint=embedder.fingerprint)
    return Localizer(embedder, templates, LocalizerSettings(mss=settings.mss))


class StudyProcessor:
    """Localize and segment studies with one model set, writing each result into `output`."""

    def __init__(self, output: BatchOutput, localizer, segmenter, organs=None, mode: str = "WPL", seed: int = 0):
        self.output = output
        self.localizer = localizer
        self.segmenter = segmenter
        self.organs = organs
        self.mode = check_mode(mode)
        self.seed = seed

    @classmethod
    def from_settings(cls, settings: BatchSettings, out_dir: str | os.PathLike) -> "StudyProcessor":
        """Load the localizer (MedLAM and the run's templates, or the prepared supports) and the
        segmenter, once per worker process."""
        from medlsam.segment import Segmenter, build_backend

        limit_threads(settings.threads)
        t0 = time.perf_counter()
        localizer = load_localizer(settings)
        backend = build_backend(settings.segmenter, settings.segmenter_checkpoint, device=settings.device,
                                accelerate=settings.accelerate, model_dir=settings.model_dir, threads=settings.threads)
        segmenter = Segmenter(backend, largest_component=settings.largest_component, progress=False,
                              in_plane_margin_mm=settings.box_margin_mm, key_slice_mm=settings.key_slice_mm)
        log.info("worker %d: models loaded in %.1f s", os.getpid(), time.perf_counter() - t0)
        return cls(BatchOutput(out_dir, settings.run_key()), localizer, segmenter, settings.organs, settings.mode,
                   settings.seed)

    def process(self, ref, attempt: int = 1) -> dict:
        """One study: load, run MedLSAM, write label + result; a failure is recorded, not raised.

        Returns the study's summary row."""
        try:
            t0 = time.perf_counter()
            image = ref.load()
            load_s = round(time.perf_counter() - t0, 3)
            result = run_medlsam(image, self.localizer, self.segmenter, organs=self.organs, mode=self.mode,
                                 seed=self.seed, name=ref.study_id)
            return self.output.write_success(ref, image.affine, result, {"load_s": load_s}, attempt)
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the run
            log.warning("study %s failed: %s: %s", ref.study_id, type(exc).__name__, exc)
            return self.output.write_failure(ref, exc, attempt)
