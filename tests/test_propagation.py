"""Propagated prompts (prompting="propagate"): walks along z, their ends, key slices, the memo.

A fake backend segments the bright pixels inside each box prompt (like a SAM-family model, it
takes whatever the box holds) and predicts IoU 0.9 for a non-empty mask, so the walk logic is
checked exactly and in milliseconds. The real LiteMedSAM check is in test_segment_litemedsam.py.
"""

import numpy as np
import pytest

from medlsam.segment import PropagationSettings, Segmenter, TrackedPrompts, dice
from medlsam.segment.propagation import BoxPart, box_parts, check_prompting, grow_box, keep_prompt_slices, mask_box


class BrightInBox:
    """Masks the pixels brighter than soft tissue inside each box; IoU prediction 0.9 (or `score`)."""

    name = "bright-in-box"
    accelerated = False
    box_decoder = None

    def __init__(self, score=None):
        self.encoder_calls = self.decoder_calls = 0
        self.encode_seconds = self.decode_seconds = 0.0
        self.score = score  # optional (image, mask) -> IoU prediction

    def encode(self, image_255):
        self.encoder_calls += 1
        return np.asarray(image_255)

    def decode_scored(self, image, boxes_xyxy, points_xy=None, point_labels=None):
        self.decoder_calls += 1
        logits = np.full((len(boxes_xyxy), *image.shape), -10.0, np.float32)
        scores = np.zeros(len(boxes_xyxy), np.float32)
        for n, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_xyxy, int)):
            mask = np.zeros(image.shape, bool)
            mask[y0:y1 + 1, x0:x1 + 1] = True
            mask &= image > 150  # soft-tissue window: 150 grey ~ 75 HU
            logits[n][mask] = 10.0
            scores[n] = (0.9 if mask.any() else 0.1) if self.score is None else self.score(image, mask)
        return logits, scores

    def decode(self, image, boxes_xyxy, points_xy=None, point_labels=None):
        return self.decode_scored(image, boxes_xyxy)[0]


def drifting_tube(depth=24, drift=1):
    """A bright 8 x 8 tube moving `drift` px in x per slice on slices 3..20, a bright distractor beside
    its early course (inside the tube's 3D box, away from the tube) and one above and below it."""
    volume = np.full((depth, 64, 96), -80.0, np.float32)
    labels = np.zeros(volume.shape, np.uint8)
    for z in range(3, 21):
        x = 10 + drift * z
        labels[z, 20:28, x:x + 8] = 1
    volume[labels == 1] = 120
    volume[3:8, 20:28, 34:40] = 120  # beside the tube's early slices, inside its 3D box
    volume[:2, 20:28, 10:40] = 120  # beyond the tube's ends along z
    volume[22:, 20:28, 10:40] = 120
    return volume, labels


def tube_box(labels, pad_z=2):
    zs, ys, xs = np.nonzero(labels == 1)
    return (zs.min() - pad_z, ys.min(), xs.min()), (zs.max() + pad_z, ys.max(), xs.max())


def segmenter(backend, prompting="propagate", **settings):
    settings = {"margin_mm": 2.0, "min_area_mm2": 1.0, **settings}
    return Segmenter(backend, box_margin_zyx=(0, 1, 1), progress=False, prompting=prompting,
                     propagation=PropagationSettings(**settings))


def test_prompts_follow_the_organ_and_stop_where_it_ends():
    volume, labels = drifting_tube()
    box = {1: tube_box(labels)}  # 3D box two slices beyond each end, as MedLAM's margin makes it
    old = segmenter(BrightInBox(), "box").segment_volume(volume, box, spacing_zyx=(1, 1, 1))
    new = segmenter(BrightInBox()).segment_volume(volume, box, spacing_zyx=(1, 1, 1))
    truth = labels == 1
    # the box holds the distractor on slices 3-7 and the structures beyond the tube's ends
    assert dice(old.labels == 1, truth) < 0.8
    assert dice(new.labels == 1, truth) > 0.99
    assert new.stats["prompting"] == "propagate" and old.stats["prompting"] == "box"
    # the walk decodes the tube's 18 slices and the first empty slice at each end, no more
    assert new.stats["encoder_calls"] == 18 + 2 <= old.stats["encoder_calls"] == 22
    prompts = new.prompts[1]
    assert sorted(prompts) == list(range(3, 21))
    y0, x0, y1, x1 = prompts[12][0]
    assert x0 >= 10 + 12 - 4 and x1 <= 10 + 12 + 7 + 4  # the prompt hugs the tube, not the whole box


def test_a_low_iou_prediction_ends_the_walk():
    volume, labels = drifting_tube()
    box = {1: tube_box(labels)}
    # the decoder doubts every mask above slice 14 (z is read from the grey level we plant on column 0)
    volume[:, 0, 0] = np.arange(volume.shape[0]) * 10 - 160
    doubt = lambda image, mask: 0.2 if image[0, 0] > (14 * 10 - 160 + 160) * 255 / 400 else 0.9
    result = segmenter(BrightInBox(doubt), min_score=0.5).segment_volume(volume, box, spacing_zyx=(1, 1, 1))
    kept = np.flatnonzero((result.labels == 1).any(axis=(1, 2)))
    assert kept.min() == 3 and kept.max() == 14


def test_key_slices_share_encoder_passes_and_interpolate_between_them():
    volume, labels = drifting_tube(depth=40, drift=0)
    labels[:] = 0
    labels[3:37, 20:28, 30:38] = 1  # a straight tube, long enough for several key slices
    volume[:] = -80
    volume[labels == 1] = 120
    second = np.zeros_like(labels)
    second[10:30, 40:50, 60:70] = 2
    volume[second == 2] = 120
    boxes = {1: tube_box(labels), 2: ((10, 40, 60), (29, 49, 69))}
    every = segmenter(BrightInBox()).segment_volume(volume, boxes, spacing_zyx=(1.0, 1, 1))
    keyed = segmenter(BrightInBox(), step_mm=4.0).segment_volume(volume, boxes, spacing_zyx=(1.0, 1, 1))
    assert keyed.stats["encoder_calls"] <= every.stats["encoder_calls"] / 3
    # both organs are decoded on the same key slices (z % 4 == 0), so they share encoder passes
    assert set(keyed.prompts[2]) <= set(keyed.prompts[1]) and all(z % 4 == 0 for z in keyed.prompts[1])
    assert keyed.stats["interpolated_slices"] > 0
    assert dice(keyed.labels == 1, labels == 1) > 0.9 and dice(keyed.labels == 2, second == 2) > 0.9


def test_memo_budget_only_costs_encoder_passes():
    volume, labels = drifting_tube()
    boxes = {1: tube_box(labels), 2: ((0, 20, 10), (1, 27, 39))}  # two walks with different starts
    roomy = segmenter(BrightInBox()).segment_volume(volume, boxes, spacing_zyx=(1, 1, 1))
    tight = Segmenter(BrightInBox(), box_margin_zyx=(0, 1, 1), progress=False, prompting="propagate",
                      propagation=PropagationSettings(margin_mm=2.0, min_area_mm2=1.0), memo_budget_mb=0)
    again = tight.segment_volume(volume, boxes, spacing_zyx=(1, 1, 1))
    assert np.array_equal(roomy.labels, again.labels)
    assert again.stats["encoder_calls"] >= roomy.stats["encoder_calls"]


def test_restricted_slices_limit_the_walk():
    volume, labels = drifting_tube()
    seg = segmenter(BrightInBox())
    full = seg.segment_volume(volume, {1: tube_box(labels)}, spacing_zyx=(1, 1, 1))
    some = seg.segment_volume(volume, {1: tube_box(labels)}, spacing_zyx=(1, 1, 1), slices=range(8, 15))
    assert set(np.flatnonzero((some.labels == 1).any(axis=(1, 2)))) == set(range(8, 15))
    assert np.array_equal(some.labels[8:15], full.labels[8:15])
    tracked = TrackedPrompts(box_parts({1: [tube_box(labels)]}, volume.shape, (0, 1, 1)))
    assert keep_prompt_slices(tracked, {1: [2, 3]}).slices == {1: {2, 3}}
    assert not keep_prompt_slices(tracked, {})


def test_per_slice_boxes_are_used_as_given_whatever_the_prompting():
    volume, labels = drifting_tube()
    per_slice = {1: {z: (20, 10, 27, 40) for z in range(3, 8)}}
    result = segmenter(BrightInBox()).segment_volume(volume, per_slice)
    assert result.stats["prompting"] == "box" and result.stats["encoder_calls"] == 5


def test_helpers_and_settings():
    assert mask_box(np.zeros((4, 4), bool)) is None
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True
    assert mask_box(mask) == (2, 3, 4, 6)
    assert grow_box((2, 3, 4, 6), (2, 2), (0, 0, 9, 7)) == (0, 1, 6, 7)
    assert grow_box((0, 0, 1, 1), (1, 1), (5, 5, 9, 9)) == (5, 5, 5, 5)  # kept inside the limit
    parts = box_parts({3: [((2, 10, 10), (6, 20, 20))]}, (8, 30, 30), (2, 3, 3))
    assert parts == {3: [BoxPart((0, 7, 7), (7, 23, 23), 4)]}
    assert PropagationSettings(step_mm=10).step_slices(2.5) == 4 and PropagationSettings().step_slices(2.5) == 1
    assert PropagationSettings(margin_mm=4).margin_px((3.0, 2.0, 0.8)) == (2, 5)
    assert check_prompting(None) == "box" and check_prompting("PROPAGATE") == "propagate"
    for bad in ({"margin_mm": -1}, {"min_score": 1.5}, {"step_mm": float("nan")}):
        with pytest.raises(ValueError, match="propagation"):
            PropagationSettings(**bad)
    with pytest.raises(ValueError, match="prompting"):
        check_prompting("snake")


# -- key slices for box prompts ---------------------------------------------------------------
def test_box_key_slices_cut_encoder_passes_and_interpolate_to_the_same_masks():
    """Box prompting with key slices 4 mm apart on 1 mm slices: about a quarter of the encoder passes,
    every organ's end slices segmented, the slices between get the interpolated masks (here: identical
    to segmenting every slice, since the organs do not change between key slices)."""
    from medlsam.segment.key_slices import KeySlices, key_step

    volume = np.full((40, 64, 96), -80.0, np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    truth[3:37, 20:28, 30:38] = 1
    truth[10:30, 40:50, 60:70] = 2
    volume[truth > 0] = 120
    boxes = {1: ((3, 20, 30), (36, 27, 37)), 2: ((10, 40, 60), (29, 49, 69))}
    every = segmenter(BrightInBox(), prompting="box").segment_volume(volume, boxes, spacing_zyx=(1.0, 1, 1))
    keyed_segmenter = Segmenter(BrightInBox(), box_margin_zyx=(0, 1, 1), progress=False, key_slice_mm=4.0)
    keyed = keyed_segmenter.segment_volume(volume, boxes, spacing_zyx=(1.0, 1, 1))
    assert every.stats["encoder_calls"] == 34 and keyed.stats["encoder_calls"] <= 13
    assert {3, 36, 10, 29} <= set(keyed.prompts[1]) | set(keyed.prompts[2])  # organ ends are key slices
    assert keyed.stats["interpolated_slices"] == 34 - keyed.stats["key_slices"]
    assert np.array_equal(keyed.labels, every.labels)
    assert dice(keyed.labels == 1, truth == 1) == 1.0 and dice(keyed.labels == 2, truth == 2) == 1.0
    # the step follows the slice spacing; gaps in a label's prompts are never interpolated across
    assert key_step(5.0, 2.5) == 2 and key_step(5.0, 5.0) == 1 and key_step(0, 1.0) == 1 and key_step(5, None) == 1
    gap = KeySlices({1: {z: [(0, 0, 4, 4)] for z in (0, 1, 2, 3, 7, 8, 9)}}, step=4)
    assert gap.keys() == {0, 3, 7, 8, 9}  # every 4th slice and both ends of each run
    assert gap.between(3, 7) == {} and gap.between(0, 3) == {1: [1], 2: [1]}


def test_box_key_slices_interpolate_a_moving_organ_between_key_slices():
    """An organ drifting 1 px per slice: the interpolated slices lie between the key slices' masks, so
    the result stays close to segmenting every slice (Dice > 0.9) with a third of the encoder passes."""
    volume, labels = drifting_tube(depth=24, drift=1)
    volume[:2], volume[22:] = -80, -80
    volume[3:8, 20:28, 34:40] = -80  # no distractor: only the interpolation differs
    boxes = {1: tube_box(labels, pad_z=0)}
    every = segmenter(BrightInBox(), prompting="box").segment_volume(volume, boxes, spacing_zyx=(1.0, 1, 1))
    keyed = Segmenter(BrightInBox(), box_margin_zyx=(0, 1, 1), progress=False, key_slice_mm=3.0).segment_volume(
        volume, boxes, spacing_zyx=(1.0, 1, 1))
    assert keyed.stats["encoder_calls"] <= every.stats["encoder_calls"] / 2.5
    assert dice(keyed.labels == 1, labels == 1) > 0.9
    assert not np.array_equal(keyed.labels, every.labels)  # interpolated, not copied


def test_pipeline_bench_configs_name_prompting_and_options():
    from medlsam.commands.bench_pipeline import parse_config

    assert parse_config("box") == ("box", {})
    assert parse_config("box:key_slice_mm=5") == ("box", {"key_slice_mm": 5.0})
    assert parse_config("box:key_slice_mm=5,one_window=1") == ("box", {"key_slice_mm": 5.0, "one_window": True})
    assert parse_config("propagate:step_mm=6,refine_start=no") == ("propagate", {"step_mm": 6.0, "refine_start": False})
    with pytest.raises(ValueError, match="keys among"):
        parse_config("box:foo=1")
    with pytest.raises(ValueError):
        parse_config("boxes")
    from medlsam.commands.bench_pipeline import parse_localization

    assert parse_localization("box") == ("box", {}, "medlam", "WPL")
    assert parse_localization("box:key_slice_mm=5@registration/spl") == ("box", {"key_slice_mm": 5.0}, "registration", "SPL")
    with pytest.raises(ValueError, match="after '@'"):
        parse_localization("box@elastix")


@pytest.mark.slow  # ~170 LiteMedSAM encoder passes per configuration: 3-8 min on 2 cores
def test_pipeline_bench_runs_registration_configs_side_by_side(tmp_path, capsys):
    """`medlsam bench --pipeline` on a tiny generated dataset (6 mm slices): every-slice boxes against key
    slices 12 mm apart, both from registration SPL boxes; one localization, per-config calls and Dice."""
    import argparse
    import json

    from medlsam.commands import bench_pipeline
    from medlsam.synthetic import write_sample_dataset

    root = tmp_path / "data"
    write_sample_dataset(root, n_studies=3, n_supports=2, seed=11, preset="tiny", progress=False)
    out = tmp_path / "bench.json"
    args = argparse.Namespace(dataset=root, study="synct_0002", templates=None, repeats=1, threads=2, seed=0, out=out,
                              compare=["box@registration/SPL", "box:key_slice_mm=12@registration/SPL"])
    assert bench_pipeline.run(args) == 0
    report = json.loads(out.read_text())
    every, keyed = (report["configs"][c] for c in args.compare)
    assert keyed["encoder_calls"] < every["encoder_calls"]
    assert keyed["stats"]["interpolated_slices"] > 0 and every["localize_s"] == keyed["localize_s"]
    assert every["mean_dice_vs_truth"] > 0.3  # liver-sized organs on 96 x 96 slices
    assert min(keyed[f"dice_vs_{args.compare[0]}"][o] for o in ("liver", "spleen")) > 0.8
    assert "registration (SPL): localized" in capsys.readouterr().out


def test_app_conf_key_slice_mm_is_checked(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "medlsam"))
    from tasks.settings import AppSettings

    def conf(**values):
        return AppSettings.from_conf({"model_dir": str(tmp_path / "m"), **values}, str(tmp_path), str(tmp_path / "s"))

    assert conf().key_slice_mm == 5.0 and conf(key_slice_mm="0").key_slice_mm == 0.0
    for bad in ("-1", "80", "five"):
        with pytest.raises(ValueError, match="key_slice_mm"):
            conf(key_slice_mm=bad)
    with pytest.raises(ValueError, match="key_slice_mm"):
        Segmenter(BrightInBox(), key_slice_mm=-2)
