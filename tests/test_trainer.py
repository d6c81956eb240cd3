"""MedLAM pretraining: sampler, position tracking, RDR/MSS losses on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from medlsam.medlam.network import patch_start, relative_offset_mm
from trainers.medlam.augment import CropAugmenter
from trainers.medlam.config import TrainConfig
from trainers.medlam.losses import mss_loss, rdr_loss, rdr_target_mm
from trainers.medlam.sampler import (
    BodyExtent,
    MSSBatchSampler,
    PatchPairDataset,
    collate_pairs,
    crop_zero_padded,
    position_grid_mm,
)

torch.set_num_threads(1)
SPACING = (6.0, 5.0, 4.0)  # anisotropic on purpose


def small_cfg(**kw) -> TrainConfig:
    values = dict(base_channels=2, patch_size=(32, 32, 32), spacing_mm=SPACING, batch_size=4, mss_pairs=2,
                  samples_per_volume=8, num_workers=0, iterations=2, log_every=1)
    values.update(kw)
    return TrainConfig(**values)


def smooth_volume(shape=(60, 50, 50), seed=0) -> np.ndarray:
    """A smooth, structured volume with a 'body' (values > 0.1) inside a margin of air."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.random(shape), 3.0)
    vol = (vol - vol.min()) / (vol.max() - vol.min()) * 0.7 + 0.2
    out = np.zeros(shape, np.float32)
    out[10:50, 8:42, 5:45] = vol[10:50, 8:42, 5:45]
    return out


def test_body_extent_and_even_centres_cover_the_whole_body():
    vol = smooth_volume()
    extent = BodyExtent.of(vol, 0.1)
    assert extent.z_range == (10, 49)
    assert tuple(extent.yx_lo[20]) == (8, 5) and tuple(extent.yx_hi[20]) == (41, 44)
    rng = np.random.default_rng(1)
    centres = np.array([extent.sample_centre(rng) for _ in range(4000)])
    assert centres[:, 0].min() == 10 and centres[:, 0].max() == 49
    assert np.all(vol[tuple(centres.T)] > 0.1)  # every centre lies in the body
    # even over z: each quarter of the body's slices gets ~25 % of the centres
    quarters = np.histogram(centres[:, 0], bins=4, range=(10, 50))[0] / len(centres)
    assert np.all(np.abs(quarters - 0.25) < 0.04), quarters
    with pytest.raises(ValueError, match="body threshold"):
        BodyExtent.of(np.zeros((40, 40, 40), np.float32), 0.1)


def test_crop_zero_padded_and_position_grid():
    vol = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    crop = crop_zero_padded(vol, np.array([-2, 1, 3]), (4, 4, 4))
    assert crop.shape == (4, 4, 4)
    assert np.all(crop[:2] == 0) and crop[2, 0, 0] == vol[0, 1, 3] and np.all(crop[:, :, 4:] == 0)
    grid = position_grid_mm(np.array([-2, 1, 3]), (4, 4, 4), SPACING)
    assert tuple(grid[:, 2, 0, 0]) == (0.0, 5.0, 12.0)  # voxel (0, 1, 3) of the volume in mm


def test_augmentation_tracks_positions():
    """After affine + elastic deformation, each voxel's value equals the source volume at its tracked
    position (the volume is smooth, so interpolation error is small)."""
    vol = smooth_volume()
    start = np.array([14, 10, 8])
    size = (36, 28, 32)
    crop = crop_zero_padded(vol, start, size)
    positions = position_grid_mm(start, size, SPACING)
    augmenter = CropAugmenter(intensity_prob=0, noise_prob=0, affine_prob=1, elastic_prob=1, elastic_magnitude=150.0)
    aug = augmenter(crop, positions, np.random.default_rng(3))
    moved_vox = np.linalg.norm((aug.positions_mm - positions) / np.reshape(SPACING, (3, 1, 1, 1)), axis=0)
    assert moved_vox[aug.valid].mean() > 0.5  # the transform really moved things
    assert 0.3 < aug.valid.mean() < 1.0  # some voxels came from outside the crop
    source_idx = aug.positions_mm / np.reshape(SPACING, (3, 1, 1, 1))
    expected = ndimage.map_coordinates(vol, source_idx.reshape(3, -1), order=1).reshape(size)
    err = np.abs(aug.image - expected)[aug.valid]
    assert err.mean() < 0.01 and np.percentile(err, 99) < 0.05, (err.mean(), np.percentile(err, 99))
    # a wrong tracking (positions of the unaugmented crop) is far off
    wrong = np.abs(aug.image - crop)[aug.valid]
    assert wrong.mean() > 3 * err.mean()


def test_dataset_items_and_rdr_target_match_inference_formula():
    vols = [smooth_volume(seed=0), smooth_volume(seed=1)]
    cfg = small_cfg()
    ds = PatchPairDataset(vols, SPACING, cfg)
    n = len(ds)
    plain, with_aug = ds[3], ds[3 + n]
    assert "aug_a" not in plain and with_aug["aug_a"].shape == (1, 32, 32, 32)
    assert with_aug["aug_pos_mm"].shape == (3, 32, 32, 32) and with_aug["point_idx"].shape == (20, 3)
    again = ds[3 + n]
    assert torch.equal(again["aug_a"], with_aug["aug_a"])  # deterministic per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[3 + n]["aug_a"], with_aug["aug_a"])

    item = plain
    vol = vols[int(item["volume_id"])]
    spacing = np.array(SPACING)
    # the centre in mm is the voxel the patch is centred on (patch_start convention)
    for key in ("a", "b"):
        centre = np.rint(item[f"centre_{key}_mm"].numpy() / spacing).astype(int)
        expected = crop_zero_padded(vol, patch_start(centre, cfg.patch_size), cfg.patch_size)
        assert np.array_equal(item[f"ori_{key}"][0].numpy(), expected)
    # RDR: target = (c_support - c_query) * spacing in mm (a = query, b = support) ...
    target = rdr_target_mm(item["centre_a_mm"][None], item["centre_b_mm"][None])
    c_a = item["centre_a_mm"].numpy() / spacing
    c_b = item["centre_b_mm"].numpy() / spacing
    np.testing.assert_allclose(target[0].numpy(), (c_b - c_a) * spacing, atol=1e-4)
    # ... and latents that reproduce it exactly put the inference estimate c_q + d / spacing on c_s
    r = torch.tensor(cfg.rdr_range_mm)
    p_q = torch.zeros(1, 3)
    p_s = torch.atanh(target / r)
    d = relative_offset_mm(p_q, p_s, cfg.rdr_range_mm)
    np.testing.assert_allclose(c_a + d[0].numpy() / spacing, c_b, atol=1e-3)
    assert float(rdr_loss(p_q, p_s, target, cfg.rdr_range_mm)) < 1e-6
    flipped = float(rdr_loss(p_s, p_q, target, cfg.rdr_range_mm))
    assert flipped == pytest.approx(4 * float((target**2).mean()), rel=1e-4)  # mm^2, sign matters


def test_mss_points_are_tracked_to_the_augmented_crop():
    vols = [smooth_volume()]
    cfg = small_cfg(affine_prob=1.0, elastic_prob=1.0, intensity_prob=0.0, noise_prob=0.0)
    ds = PatchPairDataset(vols, SPACING, cfg)
    item = ds[len(ds) + 5]
    idx = item["point_idx"].numpy()
    ori = item["ori_a"][0].numpy()
    assert np.all(ori[tuple(idx.T)] > cfg.body_threshold)  # points are taken in the body
    # the point positions (mm) index the volume at the value seen in crop a
    src = item["point_mm"].numpy() / np.array(SPACING)
    np.testing.assert_allclose(vols[0][tuple(np.rint(src).astype(int).T)], ori[tuple(idx.T)], atol=1e-6)


def test_batch_sampler_marks_mss_items_and_collates():
    sampler = list(range(10))
    batches = list(MSSBatchSampler(sampler, batch_size=4, mss_pairs=2, dataset_len=100))
    assert batches == [[100, 101, 2, 3], [104, 105, 6, 7]]
    vols = [smooth_volume()]
    ds = PatchPairDataset(vols, SPACING, small_cfg())
    batch = collate_pairs([ds[len(ds)], ds[len(ds) + 1], ds[2], ds[3]])
    assert batch["ori_a"].shape == (4, 1, 32, 32, 32) and batch["aug_a"].shape == (2, 1, 32, 32, 32)


def _identity_features(shape, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(1, channels, *shape, generator=g)
    return [F.avg_pool3d(full, 4), F.avg_pool3d(full, 2), full]


def _mss_case(shuffle: bool, augment: bool):
    """Features that are a fixed function of physical position: 'perfect' features; shuffling the
    augmented crop's voxels destroys the correspondence."""
    vol = smooth_volume()
    patch = (32, 32, 32)
    start = np.array([18, 12, 12])
    positions = position_grid_mm(start, patch, SPACING)
    if augment:
        aug = CropAugmenter(intensity_prob=0, noise_prob=0, affine_prob=1, elastic_prob=1)(
            crop_zero_padded(vol, start, patch), positions, np.random.default_rng(0))
        aug_pos, valid = aug.positions_mm, aug.valid
    else:
        aug_pos, valid = positions, np.ones(patch, bool)
    # a smooth random field of position: phi(mm) sampled at ori and at tracked aug positions
    rng = np.random.default_rng(1)
    freqs = rng.normal(size=(16, 3)) / 25.0
    phase = rng.uniform(0, 2 * np.pi, 16)

    def phi(pos):
        return torch.from_numpy(np.cos(np.tensordot(freqs, pos, axes=([1], [0])) + phase[:, None, None, None]).astype(np.float32))[None]

    def levels(full):
        return [F.avg_pool3d(full, 4), F.avg_pool3d(full, 2), full]

    f_ori = levels(phi(positions))
    f_aug_full = phi(aug_pos)
    if shuffle:
        perm = torch.randperm(f_aug_full[0, 0].numel(), generator=torch.Generator().manual_seed(2))
        f_aug_full = f_aug_full.reshape(1, 16, -1)[:, :, perm].reshape(f_aug_full.shape)
    f_aug = levels(f_aug_full)
    pts = np.stack([rng.integers(4, 28, 20) for _ in range(3)], axis=1)
    pts_mm = (start + pts) * np.array(SPACING)
    return mss_loss(
        f_ori, f_aug, torch.from_numpy(pts)[None], torch.from_numpy(pts_mm.astype(np.float32))[None],
        torch.from_numpy(aug_pos)[None], torch.from_numpy(valid)[None, None], SPACING,
    )


@pytest.mark.parametrize("augment", [False, True])
def test_mss_loss_prefers_matching_features(augment):
    perfect = _mss_case(shuffle=False, augment=augment)
    shuffled = _mss_case(shuffle=True, augment=augment)
    assert perfect.used_points >= 15
    assert float(perfect.loss) < float(shuffled.loss) - 0.5, (float(perfect.loss), float(shuffled.loss))
    assert perfect.hit_rate > 0.5 and shuffled.hit_rate < 0.2


def test_mss_loss_has_gradients_and_skips_points_without_positives():
    f = _identity_features((32, 32, 32))
    f = [x.clone().requires_grad_(True) for x in f]
    pos = torch.from_numpy(position_grid_mm(np.zeros(3, int), (32, 32, 32), SPACING))[None]
    valid = torch.ones(1, 1, 32, 32, 32, dtype=torch.bool)
    valid[..., :16] = False  # the half with x < 16 has no valid voxel
    pts = torch.tensor([[[10, 10, 4], [10, 10, 24]]])
    pts_mm = pts.float() * torch.tensor(SPACING)
    res = mss_loss(f, [x.detach() for x in f], pts, pts_mm, pos, valid, SPACING)
    assert res.used_points == 1
    res.loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in f)


def test_train_config_validation():
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainConfig(patch_size=(40, 32, 32))
    with pytest.raises(ValueError, match="mss_pairs"):
        TrainConfig(batch_size=2, mss_pairs=3)
    with pytest.raises(ValueError, match="pos_radius"):
        TrainConfig(mss_pos_radius_vox=3.0, mss_neg_radius_vox=2.0)
    cosine = TrainConfig(learning_rate=1e-3, lr_schedule="cosine", lr_final_fraction=0.1, iterations=100)
    assert cosine.learning_rate_at(0) == pytest.approx(1e-3)
    assert cosine.learning_rate_at(50) == pytest.approx(0.55e-3)
    assert cosine.learning_rate_at(100) == pytest.approx(1e-4)
    assert TrainConfig(learning_rate=1e-3).learning_rate_at(50) == 1e-3
    cfg = TrainConfig.from_dict(small_cfg().to_dict())
    assert cfg == small_cfg()
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"learning_rat": 1.0})
