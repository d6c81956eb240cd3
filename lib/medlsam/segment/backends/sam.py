"""SAM ViT-B/L/H and MedSAM (ViT-B) from `segment-anything`, each with its own preprocessing.

- SAM: longest side resized to 1024 (aspect kept), normalized by the model's pixel mean/std,
  zero padded bottom/right; logits upscaled to 1024, padding cropped, resized to the slice.
- MedSAM: image resized to 1024x1024 (aspect not kept), min-max normalized to [0, 1], no padding;
  boxes scaled per axis; the 256x256 logits resized straight to the slice.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .base import Embedding, SamFamilyBackend, longest_side_size, min_max_normalize, resize_image
from .checkpoints import load_state_dict, resolve_checkpoint

# name -> (embed dim, depth, heads, global attention blocks), the published SAM image encoders.
VIT_CONFIGS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
BACKEND_VIT = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h", "medsam": "vit_b"}


def build_sam_model(embed_dim: int, depth: int, num_heads: int, global_attn_indexes, image_size: int = 1024,
                    prompt_dim: int = 256, window_size: int = 14, decoder_mlp_dim: int = 2048,
                    patch_size: int = 16) -> Sam:
    """A SAM architecture (random weights). Defaults are SAM's; small values give tiny test models."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch_size}")
    grid = image_size // patch_size
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(global_attn_indexes),
            window_size=window_size, out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim, num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model.eval()


class SamBackend(SamFamilyBackend):
    """SAM (style='sam') or MedSAM (style='medsam') preprocessing around a `segment_anything.Sam`."""

    def __init__(self, model: Sam, style: str = "sam", device: str | torch.device = "cpu", name: str | None = None):
        if style not in ("sam", "medsam"):
            raise ValueError(f"style must be 'sam' or 'medsam', got {style!r}")
        super().__init__(model.image_encoder, model.prompt_encoder, model.mask_decoder,
                         model.image_encoder.img_size, device)
        self.style = style
        self.name = name or style
        self.pixel_mean = model.pixel_mean.detach().cpu().view(1, 3, 1, 1)
        self.pixel_std = model.pixel_std.detach().cpu().view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(cls, backend: str, checkpoint=None, model_dir=None, device="cpu") -> "SamBackend":
        """Build `backend` ('sam_vit_b', 'sam_vit_l', 'sam_vit_h' or 'medsam') and load its checkpoint."""
        if backend not in BACKEND_VIT:
            raise ValueError(f"unknown SAM backend {backend!r}; choose one of {sorted(BACKEND_VIT)}")
        path: Path = resolve_checkpoint(backend, checkpoint, model_dir)
        embed_dim, depth, heads, global_attn = VIT_CONFIGS[BACKEND_VIT[backend]]
        model = build_sam_model(embed_dim, depth, heads, global_attn)
        load_state_dict(model, path, what=backend)
        return cls(model, style="medsam" if backend == "medsam" else "sam", device=device, name=backend)

    def preprocess(self, image_255: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        size_full = self.image_size
        tensor = torch.from_numpy(np.ascontiguousarray(image_255, dtype=np.float32))[None, None]
        tensor = tensor.expand(1, 3, *tensor.shape[-2:])
        if self.style == "medsam":
            resized = resize_image(tensor, (size_full, size_full), shrink="bicubic", enlarge="bicubic")
            return min_max_normalize(resized).contiguous(), (size_full, size_full)
        size = longest_side_size(image_255.shape, size_full)
        resized = resize_image(tensor, size, shrink="bilinear").clamp(0, 255)
        normalized = (resized - self.pixel_mean) / self.pixel_std
        padded = F.pad(normalized, (0, size_full - size[1], 0, size_full - size[0]))
        return padded.contiguous(), size

    def postprocess_logits(self, low_res: torch.Tensor, emb: Embedding) -> torch.Tensor:
        if self.style == "medsam":
            return F.interpolate(low_res, emb.original_size, mode="bilinear", align_corners=False)
        return super().postprocess_logits(low_res, emb)
