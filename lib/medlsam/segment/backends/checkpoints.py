"""Where user-supplied checkpoints live, and loading them with errors that say what to do."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medlsam.errors import ConfigurationError, ModelFileMissing
from medlsam.paths import MODEL_DIR_ENV, model_dir
from medlsam.state_dicts import read_torch_file, state_dict_from

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
    """The model folder (see `medlsam.paths.model_dir`)."""
    return model_dir()


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
        raise ModelFileMissing(
            f"{backend} checkpoint not found: expected {path}. Download {file_name} from {source} "
            f"and put it there (or pass checkpoint=<file>, or set ${MODEL_DIR_ENV} to its folder)."
        )
    return path


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Load a state dict (plain or nested) onto the CPU."""
    return state_dict_from(read_torch_file(path, what), f"{what} checkpoint {path}")


def load_state_dict(model: torch.nn.Module, path: str | os.PathLike, what: str) -> None:
    """Load `path` into `model` strictly; a mismatch raises ValueError naming the first differences."""
    state = read_state_dict(path, what)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ConfigurationError(
            f"{path} is not a {what} checkpoint: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(wrong_shape)} shape mismatches {wrong_shape[:3]}"
        )
    model.load_state_dict(state, strict=True)
