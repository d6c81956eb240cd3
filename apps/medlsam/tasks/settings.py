"""App configuration from `--conf key value` (defaults suit the sample data on a CPU)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medlsam.labels import LabelMap
from medlsam.paths import DEMO_MEDLAM, OFFICIAL_MEDLAM_NAME, model_dir as resolve_model_dir
from medlsam.segment import DEFAULT_IN_PLANE_MARGIN_MM, PropagationSettings, check_prompting, parse_margin_mm

logger = logging.getLogger(__name__)
TRUE = ("1", "true", "yes", "on")


@dataclass
class AppSettings:
    label_map: Path | None  # JSON {organ: id}; default: <studies>/label_map.json or <studies>/../label_map.json
    medlam_checkpoints: list[Path]  # first existing wins
    segmenter: str  # litemedsam | sam_vit_b | sam_vit_l | sam_vit_h | medsam
    segmenter_checkpoint: str | None
    model_dir: Path
    max_supports: int
    mode: str  # WPL | SPL
    device: str
    accelerate: bool
    largest_component: bool
    template_store: Path
    box_margin_mm: float | None = DEFAULT_IN_PLANE_MARGIN_MM  # in-plane MedLAM box margin; None: 10 pixels
    prompting: str = "propagate"  # per-slice prompts follow the organ; "box": the 3D box on every slice
    propagation: PropagationSettings = PropagationSettings()

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str, studies: str) -> "AppSettings":
        model_dir = resolve_model_dir(conf.get("model_dir"), app_dir)
        # Weights published by the trainer task win; then the configured, official or demo ones.
        trained = model_dir / "medlam_trained" / "medlam.pt"
        if conf.get("medlam_checkpoint"):
            checkpoints = [trained, Path(conf["medlam_checkpoint"])]
        else:
            checkpoints = [trained, model_dir / OFFICIAL_MEDLAM_NAME, DEMO_MEDLAM]
        label_map = conf.get("label_map")
        if not label_map and not studies.startswith("http"):
            for candidate in (Path(studies) / "label_map.json", Path(studies).parent / "label_map.json"):
                if candidate.exists():
                    label_map = candidate
                    break
        max_supports = int(conf.get("max_supports", 5))
        if max_supports < 1:
            raise ValueError(f"--conf max_supports must be >= 1, got {max_supports}")
        mode = conf.get("mode", "WPL").upper()
        if mode not in ("WPL", "SPL"):
            raise ValueError(f"--conf mode must be WPL or SPL, got {mode}")
        return cls(
            label_map=Path(label_map) if label_map else None,
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
            prompting=check_prompting(conf.get("prompting", "propagate")),
            propagation=PropagationSettings(step_mm=_float(conf, "step_mm", PropagationSettings().step_mm)),
        )


    def read_label_map(self) -> LabelMap:
        """The configured label map; without one, the sample generator's organs (with a warning)."""
        if self.label_map is not None:
            return LabelMap.from_file(self.label_map)
        from medlsam.synthetic import LABEL_MAP

        logger.warning("no label map found (--conf label_map <json>); using the sample generator's organs")
        return LabelMap(LABEL_MAP, source="the sample generator's organs")


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
