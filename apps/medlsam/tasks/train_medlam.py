"""Trainer task `medlam`: self-supervised RDR + MSS pretraining on the datastore's images.

Each run fine-tunes the MedLAM weights in use (same network configuration) for `iterations` more
steps. Before publishing, both the weights in use and the new ones localize every annotated support
with templates from the other supports (leave-one-out box IoU, medlsam.medlam.validation): new
weights that score lower than the ones in use (by more than `validation_tolerance`) are kept aside
in medlam_trained/rejected/, not published. Published weights become a new version
(medlam_trained/versions/vNNN.pt, see tasks/weights.py) and medlam_trained/medlam.pt, which the
infer tasks pick up on their next request (the templates are rebuilt with them in the background).
Progress goes to train_stats.json while the run goes on, with MONAI Label's keys.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask

from medlsam.errors import InputError
from medlsam.medlam.validation import MIN_STUDIES, leave_one_out_iou
from trainers.medlam import TrainConfig

from .context import MedLSAMContext
from .weights import TrainStats, WeightVersions

logger = logging.getLogger(__name__)

# Request keys a client may set, with the defaults of a short CPU run and their allowed ranges.
DEFAULTS = {"iterations": 100, "batch_size": 4, "learning_rate": 1e-4, "mss_weight": 1.0, "seed": 0,
            "threads": 2, "num_workers": 1, "device": "auto", "validation_tolerance": 0.0, "validation_studies": 5,
            "validation_organs": 4}
LIMITS = {"iterations": (1, 1_000_000), "batch_size": (1, 256), "learning_rate": (1e-12, 10.0),
          "mss_weight": (0.0, 100.0), "seed": (0, 2**31 - 1), "threads": (1, 256), "num_workers": (0, 64),
          "validation_tolerance": (0.0, 1.0), "validation_studies": (0, 100), "validation_organs": (1, 255)}
DEVICES = ("auto", "cpu", "cuda")


def parse_options(request: dict) -> dict:
    """The run's options from a request, each checked for type and range (InputError names the problem)."""
    options = {}
    for key, default in DEFAULTS.items():
        value = request.get(key, default)
        if isinstance(default, str):
            if not isinstance(value, str) or value.split(":")[0] not in DEVICES:
                raise InputError(f"{key} must be one of {', '.join(DEVICES)} (or cuda:N), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{key} must be a finite number, got {value!r}")
        elif isinstance(default, int):
            if value != int(value):
                raise InputError(f"{key} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if key in LIMITS and not LIMITS[key][0] <= value <= LIMITS[key][1]:
            raise InputError(f"{key} must be between {LIMITS[key][0]} and {LIMITS[key][1]}, got {value!r}")
        options[key] = value
    return options


class MedLAMTrain(TrainTask):
    def __init__(self, ctx: MedLSAMContext):
        super().__init__("Self-supervised MedLAM pretraining (RDR + MSS) on the datastore's images (no labels); "
                         "new weights are published only if they localize the supports no worse")
        self.ctx = ctx
        self.versions = WeightVersions(ctx.settings.trained_dir or ctx.settings.model_dir / "medlam_trained")
        self.published = self.versions.latest
        self.work_dir = ctx.settings.model_dir / "medlam_train_work"
        self.stats_file = self.versions.dir / "train_stats.json"

    def config(self):
        return dict(DEFAULTS)

    def stats(self):
        return TrainStats.read(self.stats_file)

    def __call__(self, request, datastore):
        options = parse_options(request)
        images = [datastore.get_image_uri(i) for i in datastore.list_images()]
        images = [p for p in images if p and Path(p).is_file()]
        if not images:
            raise InputError("the datastore has no images to pretrain on")
        current = self.ctx.embedders.checkpoint
        net_cfg = self.ctx.embedders.get().net.config
        tolerance = options.pop("validation_tolerance")
        n_validation = options.pop("validation_studies")
        self._validation_organs = options.pop("validation_organs")
        cfg = TrainConfig(
            base_channels=net_cfg.base_channels, patch_size=net_cfg.patch_size, spacing_mm=net_cfg.spacing_mm,
            n_classes=net_cfg.n_classes, rdr_range_mm=net_cfg.rdr_range_mm, init_weights=str(current),
            log_every=max(1, options["iterations"] // 20), **options,
        )
        supports = self.ctx.support_studies()[-n_validation:] if n_validation else []
        stats = TrainStats(self.stats_file, cfg.iterations, started_from=str(current), images=len(images),
                           iterations=cfg.iterations, published=None)
        logger.info("MedLAM pretraining: %d images, %d iterations from %s", len(images), cfg.iterations, current)
        try:
            return self._run(cfg, images, current, supports, tolerance, stats)
        except Exception as exc:
            stats.finish(status="failed", error=f"{type(exc).__name__}: {exc}")
            raise

    def _score(self, checkpoint, supports, stats: TrainStats, which: str):
        stats.update(status=f"validating the {which} weights on {len(supports)} supports")
        started = time.time()
        result = leave_one_out_iou(checkpoint, supports, self.ctx.label_ids, self.ctx.settings.device,
                                   max_organs=self._validation_organs)
        print(f"medlam train: {which} weights, leave-one-out box IoU {result.mean_iou} on {len(supports)} "
              f"supports ({time.time() - started:.0f} s)", flush=True)
        return result

    def _run(self, cfg: TrainConfig, images, current: Path, supports, tolerance: float, stats: TrainStats) -> dict:
        baseline = self._score(current, supports, stats, "current") if len(supports) >= MIN_STUDIES else None
        if baseline is not None and baseline.mean_iou is not None:
            stats.update(best_metric=round(baseline.mean_iou, 4))
        stats.update(status="training")
        losses = []

        def progress(report: dict) -> None:
            losses.append(report)
            stats.update(epoch=int(report["iteration"]), loss=round(float(report["loss"]), 5))
            # one line per report: MONAI Label shows these in /train/ task details
            print(f"medlam train: iteration {report['iteration']}/{report['total']} loss {report['loss']:.4f} "
                  f"rdr {report.get('loss_rdr') or 0:.4f} mss {report.get('loss_mss') or 0:.4f}", flush=True)

        from trainers.medlam import train

        result = train(cfg, images, str(self.work_dir), resume=False, progress=progress)
        candidate = self._score(result, supports, stats, "new") if baseline is not None else None
        validation = self._decide(baseline, candidate, tolerance, len(supports))
        info = {"started_from": str(current), "images": len(images), "iterations": cfg.iterations,
                "final": losses[-1] if losses else None, "validation": validation,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if validation["decision"] == "rejected":
            kept = self.versions.reject(result, info)
            logger.warning("new MedLAM weights localize the supports worse (%s); kept aside in %s", validation, kept)
            return stats.finish(status="rejected", epoch=cfg.iterations, validation=validation, rejected=str(kept),
                                final=info["final"])
        version = self.versions.publish(result, info)
        if candidate is not None and candidate.mean_iou is not None:
            stats.data["best_metric"] = round(candidate.mean_iou, 4)
        if self.ctx.embedders.checkpoint != self.published:
            logger.warning("published version %d, but --conf medlam_version pins %s: the server keeps using it",
                           version, self.ctx.embedders.checkpoint)
        logger.info("MedLAM weights published to %s (version %d)", self.published, version)
        return stats.finish(status="published", epoch=cfg.iterations, validation=validation,
                            published=str(self.published), version=version, final=info["final"])

    @staticmethod
    def _decide(baseline, candidate, tolerance: float, n_supports: int) -> dict:
        if baseline is None or baseline.mean_iou is None or candidate is None or candidate.mean_iou is None:
            return {"decision": "published without validation",
                    "reason": f"leave-one-out validation needs at least {MIN_STUDIES} supports with final labels "
                              f"(found {n_supports})"}
        worse = candidate.mean_iou < baseline.mean_iou - tolerance
        return {"decision": "rejected" if worse else "published", "metric": "leave-one-out box IoU (mm)",
                "current": baseline.to_json(), "new": candidate.to_json(), "tolerance": tolerance}
