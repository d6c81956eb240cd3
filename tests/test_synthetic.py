"""Synthetic CT generator: determinism, geometry, intensities, scan ranges, dataset writer, CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medlsam.synthetic import EXPECTED_ORGAN_HU, LABEL_MAP, PHASES, generate_study, write_sample_dataset

REQUIRED = {
    "liver", "spleen", "kidney_left", "kidney_right", "stomach", "gallbladder", "pancreas", "aorta",
    "inferior_vena_cava", "esophagus", "urinary_bladder", "femoral_head_left", "femoral_head_right",
    "spinal_column", "lung_left", "lung_right", "heart", "adrenal_left", "adrenal_right",
}


def _arrays(study):
    return np.asarray(study.image.dataobj), np.asarray(study.label.dataobj)


def _canonical(img):
    can = nib.as_closest_canonical(img)
    return np.asarray(can.dataobj), can.affine


def _world_centroid(label_img, organ):
    lab = np.asarray(label_img.dataobj)
    idx = np.argwhere(lab == LABEL_MAP[organ])
    assert idx.size, f"{organ} missing"
    return (label_img.affine @ np.r_[idx.mean(axis=0), 1.0])[:3]


@pytest.fixture(scope="module")
def cap_tiny():
    return generate_study(11, "tiny", scan_range="chest_abdomen_pelvis", orientation="RAS")


def test_label_map_is_stable_and_complete():
    assert REQUIRED <= set(LABEL_MAP)
    assert len(LABEL_MAP) >= 16
    assert sorted(LABEL_MAP.values()) == list(range(1, len(LABEL_MAP) + 1))
    assert all(name == name.lower() and " " not in name for name in LABEL_MAP)


def test_same_seed_same_study_and_other_seed_differs():
    a = generate_study(5, "tiny")
    b = generate_study(5, "tiny")
    c = generate_study(6, "tiny", scan_range=a.meta["scan_range"], orientation=a.meta["orientation"])
    ia, la = _arrays(a)
    ib, lb = _arrays(b)
    assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    assert np.allclose(a.image.affine, b.image.affine)
    assert {k: v for k, v in a.meta.items() if k != "seconds"} == {k: v for k, v in b.meta.items() if k != "seconds"}
    ic, _ = _arrays(c)
    assert ia.shape != ic.shape or np.mean(ia != ic) > 0.5
    assert a.meta["organs"] != c.meta["organs"]


def test_types_affine_and_meta(cap_tiny):
    img, lab = _arrays(cap_tiny)
    assert img.dtype == np.int16 and lab.dtype == np.uint8
    assert img.shape == lab.shape == tuple(cap_tiny.meta["shape"])
    assert np.allclose(cap_tiny.image.affine, cap_tiny.label.affine)
    assert nib.aff2axcodes(cap_tiny.image.affine) == ("R", "A", "S")
    assert np.allclose(cap_tiny.image.header.get_zooms(), cap_tiny.meta["spacing"])
    assert set(np.unique(lab)) - {0} <= set(LABEL_MAP.values())
    # the body spans well over a 192 mm patch in-plane, the scan several hundred mm in z
    sx, sy, sz = cap_tiny.meta["spacing"]
    body = img > -400
    xs, ys, zs = np.nonzero(body)
    assert (xs.max() - xs.min()) * sx > 250 and (ys.max() - ys.min()) * sy > 200
    assert img.shape[2] * sz > 550
    assert set(cap_tiny.meta["organs_present"]) == REQUIRED


def test_noise_level_matches_meta():
    study = generate_study(2, "tiny", noise_std=15.0, scan_range="abdomen")
    img, _ = _arrays(study)
    air = img[:8, :8, :].astype(float)  # corner: air, or the -1024 outside the reconstruction circle
    air = air[air > -1024]
    if air.size > 50:
        assert 9 < air.std() < 22
        assert abs(np.median(air) + 1000) < 10


@pytest.mark.parametrize("phase", PHASES)
def test_organ_hu_in_expected_range(phase):
    study = generate_study(21, "default", scan_range="chest_abdomen_pelvis", slice_thickness=5.0,
                           in_plane_spacing=1.9, phase=phase) if phase in ("native", "portal_venous") else \
        generate_study(21, "tiny", scan_range="chest_abdomen_pelvis", phase=phase)
    img, lab = _arrays(study)
    for organ, ranges in EXPECTED_ORGAN_HU.items():
        vox = img[lab == LABEL_MAP[organ]]
        if vox.size < 30:
            continue
        lo, hi = ranges[phase]
        assert lo <= np.median(vox) <= hi, f"{organ} median {np.median(vox)} outside [{lo}, {hi}] ({phase})"
    # context tissues: subcutaneous/visceral fat and table-free air
    fat = img[(img > -190) & (img < -30)]
    assert -130 < np.median(fat) < -60


def test_contrast_phase_changes_enhancement():
    native = generate_study(31, "tiny", scan_range="abdomen", phase="native")
    arterial = generate_study(31, "tiny", scan_range="abdomen", phase="arterial")
    (i0, l0), (i1, l1) = _arrays(native), _arrays(arterial)
    assert np.array_equal(l0, l1)  # same anatomy
    aorta = l0 == LABEL_MAP["aorta"]
    assert np.median(i1[aorta]) - np.median(i0[aorta]) > 120


def test_labels_inside_body(cap_tiny):
    img, lab = _arrays(cap_tiny)
    body = np.zeros(img.shape, bool)
    for k in range(img.shape[2]):
        sl = ndimage.binary_fill_holes(img[:, :, k] > -400)
        comps, n = ndimage.label(sl)
        if n:
            sizes = ndimage.sum(sl, comps, range(1, n + 1))
            body[:, :, k] = comps == (1 + int(np.argmax(sizes)))
    labeled = lab > 0
    assert labeled.sum() > 1000
    assert (labeled & body).sum() / labeled.sum() > 0.995


def test_organs_sit_in_plausible_places(cap_tiny):
    lab = cap_tiny.label
    c = {name: _world_centroid(lab, name) for name in REQUIRED}
    x, y, z = 0, 1, 2  # world RAS+: +x towards the patient's right, +y anterior, +z superior
    right = lambda a, b: c[a][x] > c[b][x]  # noqa: E731  a lies to the patient's right of b
    assert right("liver", "spinal_column") and right("spinal_column", "spleen")
    assert right("kidney_right", "spinal_column") and right("spinal_column", "kidney_left")
    assert right("inferior_vena_cava", "aorta")
    assert right("lung_right", "heart") and right("heart", "lung_left")
    assert right("femoral_head_right", "urinary_bladder") and right("urinary_bladder", "femoral_head_left")
    assert c["lung_left"][z] > c["liver"][z] > c["kidney_left"][z] > c["urinary_bladder"][z]
    assert c["heart"][z] > c["liver"][z] and c["heart"][y] > c["spinal_column"][y]
    assert c["kidney_left"][y] < c["stomach"][y]  # kidneys retroperitoneal, stomach anterior
    assert c["urinary_bladder"][z] < c["kidney_right"][z] - 150


def test_vertebral_bodies_are_labelled_bone(cap_tiny):
    # the T1-L5 vertebrae of an adult hold roughly 400-900 ml of bone; a column labelled without its
    # vertebral bodies (arches and processes only) holds under 300 ml
    img, lab = _arrays(cap_tiny)
    spine = lab == LABEL_MAP["spinal_column"]
    volume_ml = spine.sum() * np.prod(cap_tiny.image.header.get_zooms()[:3]) / 1000.0
    assert 350 < volume_ml < 1200, volume_ml
    # the bodies are trabecular bone inside a cortical shell, far brighter than the discs between them
    assert 200 < np.median(img[spine]) < 500


def test_ras_and_lps_give_same_world_anatomy():
    ras = generate_study(13, "tiny", scan_range="abdomen", orientation="RAS")
    lps = generate_study(13, "tiny", scan_range="abdomen", orientation="LPS")
    sar = generate_study(13, "tiny", scan_range="abdomen", orientation="SAR")
    assert nib.aff2axcodes(lps.image.affine) == ("L", "P", "S")
    assert nib.aff2axcodes(sar.image.affine) == ("S", "A", "R")
    ras_img, ras_aff = _canonical(ras.image)
    for other in (lps, sar):
        img, aff = _canonical(other.image)
        lab, _ = _canonical(other.label)
        assert np.allclose(aff, ras_aff)
        assert np.array_equal(img, ras_img)
        assert np.array_equal(lab, _canonical(ras.label)[0])
        for organ in ("liver", "kidney_left", "aorta"):
            assert np.allclose(_world_centroid(other.label, organ), _world_centroid(ras.label, organ), atol=1e-3)
    # the raw arrays really are stored differently
    assert not np.array_equal(np.asarray(lps.image.dataobj), np.asarray(ras.image.dataobj))


@pytest.mark.parametrize("seed", [3, 4])
def test_scan_range_removes_organs_outside_it(seed):
    thorax = generate_study(seed, "tiny", scan_range="thorax")
    abdomen = generate_study(seed, "tiny", scan_range="abdomen")
    for organ in ("urinary_bladder", "femoral_head_left", "femoral_head_right"):
        assert organ not in thorax.meta["organs_present"]
        assert organ not in abdomen.meta["organs_present"]
        assert not np.any(np.asarray(thorax.label.dataobj) == LABEL_MAP[organ])
    assert {"lung_left", "lung_right", "heart", "esophagus"} <= set(thorax.meta["organs_present"])
    assert {"liver", "kidney_left", "kidney_right", "spleen"} <= set(abdomen.meta["organs_present"])
    assert thorax.image.shape[2] * thorax.meta["spacing"][2] < 480


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        generate_study(0, "huge")
    with pytest.raises(ValueError, match="scan range"):
        generate_study(0, "tiny", scan_range="head")
    for bad in ("XYZ", "RRS", "RA", "RASS"):
        with pytest.raises(ValueError, match="orientation"):
            generate_study(0, "tiny", orientation=bad)
    with pytest.raises(ValueError, match="seed"):
        generate_study(-1, "tiny")
    with pytest.raises(ValueError, match="seed"):
        generate_study(1.5, "tiny")
    with pytest.raises(ValueError, match="thickness"):
        generate_study(0, "tiny", slice_thickness=0)
    with pytest.raises(ValueError, match="phase"):
        generate_study(0, "tiny", phase="venous")
    with pytest.raises(ValueError, match="supports"):
        write_sample_dataset(tmp_path / "d", 2, 3, preset="tiny", progress=False)
    with pytest.raises(ValueError, match="studies"):
        write_sample_dataset(tmp_path / "d", 0, 0, preset="tiny", progress=False)


def test_write_sample_dataset_layout_and_idempotence(tmp_path):
    root = tmp_path / "ds"
    out = write_sample_dataset(root, 3, 1, seed=4, preset="tiny", progress=False)
    assert out["studies"] == ["synct_0000", "synct_0001", "synct_0002"] and out["supports"] == ["synct_0000"]
    assert json.loads((root / "label_map.json").read_text()) == LABEL_MAP
    for sid in out["studies"]:
        img = nib.load(root / "studies" / f"{sid}.nii.gz")
        gt = nib.load(root / "ground_truth" / f"{sid}.nii.gz")
        assert img.shape == gt.shape and np.allclose(img.affine, gt.affine)
        assert img.get_data_dtype() == np.int16 and gt.get_data_dtype() == np.uint8
    assert sorted(p.name for p in (root / "studies" / "labels" / "final").iterdir()) == ["synct_0000.nii.gz"]
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["studies"]["synct_0000"]["scan_range"] == "chest_abdomen_pelvis"
    stamp = (root / "studies" / "synct_0001.nii.gz").stat().st_mtime_ns
    again = write_sample_dataset(root, 4, 2, seed=4, preset="tiny", progress=False)
    assert again["kept"] == out["studies"] and again["generated"] == ["synct_0003"]
    assert (root / "studies" / "synct_0001.nii.gz").stat().st_mtime_ns == stamp
    assert (root / "studies" / "labels" / "final" / "synct_0001.nii.gz").exists()
    with pytest.raises(ValueError, match="already holds"):
        write_sample_dataset(root, 4, 2, seed=5, preset="tiny", progress=False)


def test_cli_generate_and_preview(tmp_path, capsys):
    from medlsam.cli import main

    root = tmp_path / "cli"
    assert main(["generate", "--out", str(root), "--count", "2", "--supports", "1", "--preset", "tiny",
                 "--quiet", "--orientation", "lps", "--preview"]) == 0
    png = root / "previews" / "synct_0001.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert nib.aff2axcodes(nib.load(root / "studies" / "synct_0001.nii.gz").affine) == ("L", "P", "S")
    single = tmp_path / "one.png"
    assert main(["generate", "--preview-of", str(root / "studies" / "synct_0000.nii.gz"),
                 "--label", str(root / "ground_truth" / "synct_0000.nii.gz"), "--png", str(single)]) == 0
    assert single.stat().st_size > 20_000
    capsys.readouterr()
    assert main(["generate", "--out", str(root), "--count", "2", "--supports", "1", "--orientation", "XYZ"]) == 2
    assert "orientation" in capsys.readouterr().err
    assert main(["generate", "--preview-of", str(tmp_path / "missing.nii.gz"), "--png", str(single)]) == 2
