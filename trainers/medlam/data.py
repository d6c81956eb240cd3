"""Training inputs: find the studies, preprocess each once onto the MedLAM grid, cache as .npy."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from medlsam.geometry import MedLAMGrid
from medlsam.io import atomic_path, is_nifti, load_image

log = logging.getLogger("medlsam.train")


def find_images(sources: list[str]) -> list[str]:
    """Expand folders (their NIfTI files, recursively; label files skipped) and globs."""
    found: list[str] = []
    for source in sources:
        if any(ch in source for ch in "*?["):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {source!r}")
            found.extend(m for m in matches if is_nifti(m))
        elif os.path.isdir(source):
            files = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and is_nifti(p))
            found.extend(f for f in files if not _looks_like_label(f))
        elif os.path.isfile(source):
            found.append(source)
        else:
            raise FileNotFoundError(f"training data not found: {source}")
    if not found:
        raise ValueError(f"no NIfTI images (.nii / .nii.gz) found in {sources}")
    return list(dict.fromkeys(found))


def _looks_like_label(path: str) -> bool:
    parts = {p.lower() for p in Path(path).parts[:-1]}
    name = Path(path).name.lower()
    return bool(parts & {"labels", "labelstr", "labelsts", "label", "masks"}) or "_label" in name or "_seg" in name


def cache_key(path: str, spacing_mm, patch_size) -> str:
    stat = os.stat(path)
    text = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{tuple(spacing_mm)}|{tuple(patch_size)}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cache_path(cache_dir, path: str, spacing_mm, patch_size) -> Path:
    stem = Path(path).name.split(".")[0]
    return Path(cache_dir) / f"{stem}-{cache_key(path, spacing_mm, patch_size)}.npy"


def prepare_volume(path: str, spacing_mm, patch_size, cache_dir) -> Path:
    """Preprocess one study onto the MedLAM grid (cached); returns the .npy path."""
    target = cache_path(cache_dir, path, spacing_mm, patch_size)
    if not target.exists():
        grid = MedLAMGrid.from_nifti(load_image(path), spacing_mm=spacing_mm, patch_size=patch_size, name=Path(path).name)
        with atomic_path(target) as tmp:
            np.save(tmp, grid.array.astype(np.float32))
    return target


def prepare_volumes(paths: list[str], spacing_mm, patch_size, cache_dir, progress: bool = True) -> list[Path]:
    """Preprocess every study (skipping, with a warning, those that are not usable CT)."""
    ready, skipped = [], []
    iterator = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="preprocessing", unit="study", mininterval=5)
    for path in iterator:
        try:
            ready.append(prepare_volume(path, spacing_mm, patch_size, cache_dir))
        except (ValueError, FileNotFoundError) as exc:
            skipped.append(path)
            log.warning("skipping %s: %s", path, exc)
    if not ready:
        raise ValueError(f"none of the {len(paths)} training images is usable CT (see the warnings)")
    log.info("preprocessed %d studies (%d skipped) into %s", len(ready), len(skipped), cache_dir)
    return ready


def load_volumes(npy_paths: list[Path]) -> list[np.ndarray]:
    return [np.load(p) for p in npy_paths]
