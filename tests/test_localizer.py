"""MedLAM templates and localization on tiny generated studies."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medlsam.medlam.checkpoint import load_medlam, save_medlam
from medlsam.medlam.localizer import Localizer, LocalizerSettings
from medlsam.medlam.network import MedLAMConfig, MedLAMNet
from medlsam.medlam.patches import PatchEmbedder
from medlsam.medlam.templates import (
    EXTREME_POINTS, TemplateMismatchError, TemplateSet, compute_support, extreme_points, spl_parts,
)
from medlsam.paths import DEMO_MEDLAM
from medlsam.synthetic import LABEL_MAP, generate_study

# organs the fast tests template (all organs of three supports would cost minutes on a shared CPU)
ORGANS = ["liver", "spleen", "heart", "kidney_left"]
SMALL = MedLAMConfig(base_channels=4, patch_size=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0))


@pytest.fixture(scope="module")
def random_embedder():
    torch.manual_seed(0)
    net = MedLAMNet(SMALL)
    embedder = PatchEmbedder(net)
    from medlsam.medlam.checkpoint import weights_fingerprint

    embedder.fingerprint = weights_fingerprint(net)
    return embedder


@pytest.fixture(scope="module")
def studies():
    return {seed: generate_study(seed, preset="tiny", scan_range="chest_abdomen_pelvis") for seed in (11, 12, 13)}


def drop_organ(label: nib.Nifti1Image, organ: str) -> nib.Nifti1Image:
    data = np.asanyarray(label.dataobj).copy()
    data[data == LABEL_MAP[organ]] = 0
    return nib.Nifti1Image(data, label.affine)


def test_extreme_points_of_a_known_shape():
    z, y, x = np.mgrid[2:7, 10:15, 20:31]
    points = np.stack([z.ravel(), y.ravel(), x.ravel()], axis=1).astype(float)
    ext = extreme_points(points)
    assert ext[0, 0] == 2 and ext[1, 0] == 6  # z_min, z_max planes
    assert ext[2, 1] == 10 and ext[3, 1] == 14
    assert ext[4, 2] == 20 and ext[5, 2] == 30
    assert np.allclose(ext[0, 1:], [12, 25])  # centroid of the z_min face
    assert len(EXTREME_POINTS) == 6


def test_spl_part_count_follows_organ_height():
    def column(height_vox):
        z = np.arange(height_vox, dtype=float)
        return np.stack([z, np.zeros_like(z), np.zeros_like(z)], axis=1)

    # 3 mm grid, 40 mm interval: 30 mm -> 1 part, 130 mm -> 3, 600 mm -> capped at 6
    assert len(spl_parts(column(11), 3.0, 40.0)) == 1
    assert len(spl_parts(column(44), 3.0, 40.0)) == 3
    assert len(spl_parts(column(201), 3.0, 40.0)) == 6
    parts = spl_parts(column(44), 3.0, 40.0)
    assert parts[0][0, 0] == 0 and parts[-1][1, 0] == 43  # the parts cover the organ end to end


def test_templates_from_supports_with_missing_organs(random_embedder, studies, tmp_path):
    (s1, s2, s3) = studies.values()
    templates = TemplateSet(random_embedder.fingerprint, SMALL.to_dict(), max_supports=5)
    templates.add(compute_support(random_embedder, s1.image, s1.label, LABEL_MAP, "s1", organs=ORGANS), LABEL_MAP)
    templates.add(compute_support(random_embedder, s2.image, drop_organ(s2.label, "spleen"), LABEL_MAP, "s2",
                                  organs=ORGANS), LABEL_MAP)
    templates.add(compute_support(random_embedder, s3.image, drop_organ(s3.label, "liver"), LABEL_MAP, "s3",
                                  organs=ORGANS), LABEL_MAP)
    summary = templates.summary()
    assert summary["spleen"]["supports"] == 2 and "s2" not in summary["spleen"]["study_ids"]
    assert summary["liver"]["supports"] == 2 and "s3" not in summary["liver"]["study_ids"]
    assert summary["heart"]["supports"] == 3
    liver = templates.template("liver")
    assert liver.n_supports == 2 and liver.wpl.latents.shape == (6, 3)
    # windows are unit feature vectors (averaged, renormalised)
    norms = liver.wpl.windows[2].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    # round trip through the versioned file, and refusal with other weights
    path = tmp_path / "templates.pt"
    templates.save(path)
    again = TemplateSet.load(path, expected_fingerprint=random_embedder.fingerprint)
    assert again.summary() == summary
    assert torch.allclose(again.template("liver").wpl.latents, liver.wpl.latents)
    with pytest.raises(TemplateMismatchError, match="other MedLAM weights"):
        TemplateSet.load(path, expected_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="no support template"):
        templates.template("not_an_organ")


def test_max_supports_keeps_the_most_recent(random_embedder, studies):
    templates = TemplateSet(random_embedder.fingerprint, SMALL.to_dict(), max_supports=2)
    for n, study in enumerate(studies.values()):
        templates.add(compute_support(random_embedder, study.image, study.label, LABEL_MAP, f"s{n}",
                                      organs=["liver"]), LABEL_MAP)
    assert templates.summary()["liver"]["study_ids"] == ["s1", "s2"]


def test_bad_supports_are_refused(random_embedder, studies):
    study = studies[11]
    empty = nib.Nifti1Image(np.zeros(study.image.shape, np.uint8), study.image.affine)
    with pytest.raises(ValueError, match="no foreground"):
        compute_support(random_embedder, study.image, empty, LABEL_MAP, "x")
    wrong = nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), study.image.affine)
    with pytest.raises(ValueError, match="shape"):
        compute_support(random_embedder, study.image, wrong, LABEL_MAP, "x")
    unknown = nib.Nifti1Image(np.full(study.image.shape, 250, np.uint8), study.image.affine)
    with pytest.raises(ValueError, match="not in the label map"):
        compute_support(random_embedder, study.image, unknown, LABEL_MAP, "x")


def test_localize_returns_boxes_in_original_voxels_and_world(random_embedder, studies):
    (s1, s2, query) = studies.values()
    templates = TemplateSet(random_embedder.fingerprint, SMALL.to_dict())
    for n, s in enumerate((s1, s2)):
        templates.add(compute_support(random_embedder, s.image, s.label, LABEL_MAP, f"s{n}",
                                      organs=["liver", "spleen"]), LABEL_MAP)
    localizer = Localizer(random_embedder, templates)
    result = localizer.localize(query.image, organs=["liver", str(LABEL_MAP["spleen"])], mode="SPL", seed=3).to_json()
    assert set(result["organs"]) == {"liver", "spleen"}
    shape = np.array(query.image.shape)
    for organ in result["organs"].values():
        lo, hi = map(np.array, organ["box_voxel"])
        assert np.all(lo >= 0) and np.all(hi <= shape - 1) and np.all(lo <= hi)
        # the world box is the unclipped box: where it overlaps the scan it contains the voxel box
        wlo, whi = map(np.array, organ["box_world"])
        corners = nib.affines.apply_affine(query.image.affine, np.array([lo, hi]))
        if organ["fraction_inside"] > 0:
            assert np.all(wlo <= corners.min(0) + 0.01) and np.all(whi >= corners.max(0) - 0.01)  # 2-decimal rounding
        assert organ["parts"] and all(len(p["box_voxel"]) == 2 for p in organ["parts"])
        assert set(organ["extreme_points_voxel"]) == set(EXTREME_POINTS)
    # same seed, same answer
    again = localizer.localize(query.image, organs=["liver"], mode="SPL", seed=3).to_json()
    assert again["organs"]["liver"]["box_voxel"] == result["organs"]["liver"]["box_voxel"]
    with pytest.raises(ValueError, match="no support template"):
        localizer.localize(query.image, organs=["brain"])
    with pytest.raises(ValueError, match="mode"):
        localizer.localize(query.image, mode="XYZ")


def test_official_layout_checkpoint_round_trip(tmp_path):
    path = tmp_path / "m.pt"
    net = MedLAMNet(SMALL)
    save_medlam(path, net, SMALL)
    embedder = PatchEmbedder.from_checkpoint(path)
    loaded, cfg = load_medlam(path)
    assert cfg == SMALL and embedder.fingerprint


@pytest.mark.slow
def test_demo_weights_flag_organs_outside_the_scan_range():
    """With trained weights, a thorax-only query marks pelvic organs absent and thoracic ones present."""
    assert DEMO_MEDLAM.exists(), f"demo MedLAM checkpoint missing: {DEMO_MEDLAM}"
    embedder = PatchEmbedder.from_checkpoint(DEMO_MEDLAM)
    templates = TemplateSet(embedder.fingerprint, embedder.net.config.to_dict())
    for seed in (21, 22, 23):
        s = generate_study(seed, preset="tiny", scan_range="chest_abdomen_pelvis")
        templates.add(compute_support(embedder, s.image, s.label, LABEL_MAP, f"s{seed}",
                                      organs=["urinary_bladder", "heart", "lung_left"]), LABEL_MAP)
    query = generate_study(24, preset="tiny", scan_range="thorax")
    truth = set(np.unique(np.asanyarray(query.label.dataobj)).tolist())
    result = Localizer(embedder, templates).localize(query.image, organs=["urinary_bladder", "heart", "lung_left"]).to_json()
    organs = result["organs"]
    print(json.dumps({k: (v["present"], v["confidence"], v["fraction_inside"]) for k, v in organs.items()}))
    assert LABEL_MAP["urinary_bladder"] not in truth and LABEL_MAP["heart"] in truth
    assert organs["urinary_bladder"]["present"] is False
    assert organs["heart"]["present"] is True and organs["lung_left"]["present"] is True


def test_ncc_peaks_where_the_template_was_cut():
    from medlsam.medlam.localizer import _ncc_maps
    from medlsam.medlam.templates import normalize_intensity

    rng = np.random.default_rng(0)
    patch = torch.from_numpy(rng.normal(size=(1, 1, 20, 20, 20)).astype(np.float32))
    at = (7, 12, 9)
    template = normalize_intensity(patch[:, :, at[0] - 2:at[0] + 3, at[1] - 2:at[1] + 3, at[2] - 2:at[2] + 3].clone())
    ncc = _ncc_maps(patch, template)[0]
    assert tuple(np.unravel_index(int(ncc.argmax()), ncc.shape)) == at
    assert float(ncc.max()) == pytest.approx(1.0, abs=1e-4)
    assert float(ncc.abs().max()) <= 1.0 + 1e-4
    # brighter and offset intensities do not change the match (normalised), away from the zero padding
    inner = (slice(2, -2),) * 3
    assert torch.allclose(_ncc_maps(3 * patch + 5, template)[0][inner], ncc[inner], atol=1e-3)
