"""Streamed template building and MSS give the results of the full-feature-map computation.

The reference functions below are the implementation before streaming (every patch's full
feature maps held at once, windows cut from replicate-padded maps, MSS similarity over the whole
patch then masked to the search box); the streamed code must reproduce them, with the demo
weights and with a random network, while keeping at most one earlier batch of feature maps alive.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medlsam.geometry import MedLAMGrid
from medlsam.medlam.checkpoint import weights_fingerprint
from medlsam.medlam.localizer import _box_sums, _mss_refine, _ncc_maps, _ncc_valid
from medlsam.medlam.network import MedLAMConfig, MedLAMNet
from medlsam.medlam.patches import (
    FEATURE_STRIDES, PatchEmbedder, default_batch_size, extract_patches, feature_windows, unique_centres,
)
from medlsam.medlam.templates import (
    DEFAULT_WINDOW_SIZES, PointSet, compute_support, extreme_points, intensity_window_size, normalize_intensity,
    spl_parts,
)
from medlsam.paths import DEMO_MEDLAM
from medlsam.synthetic import LABEL_MAP, generate_study

SMALL = MedLAMConfig(base_channels=4, patch_size=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0))
ORGANS = ["liver", "kidney_left"]  # liver: several SPL parts


# --- the computation before streaming, kept as the reference --------------------------------------
def reference_windows(features, window_sizes, patch_size):
    out = []
    centre = np.asarray(patch_size) // 2
    for level, (feat, w) in enumerate(zip(features, window_sizes)):
        lo = centre // FEATURE_STRIDES[level] - w // 2 + w
        padded = F.pad(feat, (w, w, w, w, w, w), mode="replicate")
        out.append(padded[:, :, lo[0]:lo[0] + w, lo[1]:lo[1] + w, lo[2]:lo[2] + w])
    return out


def reference_points(embedder, grid, points, window_sizes=DEFAULT_WINDOW_SIZES):
    config = embedder.net.config
    patches = extract_patches(grid.array, points, config.patch_size)
    embedding = embedder(patches, features=True)
    windows = reference_windows(embedding.features, window_sizes, config.patch_size)
    n = intensity_window_size(config.spacing_mm)
    lo = np.asarray(config.patch_size) // 2 - n // 2
    intensity = normalize_intensity(torch.from_numpy(
        patches[:, None, lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n].copy()))
    return PointSet(torch.from_numpy(embedding.latent), windows, intensity)


def reference_ncc(patches, templates):
    n = templates.shape[-1]
    count = float(n**3)
    p = len(patches)
    flat = patches.reshape(1, p, *patches.shape[2:])
    numerator = F.conv3d(flat, templates, padding=n // 2, groups=p)[0]
    box = torch.ones((p, 1, n, n, n))
    mean = F.conv3d(flat, box, padding=n // 2, groups=p)[0] / count
    mean_sq = F.conv3d(flat**2, box, padding=n // 2, groups=p)[0] / count
    norm = torch.sqrt((mean_sq - mean**2).clamp_min(0.0) * count)
    return torch.where(norm > 1e-3, numerator / norm.clamp_min(1e-3), torch.zeros_like(numerator))


def reference_mss(embedder, grid, points, templates, search_fraction=0.25, intensity_weight=1.0):
    patch = np.asarray(embedder.patch_size)
    centres = np.rint(points)
    patches = extract_patches(grid.array, centres, patch)
    embedding = embedder(patches, features=True)
    total = torch.zeros((len(points), *patch))
    for level, feats in enumerate(embedding.features):
        kernels = templates.windows[level]
        w = kernels.shape[-1]
        sim = F.conv3d(feats.reshape(1, -1, *feats.shape[2:]), kernels, padding=w // 2, groups=len(points))
        sim = sim[0] / float(w**3)
        total += F.interpolate(sim[:, None], size=tuple(patch), mode="trilinear", align_corners=False)[:, 0]
    weights = float(len(embedding.features))
    total += intensity_weight * reference_ncc(torch.from_numpy(patches)[:, None], templates.intensity)
    weights += intensity_weight
    total /= weights
    radius = np.maximum(1, (patch * search_fraction).astype(int))
    half = patch // 2
    mask = torch.full(tuple(patch), float("-inf"))
    mask[half[0] - radius[0]:half[0] + radius[0] + 1, half[1] - radius[1]:half[1] + radius[1] + 1,
         half[2] - radius[2]:half[2] + radius[2] + 1] = 0.0
    peak, index = (total + mask).reshape(len(points), -1).max(dim=1)
    offsets = np.stack(np.unravel_index(index.numpy(), tuple(patch)), axis=1) - half
    return centres + offsets, peak.numpy()


# --- fixtures -------------------------------------------------------------------------------------
def _with_fingerprint(embedder):
    embedder.fingerprint = weights_fingerprint(embedder.net)
    return embedder


class _Embedders(dict):
    """The random network at once, the demo weights when a test first asks for them."""

    def __missing__(self, key):
        assert key == "demo" and DEMO_MEDLAM.exists(), f"demo MedLAM checkpoint missing: {DEMO_MEDLAM}"
        self[key] = PatchEmbedder.from_checkpoint(DEMO_MEDLAM)
        return self[key]


@pytest.fixture(scope="module")
def embedders():
    torch.manual_seed(0)
    return _Embedders(random=_with_fingerprint(PatchEmbedder(MedLAMNet(SMALL), batch_size=4)))


@pytest.fixture(scope="module")
def studies():
    return [generate_study(seed, preset="tiny", scan_range="chest_abdomen_pelvis") for seed in (31, 32)]


# --- tests ----------------------------------------------------------------------------------------
def test_feature_windows_repeat_the_border_like_replicate_padding():
    torch.manual_seed(1)
    feats = [torch.randn(3, 5, 4, 4, 4), torch.randn(3, 5, 8, 8, 8), torch.randn(3, 5, 16, 16, 16)]
    # windows wider than the coarse maps reach past their borders
    for sizes in ((3, 3, 5), (7, 9, 5)):
        for got, want in zip(feature_windows(feats, sizes, (16, 16, 16)), reference_windows(feats, sizes, (16, 16, 16))):
            assert torch.equal(got, want)


KINDS = ["random", pytest.param("demo", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_templates_equal_full_feature_maps(embedders, studies, kind):
    embedder = embedders[kind]
    study = studies[0]
    contributions = compute_support(embedder, study.image, study.label, LABEL_MAP, "s", organs=ORGANS)
    config = embedder.net.config
    grid = MedLAMGrid.from_nifti(study.image, config.spacing_mm, config.patch_size)
    for name in ORGANS:
        c = contributions[name]
        # the points compute_support embeds (WPL, then the SPL parts), through the reference
        label = np.asanyarray(study.label.dataobj)
        pts = grid.from_original(np.argwhere(label == LABEL_MAP[name]).astype(np.float64))
        points = np.concatenate([extreme_points(pts), *spl_parts(pts, grid.spacing_mm[0], 40.0)])
        want = reference_points(embedder, grid, points)
        got = PointSet.concat([c.wpl, *c.spl])
        assert len(got.latents) == len(points) == 6 * (1 + len(c.spl))
        assert torch.allclose(got.latents, want.latents, atol=1e-5)
        for level in range(3):
            assert torch.allclose(got.windows[level], want.windows[level], atol=1e-5), (name, level)
        assert torch.allclose(got.intensity, want.intensity, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_mss_equals_full_maps(embedders, studies, kind):
    embedder = embedders[kind]
    support, query = studies
    contributions = compute_support(embedder, support.image, support.label, LABEL_MAP, "s", organs=ORGANS)
    templates = PointSet.concat([p for c in contributions.values() for p in (c.wpl, *c.spl)]).subset(slice(0, 14))
    config = embedder.net.config
    grid = MedLAMGrid.from_nifti(query.image, config.spacing_mm, config.patch_size)
    rng = np.random.default_rng(0)
    points = rng.uniform(0, np.array(grid.valid_shape) - 1, size=(len(templates.latents), 3))
    points[1] = points[0] + 0.2  # two points sharing a patch centre
    got_points, got_peak = _mss_refine(embedder, grid, points, templates, 0.25, 1.0)
    want_points, want_peak = reference_mss(embedder, grid, points, templates)
    assert np.array_equal(got_points, want_points)
    assert np.allclose(got_peak, want_peak, atol=1e-5)
    assert got_peak.max() > got_peak.min()  # not a degenerate all-equal case


def test_feature_maps_of_earlier_batches_are_released(embedders, studies):
    """Memory does not grow with the number of points: when a batch runs, at most the previous
    batch's feature maps are still alive (the full-map computation kept all of them)."""
    embedder = PatchEmbedder(embedders["random"].net, batch_size=2)
    alive, live_counts = [], []
    forward = embedder._forward

    def tracking_forward(x, features):
        gc.collect()
        live_counts.append(sum(ref() is not None for ref in alive))
        latent, feats = forward(x, features)
        if feats is not None:
            alive.extend(weakref.ref(f) for f in feats)
        return latent, feats

    embedder._forward = tracking_forward
    study = studies[0]
    contributions = compute_support(embedder, study.image, study.label, LABEL_MAP, "s", organs=ORGANS)
    n_points = sum(6 * (1 + len(c.spl)) for c in contributions.values())
    assert embedder.forward_calls >= 8 and n_points >= 16
    assert max(live_counts) <= len(FEATURE_STRIDES)  # one earlier batch (3 levels) at most

    alive.clear(), live_counts.clear()
    templates = PointSet.concat([p for c in contributions.values() for p in (c.wpl, *c.spl)])
    grid = MedLAMGrid.from_nifti(studies[1].image, SMALL.spacing_mm, SMALL.patch_size)
    points = np.random.default_rng(1).uniform(0, np.array(grid.valid_shape) - 1, size=(len(templates.latents), 3))
    _mss_refine(embedder, grid, points, templates, 0.25, 1.0)
    assert len(live_counts) >= 8 and max(live_counts) <= len(FEATURE_STRIDES)

    # the full-map call keeps everything: the check above would catch it
    alive.clear(), live_counts.clear()
    embedder(extract_patches(grid.array, points[:8], SMALL.patch_size), features=True)
    assert live_counts[-1] >= 3 * len(FEATURE_STRIDES)


def test_points_sharing_a_centre_share_one_forward_pass(embedders, studies):
    embedder = PatchEmbedder(embedders["random"].net, batch_size=4)
    grid = MedLAMGrid.from_nifti(studies[0].image, SMALL.spacing_mm, SMALL.patch_size)
    points = np.array([[10.2, 20.0, 30.0], [9.8, 20.4, 29.6], [15.0, 20.0, 30.0]])
    centres, inverse = unique_centres(points)
    assert len(centres) == 2 and inverse[0] == inverse[1] != inverse[2]
    latents = embedder.latents(grid.array, points)
    assert embedder.forward_calls == 1
    assert np.array_equal(latents[0], latents[1])
    alone = embedder.latents(grid.array, points[2:])
    assert np.allclose(alone[0], latents[2], atol=1e-6)


def test_ncc_on_the_search_box_equals_the_full_map():
    rng = np.random.default_rng(2)
    patches = torch.from_numpy(rng.uniform(size=(3, 1, 24, 24, 24)).astype(np.float32))
    patches[2] = 0.0  # an all-air patch matches nothing
    templates = normalize_intensity(torch.from_numpy(rng.normal(size=(3, 1, 7, 7, 7)).astype(np.float32)))
    want = reference_ncc(patches, templates)
    assert torch.allclose(_ncc_maps(patches, templates), want, atol=1e-5)
    inner = _ncc_valid(patches[:, :, 2:20, 3:21, 4:22], templates)  # valid positions 5.. of an inner box
    assert torch.allclose(inner, want[:, 5:17, 6:18, 7:19], atol=1e-5)
    sums = _box_sums(patches[:, 0], 7)
    ones = F.conv3d(patches.reshape(1, 3, 24, 24, 24), torch.ones(3, 1, 7, 7, 7), groups=3)[0]
    assert torch.allclose(sums, ones, rtol=1e-5)


def test_default_batch_size_follows_patch_memory_and_device():
    official = MedLAMConfig(base_channels=24, patch_size=(64, 64, 64), spacing_mm=(3, 3, 3))
    demo = MedLAMConfig(base_channels=8, patch_size=(32, 32, 32), spacing_mm=(6, 6, 6))
    assert 1 <= default_batch_size(official, "cpu") <= 3
    assert default_batch_size(demo, "cpu") == 8
    assert default_batch_size(official, "cuda") >= 16 > default_batch_size(official, "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        PatchEmbedder(MedLAMNet(SMALL), batch_size=0)
