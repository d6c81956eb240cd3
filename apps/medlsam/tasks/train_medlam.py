"""Trainer task `medlam`: self-supervised RDR + MSS pretraining on the datastore's images.

Each run fine-tunes the MedLAM weights in use (same network configuration) for `iterations`
more steps, then publishes them atomically to <model_dir>/medlam_trained/medlam.pt, which the
infer tasks pick up on their next request (the template store is rebuilt with the new weights).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask

from medlsam.io import atomic_path, atomic_write_json
from trainers.medlam import TrainConfig

from .context import MedLSAMContext

logger = logging.getLogger(__name__)

# Request keys a client may set, with the defaults of a short CPU run.
DEFAULTS = {"iterations": 100, "batch_size": 4, "learning_rate": 1e-4, "mss_weight": 1.0, "seed": 0,
            "threads": 2, "num_workers": 1, "device": "auto"}


class MedLAMTrain(TrainTask):
    def __init__(self, ctx: MedLSAMContext):
        super().__init__("Self-supervised MedLAM pretraining (RDR + MSS) on the datastore's images (no labels)")
        self.ctx = ctx
        self.published = ctx.settings.medlam_checkpoints[0]  # the candidate the infer tasks try first
        self.work_dir = ctx.settings.model_dir / "medlam_train_work"
        self.stats_file = self.published.parent / "train_stats.json"

    def config(self):
        return dict(DEFAULTS)

    def stats(self):
        if self.stats_file.exists():
            try:
                return json.loads(self.stats_file.read_text())
            except json.JSONDecodeError:
                return {}
        return {}

    def __call__(self, request, datastore):
        images = [datastore.get_image_uri(i) for i in datastore.list_images()]
        images = [p for p in images if p and Path(p).is_file()]
        if not images:
            raise ValueError("the datastore has no images to pretrain on")
        current = self.ctx.embedders.checkpoint
        net_cfg = self.ctx.embedders.get().net.config
        options = {k: type(v)(request.get(k, v)) if v is not None else request.get(k) for k, v in DEFAULTS.items()}
        cfg = TrainConfig(
            base_channels=net_cfg.base_channels, patch_size=net_cfg.patch_size, spacing_mm=net_cfg.spacing_mm,
            n_classes=net_cfg.n_classes, rdr_range_mm=net_cfg.rdr_range_mm, init_weights=str(current),
            log_every=max(1, options["iterations"] // 20), **options,
        )
        logger.info("MedLAM pretraining: %d images, %d iterations from %s", len(images), cfg.iterations, current)
        started = time.time()
        losses = []

        def progress(report: dict) -> None:
            losses.append(report)
            # one line per report: MONAI Label shows these in /train/ task details
            print(f"medlam train: iteration {report['iteration']}/{report['total']} loss {report['loss']:.4f} "
                  f"rdr {report.get('loss_rdr') or 0:.4f} mss {report.get('loss_mss') or 0:.4f}", flush=True)

        from trainers.medlam import train

        result = train(cfg, images, str(self.work_dir), resume=False, progress=progress)
        with atomic_path(self.published) as tmp:
            shutil.copyfile(result, tmp)
        stats = {
            "published": str(self.published),
            "started_from": str(current),
            "images": len(images),
            "iterations": cfg.iterations,
            "seconds": round(time.time() - started, 1),
            "final": losses[-1] if losses else None,
        }
        atomic_write_json(self.stats_file, stats)
        logger.info("MedLAM weights published to %s", self.published)
        return stats
