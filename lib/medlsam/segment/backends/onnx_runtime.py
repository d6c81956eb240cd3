"""Run the encoder and the box decoder with ONNX Runtime on the CPU (about 2x faster than eager fp32).

Each graph is exported once with the legacy TorchScript exporter (opset 17; the encoder graph bakes
in batch size 1, the decoder takes any number of boxes) into a cache folder, keyed by a fingerprint
of the weights, written atomically, and checked against the eager module right after export.
Anything going wrong falls back to eager with a warning: acceleration must never be the reason a
segmentation fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "MEDLSAM_CACHE_DIR"
OPSET = 17
# Largest accepted |onnx - eager| relative to the output's scale after export.
MAX_RELATIVE_ERROR = 1e-3


def default_cache_dir() -> Path:
    """$MEDLSAM_CACHE_DIR, else ~/.cache/medlsam (exported graphs are not committed)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medlsam"


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A short hash of the modules' parameter and buffer names and values."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class BoxDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder for box prompts only: (embedding, boxes) -> (low-res logits, IoU scores)."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, iou = self.mask_decoder(
            image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return low_res, iou


class OnnxGraph:
    """Callable tensors -> output tensor (a tuple of them for several outputs), backed by an ONNX Runtime
    CPU session."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning threads steal the CPU from other processes on a shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = {name: t.detach().cpu().numpy().astype(np.float32, copy=False)
                 for name, t in zip(self.input_names, tensors)}
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def cached_onnx_graph(module: torch.nn.Module, examples: Sequence[torch.Tensor], file_stem: str,
                      input_names: Sequence[str], dynamic_axes: dict | None = None,
                      output_names: Sequence[str] = ("output",), cache_dir: str | os.PathLike | None = None,
                      threads: int | None = None) -> OnnxGraph | None:
    """Load `<cache>/<file_stem>-<fingerprint>-opset17.onnx`, exporting `module` first if needed.

    Returns None (after a warning) when onnxruntime is missing or export/verification fails.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        warnings.warn("onnxruntime is not installed: the model runs in eager PyTorch (about 2x slower)")
        return None
    from medlsam.io import atomic_path

    threads = threads or max(1, torch.get_num_threads())
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    module = module.eval()
    path = folder / f"{file_stem}-{weights_fingerprint(module)}-opset{OPSET}.onnx"
    try:
        fresh = not path.is_file()
        if fresh:
            log.info("exporting %s to ONNX: %s", file_stem, path)
            with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the legacy exporter is deprecated but gives the fastest graph
                torch.onnx.export(module, tuple(examples), str(tmp), dynamo=False, opset_version=OPSET,
                                  input_names=list(input_names), output_names=list(output_names),
                                  dynamic_axes=dynamic_axes)
        graph = OnnxGraph(path, threads)
        if fresh:
            with torch.no_grad():
                expected = module(*examples)
            got = graph(*examples)
            pairs = zip(got, expected) if isinstance(expected, tuple) else [(got, expected)]
            error = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) for a, b in pairs)
            if error > MAX_RELATIVE_ERROR:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"exported graph disagrees with eager (relative error {error:.2e})")
        return graph
    except Exception as exc:  # export/runtime problems must not stop segmentation
        warnings.warn(f"ONNX acceleration of {file_stem} unavailable ({exc}); using eager PyTorch")
        return None


def onnx_encoder_for(image_encoder: torch.nn.Module, name: str, image_size: int, cache_dir=None,
                     threads=None) -> OnnxGraph | None:
    """ONNX Runtime image encoder: (1, 3, S, S) -> embedding."""
    example = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return cached_onnx_graph(image_encoder, [example], f"{name}-encoder-b1-s{image_size}", ["image"],
                             cache_dir=cache_dir, threads=threads)


def onnx_box_decoder_for(prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, name: str,
                         embedding_shape: Sequence[int], image_size: int, cache_dir=None,
                         threads=None) -> OnnxGraph | None:
    """ONNX Runtime box decoder: ((1, C, h, w) embedding, (N, 4) boxes in input pixels) -> ((N, 1, s, s) logits,
    (N, 1) predicted IoU)."""
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(tuple(embedding_shape), generator=gen)
    corners = torch.rand(3, 2, 2, generator=gen).sort(dim=1).values * (image_size - 1)
    boxes = corners.reshape(3, 4)  # (x0, y0, x1, y1): the sorted corner points
    return cached_onnx_graph(BoxDecoder(prompt_encoder, mask_decoder), [embedding, boxes],
                             f"{name}-box-decoder-iou-s{image_size}", ["embedding", "boxes"],
                             dynamic_axes={"boxes": {0: "n"}, "output": {0: "n"}, "iou": {0: "n"}},
                             output_names=("output", "iou"),
                             cache_dir=cache_dir, threads=threads)
