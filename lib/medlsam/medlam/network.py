"""The MedLAM 3D network (METHOD section 3), laid out so the official `medlam.pth` loads unchanged.

An encoder of conv blocks and max pooling feeds two heads:
- the RDR head (`fc1`-`fc3`): a patch -> a 3D latent coordinate `p`;
- the decoder (trilinear upsampling + skip concatenation): three feature maps at 1/4, 1/2 and
  full resolution, compared by cosine similarity in MSS.
All tensors are (z, y, x). Parameter names follow the official checkpoint
(`conv0_1.model.conv1_1.Conv.weight`, ..., `classification.0.weight`, `fc1.weight`, ...).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The encoder pools four times, so every patch axis must be a multiple of 16; instance norm of
# the 1/16 bottleneck needs more than one voxel, so at least 32.
PATCH_MULTIPLE = 16
MIN_PATCH = 32


def _triple(value, name: str, kind=float) -> tuple:
    try:
        items = tuple(kind(v) for v in value)
    except TypeError:
        items = (kind(value),) * 3
    if len(items) != 3:
        raise ValueError(f"{name} needs 3 values (z, y, x), got {value!r}")
    return items


@dataclass(frozen=True)
class MedLAMConfig:
    """Network hyper-parameters. The defaults are the official configuration for real CT."""

    base_channels: int = 24
    patch_size: tuple[int, int, int] = (64, 64, 64)  # voxels, (z, y, x)
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)  # input grid spacing, (z, y, x)
    n_classes: int = 3  # channels of the (unused) `classification` layer
    rdr_range_mm: tuple[float, float, float] = (1500.0, 600.0, 600.0)  # r in d = r * tanh(p_s - p_q)
    dropout: float = 0.2  # after conv4, training only

    def __post_init__(self):
        object.__setattr__(self, "patch_size", _triple(self.patch_size, "patch_size", int))
        object.__setattr__(self, "spacing_mm", _triple(self.spacing_mm, "spacing_mm", float))
        object.__setattr__(self, "rdr_range_mm", _triple(self.rdr_range_mm, "rdr_range_mm", float))
        if int(self.base_channels) < 1:
            raise ValueError(f"base_channels must be a positive integer, got {self.base_channels!r}")
        object.__setattr__(self, "base_channels", int(self.base_channels))
        bad = [p for p in self.patch_size if p < MIN_PATCH or p % PATCH_MULTIPLE]
        if bad:
            raise ValueError(
                f"patch_size {self.patch_size}: every axis must be a multiple of {PATCH_MULTIPLE} "
                f"and at least {MIN_PATCH} (the encoder halves the patch four times and "
                "instance-normalizes the 1/16 bottleneck)"
            )
        if min(self.spacing_mm) <= 0 or min(self.rdr_range_mm) <= 0:
            raise ValueError("spacing_mm and rdr_range_mm must be positive")
        if int(self.n_classes) < 1:
            raise ValueError(f"n_classes must be a positive integer, got {self.n_classes!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def fc_in_features(self) -> int:
        """Length of the flattened conv4 output (16 b channels at 1/16 resolution)."""
        cells = 1
        for p in self.patch_size:
            cells *= p // PATCH_MULTIPLE
        return cells * 16 * self.base_channels

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(p * s for p, s in zip(self.patch_size, self.spacing_mm))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("patch_size", "spacing_mm", "rdr_range_mm"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MedLAMConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown MedLAM configuration keys: {unknown}")
        return cls(**known)

    def describe(self) -> str:
        return (
            f"base_channels={self.base_channels}, patch_size={self.patch_size}, "
            f"n_classes={self.n_classes}"
        )


class _Conv(nn.Module):
    """Holds the convolution under the attribute name the official checkpoint uses (`Conv`)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.Conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1, dilation=1, bias=True)

    def forward(self, x):
        return self.Conv(x)


class ConvBlock(nn.Module):
    """Conv3d 3x3x3 -> InstanceNorm3d (no affine) -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.model = nn.Sequential(
            OrderedDict(
                conv1_1=_Conv(cin, cout),
                norm1_1=nn.InstanceNorm3d(cout),
                relu1_1=nn.ReLU(inplace=True),
            )
        )

    def forward(self, x):
        return self.model(x)


@dataclass
class MedLAMOutput:
    latent: torch.Tensor | None  # [B, 3]
    features: list[torch.Tensor] | None  # [f0 (1/4), f1 (1/2), f2 (full)], each [B, 4b, ...]


@dataclass
class EncoderOutput:
    bottleneck: torch.Tensor  # conv4 output after dropout, [B, 16b, D/16, H/16, W/16]
    skips: list[torch.Tensor]  # conv0 .. conv3 outputs, full .. 1/8 resolution


class MedLAMNet(nn.Module):
    """MedLAM network; `forward(x, features=...)` returns a `MedLAMOutput`."""

    def __init__(self, config: MedLAMConfig | None = None):
        super().__init__()
        self.config = config or MedLAMConfig()
        b = self.config.base_channels
        channels = OrderedDict(
            conv0_1=(1, 2 * b), conv0_2=(2 * b, 2 * b),
            conv1_1=(2 * b, 2 * b), conv1_2=(2 * b, 2 * b),
            conv2_1=(2 * b, 2 * b), conv2_2=(2 * b, 4 * b),
            conv3_1=(4 * b, 4 * b), conv3_2=(4 * b, 8 * b),
            conv4_1=(8 * b, 8 * b), conv4_2=(8 * b, 16 * b),
            conv5_1=(24 * b, 8 * b), conv5_2=(8 * b, 8 * b),
            conv6_1=(12 * b, 4 * b), conv6_2=(4 * b, 4 * b),
            conv7_1=(6 * b, 4 * b), conv7_2=(4 * b, 4 * b),
            conv8_1=(6 * b, 4 * b), conv8_2=(4 * b, 4 * b),
        )  # fmt: skip
        for name, (cin, cout) in channels.items():
            self.add_module(name, ConvBlock(cin, cout))
        self.classification = nn.Sequential(nn.Conv3d(4 * b, self.config.n_classes, kernel_size=1))
        self.fc1 = nn.Linear(self.config.fc_in_features, 8 * b)
        self.fc2 = nn.Linear(8 * b, 4 * b)
        self.fc3 = nn.Linear(4 * b, 3)
        self.drop = nn.Dropout(self.config.dropout)

    # -- pieces, usable on their own (the trainer batches them differently) --
    def encode(self, x: torch.Tensor) -> EncoderOutput:
        skips = []
        out = x
        for level in range(4):
            out = getattr(self, f"conv{level}_1")(out)
            out = getattr(self, f"conv{level}_2")(out)
            skips.append(out)
            out = F.max_pool3d(out, 2, 2)
        out = self.conv4_2(self.conv4_1(out))
        return EncoderOutput(bottleneck=self.drop(out), skips=skips)

    def latent(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """RDR head: flattened bottleneck -> 3D latent coordinate (linear layers, no activation)."""
        flat = bottleneck.reshape(bottleneck.shape[0], -1)
        if flat.shape[1] != self.fc1.in_features:
            raise ValueError(
                f"the RDR head needs patches of {self.config.patch_size} voxels; this input gives "
                f"{flat.shape[1]} bottleneck values instead of {self.fc1.in_features}"
            )
        return self.fc3(self.fc2(self.fc1(flat)))

    def decode(self, encoded: EncoderOutput) -> list[torch.Tensor]:
        """Decoder: returns [feature0 (1/4), feature1 (1/2), feature2 (full)], not normalized."""
        conv0, conv1, conv2, conv3 = encoded.skips
        out = self.conv5_2(self.conv5_1(torch.cat((_up(encoded.bottleneck), conv3), 1)))
        feature0 = self.conv6_2(self.conv6_1(torch.cat((_up(out), conv2), 1)))
        feature1 = self.conv7_2(self.conv7_1(torch.cat((_up(feature0), conv1), 1)))
        feature2 = self.conv8_2(self.conv8_1(torch.cat((_up(feature1), conv0), 1)))
        return [feature0, feature1, feature2]

    def forward(self, x: torch.Tensor, features: bool = True, latent: bool = True) -> MedLAMOutput:
        """x: [B, 1, D, H, W] in [0, 1]. `latent=False` skips the RDR head (then any multiple of
        16 voxels, at least 32, per axis is accepted); `features=False` skips the decoder."""
        self._check_input(x, need_patch=latent)
        encoded = self.encode(x)
        return MedLAMOutput(
            latent=self.latent(encoded.bottleneck) if latent else None,
            features=self.decode(encoded) if features else None,
        )

    def _check_input(self, x: torch.Tensor, need_patch: bool) -> None:
        if not torch.is_tensor(x) or x.dim() != 5 or x.shape[1] != 1:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"MedLAM expects a [B, 1, D, H, W] tensor, got {shape}")
        spatial = tuple(x.shape[2:])
        if need_patch and spatial != self.config.patch_size:
            raise ValueError(
                f"MedLAM input of {spatial} voxels does not match the configured patch size "
                f"{self.config.patch_size}"
            )
        if any(s % PATCH_MULTIPLE or s < MIN_PATCH for s in spatial):
            raise ValueError(
                f"MedLAM input sizes must be multiples of {PATCH_MULTIPLE} and at least {MIN_PATCH}, "
                f"got {spatial}"
            )


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


def patch_start(centre, patch_size) -> np.ndarray:
    """First voxel of the patch "centred" at voxel `centre`: it covers [c - P // 2, c - P // 2 + P).
    Training and inference both use this convention; the patch's position is `centre * spacing`."""
    return np.asarray(centre, dtype=np.int64) - np.asarray(patch_size, dtype=np.int64) // 2


def relative_offset_mm(
    latent_query: torch.Tensor, latent_support: torch.Tensor, rdr_range_mm
) -> torch.Tensor:
    """RDR: predicted physical offset (mm, z y x) from the query patch centre to the support's,
    d = r * tanh(p_s - p_q). Add it (divided by the spacing) to the query centre to reach the
    support point. Training regresses it onto (c_s - c_q) * spacing."""
    r = torch.as_tensor(rdr_range_mm, dtype=latent_query.dtype, device=latent_query.device)
    return r * torch.tanh(latent_support - latent_query)
