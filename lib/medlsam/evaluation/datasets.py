"""Labeled datasets for evaluation: image/label pairs from folders, file lists or list files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsam.io import is_nifti


@dataclass(frozen=True)
class LabeledStudy:
    study_id: str
    image: Path
    label: Path


def _strip_nifti(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_paths(entries: Sequence[str | Path], what: str) -> tuple[list[Path], bool]:
    """Folders -> their NIfTI files (sorted), .txt files -> the paths they list, files as given.

    Returns the paths and whether they came from folders only (then pairing goes by file name).
    """
    paths: list[Path] = []
    from_folders = True
    for entry in entries:
        entry = Path(entry)
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.is_file() and is_nifti(p))
            if not found:
                raise ValueError(f"{what} folder {entry} holds no .nii / .nii.gz files")
            paths.extend(found)
            continue
        from_folders = False
        if entry.suffix == ".txt":
            if not entry.is_file():
                raise FileNotFoundError(f"{what} list file not found: {entry}")
            listed = [line.strip() for line in entry.read_text().splitlines()]
            paths.extend((entry.parent / line) if not Path(line).is_absolute() else Path(line)
                         for line in listed if line and not line.startswith("#"))
        else:
            paths.append(entry)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what} file(s) not found: {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if not paths:
        raise ValueError(f"no {what} files given")
    return paths, from_folders


def study_ids(paths: Sequence[Path]) -> list[str]:
    """Short unique ids: the file name without .nii(.gz), prefixed by parent folders while ambiguous.

    WORD-style `imagesTs/word_0001.nii.gz` -> `word_0001`; StructSeg-style `1/data.nii.gz`,
    `2/data.nii.gz` -> `1_data`, `2_data`.
    """
    parts = [list(p.resolve().parts[:-1]) + [_strip_nifti(p.name)] for p in paths]
    depth = 1
    while True:
        ids = ["_".join(p[-depth:]) for p in parts]
        if len(set(ids)) == len(ids) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    if len(set(ids)) != len(ids):
        raise ValueError("the same image is listed twice")
    return ids


def pair_studies(images: Sequence[str | Path], labels: Sequence[str | Path]) -> list[LabeledStudy]:
    """Pair images with ground-truth labels.

    Folders are paired by file name (a label folder may hold extra files); explicit files and
    .txt lists are paired in order and must have the same length.
    """
    image_paths, image_folders = expand_paths(images, "image")
    label_paths, label_folders = expand_paths(labels, "label")
    if image_folders and label_folders:
        by_name = {p.name: p for p in label_paths}
        unlabeled = [p.name for p in image_paths if p.name not in by_name]
        if unlabeled:
            raise ValueError(f"no label with the same file name for image(s) {', '.join(unlabeled[:5])}"
                             + (f" and {len(unlabeled) - 5} more" if len(unlabeled) > 5 else ""))
        label_paths = [by_name[p.name] for p in image_paths]
    elif len(image_paths) != len(label_paths):
        raise ValueError(f"{len(image_paths)} images but {len(label_paths)} labels: lists must pair up in order")
    return [LabeledStudy(i, p, l) for i, p, l in zip(study_ids(image_paths), image_paths, label_paths)]


def split_supports(studies: Sequence[LabeledStudy], n_supports: int = 5, support_ids: Sequence[str] | None = None,
                   seed: int = 0) -> tuple[list[LabeledStudy], list[LabeledStudy]]:
    """(supports, queries): the named studies, or `n_supports` drawn with `seed`; the rest are queries."""
    if support_ids:
        known = {s.study_id: s for s in studies}
        unknown = [i for i in support_ids if i not in known]
        if unknown:
            raise ValueError(f"support id(s) {unknown} not among the studies ({', '.join(list(known)[:8])}...)")
        chosen = set(support_ids)
    else:
        if not 0 <= n_supports < len(studies):
            raise ValueError(f"{n_supports} supports requested but the dataset has {len(studies)} studies: "
                             "at least one must remain as a query")
        order = np.random.default_rng(seed).permutation(len(studies))[:n_supports]
        chosen = {studies[i].study_id for i in order}
    supports = [s for s in studies if s.study_id in chosen]
    queries = [s for s in studies if s.study_id not in chosen]
    if not queries:
        raise ValueError("every study is a support: nothing left to evaluate")
    return supports, queries
