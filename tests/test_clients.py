"""3D Slicer's MONAI Label module and OHIF v3's MONAI Label panel, replayed against the real server.

Each test sends what the client sends (payloads and call order as in MONAI Label 0.8.5's
plugins/slicer/MONAILabel/MONAILabel.py and plugins/ohifv3/extensions/monai-label; see the
README's client sections): 3D Slicer through `monailabel.client.MONAILabelClient`, which is the
same code as Slicer's MONAILabelLib/client.py (its multipart encoding and parsing), OHIF with
plain HTTP as its axios client does. One server for the module, on a tiny datastore whose label
map has ids 10, 20, 30, ... (not 1..N, as users' maps often are) and an NRRD copy of one study.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from medlsam.paths import DEMO_MEDLAM
from medlsam.synthetic import LABEL_MAP, write_sample_dataset
from server_process import running_server, wait_for_templates

pytestmark = pytest.mark.server  # runs in CI: the 3D Slicer and OHIF requests, replayed

ORGANS = ("liver", "spleen", "kidney_left")  # the supports annotate these only (keeps templates cheap)
SPARSE = {name: 10 * i for name, i in LABEL_MAP.items()}  # liver 10, spleen 20, kidney_left 30, ...
RANK = {name: r for r, name in enumerate(sorted(SPARSE, key=SPARSE.get), start=1)}
SLICER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}  # added to every Slicer infer
OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
               "restore_label_idx": False}  # added to every OHIF infer
SUPPORTS = ("synct_0000", "synct_0001")
NIFTI_STUDY = "synct_0002"  # prompts (read-only); its NRRD copy is NRRD_STUDY
SESSION_STUDY = "synct_0003"  # opened "from disk" in Slicer (session), submitted under a node name
SAMPLE_STUDY = "synct_0004"  # Next Sample (`last`), medlsam, Submit Label, Dice
NRRD_STUDY = "nrrd_copy"  # sorts first: Next Sample `first` returns it


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    write_sample_dataset(root, n_studies=5, n_supports=2, seed=11, preset="tiny", progress=False)
    (root / "label_map.json").write_text(json.dumps(SPARSE))
    lut = np.zeros(256, np.uint8)
    for name, i in LABEL_MAP.items():
        lut[i] = SPARSE[name]
    for path in list((root / "ground_truth").glob("*.nii.gz")) + list((root / "studies/labels/final").glob("*.nii.gz")):
        img = nib.load(str(path))
        data = lut[np.asanyarray(img.dataobj)]
        if "studies" in path.parts:
            data = np.where(np.isin(data, [SPARSE[o] for o in ORGANS]), data, 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    assert sorted(p.name for p in (root / "studies/labels/final").glob("*")) == [f"{s}.nii.gz" for s in SUPPORTS]
    sitk.WriteImage(sitk.ReadImage(str(root / "studies" / f"{NIFTI_STUDY}.nii.gz")),
                    str(root / "studies" / f"{NRRD_STUDY}.nrrd"), True)
    shutil.copy(root / "ground_truth" / f"{NIFTI_STUDY}.nii.gz", root / "ground_truth" / f"{NRRD_STUDY}.nii.gz")
    return root


@pytest.fixture(scope="module")
def server(dataset, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models")
    conf = {"label_map": dataset / "label_map.json", "medlam_checkpoint": DEMO_MEDLAM, "model_dir": model_dir,
            "template_store": model_dir / "templates.pt"}
    with running_server(dataset / "studies", conf, log_path=dataset / "server.log") as url:
        wait_for_templates(url)
        yield {"url": url, "root": dataset}


def unlabeled(root: Path) -> list[str]:
    labelled = {p.name.split(".")[0] for p in (root / "studies/labels/final").glob("*")}
    images = [p.name.split(".")[0] for p in (root / "studies").iterdir() if p.name.endswith((".nii.gz", ".nrrd"))]
    return sorted(i for i in images if i not in labelled)


def truth(root: Path, study: str) -> np.ndarray:
    return np.asanyarray(nib.load(str(root / "ground_truth" / f"{study}.nii.gz")).dataobj)


def read_label(path) -> np.ndarray:
    """A result file as 3D Slicer reads it (SimpleITK), as array[i, j, k]."""
    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0))


def dice(a, b) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def slicer(server, tmp_path) -> MONAILabelClient:
    return MONAILabelClient(server["url"], tmpdir=str(tmp_path), client_id="user-xyz")


def slicer_infer(server, tmp_path, model, image, params, session_id=None):
    """3D Slicer's infer: the model's /info config, then client_id, result_extension, result_dtype."""
    info = httpx.get(f"{server['url']}/info/", timeout=30).json()
    config = {k: v[0] if isinstance(v, list) else v for k, v in info["models"][model]["config"].items()}
    request = {**params, **config, **SLICER_PARAMS} if model.startswith("sam") else {**config, **params, **SLICER_PARAMS}
    label_file, result = slicer(server, tmp_path).infer(model, image, request, session_id=session_id)
    assert label_file, "3D Slicer needs a multipart answer with a file part"
    return read_label(label_file), result


def slicer_segment_names(result: dict) -> list[str]:
    """How 3D Slicer names result values 1..N: label_names sorted by value, background dropped."""
    names = [k for k, _ in sorted(result["label_names"].items(), key=lambda kv: kv[1])]
    return [n for n in names if n != "background"]


def ohif_infer(server, model, image, params) -> bytes:
    response = httpx.post(f"{server['url']}/infer/{model}", params={"image": image, "output": "image"},
                          data={"params": json.dumps({**params, **OHIF_PARAMS})}, timeout=600)
    assert response.status_code == 200, response.text[:300]
    return response.content


def parse_raw_nrrd(body: bytes) -> tuple[dict, np.ndarray]:
    """As OHIF's SegmentationReader: header fields, then the voxel bytes in file order."""
    end = body.index(b"\n\n")
    header = dict(line.split(": ", 1) for line in body[:end].decode().splitlines()[1:] if ": " in line)
    return header, np.frombuffer(body[end + 2:], dtype=np.uint8)


def liver_prompt(root, study):
    liver = truth(root, study) == SPARSE["liver"]
    k = int(np.argmax(liver.sum((0, 1))))
    inside = ndimage.distance_transform_edt(liver[:, :, k])  # the click: deep inside the organ
    i, j = np.unravel_index(int(np.argmax(inside)), inside.shape)
    lo, hi = np.argwhere(liver).min(0), np.argwhere(liver).max(0)
    return liver, k, [int(i), int(j), k], lo, hi


# --- /info as both clients read it ----------------------------------------------------------------
def test_info_lists_models_where_the_clients_look(server):
    info = httpx.get(f"{server['url']}/info/", timeout=30).json()
    assert "config" not in info  # 3D Slicer: "Please upgrade the monai server"
    assert isinstance(info["labels"], list) and info["labels"][:3] == ["liver", "spleen", "kidney_left"]
    models = info["models"]
    assert all(m.get("description") for m in models.values())
    auto = [n for n, m in models.items() if m["type"] in ("segmentation", "detection")]
    assert auto[0] == "medlsam"  # Slicer's and OHIF's default auto-segmentation model
    assert not any(m["type"] == "detection" for m in models.values())
    assert {n: models[n]["dimension"] for n, m in models.items() if m["type"] == "deepgrow"} == {"sam": 3, "sam_2d": 2}
    for name, model in models.items():  # OHIF maps result values through these
        assert model["labels"] == RANK, name
    assert list(info["strategies"])[0] == "random" and {"fewshot", "first", "last"} <= set(info["strategies"])
    assert "dice" in info["scoring"]


# --- 3D Slicer --------------------------------------------------------------------------------------
def test_slicer_sam_roi_interleaved_or_reversed_gives_the_same_mask(server, tmp_path):
    study = NIFTI_STUDY
    liver, k, _, lo, hi = liver_prompt(server["root"], study)
    k0, k1 = k - 2, k + 2  # five slices keep it quick
    interleaved = [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), k0, k1]
    reversed_pairs = [int(hi[0]), int(lo[0]), int(hi[1]), int(lo[1]), k1, k0]
    params = {"label": "liver", "foreground": [], "background": []}
    a, result = slicer_infer(server, tmp_path, "sam", study, {**params, "roi": interleaved})
    b, _ = slicer_infer(server, tmp_path, "sam", study, {**params, "roi": reversed_pairs})
    score = dice(a[:, :, k0:k1 + 1] == 1, liver[:, :, k0:k1 + 1])
    print(f"\nSlicer sam roi {interleaved} on {study}: liver Dice {score:.3f} on slices {k0}..{k1}")
    assert result["label_names"] == {"liver": 1} and set(np.unique(a)) == {0, 1}
    assert result["slices"] == 5 and set(np.nonzero(a.sum((0, 1)))[0]) <= set(range(k0, k1 + 1))
    assert np.array_equal(a, b)
    assert score > 0.75  # the liver's own box on its widest slices: read as [i0, j0, i1, j1] it would miss
    # an ROI reaching beyond the volume is clamped
    beyond = [-20, int(hi[0]), int(lo[1]), int(hi[1]) + 500, k, k]
    c, _ = slicer_infer(server, tmp_path, "sam", study, {**params, "roi": beyond})
    assert c[:, :, k].sum() > 0


def test_slicer_sam_2d_segments_the_clicked_slice_of_a_free_segment(server, tmp_path):
    study = NIFTI_STUDY
    liver, k, point, lo, hi = liver_prompt(server["root"], study)
    mask, result = slicer_infer(server, tmp_path, "sam_2d", study,
                                {"label": "Segment_1", "foreground": [point], "background": [], "slice": k})
    score = dice(mask[:, :, k] == 1, liver[:, :, k])
    print(f"\nSlicer sam_2d point {point}: Dice {score:.3f} on slice {k}")
    assert result["label_names"] == {"Segment_1": 1}
    assert set(np.nonzero(mask.sum((0, 1)))[0]) == {k}
    assert score > 0.6
    # ROI only: Slicer sends the red slice's offset in mm as `slice`; the ROI's middle slice is used
    roi = [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]
    mask, result = slicer_infer(server, tmp_path, "sam_2d", study,
                                {"label": "tumor", "foreground": [], "background": [], "roi": roi, "slice": 412})
    middle = (int(lo[2]) + int(hi[2])) // 2
    assert result["slice_indices"] == [middle] and set(np.nonzero(mask.sum((0, 1)))[0]) == {middle}


def test_slicer_local_volume_session_infer_and_submit(server, tmp_path):
    """A volume opened from the user's disk: PUT /session/, infer by session id; Submit Label
    uploads it to the datastore under its node name, then the label with its segment names."""
    root = server["root"]
    study = SESSION_STUDY
    volume = tmp_path / "CT chest.nrrd"  # Slicer's "File Extension" setting set to .nrrd
    sitk.WriteImage(sitk.ReadImage(str(root / "studies" / f"{study}.nii.gz")), str(volume), True)
    client = slicer(server, tmp_path)
    session_id = client.create_session(str(volume))["session_id"]
    assert client.get_session(session_id)
    node = "CT chest"
    liver, k, point, lo, hi = liver_prompt(root, study)
    roi = [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), k - 1, k + 1]
    mask, result = slicer_infer(server, tmp_path, "sam", node, {"label": "liver", "foreground": [point],
                                                                  "background": [], "roi": roi}, session_id=session_id)
    # the liver's whole in-plane box on three slices (loose away from its widest slice) and one click
    assert result["slices"] == 3 and dice(mask[:, :, k - 1:k + 2] == 1, liver[:, :, k - 1:k + 2]) > 0.6
    # a session is no key to other server paths
    refused = httpx.post(f"{server['url']}/infer/sam?image=x", timeout=60, data={"params": json.dumps(
        {"session": {"name": "x"}, "image": "/etc/passwd", "roi": roi})})
    assert refused.status_code == 404, refused.text
    # Submit Label: upload the volume (PUT /datastore/?image=<node name>), then the exported segments
    supports_before = httpx.get(f"{server['url']}/info/", timeout=30).json()["templates"]["organs"]["liver"]["supports"]
    assert client.upload_image(str(volume), node)["image"] == node
    names = ["background", "kidney_left", "liver", "Segment_1"]  # "background" pre-created from /info labels
    gt = truth(root, study)
    label = np.zeros(gt.shape, np.uint8)
    label[gt == SPARSE["kidney_left"]] = 1
    label[gt == SPARSE["liver"]] = 2
    label[:6, :6, :6] = 3  # the user's own segment
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, nib.load(str(root / "studies" / f"{study}.nii.gz")).affine), str(path))
    label_info = [{"name": n, "idx": i + 1} for i, n in enumerate(names) if n != "background"]
    reply = client.save_label(node, str(path), params={"label_info": label_info})
    print(f"\nSlicer Submit Label on {node!r}: {reply}")
    assert reply["segments"] == {"kidney_left": 30, "liver": 10} and reply["ignored_segments"] == ["Segment_1"]
    assert reply["templates"]["liver"] == supports_before + 1
    stored = np.asanyarray(nib.load(str(root / "studies/labels/final" / f"{node}.nii.gz")).dataobj)
    assert np.array_equal(stored == 10, gt == SPARSE["liver"]) and np.array_equal(stored == 30, gt == SPARSE["kidney_left"])
    assert set(np.unique(stored)) == {0, 10, 30}


def test_slicer_submit_with_a_detection_style_roi_json_is_refused_with_the_fix(server, tmp_path):
    study = NIFTI_STUDY
    markups = tmp_path / "tmpabc.json"
    markups.write_text(json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/"
                                   "Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#", "markups": []}))
    with pytest.raises(MONAILabelClientException) as err:
        slicer(server, tmp_path).save_label(study, str(markups), params={"label_info": []})
    print(f"\nSubmit Label with ROI markups: {err.value.msg[:200]}")
    assert "422" in err.value.msg and "select `medlsam`" in err.value.msg
    assert not any((server["root"] / "studies/labels/final").glob(f"{study}.*"))


def test_slicer_next_sample_auto_segmentation_original_label_and_dice(server, tmp_path):
    """Next Sample (strategy `first`), medlsam Run, Submit Label: the app keeps its result as the
    `original` label (shown by Slicer's Next Sample) and scores it against the final label."""
    root, url = server["root"], server["url"]
    client = slicer(server, tmp_path)
    first = client.next_sample("first", {})
    assert first["id"] == NRRD_STUDY == unlabeled(root)[0] and first["name"] == f"{NRRD_STUDY}.nrrd"
    sample = client.next_sample("last", {})
    assert sample["id"] == SAMPLE_STUDY == unlabeled(root)[-1] and sample["name"] == f"{SAMPLE_STUDY}.nii.gz"
    assert httpx.get(f"{url}/datastore/image", params={"image": sample["id"]}, timeout=60).status_code == 200
    study = sample["id"]
    labels, result = slicer_infer(server, tmp_path, "medlsam", study, {})
    names = slicer_segment_names(result)
    gt = truth(root, study)
    present = sorted(set(np.unique(labels).tolist()) - {0})
    scores = {names[v - 1]: dice(labels == v, gt == SPARSE[names[v - 1]]) for v in present}  # value k: k-th name
    print(f"\nSlicer medlsam on {study}: {scores}, absent {result['absent']}")
    assert scores and set(scores) <= set(ORGANS) and max(scores.values()) > 0.25
    assert [e["name"] for e in result["label_info"]] == [names[v - 1] for v in present]
    # the result is the study's `original` label, as Slicer's Next Sample reads it
    objects = client.datastore()["objects"]
    assert objects[study]["labels"]["original"]["info"]["params"]["label_names"] == RANK
    original = tmp_path / "original.nii.gz"
    original.write_bytes(httpx.get(f"{url}/datastore/label", params={"label": study, "tag": "original"},
                                   timeout=60).content)
    assert np.array_equal(np.asanyarray(nib.load(str(original)).dataobj), labels)
    # Submit Label after correcting the organs: the segments Slicer created from /info `labels`,
    # exported as values 1..N in segment order, named by label_info
    segments = httpx.get(f"{url}/info/", timeout=30).json()["labels"]
    final = np.zeros(gt.shape, np.uint8)
    for organ in ORGANS:
        final[gt == SPARSE[organ]] = segments.index(organ) + 1
    path = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image(final, nib.load(str(root / "studies" / f"{study}.nii.gz")).affine), str(path))
    reply = client.save_label(study, str(path), params={"label_info": [{"name": n, "idx": i + 1}
                                                                      for i, n in enumerate(segments)]})
    print(f"Submit Label: dice {reply.get('dice')} {reply.get('organ_dice')}")
    assert reply["segments"] == {o: SPARSE[o] for o in ORGANS}
    assert set(reply["organ_dice"]) == set(ORGANS)
    for organ, value in scores.items():
        assert abs(reply["organ_dice"][organ] - value) < 0.01  # the Dice of the app's own result
    info = client.datastore()["objects"][study]["image"]["info"]
    assert info["organ_dice"] == reply["organ_dice"] and info["dice"] == reply["dice"]
    stored = np.asanyarray(nib.load(str(root / "studies/labels/final" / f"{study}.nii.gz")).dataobj)
    assert np.array_equal(stored, np.where(np.isin(gt, [SPARSE[o] for o in ORGANS]), gt, 0))
    assert client.next_sample("last", {})["id"] != study


# --- OHIF -------------------------------------------------------------------------------------------
def test_ohif_auto_segmentation_point_prompt_and_next_sample(server):
    root = server["root"]
    study = SESSION_STUDY  # in the datastore under its own id too
    info = httpx.get(f"{server['url']}/info/", timeout=30).json()
    index_to_name = {v: k for k, v in info["models"]["medlsam"]["labels"].items()}
    header, raw = parse_raw_nrrd(ohif_infer(server, "medlsam", study, {}))
    gt = truth(root, study)
    assert header["encoding"] == "raw" and header["type"] in ("unsigned char", "uchar")
    assert raw.size == gt.size
    volume = raw.reshape(gt.shape, order="F")  # column fastest, then row, then slice
    scores = {index_to_name[v]: dice(volume == v, gt == SPARSE[index_to_name[v]]) for v in set(np.unique(volume)) - {0}}
    print(f"\nOHIF medlsam on {study}: {scores}")
    assert scores and max(scores.values()) > 0.25
    # Point Prompts: deepgrow `sam`, no label, one click
    liver, k, point, _, _ = liver_prompt(root, study)
    _, raw = parse_raw_nrrd(ohif_infer(server, "sam", study, {"foreground": [point], "background": []}))
    mask = raw.reshape(gt.shape, order="F")
    print(f"OHIF point prompt {point}: Dice {dice(mask[:, :, k] == 1, liver[:, :, k]):.3f}")
    assert set(np.unique(mask)) == {0, 1} and dice(mask[:, :, k] == 1, liver[:, :, k]) > 0.6
    # Next Sample: OHIF always asks for `random`, with an empty body
    sample = httpx.post(f"{server['url']}/activelearning/random", json={}, timeout=60).json()
    assert sample["id"] in unlabeled(root)


def test_fewshot_proposes_an_unlabeled_study_with_its_reason(server, tmp_path):
    sample = slicer(server, tmp_path).next_sample("fewshot", {})
    print(f"\nfewshot: {sample['id']} {sample['fewshot']}")
    root = server["root"]
    assert not any((root / "studies/labels/final").glob(f"{sample['id']}.*"))
    assert sample["fewshot"]["scored_studies"] == sample["fewshot"]["unlabeled"] >= 2
    assert 0 <= sample["fewshot"]["score"] <= 1 and sample["fewshot"]["reason"]


def test_nrrd_and_nifti_copies_give_the_same_boxes_and_masks(server, tmp_path):
    root = server["root"]
    nifti = NIFTI_STUDY
    boxes = {}
    for study in (nifti, NRRD_STUDY):
        r = httpx.post(f"{server['url']}/infer/medlam?image={study}&output=json", timeout=600,
                       data={"params": json.dumps({"organs": ["liver"], "seed": 3})})
        assert r.status_code == 200, r.text[:300]
        boxes[study] = r.json()["organs"]["liver"]
    assert boxes[nifti]["box_world"] == boxes[NRRD_STUDY]["box_world"]
    assert boxes[nifti]["box_voxel"] == boxes[NRRD_STUDY]["box_voxel"]
    _, k, point, lo, hi = liver_prompt(root, nifti)
    masks = [slicer_infer(server, tmp_path, "sam_2d", s, {"label": "liver", "foreground": [point], "slice": k})[0]
             for s in (nifti, NRRD_STUDY)]
    assert masks[0].sum() > 0 and np.array_equal(masks[0], masks[1])
