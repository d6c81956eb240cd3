"""The pretraining loop: Adam on RDR + MSS, atomic checkpoints with resume, TensorBoard, DDP.

Files in `out_dir`:
  checkpoint.pt   full training state (weights, optimizer, iteration) for resume, rewritten atomically
  medlam.pt       the published weights + network config (`medlsam.medlam.checkpoint` format)
  train_config.json, train.log, tb/ (TensorBoard scalars), cache/ (preprocessed volumes)
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from medlsam.io import atomic_write_bytes, atomic_write_json
from medlsam.medlam.checkpoint import load_medlam, save_medlam, unwrap, weights_fingerprint
from medlsam.medlam.network import EncoderOutput, MedLAMNet
from trainers.medlam import data, distributed
from trainers.medlam.config import TrainConfig
from trainers.medlam.losses import mss_loss, rdr_loss, rdr_target_mm
from trainers.medlam.sampler import MSSBatchSampler, PatchPairDataset, collate_pairs

log = logging.getLogger("medlsam.train")

STATE_FORMAT = "medlsam-medlam-train"
CHECKPOINT = "checkpoint.pt"
PUBLISHED = "medlam.pt"


class PretrainStep(nn.Module):
    """One forward pass over a batch, returning the losses. Wrapping this (not the bare network)
    in DDP keeps every iteration a single DDP forward although the encoder runs on three kinds of
    patches and the decoder on a subset."""

    def __init__(self, net: MedLAMNet, cfg: TrainConfig):
        super().__init__()
        self.net = net
        self.cfg = cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ori_a, ori_b = batch["ori_a"], batch["ori_b"]
        n = ori_a.shape[0]
        m = batch["aug_a"].shape[0] if "aug_a" in batch else 0
        parts = [ori_a, ori_b] + ([batch["aug_a"]] if m else [])
        encoded = self.net.encode(torch.cat(parts))
        latent = self.net.latent(encoded.bottleneck[: 2 * n])
        target = rdr_target_mm(batch["centre_a_mm"], batch["centre_b_mm"])
        loss_rdr = rdr_loss(latent[:n], latent[n:], target, cfg.rdr_range_mm)
        total = loss_rdr / cfg.rdr_unit_mm**2
        out = {"loss_rdr": loss_rdr.detach()}
        if m:
            pick = torch.cat([torch.arange(m), torch.arange(2 * n, 2 * n + m)]).to(ori_a.device)
            sub = EncoderOutput(
                bottleneck=encoded.bottleneck[pick], skips=[s[pick] for s in encoded.skips]
            )
            features = self.net.decode(sub)
            mss = mss_loss(
                [f[:m] for f in features],
                [f[m:] for f in features],
                batch["point_idx"],
                batch["point_mm"],
                batch["aug_pos_mm"],
                batch["aug_valid"],
                cfg.spacing_mm,
                cfg.mss_pos_radius_vox,
                cfg.mss_neg_radius_vox,
                cfg.mss_temperature,
            )
            total = total + cfg.mss_weight * mss.loss
            out["loss_mss"] = mss.loss.detach()
            out["mss_hit_rate"] = torch.tensor(mss.hit_rate)
        out["loss"] = total
        return out


def train(
    cfg: TrainConfig,
    image_paths: list[str],
    out_dir: str,
    resume: bool = True,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """Pretrain MedLAM on `image_paths` (NIfTI CT, no labels); returns out_dir/medlam.pt.

    Resumes from out_dir/checkpoint.pt when `resume` and the file exists (the network
    configuration must match). `progress` receives {"iteration", "total", "loss", "loss_rdr",
    "loss_mss", "seconds", ...} every `cfg.log_every` iterations; `should_stop()` ends the run
    early (checkpoint and weights are still written).
    """
    if not image_paths:
        raise ValueError("no training images given")
    missing = [p for p in image_paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"training image not found: {missing[0]}")
    ctx = distributed.setup(cfg.device)
    out = Path(out_dir)
    handler = None
    try:
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            handler = _attach_log_file(out / "train.log")
            atomic_write_json(out / "train_config.json", cfg.to_dict())
        volumes = _prepare_data(cfg, image_paths, out / "cache", ctx)
        return _run(cfg, volumes, out, resume, progress, should_stop, ctx)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        ctx.close()


def _prepare_data(cfg: TrainConfig, paths: list[str], cache_dir: Path, ctx) -> list[np.ndarray]:
    if ctx.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        data.prepare_volumes(paths, cfg.spacing_mm, cfg.patch_size, cache_dir, progress=sys.stderr.isatty())
    ctx.barrier()
    ready = [data.cache_path(cache_dir, p, cfg.spacing_mm, cfg.patch_size) for p in paths]
    return data.load_volumes([p for p in ready if p.exists()])


@dataclass
class _Training:
    """What a run trains: the network, its loss step (DDP-wrapped when distributed), the optimizer."""

    net: MedLAMNet
    model: nn.Module
    optimizer: torch.optim.Optimizer
    iteration: int = 0
    epoch: int = 0


def _run(cfg, volumes, out: Path, resume, progress, should_stop, ctx) -> str:
    torch.manual_seed(cfg.seed + ctx.rank)
    training = _build_training(cfg, out, resume, ctx)
    sampler, dataset, loader = _build_loader(cfg, volumes, ctx)
    writer = _tensorboard(out / "tb") if ctx.is_main else None
    log.info(
        "training %s on %d volumes, %d process(es), device %s, from iteration %d to %d",
        cfg.network_config().describe(), len(volumes), ctx.world_size, ctx.device, training.iteration, cfg.iterations,
    )
    started = time.monotonic()
    stop = _train_loop(cfg, training, sampler, dataset, loader, out, progress, should_stop, ctx, writer, started)
    if stop:
        log.info("stop requested at iteration %d", training.iteration)
    return _publish(cfg, training, out, ctx, writer, started)


def _build_training(cfg, out: Path, resume: bool, ctx) -> _Training:
    """The network (from `init_weights` or fresh), the optimizer, and the resumed position."""
    net_cfg = cfg.network_config()
    net = MedLAMNet(net_cfg)
    if cfg.init_weights:
        start, _ = load_medlam(cfg.init_weights, config=net_cfg)
        net.load_state_dict(start.state_dict())
        log.info("initialized from %s", cfg.init_weights)
    for p in net.classification.parameters():  # not used by localization
        p.requires_grad_(False)
    net.to(ctx.device).train()
    step = PretrainStep(net, cfg)
    optimizer = torch.optim.Adam(
        [p for p in net.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    training = _Training(net, step, optimizer)
    if resume and (out / CHECKPOINT).exists():
        training.iteration, training.epoch = _load_state(out / CHECKPOINT, net, optimizer, cfg, ctx.device)
        log.info("resumed from %s at iteration %d", out / CHECKPOINT, training.iteration)
    if ctx.enabled:
        training.model = nn.parallel.DistributedDataParallel(
            step,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=cfg.effective_mss_pairs == 0,
        )
    return training


def _build_loader(cfg, volumes, ctx):
    """(sampler, dataset, loader) of patch pairs, sharded over the ranks."""
    dataset = PatchPairDataset(volumes, cfg.spacing_mm, cfg)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    batches = MSSBatchSampler(sampler, cfg.batch_size, cfg.effective_mss_pairs, len(dataset))
    if len(batches) == 0:
        raise ValueError(
            f"{len(dataset)} samples per epoch over {ctx.world_size} process(es) do not fill one batch "
            f"of {cfg.batch_size}; raise samples_per_volume"
        )
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        collate_fn=collate_pairs,
        worker_init_fn=_worker_init,
        pin_memory=ctx.device.type == "cuda",
    )
    return sampler, dataset, loader


def _train_loop(cfg, training: _Training, sampler, dataset, loader, out: Path, progress, should_stop, ctx, writer,
                started: float) -> bool:
    """Optimize until `cfg.iterations` (or a stop request); returns whether it was stopped early."""
    last_save = started
    window: dict[str, list[float]] = {}
    stop = False
    optimizer = training.optimizer
    while training.iteration < cfg.iterations and not stop:
        sampler.set_epoch(training.epoch)
        dataset.set_epoch(training.epoch)
        for batch in loader:
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate_at(training.iteration)
            losses = training.model(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            training.iteration += 1
            for key, value in losses.items():
                window.setdefault(key, []).append(float(value.detach()))
            window.setdefault("lr", []).append(optimizer.param_groups[0]["lr"])
            if training.iteration % cfg.log_every == 0 or training.iteration == cfg.iterations:
                report = _report(window, training.iteration, cfg.iterations, time.monotonic() - started)
                report["epoch"] = training.epoch
                window = {}
                if ctx.is_main:
                    _log_report(report, writer)
                    if progress is not None:
                        progress(report)
            stop = ctx.any_true(should_stop is not None and bool(should_stop()))
            if ctx.is_main and time.monotonic() - last_save >= cfg.checkpoint_every_s:
                _save_state(out / CHECKPOINT, training.net, optimizer, cfg, training.iteration, training.epoch)
                last_save = time.monotonic()
            if stop or training.iteration >= cfg.iterations:
                break
        training.epoch += 1
    return stop


def _publish(cfg, training: _Training, out: Path, ctx, writer, started: float) -> str:
    """Write the final training state and the published weights (main rank), after checking the ranks agree."""
    net = training.net
    fingerprints = ctx.all_gather_strings(weights_fingerprint(net))
    if ctx.is_main:
        if len(set(fingerprints)) != 1:
            raise RuntimeError("distributed ranks ended with different weights")
        _save_state(out / CHECKPOINT, net, training.optimizer, cfg, training.iteration, training.epoch + 1)
        save_medlam(
            out / PUBLISHED,
            net,
            cfg.network_config(),
            extra={"iterations": training.iteration, "train_config": cfg.to_dict(), "world_size": ctx.world_size},
        )
        log.info(
            "published %s after %d iterations (%.0f s); ranks in sync: %s (%d), weights %s",
            out / PUBLISHED, training.iteration, time.monotonic() - started, True, len(fingerprints),
            fingerprints[0][:12],
        )
        if writer is not None:
            writer.close()
    ctx.barrier()
    return str(out / PUBLISHED)


def _report(window: dict[str, list[float]], iteration: int, total: int, seconds: float) -> dict:
    report = {"iteration": iteration, "total": total, "seconds": round(seconds, 1)}
    if "lr" in window:
        report["lr"] = window["lr"][-1]
    for key in ("loss", "loss_rdr", "loss_mss", "mss_hit_rate"):
        values = window.get(key)
        report[key] = float(np.mean(values)) if values else None
    if report["loss_rdr"] is not None:
        report["rdr_rmse_mm"] = float(np.sqrt(report["loss_rdr"]))
    return report


def _log_report(report: dict, writer) -> None:
    parts = [f"iter {report['iteration']}/{report['total']}", f"{report['seconds']:.0f}s"]
    for key in ("loss", "loss_rdr", "rdr_rmse_mm", "loss_mss", "mss_hit_rate", "lr"):
        if report.get(key) is not None:
            parts.append(f"{key} {report[key]:.4g}")
            if writer is not None:
                writer.add_scalar(f"train/{key}", report[key], report["iteration"])
    log.info(" | ".join(parts))
    if writer is not None:
        writer.flush()


def _save_state(path: Path, net, optimizer, cfg: TrainConfig, iteration: int, epoch: int) -> None:
    state = {
        "format": STATE_FORMAT,
        "iteration": iteration,
        "epoch": epoch,
        "network_config": cfg.network_config().to_dict(),
        "train_config": cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    log.info("checkpoint saved at iteration %d", iteration)


def _load_state(path: Path, net, optimizer, cfg: TrainConfig, device) -> tuple[int, int]:
    try:
        state = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read the training checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a MedLAM training checkpoint")
    if state["network_config"] != cfg.network_config().to_dict():
        raise ValueError(
            f"{path} was trained with a different network configuration {state['network_config']} "
            f"than requested {cfg.network_config().to_dict()}; use another output folder or disable resume"
        )
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # the requested learning rate wins over the stored one
        group["lr"] = cfg.learning_rate
        group["weight_decay"] = cfg.weight_decay
    return int(state["iteration"]), int(state["epoch"])


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: train without scalars
        log.warning("tensorboard is not installed; no TensorBoard scalars")
        return None
    return SummaryWriter(str(path))


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler
