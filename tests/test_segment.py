"""Box-prompt segmentation: slice boxes, backends (tiny random SAMs), the embedding cache, errors.

The real LiteMedSAM tests live in test_segment_litemedsam.py; everything here runs on tiny
random-weight SAM architectures and takes seconds.
"""

import sys
import warnings

import numpy as np
import pytest
import torch

from medlsam.segment import (
    Segmenter,
    apply_window,
    boxes_from_labels,
    build_backend,
    build_sam_model,
    dice,
    keep_largest_component,
    margin_in_voxels,
    parse_margin_mm,
    parse_organ_boxes,
    slice_boxes_from_box,
    window_for_organ_name,
)
from medlsam.segment.backends import SamBackend, accelerate_backend, sam as sam_module
from medlsam.segment.backends.checkpoints import load_state_dict, resolve_checkpoint

torch.set_num_threads(1)


def tiny_sam(seed=0, image_size=64):
    torch.manual_seed(seed)
    return build_sam_model(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), image_size=image_size,
                           prompt_dim=32, window_size=4, decoder_mlp_dim=64)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_sam()


def phantom(shape=(9, 40, 56)):
    """Air, a soft-tissue body and two brighter organs; returns (volume HU, labels)."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    volume = np.full(shape, -1000.0, np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    volume[body] = -80
    labels = np.zeros(shape, np.uint8)
    labels[1:7, 10:24, 8:26] = 1
    labels[3:9, 18:30, 30:46] = 2
    volume[labels == 1] = 60
    volume[labels == 2] = 180
    return volume, labels


# -- slice boxes ----------------------------------------------------------------------------------
def test_box_is_expanded_by_margin_and_clipped():
    boxes = slice_boxes_from_box((3, 5, 50), (4, 20, 60), shape_zyx=(10, 100, 64), margin_zyx=(2, 10, 10))
    assert sorted(boxes) == [1, 2, 3, 4, 5, 6]
    assert set(boxes.values()) == {(0, 40, 30, 63)}  # y0 = 5 - 10 clipped to 0, x1 = 70 clipped to 63


def test_boxes_outside_or_empty_give_no_slices():
    shape = (10, 32, 32)
    assert slice_boxes_from_box((20, 0, 0), (25, 10, 10), shape, (2, 10, 10)) == {}  # z range outside
    assert slice_boxes_from_box((-9, 0, 0), (-3, 10, 10), shape, (2, 10, 10)) == {}
    assert slice_boxes_from_box((5, 9, 9), (4, 8, 8), shape, (0, 0, 0)) == {}  # hi < lo
    # a zero-extent box (one voxel) still covers slices once the margin is added
    assert len(slice_boxes_from_box((5, 9, 9), (5, 9, 9), shape, (2, 10, 10))) == 5


def test_parse_organ_boxes_accepts_3d_parts_and_2d_boxes():
    shape = (10, 50, 60)
    parsed = parse_organ_boxes(
        {
            1: ((2, 10, 10), (3, 20, 20)),  # one 3D box
            2: [((0, 5, 5), (1, 9, 9)), ((2, 30, 30), (2, 40, 40))],  # SPL parts
            3: {4: (10, 12, 20, 22), 5: [(0, 0, 3, 3), (-5, -5, 70, 80)], 40: (1, 1, 2, 2)},
        },
        shape,
        margin_zyx=(1, 2, 2),
    )
    assert sorted(parsed[1]) == [1, 2, 3, 4]
    assert parsed[1][1] == [(8, 8, 22, 22)]
    assert sorted(parsed[2]) == [0, 1, 2, 3]
    assert len(parsed[2][1]) == 2  # both parts reach slice 1 after the z margin
    assert parsed[3] == {4: [(10, 12, 20, 22)], 5: [(0, 0, 3, 3), (0, 0, 49, 59)]}  # 2D boxes: no margin


@pytest.mark.parametrize(
    "bad",
    [{0: ((0, 0, 0), (1, 1, 1))}, {"liver": ((0, 0, 0), (1, 1, 1))}, {1: (1, 2, 3)}, {1: {2: (1, 2, 3)}},
     {1: ((0, 0), (1, 1))}, [((0, 0, 0), (1, 1, 1))]],
)
def test_parse_organ_boxes_rejects_malformed_input(bad):
    with pytest.raises(ValueError):
        parse_organ_boxes(bad, (4, 8, 8))


def test_boxes_from_labels_are_tight():
    _, labels = phantom()
    boxes = boxes_from_labels(labels)
    assert [tuple(boxes[1][0]), tuple(boxes[1][1])] == [(1, 10, 8), (6, 23, 25)]
    assert [tuple(boxes[2][0]), tuple(boxes[2][1])] == [(3, 18, 30), (8, 29, 45)]


# -- windows, post-processing ---------------------------------------------------------------------
def test_window_maps_level_and_edges():
    grey = apply_window(np.array([-1000, -160, 40, 240, 3000], np.float32), 40, 400)
    assert np.allclose(grey, [0, 0, 127.5, 255, 255])
    lung = apply_window(np.array([-1350, -600, 150]), -600, 1500)
    assert np.allclose(lung, [0, 127.5, 255])


def test_window_from_organ_name():
    assert window_for_organ_name("lung_left") == "lung"
    assert window_for_organ_name("Head_of_femur_R") == "bone"
    assert window_for_organ_name("liver") == "default"
    assert window_for_organ_name("fibrous_tissue") == "default"  # no accidental 'rib' match


def test_keep_largest_component_per_label():
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[0:3, 0:5, 0:5] = 1  # 75 voxels
    labels[5, 15:17, 15:17] = 1  # 4 voxels, separate
    labels[2:6, 10:14, 2:6] = 2
    labels[0, 18, 0] = 2
    keep_largest_component(labels)
    assert (labels == 1).sum() == 75 and (labels == 2).sum() == 64
    assert dice(labels == 1, labels == 1) == 1.0 and dice(labels == 3, labels == 4) == 1.0


# -- segmenter on tiny random SAMs ----------------------------------------------------------------
@pytest.mark.parametrize("style", ["sam", "medsam"])
def test_cache_gives_identical_masks_with_one_encoder_call_per_slice(tiny_model, style):
    volume, labels = phantom()
    boxes = {k: [v] for k, v in boxes_from_labels(labels).items()}
    backend = SamBackend(tiny_model, style=style)
    margin = (1, 3, 3)
    cached = Segmenter(backend, box_margin_zyx=margin, cache=True, progress=False).segment_volume(volume, boxes)
    uncached = Segmenter(backend, box_margin_zyx=margin, cache=False, progress=False).segment_volume(volume, boxes)
    covered = {1: set(range(0, 8)), 2: set(range(2, 9))}  # z ranges after the 1-slice margin
    assert cached.stats["encoder_calls"] == len(covered[1] | covered[2]) == cached.stats["slices"] == 9
    assert cached.stats["decoder_calls"] == 9  # all boxes of a slice in one call
    assert uncached.stats["encoder_calls"] == len(covered[1]) + len(covered[2]) == 15
    assert cached.labels.dtype == np.uint8 and cached.labels.shape == volume.shape
    assert np.array_equal(cached.labels, uncached.labels)


def test_overlaps_go_to_the_higher_probability(tiny_model):
    volume, labels = phantom()
    # heavily overlapping boxes so that labels compete for the same pixels
    boxes = {1: [((0, 5, 5), (8, 30, 40))], 2: [((0, 10, 15), (8, 35, 50))], 3: {4: (0, 0, 39, 55)}}
    result = Segmenter(SamBackend(tiny_model), progress=False).segment_volume(volume, boxes, return_probabilities=True)
    probs = result.probabilities
    assert set(probs) == {1, 2, 3} and all(p.dtype == np.float32 for p in probs.values())
    stack = np.stack([probs[1], probs[2], probs[3]])
    best, best_prob = stack.argmax(0) + 1, stack.max(0)
    expected = np.where(best_prob > 0.5, best, 0)
    assert np.array_equal(result.labels, expected)
    assert probs[3][:4].max() == 0 and probs[3][5:].max() == 0  # label 3 only prompted on slice 4
    assert (result.labels > 0).any()


def test_boxes_outside_image_and_degenerate_boxes_do_not_fail(tiny_model):
    volume, _ = phantom()
    backend = SamBackend(tiny_model)
    boxes = {
        1: ((-5, -30, -30), (3, 12, 12)),  # partly outside
        2: ((20, 0, 0), (30, 10, 10)),  # z range wholly outside
        3: {2: (5, 5, 5, 5), 3: (7, 9, 6, 9)},  # one-pixel box; hi < lo (empty)
        4: ((4, 60, 70), (5, 80, 90)),  # in-plane wholly outside
    }
    result = Segmenter(backend, box_margin_zyx=(0, 0, 0), progress=False).segment_volume(volume, boxes)
    assert result.stats["organs"] == 2  # labels 2 and 4 have nothing inside the image; label 3 keeps slice 2
    assert result.stats["encoder_calls"] == 4  # slices 0-3
    assert not np.isin(result.labels, [2, 4]).any()
    empty = Segmenter(backend, progress=False).segment_volume(volume, {2: ((20, 0, 0), (30, 10, 10))})
    assert empty.stats["encoder_calls"] == 0 and not empty.labels.any()


def test_slices_subset_and_window_choice(tiny_model):
    volume, labels = phantom()
    boxes = {k: [v] for k, v in boxes_from_labels(labels).items()}
    seg = Segmenter(SamBackend(tiny_model), box_margin_zyx=(0, 2, 2), progress=False)
    subset = seg.segment_volume(volume, boxes, slices=[1, 4, 5, 100])
    assert subset.stats["slices"] == 3 and subset.stats["encoder_calls"] == 3
    assert not subset.labels[[0, 2, 3, 6, 7, 8]].any()
    # a different window for one organ means its slices are encoded once per window
    mixed = seg.segment_volume(volume, boxes, window_for_label={2: "bone"})
    overlap = len(set(range(1, 7)) & set(range(3, 9)))
    assert mixed.stats["encoder_calls"] == 6 + 6 == 8 + overlap
    with pytest.raises(ValueError, match="unknown window"):
        seg.segment_volume(volume, boxes, window_for_label={1: "brain"})


@pytest.mark.parametrize(
    "volume",
    [np.zeros((4, 4)), np.full((2, 8, 8), np.nan, np.float32), np.zeros((2, 8, 8), dtype=bool).astype(object)],
)
def test_bad_volumes_are_refused(tiny_model, volume):
    with pytest.raises(ValueError):
        Segmenter(SamBackend(tiny_model), progress=False).segment_volume(volume, {1: ((0, 0, 0), (1, 2, 2))})


def test_interactive_slice_reuses_the_embedding(tiny_model):
    volume, _ = phantom()
    backend = SamBackend(tiny_model)
    seg = Segmenter(backend, progress=False)
    first = seg.segment_slice(volume[3], box_yx=(10, 8, 30, 40))
    assert first.mask.shape == volume[3].shape and first.probability.dtype == np.float32
    again = seg.segment_slice(volume[3], box_yx=(10, 8, 30, 40), foreground=[(20, 20)], background=[(2, 2)])
    points_only = seg.segment_slice(volume[3], foreground=[(20, 20)])
    assert backend.encoder_calls == 1 and backend.decoder_calls == 3
    assert not np.array_equal(first.probability, again.probability)  # the points change the prompt
    assert points_only.mask.shape == volume[3].shape
    seg.segment_slice(volume[4], box_yx=(0, 0, 5, 5))  # same content as slice 3: cache hit
    assert backend.encoder_calls == 1
    seg.segment_slice(volume[0], box_yx=(-5, -5, 100, 100))  # clipped, new content
    assert backend.encoder_calls == 2
    with pytest.raises(ValueError):
        seg.segment_slice(volume[3])


def test_segment_nifti_returns_labels_on_the_original_grid(tiny_model):
    import nibabel as nib

    from medlsam.geometry import AxialView

    volume_zyx, labels_zyx = phantom()
    # store the study as RAS (i, j, k) = (x reversed, y reversed, z): a different grid from the view
    data = volume_zyx.transpose(2, 1, 0)[::-1, ::-1, :].copy()
    img = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]))
    view = AxialView.from_nifti(img)
    assert np.array_equal(view.array, volume_zyx)
    seg = Segmenter(SamBackend(tiny_model), box_margin_zyx=(0, 2, 2), progress=False)
    lo_zyx, hi_zyx = boxes_from_labels(labels_zyx)[1]
    lo_ijk, hi_ijk = view.box_to_original(lo_zyx, hi_zyx)
    on_original = seg.segment_nifti(img, {1: (lo_ijk, hi_ijk)}, return_probabilities=True)
    on_view = seg.segment_volume(volume_zyx, {1: (lo_zyx, hi_zyx)}, return_probabilities=True)
    assert on_original.labels.shape == img.shape
    assert np.array_equal(on_original.labels, on_view.labels.transpose(2, 1, 0)[::-1, ::-1, :])
    assert np.allclose(on_original.probabilities[1], on_view.probabilities[1].transpose(2, 1, 0)[::-1, ::-1, :])


def test_margin_in_mm_becomes_pixels_of_the_study_spacing():
    assert margin_in_voxels((2, 10, 10), 8.0, (2.5, 0.8, 0.8)) == (2, 10, 10)  # the paper's slices
    assert margin_in_voxels((2, 10, 10), 8.0, (3.0, 1.6, 2.0)) == (2, 5, 4)  # coarser slices: fewer pixels
    assert margin_in_voxels((2, 10, 10), None, (3.0, 1.6, 2.0)) == (2, 10, 10)  # 'px': unchanged
    assert margin_in_voxels((1, 3, 3), 8.0, None) == (1, 3, 3)  # no spacing known: pixels
    assert parse_margin_mm("8") == 8.0 and parse_margin_mm("px") is None and parse_margin_mm(None) is None
    for bad in ("-1", "wide", "nan", "inf"):
        with pytest.raises(ValueError, match="box margin"):
            parse_margin_mm(bad)


def test_segment_nifti_uses_the_margin_in_mm(tiny_model):
    import nibabel as nib

    volume_zyx, labels_zyx = phantom()
    data = volume_zyx.transpose(2, 1, 0)[::-1, ::-1, :].copy()
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.5, 1.0]))  # 2 mm pixels: 8 mm = 4 pixels
    lo_zyx, hi_zyx = boxes_from_labels(labels_zyx)[1]
    from medlsam.geometry import AxialView

    lo_ijk, hi_ijk = AxialView.from_nifti(img).box_to_original(lo_zyx, hi_zyx)
    backend = SamBackend(tiny_model)
    in_mm = Segmenter(backend, box_margin_zyx=(0, 10, 10), in_plane_margin_mm=8.0, progress=False)
    result = in_mm.segment_nifti(img, {1: (lo_ijk, hi_ijk)}, return_probabilities=True)
    four_px = Segmenter(backend, box_margin_zyx=(0, 4, 4), progress=False).segment_volume(
        volume_zyx, {1: (lo_zyx, hi_zyx)}, return_probabilities=True)
    ten_px = Segmenter(backend, box_margin_zyx=(0, 10, 10), progress=False).segment_volume(
        volume_zyx, {1: (lo_zyx, hi_zyx)}, return_probabilities=True)
    back = result.probabilities[1][::-1, ::-1, :].transpose(2, 1, 0)
    assert np.allclose(back, four_px.probabilities[1])
    assert not np.allclose(back, ten_px.probabilities[1])


# -- acceleration ---------------------------------------------------------------------------------
def test_onnx_encoder_and_decoder_match_eager_and_are_cached(tiny_model, tmp_path):
    volume, labels = phantom()
    boxes = {k: [v] for k, v in boxes_from_labels(labels).items()}
    boxes[3] = {5: [(0, 0, 20, 20), (5, 5, 30, 30), (10, 10, 39, 55)]}  # several boxes: dynamic batch
    eager = SamBackend(tiny_model)
    fast = SamBackend(tiny_model)
    assert accelerate_backend(fast, cache_dir=tmp_path, threads=1)
    exported = sorted(p.name.split("-")[1] for p in tmp_path.glob("*.onnx"))
    assert exported == ["box", "encoder"] and fast.accelerated and fast.box_decoder is not None
    a = Segmenter(eager, progress=False).segment_volume(volume, boxes, return_probabilities=True)
    b = Segmenter(fast, progress=False).segment_volume(volume, boxes, return_probabilities=True)
    assert b.stats["accelerated"] and b.stats["accelerated_decoder"] and not a.stats["accelerated"]
    for k in (1, 2, 3):
        assert np.abs(a.probabilities[k] - b.probabilities[k]).max() < 1e-3
        assert dice(a.labels == k, b.labels == k) >= 0.99
    # point prompts take the eager decoder path and still work on an accelerated backend
    with_points = Segmenter(fast, progress=False).segment_slice(volume[3], (10, 8, 30, 40), foreground=[(20, 20)])
    reference = Segmenter(eager, progress=False).segment_slice(volume[3], (10, 8, 30, 40), foreground=[(20, 20)])
    assert np.abs(with_points.probability - reference.probability).max() < 1e-3
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = SamBackend(tiny_model)
    assert accelerate_backend(again, cache_dir=tmp_path, threads=1)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes  # reused; no temp files left


def test_missing_onnxruntime_falls_back_to_eager(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    backend = SamBackend(tiny_model)
    with pytest.warns(UserWarning, match="onnxruntime"):
        assert not accelerate_backend(backend, cache_dir=tmp_path)
    assert not backend.accelerated and backend.encoder is backend.image_encoder and backend.box_decoder is None


# -- checkpoints ----------------------------------------------------------------------------------
def test_missing_checkpoint_names_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLSAM_MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "medsam_vit_b.pth")):
        build_backend("medsam")
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth.*dl.fbaipublicfiles"):
        build_backend("sam_vit_h", model_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown segmentation backend"):
        build_backend("sam_vit_x")


def test_wrong_or_corrupt_checkpoint_is_a_value_error(tmp_path, tiny_model):
    garbage = tmp_path / "sam_vit_b_01ec64.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        build_backend("sam_vit_b", model_dir=tmp_path, accelerate=False)
    torch.save(tiny_model.state_dict(), garbage)  # a SAM, but not ViT-B
    with pytest.raises(ValueError, match="not a sam_vit_b checkpoint.*shape mismatches"):
        build_backend("sam_vit_b", model_dir=tmp_path, accelerate=False)
    with pytest.raises(ValueError, match="missing keys"):
        load_state_dict(tiny_sam(), _save({"x": torch.zeros(1)}, tmp_path / "other.pth"), "SAM")


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_medsam_checkpoint_loads_from_the_model_folder(tmp_path, monkeypatch):
    # Same code path as the real medsam_vit_b.pth, with a narrow ViT so the test stays fast.
    monkeypatch.setitem(sam_module.VIT_CONFIGS, "vit_b", (16, 1, 2, ()))
    torch.manual_seed(1)
    model = build_sam_model(16, 1, 2, ())
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "medsam_vit_b.pth")
    assert resolve_checkpoint("medsam", None, tmp_path) == tmp_path / "medsam_vit_b.pth"
    backend = build_backend("medsam", model_dir=tmp_path, accelerate=False)
    assert backend.name == "medsam" and backend.style == "medsam" and backend.image_size == 1024
    loaded = backend.image_encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.image_encoder.state_dict().items())
    volume, labels = phantom((2, 40, 56))
    result = Segmenter(backend, progress=False).segment_volume(volume, {1: ((0, 10, 8), (1, 23, 25))})
    assert result.labels.shape == volume.shape and result.stats["encoder_calls"] == 2


# -- boxes JSON of `medlsam localize` -------------------------------------------------------------
def test_boxes_json_selection_uses_spl_parts_and_skips_absent_organs(tmp_path):
    from medlsam.commands.segment import read_localization, select_organs

    organs = {
        "liver": {"id": 1, "present": True, "box_voxel": [[0, 0, 0], [9, 9, 9]],
                  "parts": [{"box_voxel": [[0, 0, 0], [9, 9, 4]]}, {"box_voxel": [[2, 2, 5], [8, 8, 9]]}]},
        "spleen": {"id": 2, "present": False, "box_voxel": [[0, 0, 0], [1, 1, 1]]},
        "kidney_left": {"id": 3, "present": True, "box_voxel": [[1, 2, 3], [4, 5, 6]]},
    }
    path = tmp_path / "boxes.json"
    path.write_text(__import__("json").dumps({"mode": "SPL", "organs": organs}))
    localization = read_localization(path)
    assert localization.label_names == {"liver": 1, "kidney_left": 3} and localization.absent == ["spleen"]
    boxes = localization.prompt_boxes()
    assert boxes[1] == [([0, 0, 0], [9, 9, 4]), ([2, 2, 5], [8, 8, 9])] and boxes[3] == [([1, 2, 3], [4, 5, 6])]
    whole = select_organs(localization, ["3", "liver"]).prompt_boxes("WPL")
    assert whole == {1: [([0, 0, 0], [9, 9, 9])], 3: [([1, 2, 3], [4, 5, 6])]}
    with pytest.raises(ValueError, match="unknown organ"):
        select_organs(localization, ["pancreas"])
    path.write_text('{"organs": {}}')
    with pytest.raises(ValueError, match="'organs'"):
        read_localization(path)
    path.write_text('{"organs": {"liver": {"id": 1, "box_voxel": [[0, 0], [1, 1]]}}}')
    with pytest.raises(ValueError, match="box_voxel"):
        read_localization(path)
