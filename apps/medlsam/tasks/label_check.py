"""Label uploads: read a label (NIfTI, NRRD, 3D Slicer's .seg.nrrd) onto its image's grid, name its
values by segment, and check a final label before a datastore stores it (it becomes a support).

How voxel values get their organ names, first rule that applies:
1. a `.seg.nrrd` header (`Segment<n>_Name`, `_LabelValue`, `_Layer`: 3D Slicer's own segment list);
2. `label_names` in the save params, `{name: value}` (what the app's infer results carry);
3. `label_info` in the save params, a list of `{"name": ..., "idx": ...}` (3D Slicer's Submit Label):
   value k is the k-th entry's name (Slicer exports segments as 1..N in list order; its `idx` counts
   skipped segments too, so it is only used when the values cannot be positions);
4. none of these: the values are label-map ids.
Names are matched to the label map; segments named `background` or `*_scribbles` are not organs.
Non-empty segments with names outside the label map are left out and reported (a support can only
teach organs the label map knows), as DICOM SEGs from other clients are (docs/DICOMWEB.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from medlsam.errors import InputError
from medlsam.io import declared_shape, image_geometry, is_nrrd, sitk_affine
from medlsam.labels import LabelMap
from medlsam.medlam.templates import check_label

LABEL_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")
NOT_ORGANS = ("background", "foreground_scribbles", "background_scribbles")
MAX_LAYERS = 32  # layers of an overlapping-segments .seg.nrrd (one per overlap level)


def label_suffix(file_name: str) -> str:
    """The file-type suffix of a label upload; InputError for formats the app does not read."""
    name = os.path.basename(file_name).lower()
    for suffix in LABEL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    if name.endswith(".json"):
        raise InputError(f"label file {os.path.basename(file_name)!r} is a JSON file (3D Slicer sends its ROI "
                         "markups as JSON when a detection model is selected): select `medlsam` under Auto "
                         "Segmentation and press Submit Label again, so the segments are sent as a label volume")
    raise InputError(f"label file {os.path.basename(file_name)!r} is not a label volume the app reads "
                     f"({', '.join(LABEL_SUFFIXES)})")


@dataclass
class LabelUpload:
    """A label on its image's grid with label-map ids, and how its values were named."""

    image: nib.Nifti1Image
    segments: dict[str, int] = field(default_factory=dict)  # organ -> label-map id, organs with voxels
    ignored: list[str] = field(default_factory=list)  # non-empty segments outside the label map
    naming: str = "label-map ids"
    unchanged: str | None = None  # the uploaded NIfTI file itself, when the label is stored as sent

    def report(self) -> dict[str, Any]:
        return {"segments": dict(self.segments), "ignored_segments": list(self.ignored), "naming": self.naming}


class FinalLabelCheck:
    """Reads label uploads onto their image and refuses (InputError, naming the problem) a final label
    the template store could not use: unreadable, another grid than its image, values without a
    name, no organ of the label map."""

    def __init__(self, label_map: LabelMap):
        self.label_map = label_map

    def __call__(self, image_file: str, label_file: str, image_id: str,
                 params: Mapping[str, Any] | None = None) -> LabelUpload:
        """The final label of `image_id`, checked, with label-map ids."""
        upload = self.read(image_file, label_file, image_id, params)
        try:
            check_label(np.asanyarray(upload.image.dataobj), upload.image.shape, self.label_map.to_dict(),
                        name=f"label for {image_id}")
        except ValueError as exc:
            ignored = f" (segments outside the label map: {', '.join(upload.ignored)})" if upload.ignored else ""
            raise InputError(f"label rejected: {exc}{ignored}") from exc
        return upload

    def read(self, image_file: str, label_file: str, image_id: str,
             params: Mapping[str, Any] | None = None) -> LabelUpload:
        """Any label upload (any tag) on the grid of `image_file`, values renamed to label-map ids when
        the upload names its segments."""
        try:
            label_suffix(label_file)
            image_shape, image_affine = image_geometry(image_file)
            _check_declared_shape(label_file, image_shape, image_id)  # before any voxel is decompressed
            data, affine, segments = _read_voxels(label_file)
        except (ValueError, InputError) as exc:
            # the upload's file name is the server's temporary name: meaningless to the client
            message = str(exc).replace(os.path.basename(label_file), "upload")
            raise InputError(f"label rejected: {message}") from exc
        if not np.allclose(affine, image_affine, atol=1e-3):
            raise InputError(f"label rejected: its affine differs from the affine of image {image_id!r} "
                             "(save the label on the image's own grid)")
        if not np.issubdtype(data.dtype, np.integer):
            if not np.all(np.isfinite(data)) or not np.array_equal(data, np.rint(data)):
                raise InputError("label rejected: it must hold integer label values")
        data = data.astype(np.int64, copy=False)
        if data.size and data.min() < 0:
            raise InputError(f"label rejected: negative label value {int(data.min())}")
        params = params or {}
        if segments:
            return self._by_masks(data, segments, image_affine, ".seg.nrrd segment list")
        if data.ndim == 4:
            raise InputError("label rejected: a multi-layer label needs the .seg.nrrd segment list in its header")
        names = _value_names(data, params)
        if names is None:
            upload = _as_label(data, image_affine, self.label_map, None, "label-map ids")
            if not is_nrrd(label_file):
                upload.unchanged = label_file  # nothing to rename or convert: kept byte for byte
            return upload
        naming, by_value = names
        return _as_label(data, image_affine, self.label_map, by_value, naming)

    def _by_masks(self, data: np.ndarray, segments: list[dict], affine, naming: str) -> LabelUpload:
        out = np.zeros(data.shape[:3], np.uint8)
        found, ignored = {}, []
        for seg in segments:
            layer = data[..., seg["layer"]] if data.ndim == 4 else data
            mask = layer == seg["value"]
            if not mask.any() or _not_organ(seg["name"]):
                continue
            organ = _organ(self.label_map, seg["name"])
            if organ is None:
                ignored.append(seg["name"])
                continue
            out[mask] = self.label_map[organ]
            found[organ] = self.label_map[organ]
        return LabelUpload(nib.Nifti1Image(out, affine), found, ignored, naming)


def _organ(label_map: LabelMap, name: str) -> str | None:
    """The label map's organ for a segment name (exact, else case-insensitive), None if unknown."""
    name = str(name).strip()
    if name in label_map:
        return name
    lowered = {n.lower(): n for n in label_map}
    return lowered.get(name.lower())


def _not_organ(name: str) -> bool:
    return str(name).strip().lower() in NOT_ORGANS


def _check_declared_shape(label_file: str, image_shape: tuple[int, ...], image_id: str) -> None:
    shape = declared_shape(label_file)
    extra = shape[3:]
    layers_ok = not extra or (len(extra) == 1 and 1 <= extra[0] <= MAX_LAYERS)
    if tuple(shape[:3]) != tuple(image_shape) or not layers_ok:
        raise InputError(f"its header declares shape {list(shape)}, but image {image_id!r} has shape "
                         f"{list(image_shape)}")


def _read_voxels(label_file: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Voxels as array[i, j, k(, layer)], the RAS affine, and the .seg.nrrd segment list (or [])."""
    if not is_nrrd(label_file):
        img = nib.load(label_file)
        data = np.asanyarray(img.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        return data, img.affine, []
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(label_file))
    except RuntimeError as exc:
        raise InputError(f"{Path(label_file).name} is not a readable NRRD file") from exc
    array = sitk.GetArrayFromImage(image)  # (k, j, i) or (k, j, i, layers)
    array = np.transpose(array, (2, 1, 0) + tuple(range(3, array.ndim)))
    if image.GetDimension() != 3:
        raise InputError(f"{Path(label_file).name} is a {image.GetDimension()}D image, not a 3D label")
    return array, sitk_affine(image), _seg_nrrd_segments(image)


def _seg_nrrd_segments(image) -> list[dict]:
    """3D Slicer's segment list from a .seg.nrrd header: [{name, value, layer}], [] if there is none."""
    keys = set(image.GetMetaDataKeys())
    segments = []
    n = 0
    while f"Segment{n}_Name" in keys or f"Segment{n}_ID" in keys:
        prefix = f"Segment{n}_"
        name = image.GetMetaData(prefix + "Name") if prefix + "Name" in keys else image.GetMetaData(prefix + "ID")
        try:
            value = int(image.GetMetaData(prefix + "LabelValue")) if prefix + "LabelValue" in keys else n + 1
            layer = int(image.GetMetaData(prefix + "Layer")) if prefix + "Layer" in keys else 0
        except ValueError as exc:
            raise InputError(f"the .seg.nrrd header entry of segment {name!r} is malformed: {exc}") from exc
        segments.append({"name": name, "value": value, "layer": layer})
        n += 1
    layers = image.GetNumberOfComponentsPerPixel()
    for seg in segments:
        if not 0 <= seg["layer"] < layers:
            raise InputError(f"segment {seg['name']!r} is on layer {seg['layer']}, the file has {layers}")
    return segments


def _value_names(data: np.ndarray, params: Mapping[str, Any]) -> tuple[str, dict[int, str]] | None:
    """(naming rule, {value: segment name}) from the save params, or None if they name nothing."""
    names = params.get("label_names")
    if isinstance(names, Mapping) and names:
        try:
            return "label_names", {int(v): str(k) for k, v in names.items()}
        except (TypeError, ValueError):
            raise InputError(f"label rejected: label_names must map names to integer values, got {names!r}") from None
    info = params.get("label_info")
    if not isinstance(info, list) or not info:
        return None
    if not all(isinstance(e, Mapping) and e.get("name") for e in info):
        raise InputError("label rejected: each label_info entry needs a 'name'")
    present = [int(v) for v in np.unique(data) if v != 0]
    if not present or max(present) <= len(info):
        return "label_info order", {k + 1: str(e["name"]) for k, e in enumerate(info)}
    by_idx = {}
    for e in info:
        try:
            by_idx[int(e["idx"])] = str(e["name"])
        except (KeyError, TypeError, ValueError):
            by_idx = {}
            break
    if by_idx and set(present) <= set(by_idx):
        return "label_info idx", by_idx
    raise InputError(f"label rejected: it holds values {present} but label_info names {len(info)} segments")


def _as_label(data: np.ndarray, affine, label_map: LabelMap, by_value: dict[int, str] | None,
              naming: str) -> LabelUpload:
    present = [int(v) for v in np.unique(data) if v != 0]
    if by_value is None:
        if present and max(present) > 255:
            raise InputError(f"label rejected: label value {max(present)} does not fit a label map (1..255)")
        found = {n: label_map[n] for n in (label_map.name_of(v) for v in present) if n}
        return LabelUpload(nib.Nifti1Image(data.astype(np.uint8), affine), found, [], naming)
    missing = [v for v in present if v not in by_value]
    if missing:
        raise InputError(f"label rejected: label values {missing} have no segment name ({naming})")
    lut = np.zeros(max(present, default=0) + 1, np.uint8)
    found, ignored = {}, []
    for value in present:
        name = by_value[value]
        if _not_organ(name):
            continue
        organ = _organ(label_map, name)
        if organ is None:
            ignored.append(name)
            continue
        lut[value] = label_map[organ]
        found[organ] = label_map[organ]
    return LabelUpload(nib.Nifti1Image(lut[data], affine), found, ignored, naming)
