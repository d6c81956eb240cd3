"""What 3D Slicer and OHIF send, read without a server: NRRD and NIfTI volumes, Slicer's ROI layout,
label uploads named by segment (label_info, label_names, .seg.nrrd), the header check that refuses
a label before decompressing it, `--conf labels`, 2D slice choice, Dice and strategies.
"""

from __future__ import annotations

import gzip
import json
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medlsam.errors import ConfigurationError, InputError
from medlsam.io import declared_shape, load_image, sitk_affine
from medlsam.labels import LabelMap
from medlsam.synthetic import generate_study
from server_process import APP_DIR

sys.path.insert(0, str(APP_DIR))
from fastapi import HTTPException  # noqa: E402
from tasks.infer_sam import Prompt, SAM2DInfer  # noqa: E402
from tasks.label_check import FinalLabelCheck  # noqa: E402
from tasks.requests import box_param, roi_param  # noqa: E402
from tasks.scoring import per_organ_dice  # noqa: E402
from tasks.settings import AppSettings, parse_labels  # noqa: E402
from tasks.strategies import Last, study_score  # noqa: E402

# a label map whose ids are not 1..N, as users' maps often are
SPARSE = LabelMap({"liver": 10, "spleen": 20, "kidney_left": 30, "kidney_right": 40})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    s = generate_study(3, preset="tiny", orientation="LPS")  # i and j point against RAS, as most CT
    image = folder / "ct.nii.gz"
    nib.save(s.image, str(image))
    return {"folder": folder, "image": image, "nifti": s.image, "label": np.asanyarray(s.label.dataobj)}


def write_nrrd(array_ijk: np.ndarray, like: nib.Nifti1Image, path, compress=True, meta=None, vector=False):
    """A NRRD on the grid of `like` (array[i, j, k] or [i, j, k, layer])."""
    data = np.transpose(array_ijk, (2, 1, 0, 3) if vector else (2, 1, 0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=vector)
    ref = sitk.ReadImage(str(like.get_filename())) if like.get_filename() else None
    img.CopyInformation(ref)
    for key, value in (meta or {}).items():
        img.SetMetaData(key, str(value))
    sitk.WriteImage(img, str(path), compress)
    return path


# --- images: NIfTI and NRRD give the same voxels and world coordinates ---------------------------
@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_nrrd_copy_of_a_nifti_loads_identically(tmp_path, orientation):
    s = generate_study(4, preset="tiny", orientation=orientation)
    nii = tmp_path / "a.nii.gz"
    nib.save(s.image, str(nii))
    nrrd = tmp_path / "a.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(nrrd), True)  # what 3D Slicer writes for this volume
    a, b = load_image(nii), load_image(nrrd)
    assert a.shape == b.shape == declared_shape(nrrd)
    assert np.allclose(a.affine, b.affine, atol=1e-5)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_unreadable_and_2d_nrrd_images_are_refused(tmp_path):
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ngarbage\n")
    with pytest.raises(InputError, match="not a readable NRRD"):
        load_image(bad)
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 40, 40), np.int16)), str(flat))
    with pytest.raises(InputError, match="2D image"):
        load_image(flat)


# --- 3D Slicer's roi ----------------------------------------------------------------------------
def slicer_roi(affine: np.ndarray, center_ras, size_ras) -> list[int]:
    """What 3D Slicer's getROIPointsXYZ sends for an ROI node (MONAILabel.py, 0.8.5)."""
    ras_to_ijk = np.linalg.inv(affine)
    lo = [c - s / 2 for c, s in zip(center_ras, size_ras)]
    hi = [c + s / 2 for c, s in zip(center_ras, size_ras)]
    lo_ijk = [round(v) for v in (ras_to_ijk @ np.array([*lo, 1.0]))[:3]]
    hi_ijk = [round(v) for v in (ras_to_ijk @ np.array([*hi, 1.0]))[:3]]
    return [v for pair in zip(lo_ijk, hi_ijk) for v in pair]


def test_slicer_roi_with_reversed_pairs_is_the_box_it_shows(study):
    img = study["nifti"]
    ijk_lo, ijk_hi = np.array([20, 30, 10]), np.array([60, 70, 40])
    corners = nib.affines.apply_affine(img.affine, np.array([ijk_lo, ijk_hi]))
    roi = slicer_roi(img.affine, corners.mean(0), np.abs(corners[1] - corners[0]))
    assert roi[0] > roi[1] and roi[2] > roi[3] and roi[4] < roi[5]  # LPS volume: i and j pairs reversed
    assert roi_param(roi, img.shape) == ([20, 30, 10], [60, 70, 40])
    assert roi_param([20, 60, 30, 70, 10, 40], img.shape) == ([20, 30, 10], [60, 70, 40])
    assert box_param([60, 70, 40, 20, 30, 10], img.shape) == ([20, 30, 10], [60, 70, 40])
    # beyond the image: clamped; entirely outside or flat: 422
    assert roi_param([-5, 500, 30, 70, 10, 40], img.shape)[1][0] == img.shape[0] - 1
    for bad in ([900, 950, 900, 950, 900, 950], [20, 20, 30, 70, 10, 40], [1, 2, 3]):
        with pytest.raises(HTTPException) as err:
            roi_param(bad, img.shape)
        assert err.value.status_code == 422


def test_box_from_clicks_frames_the_clicked_organ(study):
    """A click without a box: the box grows over the clicked tissue (LiteMedSAM needs a box)."""
    from medlsam.geometry import AxialView
    from medlsam.segment.point_box import box_from_clicks
    from medlsam.synthetic import LABEL_MAP

    view = AxialView.from_nifti(study["nifti"])
    labels = AxialView.from_nifti(nib.Nifti1Image(study["label"].astype(np.int16), study["nifti"].affine)).array
    liver = labels == LABEL_MAP["liver"]
    z = int(np.argmax(liver.sum((1, 2))))
    inside = ndimage.distance_transform_edt(liver[z])
    click = np.unravel_index(int(np.argmax(inside)), inside.shape)
    y0, x0, y1, x1 = box_from_clicks(view.array[z], [click], spacing_yx=view.spacing_zyx[1:])
    ys, xs = np.nonzero(liver[z])
    covered = ((ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)).mean()
    organ_area = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
    print(f"\nbox from a liver click: covers {covered:.2f} of the liver, {(y1 - y0 + 1) * (x1 - x0 + 1) / organ_area:.2f}"
          " x its box")
    assert covered > 0.9 and (y1 - y0 + 1) * (x1 - x0 + 1) < 3 * organ_area
    assert box_from_clicks(view.array[z], []) is None


def test_sam_2d_slice_choice():
    choose = SAM2DInfer.choose_slice
    roi = Prompt(box=([10, 10, 20], [50, 50, 30]))
    assert choose(roi, 25, 80) == 25  # Slicer's clicked slice
    assert choose(roi, 163, 80) == 25  # a millimetre offset (ROI only): the ROI's middle slice
    assert choose(Prompt(foreground=[[5, 5, 12], [6, 6, 14]]), None, 80) == 14  # the last point's slice
    assert choose(Prompt(background=[[5, 5, 9]]), -1, 80) == 9
    with pytest.raises(HTTPException):
        choose(Prompt(), None, 80)


# --- label uploads ------------------------------------------------------------------------------
def slicer_export(study, names: list[str], organs: dict[str, int]):
    """A label as 3D Slicer exports it: segment k (after skipped ones) gets value k."""
    out = np.zeros(study["label"].shape, np.uint8)
    value = 0
    for name in names:
        if name == "background":
            continue
        value += 1
        if name in organs:
            out[study["label"] == organs[name]] = value
        elif name == "Segment_1":  # a user's own segment: a corner block
            out[:8, :8, :8] = value
    return out


def test_slicer_label_info_names_values_by_position(study, tmp_path):
    from medlsam.synthetic import LABEL_MAP

    names = ["background", "kidney_left", "liver", "Segment_1", "spleen"]
    label = slicer_export(study, names, LABEL_MAP)
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, study["nifti"].affine), str(path))
    label_info = [{"name": n, "idx": i + 1} for i, n in enumerate(names) if n != "background"]  # idx off by one
    upload = FinalLabelCheck(SPARSE)(str(study["image"]), str(path), "ct", {"label_info": label_info})
    data = np.asanyarray(upload.image.dataobj)
    assert upload.naming == "label_info order"
    assert upload.segments == {"kidney_left": 30, "liver": 10, "spleen": 20}
    assert upload.ignored == ["Segment_1"]
    for organ in ("liver", "spleen", "kidney_left"):
        assert np.array_equal(data == SPARSE[organ], study["label"] == LABEL_MAP[organ])
    assert not data[:8, :8, :8].any() or set(np.unique(data[:8, :8, :8])) <= {0, 10, 20, 30}
    # the same values named through label_names (what the app's own results carry)
    by_names = FinalLabelCheck(SPARSE)(str(study["image"]), str(path), "ct",
                                      {"label_names": {"kidney_left": 1, "liver": 2, "Segment_1": 3, "spleen": 4}})
    assert np.array_equal(np.asanyarray(by_names.image.dataobj), data)


def test_label_info_with_sparse_values_uses_idx_and_missing_names_are_refused(study, tmp_path):
    label = np.zeros(study["label"].shape, np.uint8)
    label[study["label"] == 1] = 10
    label[study["label"] == 3] = 30
    path = tmp_path / "sparse.nii.gz"
    nib.save(nib.Nifti1Image(label, study["nifti"].affine), str(path))
    check = FinalLabelCheck(SPARSE)
    upload = check(str(study["image"]), str(path), "ct", {"label_info": [{"name": "liver", "idx": 10},
                                                                        {"name": "kidney_left", "idx": 30}]})
    assert upload.naming == "label_info idx" and upload.segments == {"liver": 10, "kidney_left": 30}
    with pytest.raises(InputError, match="values"):
        check(str(study["image"]), str(path), "ct", {"label_info": [{"name": "liver", "idx": 1}]})
    # without names, values are label-map ids
    assert check(str(study["image"]), str(path), "ct").segments == {"liver": 10, "kidney_left": 30}


def test_nrrd_and_seg_nrrd_labels(study, tmp_path):
    from medlsam.synthetic import LABEL_MAP

    liver, spleen = study["label"] == LABEL_MAP["liver"], study["label"] == LABEL_MAP["spleen"]
    plain = np.where(liver, 1, np.where(spleen, 2, 0)).astype(np.uint8)
    nrrd = write_nrrd(plain, nib.load(str(study["image"])), tmp_path / "label.nrrd")
    check = FinalLabelCheck(SPARSE)
    upload = check(str(study["image"]), str(nrrd), "ct", {"label_info": [{"name": "liver"}, {"name": "spleen"}]})
    assert np.array_equal(np.asanyarray(upload.image.dataobj) == 10, liver)
    # .seg.nrrd with overlapping segments on two layers, a background segment, names in the header
    layers = np.zeros(liver.shape + (2,), np.uint8)
    layers[..., 0][liver] = 1
    layers[..., 1][spleen] = 1
    layers[..., 1][:6, :6, :6] = 2  # "background" segment: not an organ
    meta = {"Segment0_Name": "liver", "Segment0_LabelValue": 1, "Segment0_Layer": 0,
            "Segment1_Name": "spleen", "Segment1_LabelValue": 1, "Segment1_Layer": 1,
            "Segment2_Name": "background", "Segment2_LabelValue": 2, "Segment2_Layer": 1}
    seg = write_nrrd(layers, nib.load(str(study["image"])), tmp_path / "label.seg.nrrd", meta=meta, vector=True)
    assert declared_shape(seg) == liver.shape + (2,)
    upload = check(str(study["image"]), str(seg), "ct", {"label_info": [{"name": "wrong order"}]})
    data = np.asanyarray(upload.image.dataobj)
    assert upload.naming == ".seg.nrrd segment list" and upload.segments == {"liver": 10, "spleen": 20}
    assert np.array_equal(data == 20, spleen) and not data[:6, :6, :6].any()


def test_label_header_declaring_another_shape_is_refused_before_decompressing(study, tmp_path):
    """A gzip bomb: a tiny file whose header declares 2000^3 voxels (8 GB) is refused from its header."""
    header = ("NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: 2000 2000 2000\nencoding: gzip\n"
              "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n")
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(header.encode() + gzip.compress(b"\0" * (1 << 20)))
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"declares shape \[2000, 2000, 2000\]"):
        FinalLabelCheck(SPARSE)(str(study["image"]), str(bomb), "ct")
    assert time.perf_counter() - started < 2.0
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), study["nifti"].affine)
    img.header.set_data_shape((1500, 1500, 1500))
    nii = tmp_path / "bomb.nii.gz"
    with gzip.open(nii, "wb") as f:
        f.write(img.header.binaryblock + b"\0" * 4)
    with pytest.raises(InputError, match=r"declares shape \[1500, 1500, 1500\]"):
        FinalLabelCheck(SPARSE)(str(study["image"]), str(nii), "ct")


def test_markups_json_and_other_grids_are_refused_with_the_reason(study, tmp_path):
    markups = tmp_path / "roi.json"
    markups.write_text(json.dumps({"@schema": "markups-schema-v1.0.3", "markups": []}))
    with pytest.raises(InputError, match="select `medlsam`"):
        FinalLabelCheck(SPARSE)(str(study["image"]), str(markups), "ct", {"label_info": []})
    moved = tmp_path / "moved.nii.gz"
    affine = study["nifti"].affine.copy()
    affine[0, 3] += 5
    nib.save(nib.Nifti1Image((study["label"] == 1).astype(np.uint8) * 10, affine), str(moved))
    with pytest.raises(InputError, match="affine differs"):
        FinalLabelCheck(SPARSE)(str(study["image"]), str(moved), "ct")


# --- label map, Dice, strategies ----------------------------------------------------------------
def test_labels_conf_and_missing_label_map_message(tmp_path):
    assert parse_labels("liver, spleen").to_dict() == {"liver": 1, "spleen": 2}
    assert parse_labels('{"liver": 10, "spleen": 20}').to_dict() == {"liver": 10, "spleen": 20}
    assert parse_labels('["background", "liver"]').to_dict() == {"liver": 1}
    with pytest.raises(ConfigurationError):
        parse_labels('{"liver": "x"}')
    studies = tmp_path / "studies"
    studies.mkdir()
    settings = AppSettings.from_conf({}, str(tmp_path), str(studies))
    with pytest.raises(ConfigurationError, match="--conf labels"):
        settings.read_label_map()
    assert AppSettings.from_conf({"labels": "liver"}, str(tmp_path), str(studies)).read_label_map().names == ["liver"]


def test_consecutive_values_for_clients():
    assert SPARSE.consecutive() == {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
    assert SPARSE.to_consecutive(np.array([0, 10, 40, 30])).tolist() == [0, 1, 4, 3]


def test_per_organ_dice_uses_each_volumes_own_names():
    result = np.array([0, 1, 1, 2, 2, 0])
    truth = np.array([0, 10, 10, 10, 0, 30])
    dice = per_organ_dice(result, {"liver": 1, "spleen": 2}, truth, {"liver": 10, "spleen": 20, "kidney_left": 30})
    assert dice == {"liver": 0.8, "spleen": 0.0, "kidney_left": 0.0}


def test_last_strategy_and_fewshot_score():
    class Store:
        def get_unlabeled_images(self, *args):
            return ["b", "c", "a"]

    assert Last()({"strategy": "last"}, Store()) == {"id": "c"}

    class Organ:
        def __init__(self, confidence, inside):
            self.confidence, self.fraction_inside = confidence, inside

    class Loc:
        organs = {"liver": Organ(0.5, 1.0), "spleen": Organ(0.3, 0.9), "lung_left": Organ(0.01, 0.0)}

    class Settings:
        min_fraction_inside = 0.3

    score = study_score(Loc(), Settings())
    assert score["score"] == 0.4 and score["organs_inside"] == 2
    Loc.organs = {"lung_left": Organ(0.2, 0.1)}
    assert study_score(Loc(), Settings())["score"] == 0.0  # nothing the supports know is in this scan
