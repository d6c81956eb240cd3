"""Training configuration for MedLAM self-supervised pretraining (RDR + MSS)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medlsam.medlam.network import MedLAMConfig


@dataclass
class TrainConfig:
    """Everything a run needs besides the data. Defaults are the paper's setup for real CT on a GPU;
    `demo_config()` is the small configuration that trains on a 2-core CPU within about an hour."""

    # network / grid (see MedLAMConfig)
    base_channels: int = 24
    patch_size: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    n_classes: int = 3
    rdr_range_mm: tuple[float, float, float] = (1500.0, 600.0, 600.0)
    dropout: float = 0.2
    # optimisation
    iterations: int = 10000
    batch_size: int = 4  # crop pairs per iteration (per process under DDP)
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine (to lr_final_fraction x learning_rate at the end)
    lr_final_fraction: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    # losses
    rdr_unit_mm: float = 10.0  # the RDR MSE enters the total in units of (rdr_unit_mm)^2
    mss_weight: float = 1.0
    mss_pairs: int | None = None  # (crop, augmented crop) couples per iteration for MSS; None = batch_size
    mss_points: int = 20
    mss_temperature: float = 15.0
    mss_pos_radius_vox: float = 1.0  # positives: within this many voxels of the level's grid
    mss_neg_radius_vox: float = 2.0  # negatives: farther than this
    # sampling and augmentation
    crop_pad: int | None = None  # extra margin around a crop for augmentation; None = patch // 8
    body_threshold: float = 0.1  # mapped intensity above which a voxel counts as body (~ -600 HU)
    uniform_centre_fraction: float = 0.2  # crop centres drawn over the whole volume, not just the body
    intensity_prob: float = 0.5
    noise_prob: float = 0.5
    noise_std: float = 0.1
    affine_prob: float = 0.5
    affine_scale: float = 0.1
    affine_rotate_deg: float = 15.0
    elastic_prob: float = 0.5
    elastic_magnitude: float = 100.0  # MONAI Rand3DElastic magnitude; ~3 voxels peak at sigma 5-7
    samples_per_volume: int = 64  # dataset length per epoch = volumes x this
    # runtime
    num_workers: int = 1
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    log_every: int = 10
    checkpoint_every_s: float = 300.0
    init_weights: str | None = None  # start from these MedLAM weights (e.g. the official medlam.pth)

    def __post_init__(self):
        self.patch_size = tuple(int(v) for v in _as_triple(self.patch_size))
        self.spacing_mm = tuple(float(v) for v in _as_triple(self.spacing_mm))
        self.rdr_range_mm = tuple(float(v) for v in _as_triple(self.rdr_range_mm))
        self.network_config()  # validates the network part
        for name in ("iterations", "batch_size", "mss_points", "samples_per_volume", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if self.mss_pairs is not None and not 0 <= self.mss_pairs <= self.batch_size:
            raise ValueError(f"mss_pairs must be between 0 and batch_size ({self.batch_size})")
        if not 0 < self.mss_pos_radius_vox < self.mss_neg_radius_vox:
            raise ValueError("need 0 < mss_pos_radius_vox < mss_neg_radius_vox")
        if self.learning_rate <= 0 or self.rdr_unit_mm <= 0:
            raise ValueError("learning_rate and rdr_unit_mm must be positive")
        if not 0.0 <= self.uniform_centre_fraction <= 1.0:
            raise ValueError("uniform_centre_fraction must be in [0, 1]")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def effective_mss_pairs(self) -> int:
        if self.mss_weight <= 0:
            return 0
        return self.batch_size if self.mss_pairs is None else self.mss_pairs

    @property
    def effective_crop_pad(self) -> int:
        return max(self.patch_size) // 8 if self.crop_pad is None else int(self.crop_pad)

    def learning_rate_at(self, iteration: int) -> float:
        """Learning rate for the step that follows `iteration` completed steps."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        progress = min(max(iteration / self.iterations, 0.0), 1.0)
        low = self.learning_rate * self.lr_final_fraction
        return low + 0.5 * (self.learning_rate - low) * (1.0 + math.cos(math.pi * progress))

    def network_config(self) -> MedLAMConfig:
        return MedLAMConfig(
            base_channels=self.base_channels,
            patch_size=self.patch_size,
            spacing_mm=self.spacing_mm,
            n_classes=self.n_classes,
            rdr_range_mm=self.rdr_range_mm,
            dropout=self.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training configuration keys: {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"training configuration not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"training configuration {path} is not valid JSON: {exc}") from exc


def demo_config(**overrides) -> TrainConfig:
    """Small CPU configuration (METHOD section 12): base 8, 32^3 patches at 6 mm (192 mm field of
    view, like 64^3 at 3 mm), MSS on two of eight pairs per iteration to keep the decoder cheap."""
    values = dict(
        base_channels=8,
        patch_size=(32, 32, 32),
        spacing_mm=(6.0, 6.0, 6.0),
        dropout=0.0,
        iterations=3000,
        batch_size=8,
        mss_pairs=2,
        learning_rate=1e-3,
        lr_schedule="cosine",
        threads=1,
        num_workers=1,
        log_every=20,
        checkpoint_every_s=180.0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _as_triple(value) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * 3
    items = tuple(value)
    if len(items) == 1:
        return items * 3
    if len(items) != 3:
        raise ValueError(f"expected 1 or 3 values (z, y, x), got {value!r}")
    return items
