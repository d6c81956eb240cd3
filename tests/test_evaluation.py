"""`medlsam eval`: metrics against hand-computed cases, manual boxes, datasets, the runner and the command.

The runner and command tests use tiny generated studies, a small random MedLAM and a box-filling
stand-in for the SAM backend (it predicts exactly the prompted box), so the expected Dice of a
prompt can be computed independently on the study grid. The real LiteMedSAM run is marked slow.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from medlsam import cli
from medlsam.evaluation import (
    EvalSettings, box_iou, box_iou_mm, counted_slices, dice, evaluate_study, hd95, manual_slice_boxes, mask_box,
    pair_studies, perturbed_box, run_evaluation, split_supports, summarize, voxel_box_to_mm,
)
from medlsam.evaluation.manual_boxes import organ_rng
from medlsam.evaluation.report import aggregate, markdown_tables
from medlsam.evaluation.runner import score_organ, segment_prompt_sets, slice_step
from medlsam.segment import Segmenter
from medlsam.medlam.checkpoint import save_medlam
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.network import MedLAMConfig, MedLAMNet
from medlsam.medlam.patches import PatchEmbedder
from medlsam.medlam.templates import TemplateSet, compute_support

torch.set_num_threads(1)

ORGANS = {"liver": 1, "kidney_left": 3, "urinary_bladder": 11}


# -- metrics ------------------------------------------------------------------------------------
def test_voxel_box_to_mm_covers_whole_voxels_with_anisotropic_flipped_affine():
    affine = np.array([[-2.0, 0, 0, 10], [0, 1.0, 0, 20], [0, 0, 3.0, 30], [0, 0, 0, 1]])
    lo, hi = voxel_box_to_mm([[0, 0, 0], [9, 9, 9]], affine)
    # x runs backwards: voxel 0 is at 10 mm, voxel 9 at -8 mm; each voxel spans +-1 mm in x
    np.testing.assert_allclose(lo, [-9.0, 19.5, 28.5])
    np.testing.assert_allclose(hi, [11.0, 29.5, 58.5])


def test_box_iou_of_known_boxes():
    assert box_iou(([0, 0, 0], [10, 10, 10]), ([5, 0, 0], [15, 10, 10])) == pytest.approx(1 / 3)
    assert box_iou(([0, 0, 0], [4, 4, 4]), ([1, 1, 1], [3, 3, 3])) == pytest.approx(8 / 64)
    assert box_iou(([0, 0, 0], [1, 1, 1]), ([2, 0, 0], [3, 1, 1])) == 0.0
    # voxel boxes 0..9 and 5..14 along i (10 voxels each, overlap 5), any spacing: 500 / 1500
    affine = np.diag([2.5, 0.7, 4.0, 1.0])
    assert box_iou_mm([[0, 0, 0], [9, 9, 9]], [[5, 0, 0], [14, 9, 9]], affine) == pytest.approx(1 / 3)
    # a one-voxel box inside a 3x3x3 box: 1 / 27, whatever the (permuted) axes
    permuted = np.array([[0, 0, 3.0, 0], [1.5, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 0, 1]])
    assert box_iou_mm([[1, 1, 1], [1, 1, 1]], [[0, 0, 0], [2, 2, 2]], permuted) == pytest.approx(1 / 27)
    with pytest.raises(ValueError, match="voxel box"):
        voxel_box_to_mm([[0, 0], [1, 1]], affine)


def test_dice_and_mask_box():
    a = np.zeros((4, 5, 6), bool)
    b = a.copy()
    a[0, 0, :6] = True
    a[1, 0, :4] = True  # 10 voxels
    b[0, 0, 2:6] = True
    b[2, 1, :2] = True  # 6 voxels, 4 shared with a
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    assert np.isnan(dice(np.zeros_like(a), np.zeros_like(a)))
    assert mask_box(b) == [[0, 0, 0], [2, 1, 5]] and mask_box(np.zeros_like(a)) is None
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:3])


def test_hd95_single_voxels_with_anisotropic_spacing():
    a = np.zeros((10, 12, 14), bool)
    b = a.copy()
    a[2, 3, 4] = True
    b[5, 7, 10] = True
    expected = np.sqrt((3 * 2.5) ** 2 + (4 * 1.0) ** 2 + (6 * 0.7) ** 2)
    assert hd95(a, b, (2.5, 1.0, 0.7)) == pytest.approx(expected, rel=1e-5)


def test_hd95_parallel_planes_use_the_spacing_of_the_right_axis():
    a = np.zeros((12, 20, 20), bool)
    b = a.copy()
    a[2] = True
    b[5] = True
    assert hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(7.5)
    assert hd95(a, b, (1.0, 2.5, 2.5)) == pytest.approx(3.0)


def test_hd95_ignores_the_farthest_5_percent():
    a = np.zeros((12, 20, 50), bool)
    a[3, 4, 5:45] = True  # a 40-voxel line: every voxel is surface
    b = a.copy()
    b[11, 19, 0] = True  # one outlier (1 of 41 surface voxels)
    spacing = (2.0, 1.0, 1.0)
    assert hd95(a, b, spacing) == pytest.approx(0.0)
    # the maximum is the outlier's distance to the line's first voxel
    assert hd95(a, b, spacing, percentile=100) == pytest.approx(np.sqrt(16**2 + 15**2 + 5**2), rel=1e-5)


def test_hd95_matches_a_brute_force_surface_distance():
    rng = np.random.default_rng(3)
    a = ndimage.binary_dilation(rng.random((14, 16, 18)) > 0.97, iterations=2)
    b = ndimage.binary_dilation(rng.random((14, 16, 18)) > 0.97, iterations=2)
    spacing = np.array([3.0, 0.8, 1.2])

    def surface_mm(mask):
        border = mask & ~ndimage.binary_erosion(mask)
        return np.argwhere(border) * spacing

    d = cdist(surface_mm(a), surface_mm(b))
    expected = max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))
    assert hd95(a, b, spacing) == pytest.approx(expected, rel=1e-4)


def test_hd95_refuses_bad_input_and_is_nan_for_empty_masks():
    a = np.zeros((4, 4, 4), bool)
    a[1, 1, 1] = True
    assert np.isnan(hd95(a, np.zeros_like(a), (1, 1, 1)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1, 0, 1))


def test_summarize_skips_missing_values():
    s = summarize([0.5, None, float("nan"), 1.0])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.75) and s["std"] == pytest.approx(0.25)
    assert summarize([])["n"] == 0


# -- manual boxes -------------------------------------------------------------------------------
def test_perturbed_box_grows_outward_by_0_to_max_and_clips():
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:40] = True
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(400):
        y0, x0, y1, x1 = perturbed_box(mask, rng, max_shift_px=6)
        shifts.append((10 - y0, 30 - x0, y1 - 19, x1 - 39))
    shifts = np.array(shifts)
    assert shifts.min() == 0 and shifts.max() == 6  # both ends of 0..6 occur, never beyond
    assert len(np.unique(shifts[:, 0])) == 7
    assert perturbed_box(mask, rng, max_shift_px=0) == (10, 30, 19, 39)
    edge = np.zeros((64, 64), bool)
    edge[0:5, 60:64] = True
    y0, x0, y1, x1 = perturbed_box(edge, rng, max_shift_px=20)
    assert y0 == 0 and x1 == 63
    with pytest.raises(ValueError, match="empty"):
        perturbed_box(np.zeros((8, 8), bool), rng)


def test_manual_boxes_follow_the_slice_threshold_and_the_1024_pixel_scale():
    truth = np.zeros((5, 256, 256), bool)
    truth[1, 100:101, 100:105] = True  # 5 px
    truth[2, 100:102, 100:105] = True  # 10 px
    truth[3, 100:111, 100:101] = True  # 11 px
    truth[4, 50:150, 60:200] = True
    assert counted_slices(truth, 10) == [3, 4] and counted_slices(truth, 0) == [1, 2, 3, 4]
    boxes = manual_slice_boxes(truth, np.random.default_rng(1), gt_slice_threshold=10)
    assert sorted(boxes) == [3, 4]
    y0, x0, y1, x1 = boxes[4]
    # 20 px at 1024 is at most 5 px on a 256-pixel slice
    assert 45 <= y0 <= 50 and 55 <= x0 <= 60 and 149 <= y1 <= 154 and 199 <= x1 <= 204
    native = [manual_slice_boxes(truth, np.random.default_rng(s), 10, 20, None)[4] for s in range(30)]
    assert min(b[0] for b in native) < 45  # native pixels: shifts beyond 5 occur
    with pytest.raises(ValueError):
        counted_slices(truth, -1)


def test_manual_box_draws_do_not_depend_on_processing_order():
    a = organ_rng(0, "study_a", 3).integers(0, 1000, 5)
    organ_rng(0, "study_b", 3).integers(0, 1000, 5)
    assert np.array_equal(a, organ_rng(0, "study_a", 3).integers(0, 1000, 5))
    assert not np.array_equal(a, organ_rng(1, "study_a", 3).integers(0, 1000, 5))


# -- datasets -----------------------------------------------------------------------------------
def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_pair_studies_by_name_by_order_and_structseg_ids(tmp_path):
    for name in ("word_0001", "word_0002"):
        _touch(tmp_path / "imagesTs" / f"{name}.nii.gz")
        _touch(tmp_path / "labelsTs" / f"{name}.nii.gz")
    _touch(tmp_path / "labelsTs" / "extra.nii.gz")
    pairs = pair_studies([tmp_path / "imagesTs"], [tmp_path / "labelsTs"])
    assert [p.study_id for p in pairs] == ["word_0001", "word_0002"]
    assert pairs[1].label == tmp_path / "labelsTs" / "word_0002.nii.gz"

    for k in (1, 2, 3):  # StructSeg: one folder per patient, same file names
        _touch(tmp_path / "HaN_OAR" / str(k) / "data.nii.gz")
        _touch(tmp_path / "HaN_OAR" / str(k) / "label.nii.gz")
    (tmp_path / "images.txt").write_text("\n".join(f"HaN_OAR/{k}/data.nii.gz" for k in (1, 2, 3)))
    (tmp_path / "labels.txt").write_text("\n".join(f"HaN_OAR/{k}/label.nii.gz" for k in (1, 2, 3)) + "\n")
    pairs = pair_studies([tmp_path / "images.txt"], [tmp_path / "labels.txt"])
    assert [p.study_id for p in pairs] == ["1_data", "2_data", "3_data"]

    with pytest.raises(ValueError, match="same file name"):
        _touch(tmp_path / "imagesTs" / "word_0003.nii.gz")
        pair_studies([tmp_path / "imagesTs"], [tmp_path / "labelsTs"])
    with pytest.raises(ValueError, match="pair up"):
        pair_studies([tmp_path / "images.txt"], [tmp_path / "HaN_OAR" / "1" / "label.nii.gz"])
    with pytest.raises(FileNotFoundError, match="nope"):
        pair_studies([tmp_path / "nope.nii.gz"], [tmp_path / "HaN_OAR" / "1" / "label.nii.gz"])


def test_split_supports(tmp_path):
    for k in range(6):
        _touch(tmp_path / "im" / f"s{k}.nii.gz")
    pairs = pair_studies([tmp_path / "im"], [tmp_path / "im"])
    supports, queries = split_supports(pairs, 2, seed=4)
    assert len(supports) == 2 and len(queries) == 4
    assert {s.study_id for s in supports}.isdisjoint({q.study_id for q in queries})
    assert split_supports(pairs, 2, seed=4)[0] == supports  # same seed, same draw
    supports, queries = split_supports(pairs, support_ids=["s0", "s3"])
    assert [s.study_id for s in supports] == ["s0", "s3"]
    with pytest.raises(ValueError, match="not among"):
        split_supports(pairs, support_ids=["s9"])
    with pytest.raises(ValueError, match="at least one"):
        split_supports(pairs, 6)


# -- runner on tiny generated studies -------------------------------------------------------------
class BoxFiller:
    """A stand-in backend: the predicted mask of a box prompt is exactly the box."""

    name = "boxfill"
    accelerated = False
    box_decoder = None  # the Segmenter reports whether the decoder is accelerated

    def __init__(self):
        self.encoder_calls = self.decoder_calls = 0
        self.encode_seconds = self.decode_seconds = 0.0

    def encode(self, image_255):
        self.encoder_calls += 1
        return np.asarray(image_255).shape

    def decode(self, shape, boxes_xyxy, points_xy=None, point_labels=None):
        return self.decode_scored(shape, boxes_xyxy)[0]

    def decode_scored(self, shape, boxes_xyxy, points_xy=None, point_labels=None):
        self.decoder_calls += 1
        out = np.full((len(boxes_xyxy), *shape), -10.0, np.float32)
        for n, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_xyxy, int)):
            out[n, y0:y1 + 1, x0:x1 + 1] = 10.0
        return out, np.full(len(out), 0.9, np.float32)


SMALL = MedLAMConfig(base_channels=4, patch_size=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from medlsam.synthetic import write_sample_dataset

    root = tmp_path_factory.mktemp("evaldata")
    write_sample_dataset(root, n_studies=4, n_supports=2, seed=0, preset="tiny", progress=False)
    torch.manual_seed(0)
    save_medlam(root / "medlam.pt", MedLAMNet(SMALL), SMALL)
    return root


@pytest.fixture(scope="module")
def localizer(dataset):
    embedder = PatchEmbedder.from_checkpoint(dataset / "medlam.pt")
    label_map = json.loads((dataset / "label_map.json").read_text())
    templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict())
    for sid in ("synct_0000", "synct_0001"):
        image = nib.load(str(dataset / "studies" / f"{sid}.nii.gz"))
        label = nib.load(str(dataset / "ground_truth" / f"{sid}.nii.gz"))
        templates.add(compute_support(embedder, image, label, label_map, sid, organs=list(ORGANS)), label_map)
    return Localizer(embedder, templates)


@pytest.fixture(scope="module")
def queries(dataset):
    pairs = pair_studies([dataset / "studies"], [dataset / "ground_truth"])
    return [p for p in pairs if p.study_id not in ("synct_0000", "synct_0001")]


def _expected_box_dice(study, label_id):
    """Dice of 'fill each axial slice's tight ground-truth box', computed on the study grid."""
    label = nib.load(str(study.label))
    truth = np.asanyarray(label.dataobj) == label_id
    axial = [i for i, code in enumerate(nib.aff2axcodes(label.affine)) if code in "SI"][0]
    truth_moved = np.moveaxis(truth, axial, 0)
    boxes = np.zeros_like(truth_moved)
    for z in range(truth_moved.shape[0]):
        box = mask_box(truth_moved[z][None])
        if box is not None:
            boxes[z, box[0][1]:box[1][1] + 1, box[0][2]:box[1][2] + 1] = True
    return dice(boxes, truth_moved), int(boxes.sum())


def test_manual_boxes_without_shift_give_the_expected_dice_on_the_study_grid(queries):
    for study in queries:
        for name, label_id in {"liver": 1, "kidney_left": 3}.items():
            # one organ at a time: boxes of two organs overlapping on a slice would share pixels
            settings = EvalSettings(organs={name: label_id}, localizations=("manual",), backbones=("boxfill",),
                                    max_shift_px=0)
            organ = evaluate_study(study, settings, {"boxfill": BoxFiller()})["organs"][name]
            if not organ["in_truth"]:
                continue
            expected, voxels = _expected_box_dice(study, label_id)
            metrics = organ["metrics"]["manual/boxfill"]
            assert metrics["pred_voxels"] == voxels
            assert metrics["dsc"] == pytest.approx(expected, abs=1e-4)
            assert 0.5 < expected < 1.0
            assert organ["localization"]["manual"]["iou"] == pytest.approx(1.0)  # unshifted: the tight box


def test_runner_scores_absent_organs_and_shares_encoder_passes(queries, localizer, tmp_path):
    settings = EvalSettings(organs=ORGANS, backbones=("boxfill",), seed=0)
    backend = BoxFiller()
    results = run_evaluation(queries, settings, {"boxfill": backend}, tmp_path, localizer, overlay_studies=0,
                             progress=False)
    assert len(results) == 2 and all((tmp_path / "studies" / f"{q.study_id}.json").exists() for q in queries)
    for result in results:
        seg = result["segmentation"]["boxfill"]
        # one window for these organs: one encoder pass per slice, whichever localizations prompt it
        assert seg["encoder_calls"] == seg["slices"]
        bladder = result["organs"]["urinary_bladder"]
        assert not bladder["in_truth"] and bladder["metrics"] == {}  # abdomen/thorax scans: excluded
        liver = result["organs"]["liver"]
        assert liver["in_truth"] and 0.0 <= liver["localization"]["medlam"]["iou"] <= 1.0
        assert liver["localization"]["manual"]["iou"] > 0.6

    summary = aggregate(results, settings)
    liver = summary["pairs"]["manual/boxfill"]["organs"]["liver"]
    values = [r["organs"]["liver"]["metrics"]["manual/boxfill"]["dsc"] for r in results]
    assert liver["dsc"]["mean"] == pytest.approx(np.mean(values)) and liver["n"] == 2
    assert summary["pairs"]["manual/boxfill"]["organs"]["urinary_bladder"]["n"] == 0
    assert "| urinary_bladder | - | - |" in markdown_tables(summary)["dsc"]
    assert "MedLAM + boxfill" in markdown_tables(summary)["dsc"]
    # boxes from the registration localizer are labelled as such, in tables and the report's text
    from_registration = summary | {"localizer": {"name": "registration", "supports": []}}
    tables = markdown_tables(from_registration)
    assert "Registration + boxfill" in tables["dsc"] and "Registration missed" in tables["iou"]
    assert "MedLAM" not in tables["dsc"] + tables["iou"]

    # a localizer that finds nothing: present organs count as IoU 0 / DSC 0, absent ones as correct
    blind = Localizer(localizer.embedder, localizer.templates, LocalizerSettings(presence_threshold=2.0))
    settings_blind = EvalSettings(organs=ORGANS, localizations=("medlam",), backbones=("boxfill",))
    results = run_evaluation(queries, settings_blind, {"boxfill": BoxFiller()}, tmp_path / "blind", blind,
                             overlay_studies=0, progress=False)
    loc = aggregate(results, settings_blind)["localization"]["medlam"]
    pair = aggregate(results, settings_blind)["pairs"]["medlam/boxfill"]
    assert loc["organs"]["liver"]["missed"] == loc["organs"]["liver"]["n"] == 2
    assert loc["organs"]["liver"]["iou"]["mean"] == 0.0 and pair["organs"]["liver"]["dsc"]["mean"] == 0.0
    assert pair["organs"]["liver"]["hd95"]["n"] == 0 and pair["organs"]["liver"]["empty_predictions"] == 2
    assert loc["totals"]["correctly_absent"] == 2 and loc["totals"]["false_alarms"] == 0


class TruthLocalizer:
    """A stand-in localizer that returns the tight ground-truth box of each organ."""

    name = "truth"

    def __init__(self, label_path, organs):
        self.truth = np.asanyarray(nib.load(str(label_path)).dataobj)
        self.label_ids = organs
        self.organs = list(organs)

    def localize(self, image, organs=None, mode="WPL", seed=0, name="image"):
        from medlsam.localization import Box, OrganLocation, StudyLocalization

        found = {}
        for n in organs:
            lo, hi = mask_box(self.truth == self.label_ids[n])
            found[n] = OrganLocation(n, self.label_ids[n], Box.from_voxels(lo, hi), confidence=1.0)
        return StudyLocalization(mode, found, self.name)


def test_paper_protocol_only_prompts_slices_with_ground_truth(queries):
    study = queries[0]
    organs = {"liver": 1}
    localizer = TruthLocalizer(study.label, organs)
    paper = EvalSettings(organs=organs, localizations=("medlam",), backbones=("boxfill",))
    box = EvalSettings(organs=organs, localizations=("medlam",), backbones=("boxfill",), eval_slices="box")
    r_paper = evaluate_study(study, paper, {"boxfill": BoxFiller()}, localizer)
    r_box = evaluate_study(study, box, {"boxfill": BoxFiller()}, localizer)
    liver_paper, liver_box = r_paper["organs"]["liver"], r_box["organs"]["liver"]
    assert liver_paper["localization"]["medlam"]["iou"] == pytest.approx(1.0)
    # paper: exactly the slices holding the liver; box: those plus the 2-slice margin on each side
    n_counted = liver_paper["counted_slices"]
    assert r_paper["segmentation"]["boxfill"]["slices"] == n_counted
    assert n_counted < r_box["segmentation"]["boxfill"]["slices"] <= n_counted + 4
    m_paper, m_box = liver_paper["metrics"]["medlam/boxfill"], liver_box["metrics"]["medlam/boxfill"]
    assert m_box["pred_voxels"] > m_paper["pred_voxels"] and m_box["dsc"] < m_paper["dsc"]
    assert r_paper["settings_key"] != r_box["settings_key"]


def test_scoring_skips_uncounted_slices_and_subsamples():
    truth = np.zeros((10, 8, 8), bool)
    truth[0:10, 2:6, 2:6] = True  # 16 px per slice
    pred = np.zeros_like(truth)
    pred[0:10, 2:6, 2:4] = True  # half of each slice
    pred[0:2, 2:6, 4:6] = True  # slices 0-1 complete
    full = score_organ(pred, truth, (2.0, 1.0, 1.0), None, 1)
    assert full["dsc"] == pytest.approx(2 * 96 / (160 + 96), abs=1e-4)
    # only slices 2..9 counted (the paper skips the others): 8 * 8 of 8 * 16
    counted = score_organ(pred, truth, (2.0, 1.0, 1.0), list(range(2, 10)), 1)
    assert counted["dsc"] == pytest.approx(2 * 64 / (128 + 64), abs=1e-4) and counted["scored_truth_voxels"] == 128
    # every 3rd slice: 0, 3, 6, 9 -> slice 0 complete, three half slices
    sub = score_organ(pred, truth, (2.0, 1.0, 1.0), None, 3)
    assert sub["dsc"] == pytest.approx(2 * (16 + 3 * 8) / (64 + 16 + 3 * 8), abs=1e-4)
    assert sub["scored_truth_voxels"] == 64
    # stacked at 3 x 2 mm: two planes 6 mm apart vs the same planes -> HD95 is an in-plane 2 mm
    assert sub["hd95"] == pytest.approx(2.0)
    assert slice_step(0, 3.0) == 1 and slice_step(15, 3.0) == 5 and slice_step(2, 5.0) == 1


def test_prompt_sets_share_one_encoder_pass_per_slice_and_window():
    volume = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 32, 32), np.float32) * 10  # slices differ
    medlam = {1: {1: [(2, 2, 10, 10)], 2: [(2, 2, 10, 10)]}, 2: {2: [(20, 20, 30, 30)]}}
    manual = {1: {2: [(4, 4, 8, 8)], 3: [(4, 4, 8, 8)]}}
    backend = BoxFiller()
    segmenter = Segmenter(backend, box_margin_zyx=(0, 0, 0), progress=False)
    labels, stats = segment_prompt_sets(segmenter, volume, {"medlam": medlam, "manual": manual},
                                        {1: "default", 2: "default"})
    # slices 1, 2, 3; slice 2 serves both sets with one pass
    assert stats["slices"] == 3 and backend.encoder_calls == 3 and stats["encoder_calls"] == 3
    assert labels["medlam"][2, 25, 25] == 2 and labels["manual"][2, 25, 25] == 0
    assert labels["manual"][3, 6, 6] == 1 and labels["medlam"][3].max() == 0
    # another window on the same slice needs its own pass
    backend = BoxFiller()
    segment_prompt_sets(Segmenter(backend, progress=False), volume, {"medlam": medlam, "manual": manual},
                        {1: "default", 2: "bone"})
    assert backend.encoder_calls == 4


def test_slice_subsampling_prompts_every_kth_slice(queries):
    study = queries[1]
    spacing_z = nib.load(str(study.image)).header.get_zooms()[2]  # generated studies are axial
    full = EvalSettings(organs={"liver": 1}, localizations=("manual",), backbones=("boxfill",))
    sub = EvalSettings(organs={"liver": 1}, localizations=("manual",), backbones=("boxfill",),
                       slice_step_mm=2 * spacing_z)
    r_full = evaluate_study(study, full, {"boxfill": BoxFiller()})
    r_sub = evaluate_study(study, sub, {"boxfill": BoxFiller()})
    assert r_sub["slice_step"] == 2 and r_full["slice_step"] == 1
    n_full, n_sub = r_full["segmentation"]["boxfill"]["slices"], r_sub["segmentation"]["boxfill"]["slices"]
    assert abs(n_sub - n_full / 2) <= 1
    m_full, m_sub = r_full["organs"]["liver"]["metrics"]["manual/boxfill"], r_sub["organs"]["liver"]["metrics"][
        "manual/boxfill"]
    assert m_sub["scored_truth_voxels"] < m_full["scored_truth_voxels"]
    assert m_sub["dsc"] == pytest.approx(m_full["dsc"], abs=0.05)  # an estimate of the same Dice


# -- the command end to end ------------------------------------------------------------------------
def _eval_args(dataset, out, *extra):
    return ["eval", "--images", str(dataset / "studies"), "--labels", str(dataset / "ground_truth"),
            "--label-map", str(dataset / "label_map.json"), "--support-ids", "synct_0000", "synct_0001",
            "--organs", *ORGANS, "--medlam", str(dataset / "medlam.pt"), "--out", str(out), *extra]


def test_command_writes_every_output_and_resumes(dataset, tmp_path, monkeypatch, capsys):
    from medlsam.commands import eval as eval_command

    monkeypatch.setattr(eval_command, "build_backends", lambda names, ck, args: {n: BoxFiller() for n in names})
    out = tmp_path / "run"
    both = ("--localization", "medlam", "medlam_box", "manual", "--prompting", "propagate")  # MedLAM boxes two ways
    assert cli.main(_eval_args(dataset, out, *both)) == 0
    printed = capsys.readouterr().out
    assert "| liver |" in printed and "Box IoU" in printed
    for name in ("report.md", "summary.json", "dsc.csv", "hd95.csv", "iou.csv", "per_study.csv", "timings.csv",
                 "iou_bars.png", "dsc_bars.png", "hd95_bars.png", "templates.pt",
                 "studies/synct_0002.json", "studies/synct_0003.json"):
        assert (out / name).stat().st_size > 0, name
    overlays = sorted((out / "overlays" / "synct_0002").glob("*.png"))
    assert overlays and all(p.read_bytes()[:4] == b"\x89PNG" for p in overlays)
    assert not (out / "overlays" / "synct_0003").exists()  # overlays for the first study only

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_studies"] == 2 and summary["supports"] == ["synct_0000", "synct_0001"]
    assert set(summary["pairs"]) == {"medlam/litemedsam", "medlam_box/litemedsam", "manual/litemedsam"}
    assert summary["settings"]["prompting"] == "propagate"
    loc = summary["localization"]
    assert loc["medlam"]["mean_over_organs"] == loc["medlam_box"]["mean_over_organs"]  # one localization
    mean = summary["pairs"]["manual/litemedsam"]["mean_over_organs"]["dsc"]
    organ_means = [v["dsc"]["mean"] for v in summary["pairs"]["manual/litemedsam"]["organs"].values()
                   if v["dsc"]["n"]]
    assert mean == pytest.approx(np.mean(organ_means)) and 0.3 < mean <= 1.0
    report = (out / "report.md").read_text()
    assert "## Segmentation: DSC" in report and "MedLAM + litemedsam" in report
    assert "MedLAM boxes grown by 2 slices along z and 8 mm in-plane." in report  # the default margin
    assert "MedLAM boxes prompted by propagation" in report and "MedLAM (box prompts) + litemedsam" in report
    assert "MedLAM (box prompts) IoU" not in report  # the same boxes: one IoU column
    header = (out / "dsc.csv").read_text().splitlines()[0]
    assert header.startswith("organ,medlam/litemedsam_dsc_mean,medlam/litemedsam_dsc_std")
    rows = (out / "per_study.csv").read_text().splitlines()
    assert len(rows) > 1 and rows[0].startswith("study,organ,in_truth,localization")

    # resume: finished studies are not recomputed; a deleted one is
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "studies").glob("*.json")}
    (out / "studies" / "synct_0003.json").unlink()
    assert cli.main(_eval_args(dataset, out, *both)) == 0
    assert (out / "studies" / "synct_0002.json").stat().st_mtime_ns == stamp["synct_0002.json"]
    assert (out / "studies" / "synct_0003.json").exists()
    # other settings in the same folder are refused with a clear message
    assert cli.main(_eval_args(dataset, out, *both, "--seed", "5")) == 2
    assert "other evaluation settings" in capsys.readouterr().err


@pytest.mark.slow
def test_command_with_the_registration_localizer(dataset, tmp_path, monkeypatch, capsys):
    from medlsam.commands import eval as eval_command

    monkeypatch.setattr(eval_command, "build_backends", lambda names, ck, args: {n: BoxFiller() for n in names})
    out = tmp_path / "reg"
    assert cli.main(_eval_args(dataset, out, "--localization", "medlam", "--localizer", "registration")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["extra"]["localizer"]["name"] == "registration"
    report = (out / "report.md").read_text()
    # the stand-in backend keeps the backbone's name: pairs are medlam/litemedsam
    assert "Registration + litemedsam" in report and "Registration boxes grown by" in report
    assert "MedLAM + litemedsam" not in report
    assert sorted(p.stem for p in (out / "atlases").glob("*.npz")) == ["synct_0000", "synct_0001"]
    iou = summary["localization"]["medlam"]["mean_over_organs"]
    assert 0.3 < (iou["iou"] if isinstance(iou, dict) else iou) <= 1.0


def test_command_refuses_bad_input(dataset, tmp_path, capsys):
    assert cli.main(_eval_args(dataset, tmp_path / "a", "--backbones", "unet")) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert cli.main(_eval_args(dataset, tmp_path / "b", "--checkpoint", "medsam")) == 2
    assert "BACKBONE=PATH" in capsys.readouterr().err
    args = _eval_args(dataset, tmp_path / "c")
    args[args.index("--organs") + 1] = "brain"
    assert cli.main(args) == 2
    assert "unknown organ 'brain'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_litemedsam_with_manual_boxes(dataset, tmp_path):
    """The default backbone on one tiny study: manual boxes segment the liver well."""
    out = tmp_path / "real"
    args = ["eval", "--images", str(dataset / "studies" / "synct_0003.nii.gz"),
            "--labels", str(dataset / "ground_truth" / "synct_0003.nii.gz"), "--label-map",
            str(dataset / "label_map.json"), "--organs", "liver", "--localization", "manual",
            "--overlay-studies", "0", "--out", str(out)]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    liver = summary["pairs"]["manual/litemedsam"]["organs"]["liver"]
    assert liver["n"] == 1 and liver["dsc"]["mean"] > 0.65  # 0.77 measured; random weights give ~0.1
