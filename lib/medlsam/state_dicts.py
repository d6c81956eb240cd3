"""Reading PyTorch checkpoint files into plain state dicts (one reader for every model family)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from medlsam.errors import ConfigurationError, ModelFileMissing

# Keys under which training tools nest a state dict inside a checkpoint dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """torch.load a checkpoint onto the CPU (weights only); errors name the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileMissing(f"{what} checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise ConfigurationError(f"{what} checkpoint {path} is not a readable PyTorch checkpoint: {exc}") from exc


def state_dict_from(raw: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a plain or nested state dict, without DataParallel's `module.` prefixes."""
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{source}: expected a state dict or a dict holding one, got {type(raw).__name__}")
    if not any(torch.is_tensor(v) for v in raw.values()):
        nested = [k for k in NESTED_KEYS if isinstance(raw.get(k), Mapping)]
        if not nested:
            raise ConfigurationError(f"{source}: no state dict found (top-level keys: {sorted(map(str, raw))[:8]})")
        raw = raw[nested[0]]
    state = {}
    for key, value in raw.items():
        if not torch.is_tensor(value):
            continue
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    if not state:
        raise ConfigurationError(f"{source}: the checkpoint holds no tensors")
    return state
