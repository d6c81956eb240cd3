"""The support templates of a batch run: from a template file, or computed from annotated studies."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from medlsam.io import load_nifti

log = logging.getLogger(__name__)


def _supports_key(embedder, pairs: Sequence[tuple[Path, Path]], label_map: dict, max_supports: int,
                  organs: Sequence[str] | None) -> str:
    files = [(str(Path(i).resolve()), str(Path(l).resolve()), os.stat(l).st_mtime_ns) for i, l in pairs]
    content = {"weights": embedder.fingerprint, "files": files, "label_map": label_map, "max_supports": max_supports,
               "organs": sorted(organs) if organs else None}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def build_templates(embedder, pairs: Sequence[tuple[Path, Path]], label_map: dict[str, int], max_supports: int = 5,
                    cache: Path | None = None, progress: bool = True, organs: Sequence[str] | None = None):
    """(templates, key) from (image, label) support pairs, for `organs` only if given (cheaper); reused
    from `cache` (its .json holds the key) when the supports, label map, organs and weights are unchanged."""
    from medlsam.medlam.templates import TemplateSet, compute_support
    from medlsam.batch.sources import strip_nifti

    if not pairs:
        raise ValueError("no support studies: give --templates, --support IMAGE LABEL or a --datastore with final labels")
    if organs:
        unknown = [o for o in organs if o not in label_map]
        if unknown:
            raise ValueError(f"organ(s) {unknown} are not in the label map ({', '.join(label_map)})")
    key = _supports_key(embedder, pairs, label_map, max_supports, organs)
    key_file = cache.with_suffix(".json") if cache else None
    if cache and cache.exists() and key_file.exists() and json.loads(key_file.read_text()).get("key") == key:
        try:
            return TemplateSet.load(cache, expected_fingerprint=embedder.fingerprint), key
        except ValueError as exc:
            log.warning("rebuilding templates %s: %s", cache, exc)
    templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict(), max_supports=max_supports)
    for image_path, label_path in tqdm(pairs, desc="supports", unit="study", disable=None if progress else True):
        image, label = load_nifti(image_path), load_nifti(label_path, what="label")
        study_id = strip_nifti(Path(image_path).name)
        held = set(np.unique(np.asanyarray(label.dataobj)).astype(int).tolist())
        if organs and not held & {label_map[o] for o in organs}:
            continue  # compute_support needs at least one organ to cut
        templates.add(compute_support(embedder, image, label, label_map, study_id,
                                      organs=list(organs) if organs else None), label_map)
    if not templates.organs:
        raise ValueError("the supports hold no organ of the label map: nothing to localize with")
    return templates, key


def save_templates(templates, path: Path, key: str | None = None) -> None:
    """Write the run's templates (workers load them) and the key that lets a rerun reuse them."""
    from medlsam.io import atomic_write_json

    templates.save(path)
    if key:
        atomic_write_json(path.with_suffix(".json"), {"key": key})
