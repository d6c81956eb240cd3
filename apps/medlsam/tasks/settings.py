"""App configuration from `--conf key value` (defaults suit the sample data on a CPU)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medlsam.errors import ConfigurationError
from medlsam.labels import LabelMap
from medlsam.medlam.patches import PRECISIONS
from medlsam.paths import DEMO_MEDLAM, OFFICIAL_MEDLAM_NAME, model_dir as resolve_model_dir
from medlsam.segment import (
    DEFAULT_IN_PLANE_MARGIN_MM, DEFAULT_PROMPTING, PropagationSettings, check_prompting, parse_margin_mm,
)
from medlsam.segment.key_slices import DEFAULT_KEY_SLICE_MM

from .requests import MODES

logger = logging.getLogger(__name__)
TRUE = ("1", "true", "yes", "on")
LOCALIZERS = ("auto", "medlam", "registration")


@dataclass
class AppSettings:
    label_map: Path | None  # JSON {organ: id}; default: <studies>/label_map.json or <studies>/../label_map.json
    labels: str | None  # --conf labels: '{"liver": 1, ...}', '["liver", ...]' or 'liver,spleen' (ids 1..N)
    medlam_checkpoints: list[Path]  # first existing wins
    segmenter: str  # litemedsam | sam_vit_b | sam_vit_l | sam_vit_h | medsam
    segmenter_checkpoint: str | None
    model_dir: Path
    max_supports: int
    mode: str  # AUTO (SPL for registration, WPL for MedLAM) | WPL | SPL
    device: str
    accelerate: bool
    largest_component: bool
    template_store: Path
    box_margin_mm: float | None = DEFAULT_IN_PLANE_MARGIN_MM  # in-plane MedLAM box margin; None: 10 pixels
    trained_dir: Path | None = None  # where the trainer task publishes weight versions
    template_wait_s: float = 30.0  # longest a request waits for a template update before HTTP 409
    medlam_batch_size: int | None = None  # MedLAM patches per forward pass; None: by device and network size
    medlam_precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16
    prompting: str = DEFAULT_PROMPTING  # "box": the 3D box on every slice; "propagate": prompts follow the organ
    propagation: PropagationSettings = PropagationSettings()
    key_slice_mm: float = DEFAULT_KEY_SLICE_MM  # box prompting: segment slices this far apart, interpolate between
    localizer: str = "auto"  # medlam | registration | auto (tasks/localizers.py)
    medlam_configured: bool = False  # `--conf medlam_checkpoint` given: the user chose MedLAM weights

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str, studies: str) -> "AppSettings":
        model_dir = resolve_model_dir(conf.get("model_dir"), app_dir)
        # Weights published by the trainer task win (or the version pinned by `medlam_version`);
        # then the configured, official or demo ones.
        trained_dir = model_dir / TRAINED_DIR
        base = [Path(conf["medlam_checkpoint"])] if conf.get("medlam_checkpoint") else [
            model_dir / OFFICIAL_MEDLAM_NAME, DEMO_MEDLAM]
        checkpoints = trained_checkpoints(trained_dir, conf.get("medlam_version", "latest")) + base
        template_wait_s = float(conf.get("template_wait_s", 30))
        if not 0 <= template_wait_s <= 3600:
            raise ValueError(f"--conf template_wait_s must be between 0 and 3600 seconds, got {template_wait_s}")
        label_map = conf.get("label_map")
        if not label_map and not studies.startswith("http"):
            for candidate in (Path(studies) / "label_map.json", Path(studies).parent / "label_map.json"):
                if candidate.exists():
                    label_map = candidate
                    break
        max_supports = int(conf.get("max_supports", 5))
        if max_supports < 1:
            raise ValueError(f"--conf max_supports must be >= 1, got {max_supports}")
        batch_size = conf.get("medlam_batch_size")
        if batch_size is not None:
            try:
                batch_size = int(batch_size)
            except ValueError:
                batch_size = 0
            if batch_size < 1:
                raise ValueError(f"--conf medlam_batch_size must be a positive integer, got {conf['medlam_batch_size']!r}")
        precision = conf.get("medlam_precision", "auto").lower()
        if precision not in PRECISIONS:
            raise ValueError(f"--conf medlam_precision must be one of {', '.join(PRECISIONS)}, got {precision}")
        localizer = conf.get("localizer", "auto").strip().lower()
        if localizer not in LOCALIZERS:
            raise ValueError(f"--conf localizer must be one of {', '.join(LOCALIZERS)}, got {conf['localizer']!r}")
        mode = conf.get("mode", "auto").strip().upper()
        if mode not in MODES:
            raise ValueError(f"--conf mode must be auto, WPL or SPL, got {mode}")
        return cls(
            label_map=Path(label_map) if label_map else None,
            labels=conf.get("labels") or None,
            medlam_checkpoints=checkpoints,
            segmenter=conf.get("segmenter", "litemedsam"),
            segmenter_checkpoint=conf.get("segmenter_checkpoint"),
            model_dir=model_dir,
            max_supports=max_supports,
            mode=mode,
            device=conf.get("device", "cpu"),
            accelerate=conf.get("accelerate", "true").lower() in TRUE,
            largest_component=conf.get("largest_component", "false").lower() in TRUE,
            template_store=Path(conf.get("template_store") or default_template_store(model_dir, studies)),
            box_margin_mm=parse_margin_mm(conf.get("box_margin_mm", DEFAULT_IN_PLANE_MARGIN_MM)),
            trained_dir=trained_dir,
            template_wait_s=template_wait_s,
            medlam_batch_size=batch_size,
            medlam_precision=precision,
            prompting=check_prompting(conf.get("prompting")),
            propagation=PropagationSettings(step_mm=_float(conf, "step_mm", PropagationSettings().step_mm)),
            key_slice_mm=_key_slice_mm(conf),
            localizer=localizer,
            medlam_configured=bool(conf.get("medlam_checkpoint")),
        )

    @property
    def atlas_store(self) -> Path:
        """The registration localizer's prepared supports: a folder beside the template file."""
        return self.template_store.with_name(self.template_store.stem + "-atlases")

    def read_label_map(self) -> LabelMap:
        """The label map from `--conf label_map <json file>`, `--conf labels ...`, or label_map.json
        beside the studies; ConfigurationError saying how to give one when there is none."""
        if self.label_map is not None:
            return LabelMap.from_file(self.label_map)
        if self.labels:
            return parse_labels(self.labels)
        raise ConfigurationError(NO_LABEL_MAP)


NO_LABEL_MAP = (
    "no label map: MedLSAM needs your organs' names and label ids. Start the server with "
    "`--conf labels liver,spleen,kidney_left` (ids 1..N in that order), "
    "`--conf labels '{\"liver\": 1, \"spleen\": 2}'`, or `--conf label_map /path/to/label_map.json` "
    "(a JSON object {organ name: label id}), or put label_map.json into the studies folder or its parent."
)


def parse_labels(text: str) -> LabelMap:
    """`--conf labels`: a JSON object {name: id}, a JSON list of names, or comma-separated names (ids 1..N)."""
    text = text.strip()
    source = "--conf labels"
    if text.startswith(("{", "[")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{source}: not valid JSON: {exc}") from exc
    else:
        value = [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(value, list):
        if not all(isinstance(v, str) and v for v in value) or len(set(value)) != len(value):
            raise ConfigurationError(f"{source}: a list of distinct organ names, got {value!r}")
        value = {name: i for i, name in enumerate((v for v in value if v.lower() != "background"), start=1)}
    return LabelMap(value, source=source)


TRAINED_DIR = "medlam_trained"  # <model_dir>/medlam_trained/: medlam.pt (latest) and versions/vNNN.pt


def trained_checkpoints(trained_dir: Path, version: str) -> list[Path]:
    """The trained weights to try first: the latest published (`latest`), a pinned version (`3`), or
    none (`0`: the configured / official / demo weights)."""
    version = str(version).strip().lower()
    if version in ("latest", ""):
        return [trained_dir / "medlam.pt"]
    if not version.isdigit():
        raise ValueError(f"--conf medlam_version must be 'latest' or a version number (0 = untrained), got {version!r}")
    if int(version) == 0:
        return []
    path = trained_dir / "versions" / f"v{int(version):03d}.pt"
    if not path.exists():
        known = sorted(p.stem for p in (trained_dir / "versions").glob("v*.pt"))
        raise ValueError(f"--conf medlam_version {version}: {path} does not exist (published: {', '.join(known) or 'none'})")
    return [path]


def _key_slice_mm(conf: dict[str, str]) -> float:
    value = _float(conf, "key_slice_mm", DEFAULT_KEY_SLICE_MM)
    if not 0 <= value <= 50:
        raise ValueError(f"--conf key_slice_mm must be between 0 (every slice) and 50 mm, got {value}")
    return value


def _float(conf: dict[str, str], key: str, default: float) -> float:
    try:
        return float(conf.get(key, default))
    except ValueError:
        raise ValueError(f"--conf {key} must be a number, got {conf[key]!r}") from None


def default_template_store(model_dir: Path, studies: str) -> Path:
    """One template file per datastore under the model folder (supports belong to their datastore)."""
    key = hashlib.sha1(os.path.abspath(studies).encode() if not studies.startswith("http") else studies.encode())
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(studies.rstrip("/")).name)[:40] or "datastore"
    return model_dir / "templates" / f"{name}-{key.hexdigest()[:10]}.pt"
