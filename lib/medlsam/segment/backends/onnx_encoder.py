"""Run an image encoder with ONNX Runtime on the CPU (about 2x faster than eager fp32 for LiteMedSAM).

The encoder is exported once with the legacy TorchScript exporter (opset 17; the graph bakes in
batch size 1) into a cache folder, keyed by a fingerprint of the weights, written atomically, and
checked against the eager module right after export. Anything going wrong falls back to eager with
a warning: acceleration must never be the reason a segmentation fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "MEDLSAM_CACHE_DIR"
OPSET = 17
# Largest accepted |onnx - eager| relative to the embedding's scale after export.
MAX_RELATIVE_ERROR = 1e-3


def default_cache_dir() -> Path:
    """$MEDLSAM_CACHE_DIR, else ~/.cache/medlsam (exported graphs are not committed)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medlsam"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's parameter and buffer values and names."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class OnnxEncoder:
    """Callable (1, 3, S, S) tensor -> embedding tensor backed by an ONNX Runtime session."""

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
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        array = image.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    from medlsam.io import atomic_path

    with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated but gives the fastest graph
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["embedding"])


def onnx_encoder_for(module: torch.nn.Module, name: str, image_size: int,
                     cache_dir: str | os.PathLike | None = None, threads: int | None = None) -> OnnxEncoder | None:
    """Load (exporting first if needed) an ONNX Runtime encoder equivalent to `module`; None if unavailable."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        warnings.warn("onnxruntime is not installed: the encoder runs in eager PyTorch (about 2x slower)")
        return None
    threads = threads or max(1, torch.get_num_threads())
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    module = module.eval().cpu()
    path = folder / f"{name}-encoder-{weights_fingerprint(module)}-b1-s{image_size}-opset{OPSET}.onnx"
    example = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        fresh = not path.is_file()
        if fresh:
            log.info("exporting the %s encoder to ONNX: %s", name, path)
            with torch.no_grad():
                _export(module, example, path)
        encoder = OnnxEncoder(path, threads)
        if fresh:
            with torch.no_grad():
                expected = module(example)
            error = float((encoder(example) - expected).abs().max() / expected.abs().max().clamp(min=1e-6))
            if error > MAX_RELATIVE_ERROR:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"exported graph disagrees with eager (relative error {error:.2e})")
        return encoder
    except Exception as exc:  # export/runtime problems must not stop segmentation
        warnings.warn(f"ONNX acceleration of the {name} encoder unavailable ({exc}); using eager PyTorch")
        return None
