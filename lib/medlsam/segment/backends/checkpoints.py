"""Where user-supplied checkpoints live, and loading them with errors that say what to do."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MODEL_DIR_ENV = "MEDLSAM_MODEL_DIR"

# backend name -> (file name, where a user gets it). Nothing is downloaded by this code.
CHECKPOINT_FILES: dict[str, tuple[str, str]] = {
    "sam_vit_b": ("sam_vit_b_01ec64.pth",
                  "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
    "sam_vit_l": ("sam_vit_l_0b3195.pth",
                  "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
    "sam_vit_h": ("sam_vit_h_4b8939.pth",
                  "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
    "medsam": ("medsam_vit_b.pth",
               "the MedSAM release (https://github.com/bowang-lab/MedSAM, 'Model checkpoints')"),
}


def default_model_dir() -> Path:
    """$MEDLSAM_MODEL_DIR, else the app's model folder apps/medlsam/model/ of this checkout."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    from medlsam.paths import REPO_ROOT

    return REPO_ROOT / "apps" / "medlsam" / "model"


def resolve_checkpoint(backend: str, checkpoint: str | os.PathLike | None,
                       model_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint file for `backend`: the given path, else <model dir>/<official file name>."""
    file_name, source = CHECKPOINT_FILES[backend]
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            path = path / file_name
    else:
        path = Path(model_dir).expanduser() / file_name if model_dir else default_model_dir() / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{backend} checkpoint not found: expected {path}. Download {file_name} from {source} "
            f"and put it there (or pass checkpoint=<file>, or set ${MODEL_DIR_ENV} to its folder)."
        )
    return path


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Load a state dict (plain, or under 'model' / 'state_dict') onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for non-checkpoint files
        raise ValueError(f"{what} checkpoint {path} is not a readable PyTorch checkpoint: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict(model: torch.nn.Module, path: str | os.PathLike, what: str) -> None:
    """Load `path` into `model` strictly; a mismatch raises ValueError naming the first differences."""
    state = read_state_dict(path, what)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} is not a {what} checkpoint: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(wrong_shape)} shape mismatches {wrong_shape[:3]}"
        )
    model.load_state_dict(state, strict=True)
