"""DICOMweb deployment: DICOM writing/reading, Orthanc as the datastore, SEG write-back, OHIF in Chromium.

Unit tests (fast): CT series geometry and HU, SEG round trips with label ids mapped by segment
name, stable UIDs, refusals. Server tests (slow): Orthanc on a free port loaded with tiny
generated studies (supports annotate ORGANS only, to keep the CPU cost small), MONAI Label on its
DICOMweb, the REST API on series UIDs, final labels saved as SEG, a restart that rebuilds the
template store from the PACS, bad inputs, the PACS stopping mid-session, and OHIF v3 driven by
playwright-core in Debian's Chromium (screenshots kept under build/artifacts/ohif/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from unittest import mock

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from dicomweb_client import DICOMwebClient

from medlsam.dicom import (dataset_files, derived_uid, dicom_layout, read_seg, referenced_series_uid,
                           segment_names, study_uids, write_ct_series, write_dicom_dataset, write_seg)
from medlsam.dicom.orthanc import start_orthanc, upload
from medlsam.labels import LabelMap
from medlsam.paths import DEMO_MEDLAM
from medlsam.synthetic import LABEL_MAP, generate_study, write_sample_dataset
from server_process import REPO, free_port, running_server, wait_for_templates

ORGANS = ("liver", "kidney_left")  # ids 1 and 3: SEG segments 1 and 2, so names must carry the ids
MEDLAM = Path(os.environ.get("MEDLSAM_TEST_MEDLAM", DEMO_MEDLAM))
ARTIFACTS = REPO / "build" / "artifacts" / "ohif"
E2E = REPO / "tests" / "e2e"


def read_series(folder: Path) -> nib.Nifti1Image:
    """A DICOM series read the way MONAI Label reads it (SimpleITK/GDCM), as NIfTI."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    out = folder.parent / f"{folder.name}.nii.gz"
    sitk.WriteImage(image, str(out))
    return nib.load(str(out))


def keep_organs(label: np.ndarray, organs=ORGANS) -> np.ndarray:
    keep = np.isin(label, [LABEL_MAP[o] for o in organs])
    return np.where(keep, label, 0).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


# --- DICOM writing and reading (no server) --------------------------------------------------------
@pytest.fixture(scope="module")
def study():
    return generate_study(5, preset="tiny", orientation="PIR")  # not the DICOM layout: must be reoriented


def test_ct_series_has_the_study_geometry_and_hu(study, tmp_path):
    ref = write_ct_series(study.image, tmp_path / "ct", "synct_geo")
    expected = dicom_layout(study.image)
    read = read_series(tmp_path / "ct")
    assert read.shape == expected.shape and len(ref.files) == expected.shape[2]
    assert np.allclose(read.affine, expected.affine, atol=1e-3)
    hu = np.asanyarray(expected.dataobj).astype(np.int32)
    got = np.asanyarray(read.dataobj).astype(np.int32)
    assert np.array_equal(got, np.maximum(hu, -1024))
    ds = pydicom.dcmread(str(ref.files[0]))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (-1024, 1, "HU")
    assert [round(float(v)) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    positions = [float(pydicom.dcmread(str(f), stop_before_pixels=True).ImagePositionPatient[2]) for f in ref.files]
    assert np.allclose(np.diff(positions), float(ds.SliceThickness), atol=1e-3)  # ascending to superior


def test_uids_are_stable_per_study(study, tmp_path):
    a = write_ct_series(study.image, tmp_path / "a", "synct_0001")
    b = write_ct_series(study.image, tmp_path / "b", "synct_0001")
    c = write_ct_series(study.image, tmp_path / "c", "synct_0002")
    uids = lambda ref: [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in ref.files]  # noqa: E731
    assert a.series_uid == b.series_uid == study_uids("synct_0001")["SeriesInstanceUID"]
    assert uids(a) == uids(b) and len(set(uids(a))) == len(a.files)
    assert c.series_uid != a.series_uid and c.study_uid != a.study_uid


def test_seg_round_trip_maps_ids_by_segment_name(study, tmp_path):
    ref = write_ct_series(study.image, tmp_path / "ct", "synct_seg")
    label = keep_organs(np.asanyarray(study.label.dataobj))
    ds = write_seg(nib.Nifti1Image(label, study.label.affine), ref.files, LABEL_MAP, tmp_path / "seg.dcm")
    assert segment_names(ds) == {1: "liver", 2: "kidney_left"}  # consecutive segment numbers
    assert referenced_series_uid(ds) == ref.series_uid
    decoded, report = read_seg(tmp_path / "seg.dcm", read_series(tmp_path / "ct"), LABEL_MAP)
    expected = np.asanyarray(dicom_layout(nib.Nifti1Image(label, study.label.affine)).dataobj)
    assert report["mapped"] == {"liver": 1, "kidney_left": 3}
    assert np.array_equal(decoded, expected)
    assert (decoded == 3).sum() > 50


def test_seg_refusals(study, tmp_path):
    ref = write_ct_series(study.image, tmp_path / "ct", "synct_bad")
    shape, affine = study.image.shape, study.image.affine
    with pytest.raises(ValueError, match="not in the label map"):
        write_seg(nib.Nifti1Image(np.full(shape, 77, np.uint8), affine), ref.files, LABEL_MAP, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="empty"):
        write_seg(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), ref.files, LABEL_MAP, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="not a DICOM SEG"):
        read_seg(ref.files[0], study.image, LABEL_MAP)
    sheared = affine.copy()
    sheared[0, 1] = 2.0
    with pytest.raises(ValueError, match="sheared"):
        write_ct_series(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), sheared), tmp_path / "s", "synct_s")
    label = keep_organs(np.asanyarray(study.label.dataobj))
    write_seg(nib.Nifti1Image(label, affine), ref.files, LABEL_MAP, tmp_path / "ok.dcm")
    with pytest.raises(ValueError, match="no segment"):
        read_seg(tmp_path / "ok.dcm", study.image, {"brain": 1})


# --- the PACS datastore against a real Orthanc (no MONAI Label server) ---------------------------
def test_pacs_datastore_labels_come_from_the_newest_usable_seg(study, tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(REPO / "apps" / "medlsam"))
    from fastapi import HTTPException
    from tasks import dicomweb
    from tasks.dicomweb import PacsDatastore

    ref = write_ct_series(study.image, tmp_path / "ct", "synct_pacs")
    mr = write_ct_series(study.image, tmp_path / "mr", "synct_pacs", modality="MR")
    full = keep_organs(np.asanyarray(study.label.dataobj))
    liver_only = keep_organs(full, ("liver",))
    write_seg(nib.Nifti1Image(full, study.label.affine), ref.files, LABEL_MAP, tmp_path / "old.dcm")
    write_seg(nib.Nifti1Image(liver_only, study.label.affine), ref.files, LABEL_MAP, tmp_path / "new.dcm",
              series_uid=derived_uid("synct_pacs", "newer"))
    # a SEG of organs the label map does not know, newest of all: skipped, not fatal
    write_seg(nib.Nifti1Image((full > 0).astype(np.uint8), study.label.affine), ref.files, {"brain": 1},
              tmp_path / "alien.dcm", series_uid=derived_uid("synct_pacs", "alien"))
    orthanc = start_orthanc(tmp_path / "orthanc", free_port())
    try:
        upload(orthanc.url, ref.files + mr.files + [tmp_path / "old.dcm", tmp_path / "new.dcm"])
        from tasks.label_check import FinalLabelCheck

        store = PacsDatastore(orthanc.dicomweb_url, LabelMap(LABEL_MAP), FinalLabelCheck(LabelMap(LABEL_MAP)),
                              cache_path=str(tmp_path / "cache"))
        assert store.list_images() == [ref.series_uid]  # CT only
        assert store.get_labeled_images("final") == [ref.series_uid]
        label = nib.load(store.get_label_uri(ref.series_uid, "final"))
        image = nib.load(store.get_image_uri(ref.series_uid))
        assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-3)
        expected = np.asanyarray(dicom_layout(nib.Nifti1Image(liver_only, study.label.affine)).dataobj)
        assert np.array_equal(np.asanyarray(label.dataobj), expected)  # the newer SEG, liver only
        upload(orthanc.url, [tmp_path / "alien.dcm"])
        store._seg_index(fresh=True)
        assert store.get_label_uri(ref.series_uid, "final") == ""
        for image_id, status in ((mr.series_uid, 422), ("1.2.3.999", 404)):
            with pytest.raises(HTTPException) as err:
                store.check_image(image_id)
            assert err.value.status_code == status
        orthanc.stop()
        started = time.monotonic()
        with pytest.raises(HTTPException) as err:
            store.check_image(ref.series_uid + ".9")
        assert err.value.status_code == 503 and time.monotonic() - started < 5
        monkeypatch.setattr(dicomweb, "LIST_TTL_S", 0.0)  # no cached series list: /info's counts ask the PACS
        assert "not reachable" in store.status()["error"]
    finally:
        orthanc.stop()


def test_pacs_datastore_logs_in_with_monai_labels_dicomweb_credentials(study, tmp_path, monkeypatch):
    """MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD (the pair MONAI Label's OHIF proxy uses) reach the PACS."""
    import sys

    sys.path.insert(0, str(REPO / "apps" / "medlsam"))
    from fastapi import HTTPException
    from monailabel.config import settings as ml_settings
    from tasks.dicomweb import PacsDatastore
    from tasks.label_check import FinalLabelCheck

    ref = write_ct_series(study.image, tmp_path / "ct", "synct_login")
    orthanc = start_orthanc(tmp_path / "orthanc", free_port(), users={"radiologist": "s3cret"})
    try:
        upload(orthanc.url, ref.files, auth=("radiologist", "s3cret"))
        check = FinalLabelCheck(LabelMap(LABEL_MAP))
        monkeypatch.setattr(ml_settings, "MONAI_LABEL_DICOMWEB_USERNAME", "")
        anonymous = PacsDatastore(orthanc.dicomweb_url, LabelMap(LABEL_MAP), check, cache_path=str(tmp_path / "c1"))
        with pytest.raises(HTTPException) as err:
            anonymous.list_images(fresh=True)
        assert err.value.status_code == 502 and "401" in err.value.detail
        monkeypatch.setattr(ml_settings, "MONAI_LABEL_DICOMWEB_USERNAME", "radiologist")
        monkeypatch.setattr(ml_settings, "MONAI_LABEL_DICOMWEB_PASSWORD", "s3cret")
        store = PacsDatastore(orthanc.dicomweb_url, LabelMap(LABEL_MAP), check, cache_path=str(tmp_path / "c2"))
        assert store.list_images(fresh=True) == [ref.series_uid]
        assert nib.load(store.get_image_uri(ref.series_uid)).shape == dicom_layout(study.image).shape
    finally:
        orthanc.stop()


# --- Orthanc + MONAI Label ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb")
    nifti = root / "nifti"
    write_sample_dataset(nifti, n_studies=4, n_supports=2, seed=7, preset="tiny", progress=False)
    for path in (nifti / "studies" / "labels" / "final").glob("*.nii.gz"):  # supports annotate ORGANS only
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(keep_organs(np.asanyarray(img.dataobj)), img.affine, img.header), str(path))
    manifest = write_dicom_dataset(nifti, root / "dicom", progress=False)
    # a non-CT series in the study of the last query
    last = sorted(manifest)[-1]
    mr = write_ct_series(nib.load(str(nifti / "studies" / f"{last}.nii.gz")), root / "mr", last, modality="MR")
    return {"root": root, "nifti": nifti, "manifest": manifest, "mr": mr}


@pytest.fixture(scope="module")
def pacs(dataset):
    orthanc = start_orthanc(dataset["root"] / "orthanc", free_port())
    upload(orthanc.url, dataset_files(dataset["root"] / "dicom") + dataset["mr"].files)
    yield orthanc
    orthanc.stop()


def server_env(root: Path, name: str) -> dict:
    return {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / f"cache-{name}"),
            "MONAI_LABEL_SESSION_PATH": str(root / f"sessions-{name}")}


def server_conf(dataset, name: str) -> dict:
    return {"label_map": dataset["nifti"] / "label_map.json", "medlam_checkpoint": MEDLAM,
            "model_dir": dataset["root"] / f"models-{name}", "template_store": dataset["root"] / f"templates-{name}.pt"}


@pytest.fixture(scope="module")
def server(dataset, pacs):
    assert MEDLAM.exists(), f"demo MedLAM checkpoint missing: {MEDLAM}"
    with mock.patch.dict(os.environ, server_env(dataset["root"], "a")):
        with running_server(pacs.dicomweb_url, server_conf(dataset, "a"), log_path=dataset["root"] / "server-a.log",
                            timeout=300) as url:
            wait_for_templates(url)
            yield url


def client(url: str, dataset) -> MONAILabelClient:
    # a folder of our own: by default the client saves results under the server's own file name
    # in /tmp, which the server (same machine) deletes once the response is sent
    folder = dataset["root"] / "client"
    folder.mkdir(exist_ok=True)
    return MONAILabelClient(url, tmpdir=str(folder))


def queries(dataset) -> list[str]:
    return sorted(sid for sid, e in dataset["manifest"].items() if e["SegSeriesInstanceUID"] is None)


def series_uid(dataset, sid: str) -> str:
    return dataset["manifest"][sid]["SeriesInstanceUID"]


def truth(dataset, sid: str) -> np.ndarray:
    """Ground truth of `sid` on the grid of its DICOM series."""
    img = nib.load(str(dataset["nifti"] / "ground_truth" / f"{sid}.nii.gz"))
    return np.asanyarray(dicom_layout(img).dataobj)


def post_infer(url, model, image, params=None, output="json", timeout=600):
    return httpx.post(f"{url}/infer/{model}?image={image}&output={output}",
                      data={"params": json.dumps(params or {})}, timeout=timeout)


def qido_segs(pacs) -> list[dict]:
    return httpx.get(f"{pacs.dicomweb_url}/series", params={"Modality": "SEG"}, timeout=30).json()




@pytest.mark.server
@pytest.mark.slow
def test_template_store_filled_from_pacs_segs(server, dataset):
    info = httpx.get(f"{server}/info/", timeout=30).json()
    organs = info["templates"]["organs"]
    print(f"\n/info over DICOMweb: datastore {info['datastore']}, templates "
          f"{ {k: v['supports'] for k, v in organs.items()} }")
    assert set(organs) == set(ORGANS)
    assert all(o["supports"] == 2 for o in organs.values())
    supports = {series_uid(dataset, s) for s, e in dataset["manifest"].items() if e["SegSeriesInstanceUID"]}
    assert set(organs["liver"]["study_ids"]) == supports
    assert info["datastore"]["total"] == 4  # CT series only: the MR series is not served
    assert info["datastore"]["completed"] == 2
    assert "medlsam" in info["models"] and info["models"]["medlsam"]["type"] == "segmentation"


@pytest.mark.server
@pytest.mark.slow
def test_medlsam_on_a_series_uid_returns_a_label_on_its_grid(server, dataset):
    sid = queries(dataset)[0]
    label_file, params = client(server, dataset).infer("medlsam", series_uid(dataset, sid), {"organs": ["liver"]})
    label = nib.load(label_file)
    series = read_series_from_dataset(dataset, sid)
    assert label.shape == series.shape
    assert np.allclose(label.affine, series.affine, atol=1e-3)
    data = np.asanyarray(label.dataobj)
    gt = truth(dataset, sid)
    scores = {"liver": dice(data == params["label_names"]["liver"], gt == LABEL_MAP["liver"])}
    print(f"\n/infer/medlsam on series {series_uid(dataset, sid)} ({sid}): Dice {scores}, "
          f"{params['timings']}")
    assert params["label_names"] == LABEL_MAP  # the whole map (ids 1..N here): Slicer names values by rank
    assert params["label_info"] == [{"name": "liver", "idx": LABEL_MAP["liver"]}]  # the organs present
    assert set(np.unique(data)) == {0, LABEL_MAP["liver"]}
    assert scores["liver"] > 0.2  # on the liver (misplaced boxes score ~0 here)


def read_series_from_dataset(dataset, sid: str) -> nib.Nifti1Image:
    return read_series(dataset["root"] / "dicom" / "series" / sid)


@pytest.mark.server
@pytest.mark.slow
def test_nrrd_result_as_ohif_asks_matches_the_nifti(server, dataset):
    image = series_uid(dataset, queries(dataset)[1])
    nifti = post_infer(server, "medlam", image, {"organs": "liver"}, output="image")
    nrrd = post_infer(server, "medlam", image, {"organs": "liver", "result_extension": ".nrrd",
                                                 "result_dtype": "uint8", "result_compress": False}, output="image")
    assert nifti.status_code == 200 and nrrd.status_code == 200, (nifti.text[:200], nrrd.text[:200])
    assert nrrd.content.startswith(b"NRRD") and b"encoding: raw" in nrrd.content[:1000]
    assert b"type: unsigned char" in nrrd.content[:1000] or b"type: uchar" in nrrd.content[:1000]
    out = Path(dataset["root"] / "r.nii.gz")
    out.write_bytes(nifti.content)
    expected = np.asanyarray(nib.load(str(out)).dataobj).astype(np.uint8)
    header_end = nrrd.content.index(b"\n\n") + 2
    raw = np.frombuffer(nrrd.content[header_end:], dtype=np.uint8)
    # OHIF copies these bytes into the series' labelmap: column fastest, then row, then slice
    assert raw.size == expected.size
    assert np.array_equal(raw, expected.ravel(order="F"))
    assert (raw == LABEL_MAP["liver"]).sum() > 100


@pytest.mark.server
@pytest.mark.slow
def test_sam_with_a_box_on_a_series_uid(server, dataset):
    sid = queries(dataset)[1]
    liver = truth(dataset, sid) == LABEL_MAP["liver"]
    (i0, j0, _), (i1, j1, _) = np.argwhere(liver).min(0), np.argwhere(liver).max(0)
    kc = int(np.argmax(liver.sum((0, 1))))
    roi = [int(i0), int(i1), int(j0), int(j1), kc - 1, kc + 1]  # 3D Slicer's layout
    label_file, params = client(server, dataset).infer("sam", series_uid(dataset, sid), {"roi": roi, "label": "liver"})
    mask = np.asanyarray(nib.load(label_file).dataobj)[:, :, kc - 1:kc + 2] == 1
    score = dice(mask, liver[:, :, kc - 1:kc + 2])
    print(f"\n/infer/sam roi {roi} on series of {sid}: Dice {score:.3f} on 3 slices")
    assert params["slices"] == 3 and score > 0.7


@pytest.mark.server
@pytest.mark.slow
def test_dicom_seg_output_names_segments_by_organ(server, dataset):
    """`output=dicom_seg`: MONAI Label requires a `label_info` param; an empty one is filled with the
    result's organs, so the SEG's segments are named liver and kidney_left, not "unknown"."""
    image = series_uid(dataset, queries(dataset)[1])
    response = httpx.post(f"{server}/infer/medlam?image={image}&output=dicom_seg", timeout=600,
                          data={"params": json.dumps({"organs": list(ORGANS), "label_info": []})})
    assert response.status_code == 200, response.text[:300]
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(response.content))
    print(f"\nDICOM SEG output: segments {segment_names(seg)}")
    assert sorted(segment_names(seg).values()) == sorted(ORGANS)
    assert referenced_series_uid(seg) == image


@pytest.mark.server
@pytest.mark.slow
def test_next_sample_gives_ohif_the_series_and_study_uids(server, dataset):
    """OHIF's Next Sample: `random`, an empty body; it shows these keys and opens StudyInstanceUID."""
    response = httpx.post(f"{server}/activelearning/random", json={}, timeout=300)
    assert response.status_code == 200, response.text[:300]
    sample = response.json()
    unlabeled = {series_uid(dataset, s): e for s, e in dataset["manifest"].items() if e["SegSeriesInstanceUID"] is None}
    print(f"\nNext Sample over DICOMweb: { {k: sample.get(k) for k in ('id', 'StudyInstanceUID', 'Modality')} }")
    assert sample["id"] in unlabeled and sample["SeriesInstanceUID"] == sample["id"]
    assert sample["StudyInstanceUID"] == unlabeled[sample["id"]]["StudyInstanceUID"]
    assert sample["Modality"] == "CT" and sample["PatientID"] not in ("", "UNK")
    assert sample["name"].endswith(".nii.gz")  # 3D Slicer downloads it under this name


BAD = [("unknown series", "1.2.3.4.5.6.7.8.9", 404, "not found in the PACS"),
       ("non-CT series", "MR", 422, "modality MR"),
       ("a SEG series as image", "SEG", 422, "modality SEG"),
       ("path escape", "../../../etc/passwd", 404, "is not a study of this datastore")]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("case,image,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_series_get_clear_errors(server, dataset, case, image, status, words):
    if image == "MR":
        image = dataset["mr"].series_uid
    elif image == "SEG":
        image = next(e["SegSeriesInstanceUID"] for e in dataset["manifest"].values() if e["SegSeriesInstanceUID"])
    response = post_infer(server, "medlsam", image, {}, timeout=120)
    print(f"\n{case}: HTTP {response.status_code} {response.text[:200]}")
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert httpx.get(f"{server}/info/", timeout=30).status_code == 200


@pytest.mark.server
@pytest.mark.slow
def test_ohif_runs_medlsam_and_shows_the_overlay(server, dataset):
    node = shutil.which("node")
    assert node, "node is required for the OHIF end-to-end test (make dicomweb-deps)"
    assert (E2E / "node_modules" / "playwright-core").is_dir(), "run `make dicomweb-deps` (npm ci in tests/e2e)"
    sid = queries(dataset)[0]
    study_uid = dataset["manifest"][sid]["StudyInstanceUID"]
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    started = time.monotonic()
    step_timeout = int(os.environ.get("MEDLSAM_E2E_TIMEOUT", "300"))  # seconds per browser step (slow machines)
    run = subprocess.run([node, str(E2E / "ohif_medlsam.mjs"), "--server", server, "--study", study_uid,
                          "--out", str(ARTIFACTS), "--timeout", str(step_timeout)], capture_output=True, text=True,
                         timeout=3 * step_timeout + 300)
    print(f"\nOHIF e2e ({time.monotonic() - started:.0f} s):\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    result = json.loads((ARTIFACTS / "result.json").read_text())
    assert run.returncode == 0 and result["ok"], result.get("error")
    assert "medlsam" in result["models"]
    assert result["infer"]["status"] == 200
    text = result["page_text"].lower()
    assert all(organ in text for organ in ORGANS), "the panel does not list the organs"

    label = sitk.ReadImage(str(ARTIFACTS / "infer.nrrd"))  # exactly what OHIF received
    label = np.transpose(sitk.GetArrayFromImage(label), (2, 1, 0))
    hu = np.asanyarray(read_series_from_dataset(dataset, sid).dataobj)
    assert label.shape == hu.shape
    check = overlay_matches_label(ARTIFACTS / "before.png", ARTIFACTS / "after.png", label, hu)
    print(f"overlay check: {check}; screenshots in {ARTIFACTS}")
    assert check["changed_pixels"] > 300
    assert check["inside_body"] > 0.95
    assert check["best_iou"] > 0.5, check
    # OHIF colours a segment by its name: the liver's overlay has its salmon (221, 130, 101) tint,
    # so the label id reached OHIF's segment named "liver"
    d_red, _, d_blue = check["tint_rgb_by_id"][LABEL_MAP["liver"]]
    assert d_red - d_blue > 15, check
    # Next Sample (strategy `random`): the dialog shows an unlabeled series and OK opens its study
    proposed = result["next_sample"]["body"]
    print(f"Next Sample: {proposed['SeriesInstanceUID']} -> {result['next_sample']['opened_url']}")
    unlabeled = {series_uid(dataset, s): e for s, e in dataset["manifest"].items() if e["SegSeriesInstanceUID"] is None}
    assert proposed["id"] == proposed["SeriesInstanceUID"] and proposed["id"] in unlabeled
    assert proposed["StudyInstanceUID"] == unlabeled[proposed["id"]]["StudyInstanceUID"]
    assert proposed["StudyInstanceUID"] in result["next_sample"]["form_text"]
    assert result["next_sample"]["opened_url"].endswith(proposed["StudyInstanceUID"])
    assert (ARTIFACTS / "next-sample.png").exists() and (ARTIFACTS / "next-study.png").exists()


def overlay_matches_label(before_png: Path, after_png: Path, label: np.ndarray, hu: np.ndarray) -> dict:
    """Where the screenshot changed after Run, versus where the label lies on some axial slice.

    The display transform comes from the body outline: its bounding box in the before screenshot
    (soft-tissue window) against its bounding box in voxels, one scale and offset per screen axis
    (radiological display: column i to the right, row j downwards). The label of each slice is
    projected with it; the best IoU with the changed pixels says the overlay sits on the organs.
    """
    from PIL import Image
    from scipy import ndimage

    before = np.asarray(Image.open(before_png).convert("RGB")).astype(np.int32)
    after = np.asarray(Image.open(after_png).convert("RGB")).astype(np.int32)
    changed = np.abs(after - before).sum(-1) > 40
    gray = before.mean(-1)
    bright, n = ndimage.label(gray > 40)  # soft tissue and brighter: (HU + 160) / 400 * 255 > 40
    body_screen = bright == (np.argmax(np.bincount(bright.ravel())[1:]) + 1) if n else bright > 0
    body_screen = ndimage.binary_fill_holes(body_screen)
    ys, xs = np.nonzero(body_screen)
    k_mid = hu.shape[2] // 2
    best = {"iou": 0.0, "k": None}
    for k in range(hu.shape[2]):
        organ = label[:, :, k] > 0
        if organ.sum() < 20:
            continue
        tissue, m = ndimage.label(hu[:, :, k] > -100)
        if not m:
            continue
        body = tissue == (np.argmax(np.bincount(tissue.ravel())[1:]) + 1)
        ii, jj = np.nonzero(body)
        sx = (xs.max() - xs.min() + 1) / (ii.max() - ii.min() + 1)
        sy = (ys.max() - ys.min() + 1) / (jj.max() - jj.min() + 1)
        yy, xx = np.mgrid[0:changed.shape[0], 0:changed.shape[1]]
        i = np.floor((xx - xs.min()) / sx + ii.min()).astype(int)
        j = np.floor((yy - ys.min()) / sy + jj.min()).astype(int)
        inside = (i >= 0) & (i < organ.shape[0]) & (j >= 0) & (j < organ.shape[1])
        projected = np.zeros(changed.shape, bool)
        projected[inside] = organ[i[inside], j[inside]]
        union = np.logical_or(projected, changed).sum()
        iou = float(np.logical_and(projected, changed).sum() / union) if union else 0.0
        if iou > best["iou"]:
            ids = np.zeros(changed.shape, np.uint8)
            ids[inside] = label[i[inside], j[inside], k]
            tint = {int(v): [round(float(c), 1) for c in (after - before)[ids == v].mean(0)]
                    for v in np.unique(ids) if v and (ids == v).sum() > 20}
            best = {"iou": iou, "k": k, "scale_xy": [round(float(sx), 3), round(float(sy), 3)], "tint": tint}
    return {"changed_pixels": int(changed.sum()),
            "inside_body": float(np.logical_and(changed, ndimage.binary_dilation(body_screen, iterations=3)).sum()
                                 / max(changed.sum(), 1)),
            "best_iou": round(best["iou"], 3), "best_slice": best["k"], "middle_slice": k_mid,
            "scale_xy": best.get("scale_xy"), "tint_rgb_by_id": best.get("tint", {})}


@pytest.mark.server
@pytest.mark.slow
def test_saved_final_label_becomes_a_seg_and_survives_restart(server, dataset, pacs):
    sid = queries(dataset)[-1]
    image = series_uid(dataset, sid)
    segs_before = qido_segs(pacs)
    label = keep_organs(truth(dataset, sid))
    series = read_series_from_dataset(dataset, sid)
    path = dataset["root"] / f"{sid}-final.nii.gz"
    nib.save(nib.Nifti1Image(label, series.affine), str(path))
    # a bad label first: refused with 422, nothing stored in the PACS
    bad = dataset["root"] / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), series.affine), str(bad))
    with open(bad, "rb") as f:
        refused = httpx.put(f"{server}/datastore/label?image={image}&tag=final", files={"label": ("bad.nii.gz", f)},
                            timeout=120)
    assert refused.status_code == 422 and "label rejected" in refused.json()["detail"]
    assert len(qido_segs(pacs)) == len(segs_before)

    result = client(server, dataset).save_label(image, str(path), tag="final")
    print(f"\nsave final label of {sid}: {result}")
    assert result["templates"] == {"liver": 3, "kidney_left": 3}
    segs = qido_segs(pacs)
    assert len(segs) == len(segs_before) + 1
    new_uid = ({s["0020000E"]["Value"][0] for s in segs} - {s["0020000E"]["Value"][0] for s in segs_before}).pop()
    study_uid = dataset["manifest"][sid]["StudyInstanceUID"]
    raw = httpx.get(f"{pacs.dicomweb_url}/studies/{study_uid}/series/{new_uid}/instances", timeout=30).json()
    instance = raw[0]["00080018"]["Value"][0]
    dcm = httpx.get(f"{pacs.url}/instances/{orthanc_id(pacs, instance)}/file", timeout=30).content
    seg_path = dataset["root"] / "saved-seg.dcm"
    seg_path.write_bytes(dcm)
    decoded, report = read_seg(seg_path, series, LABEL_MAP)
    assert referenced_series_uid(pydicom.dcmread(str(seg_path))) == image
    assert report["mapped"] == {"liver": 1, "kidney_left": 3}  # segments named after the organs
    assert np.array_equal(decoded, label)
    # a SEG stored by another client, as OHIF's SEG export does (STOW-RS through MONAI Label's
    # DICOMweb proxy), joins the template store at the next request
    other = queries(dataset)[0]
    other_label = nib.Nifti1Image(keep_organs(truth(dataset, other)), read_series_from_dataset(dataset, other).affine)
    ohif_seg = write_seg(other_label, sorted((dataset["root"] / "dicom" / "series" / other).glob("*.dcm")),
                         LABEL_MAP, dataset["root"] / "ohif-seg.dcm", series_uid=derived_uid(other, "ohif"))
    DICOMwebClient(url=f"{server}/proxy/dicom/wado").store_instances([ohif_seg])
    assert len(qido_segs(pacs)) == len(segs_before) + 2
    assert post_infer(server, "medlam", image, {"organs": "liver"}).status_code == 200
    organs = httpx.get(f"{server}/info/", timeout=30).json()["templates"]["organs"]
    assert organs["liver"]["supports"] == 4 and series_uid(dataset, other) in organs["liver"]["study_ids"]
    # a fresh server, with empty caches and no template file, rebuilds the store from the PACS's SEGs
    with mock.patch.dict(os.environ, server_env(dataset["root"], "b")):
        with running_server(pacs.dicomweb_url, server_conf(dataset, "b"), log_path=dataset["root"] / "server-b.log",
                            timeout=300) as url2:
            info = wait_for_templates(url2)
    organs = info["templates"]["organs"]
    print(f"after restart: { {k: v['supports'] for k, v in organs.items()} }, datastore {info['datastore']}")
    assert organs["liver"]["supports"] == 4 and image in organs["liver"]["study_ids"]
    assert organs["kidney_left"]["supports"] == 4
    assert info["datastore"]["completed"] == 4


def orthanc_id(pacs, sop_uid: str) -> str:
    found = httpx.post(f"{pacs.url}/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}},
                       timeout=30).json()
    assert len(found) == 1
    return found[0]


@pytest.mark.server
@pytest.mark.slow
def test_pacs_stopped_mid_session_gives_503_and_server_keeps_serving(server, dataset, pacs):
    image = series_uid(dataset, queries(dataset)[0])
    pacs.stop()
    try:
        started = time.monotonic()
        response = post_infer(server, "medlam", image, {"organs": "liver"}, timeout=120)
        print(f"\nPACS stopped: HTTP {response.status_code} in {time.monotonic() - started:.1f} s: "
              f"{response.text[:200]}")
        assert time.monotonic() - started < 10
        assert response.status_code == 503
        assert "not reachable" in response.json()["detail"]
        info = httpx.get(f"{server}/info/", timeout=30)
        assert info.status_code == 200 and "not reachable" in info.json()["datastore"]["error"]
    finally:  # the same storage and port: the session goes on once the PACS is back
        restarted = start_orthanc(pacs.storage_dir, pacs.port)
        pacs.process = restarted.process
    started = time.monotonic()
    response = post_infer(server, "medlam", image, {"organs": "liver"}, timeout=300)
    print(f"PACS back: HTTP {response.status_code} in {time.monotonic() - started:.1f} s")
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["organs"]["liver"]["box_voxel"]) == 2
