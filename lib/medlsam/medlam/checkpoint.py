"""Load and save MedLAM weights: the official `medlam.pth` as it is, and our own files with config.

Our files hold {"format": FORMAT, "version": 1, "config": {...}, "state_dict": {...}, "extra": {...}}.
The official file is a plain state dict (saved from DataParallel, so keys start with `module.`);
its configuration is inferred from tensor shapes.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medlsam.errors import ConfigurationError, ModelFileMissing
from medlsam.state_dicts import read_torch_file, state_dict_from
from medlsam.io import atomic_write_bytes
from medlsam.medlam.network import PATCH_MULTIPLE, MedLAMConfig, MedLAMNet

FORMAT = "medlsam-medlam"
VERSION = 1


def unwrap(net: nn.Module) -> nn.Module:
    """The bare network inside DataParallel / DistributedDataParallel wrappers."""
    while hasattr(net, "module") and isinstance(getattr(net, "module"), nn.Module):
        net = net.module
    return net


def save_medlam(path, net: nn.Module, cfg: MedLAMConfig, extra: dict | None = None) -> str:
    """Write weights + config to `path` atomically; returns the path as a string."""
    state = {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_dict(),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)


def load_medlam(path, device="cpu", config: MedLAMConfig | None = None) -> tuple[MedLAMNet, MedLAMConfig]:
    """Load a MedLAM checkpoint (ours or the official one) into a network in eval mode.

    `config` overrides what the file says or what the shapes suggest (e.g. the spacing, which the
    official file does not record); shapes are still checked against it.
    """
    raw = read_checkpoint(path)
    state, stored = split_checkpoint(raw, source=str(path))
    cfg = config or (MedLAMConfig.from_dict(stored) if stored is not None else infer_config(state, str(path)))
    net = MedLAMNet(cfg)
    check_state_dict(state, net, cfg, source=str(path))
    net.load_state_dict(state, strict=True)
    return net.to(device).eval(), cfg


def read_checkpoint(path) -> Any:
    if not Path(path).is_file():
        raise ModelFileMissing(
            f"MedLAM checkpoint not found: {path} (give the official medlam.pth or a file written "
            "by `medlsam train`)"
        )
    return read_torch_file(path, "MedLAM")


def split_checkpoint(raw: Any, source: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Return (state dict without `module.` prefixes, stored config or None)."""
    stored = None
    if isinstance(raw, Mapping) and raw.get("format") == FORMAT:
        stored = raw.get("config")
        raw = raw["state_dict"]
    return state_dict_from(raw, source), stored


def infer_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> MedLAMConfig:
    """Configuration implied by tensor shapes (base channels, cubic patch size, classes)."""
    for key in ("conv0_1.model.conv1_1.Conv.weight", "fc1.weight"):
        if key not in state:
            raise ConfigurationError(f"{source}: missing {key!r}; this is not a MedLAM checkpoint")
    base2 = state["conv0_1.model.conv1_1.Conv.weight"].shape[0]
    if base2 % 2:
        raise ConfigurationError(f"{source}: conv0_1 has {base2} output channels, expected an even number")
    base = base2 // 2
    cells, rem = divmod(state["fc1.weight"].shape[1], 16 * base)
    side = round(cells ** (1 / 3)) if cells > 0 else 0
    if rem or side < 1 or side**3 != cells:
        raise ConfigurationError(
            f"{source}: fc1.in_features={state['fc1.weight'].shape[1]} does not correspond to a cubic "
            f"patch for base_channels={base}; pass an explicit configuration"
        )
    n_classes = state["classification.0.weight"].shape[0] if "classification.0.weight" in state else 3
    return MedLAMConfig(base_channels=base, patch_size=(side * PATCH_MULTIPLE,) * 3, n_classes=n_classes)


def check_state_dict(state: Mapping[str, torch.Tensor], net: nn.Module, cfg: MedLAMConfig, source: str) -> None:
    """Raise ValueError naming the first key whose presence or shape differs from `cfg`'s network."""
    expected = unwrap(net).state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ConfigurationError(f"{source}: missing parameter {key!r} expected by MedLAM({cfg.describe()})")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigurationError(
                f"{source}: parameter {key!r} has shape {tuple(state[key].shape)} but MedLAM"
                f"({cfg.describe()}) expects {tuple(tensor.shape)}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise ConfigurationError(f"{source}: unexpected parameter {extra[0]!r} for MedLAM({cfg.describe()})")


def weights_fingerprint(net: nn.Module) -> str:
    """sha256 over the parameter names, shapes and float32 values (device and wrapper independent)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(unwrap(net).state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Config and extra info of a checkpoint, without building the network."""
    raw = read_checkpoint(path)
    state, stored = split_checkpoint(raw, str(path))
    cfg = MedLAMConfig.from_dict(stored) if stored is not None else infer_config(state, str(path))
    extra = raw.get("extra", {}) if isinstance(raw, Mapping) and raw.get("format") == FORMAT else {}
    return {"config": cfg.to_dict(), "extra": extra, "official_layout": stored is None}
