"""The box-prompt backend interface shared by LiteMedSAM, SAM and MedSAM.

A backend encodes one windowed axial slice (grey levels 0-255, shape (H, W)) into an embedding and
decodes any number of box prompts (optionally with points) against that embedding in one batched
call, returning logits on the slice's own (H, W) grid. Counters make the cost observable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Embedding:
    """An encoded slice plus the geometry needed to map prompts and masks."""

    features: torch.Tensor  # (1, C, h, w) on the backend's device
    original_size: tuple[int, int]  # (H, W) of the slice
    input_size: tuple[int, int]  # (h', w') of the resized image inside the model input (before padding)


class SamFamilyBackend:
    """Common machinery: a SAM prompt encoder + mask decoder fed by some image encoder.

    Subclasses define `preprocess` (slice -> model input tensor and resized size) and may
    override `postprocess_logits`. `encoder` is any callable image tensor -> embedding tensor,
    so an accelerated runtime can replace the eager module.
    """

    name = "sam-family"

    def __init__(self, image_encoder: torch.nn.Module, prompt_encoder: torch.nn.Module,
                 mask_decoder: torch.nn.Module, image_size: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.image_encoder = image_encoder.to(self.device).eval()
        self.prompt_encoder = prompt_encoder.to(self.device).eval()
        self.mask_decoder = mask_decoder.to(self.device).eval()
        self.image_size = int(image_size)
        self.encoder: Callable[[torch.Tensor], torch.Tensor] = self.image_encoder
        # Optional faster path for box-only prompts: (embedding, boxes in input pixels) -> low-res logits.
        self.box_decoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.accelerated = False
        self.encoder_calls = 0
        self.decoder_calls = 0
        self.encode_seconds = 0.0
        self.decode_seconds = 0.0

    # -- to be provided by each model family -------------------------------------------------
    def preprocess(self, image_255: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W) grey levels in [0, 255] -> ((1, 3, S, S) model input, resized (h', w'))."""
        raise NotImplementedError

    def postprocess_logits(self, low_res: torch.Tensor, emb: Embedding) -> torch.Tensor:
        """(N, 1, s, s) low-res logits -> (N, 1, H, W): upscale to the input, crop the padding, resize."""
        if low_res.shape[-1] != self.image_size:
            low_res = F.interpolate(low_res, (self.image_size, self.image_size), mode="bilinear",
                                    align_corners=False)
        h, w = emb.input_size
        cropped = low_res[..., :h, :w]
        return F.interpolate(cropped, emb.original_size, mode="bilinear", align_corners=False)

    # -- shared -------------------------------------------------------------------------------
    def reset_counters(self) -> None:
        self.encoder_calls = self.decoder_calls = 0
        self.encode_seconds = self.decode_seconds = 0.0

    @torch.inference_mode()
    def encode(self, image_255: np.ndarray) -> Embedding:
        """Encode one windowed slice (H, W) with grey levels in [0, 255]."""
        image_255 = np.asarray(image_255, dtype=np.float32)
        if image_255.ndim != 2 or min(image_255.shape) < 1:
            raise ValueError(f"expected one 2D slice, got shape {image_255.shape}")
        start = time.perf_counter()
        tensor, input_size = self.preprocess(image_255)
        features = self.encoder(tensor.to(self.device))
        self.encoder_calls += 1
        self.encode_seconds += time.perf_counter() - start
        return Embedding(features=features, original_size=tuple(image_255.shape), input_size=input_size)

    def _scale_xy(self, emb: Embedding) -> np.ndarray:
        (h0, w0), (h1, w1) = emb.original_size, emb.input_size
        return np.array([w1 / w0, h1 / h0], dtype=np.float32)

    def decode(self, emb: Embedding, boxes_xyxy: np.ndarray | None = None,
               points_xy: np.ndarray | None = None, point_labels: np.ndarray | None = None) -> np.ndarray:
        """Logits (N, H, W) float32 for N prompts decoded in one call.

        boxes_xyxy: (N, 4) inclusive pixel coordinates (x0, y0, x1, y1) on the slice.
        points_xy: (N, P, 2) pixel coordinates (x, y), with point_labels (N, P): 1 foreground, 0 background.
        """
        return self.decode_scored(emb, boxes_xyxy, points_xy, point_labels)[0]

    @torch.inference_mode()
    def decode_scored(self, emb: Embedding, boxes_xyxy: np.ndarray | None = None,
                      points_xy: np.ndarray | None = None,
                      point_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like `decode`, plus the decoder's own IoU prediction per prompt: ((N, H, W) logits, (N,) scores)."""
        if boxes_xyxy is None and points_xy is None:
            raise ValueError("decode needs boxes, points or both")
        scale = self._scale_xy(emb)
        boxes_t = points = None
        n = None
        if boxes_xyxy is not None:
            boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4) * np.tile(scale, 2)
            n = len(boxes)
            boxes_t = torch.as_tensor(boxes, device=self.device)
        if points_xy is not None:
            pts = np.asarray(points_xy, dtype=np.float32)
            labels = np.asarray(point_labels, dtype=np.float32)
            if pts.ndim != 3 or pts.shape[-1] != 2 or labels.shape != pts.shape[:2]:
                raise ValueError("points must be (N, P, 2) with labels (N, P)")
            if n is not None and pts.shape[0] != n:
                raise ValueError("points and boxes need the same number of prompts N")
            n = pts.shape[0]
            # SAM maps a pixel's centre with +0.5 inside the prompt encoder itself.
            points = (torch.as_tensor(pts * scale, device=self.device),
                      torch.as_tensor(labels, device=self.device))
        if n == 0:
            return np.zeros((0, *emb.original_size), dtype=np.float32), np.zeros(0, np.float32)
        start = time.perf_counter()
        if points is None and self.box_decoder is not None:
            low_res, iou = self.box_decoder(emb.features, boxes_t)
            low_res = low_res.to(self.device)
        else:
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes_t, masks=None)
            low_res, iou = self.mask_decoder(
                image_embeddings=emb.features,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        logits = self.postprocess_logits(low_res, emb)[:, 0]
        self.decoder_calls += 1
        self.decode_seconds += time.perf_counter() - start
        return logits.float().cpu().numpy(), iou.reshape(n).float().cpu().numpy()


def resize_image(tensor: torch.Tensor, size: tuple[int, int], shrink: str = "area",
                 enlarge: str = "bilinear") -> torch.Tensor:
    """Resize (1, C, H, W) to `size` with mode `shrink` (antialiased) or `enlarge`."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    if size[0] <= tensor.shape[-2] and size[1] <= tensor.shape[-1]:
        if shrink == "area":
            return F.interpolate(tensor, size, mode="area")
        return F.interpolate(tensor, size, mode=shrink, align_corners=False, antialias=True)
    return F.interpolate(tensor, size, mode=enlarge, align_corners=False)


def longest_side_size(shape: tuple[int, int], target: int) -> tuple[int, int]:
    """(h', w') with the longest side scaled to `target`, aspect kept, rounded half up."""
    h, w = shape
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def min_max_normalize(tensor: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by the tensor's own range (a constant image becomes zeros)."""
    lo, hi = tensor.min(), tensor.max()
    return (tensor - lo) / torch.clamp(hi - lo, min=1e-8)
