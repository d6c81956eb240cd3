"""Training cannot silently make things worse, and kill -9 never leaves an inconsistent store (issue 13,
problem 9 and the kill tests; the train_stats keys of issue 14).

The tests share one tiny datastore (2 supports, 1 query) and model folder and run in order, each
with its own server: train (publish, then reject worse weights), kill -9 during a training run,
during the template rebuild for new weights, during a final-label save, then a last start that
must converge (the saved study joins the templates) with `--conf medlam_version 0` restoring the
untrained weights.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from medlsam.medlam.patches import PatchEmbedder
from medlsam.medlam.templates import TemplateSet
from medlsam.paths import DEMO_MEDLAM
from medlsam.synthetic import write_sample_dataset
from server_process import kill_now, running_server, wait_for_templates

pytestmark = [pytest.mark.server, pytest.mark.slow]

ORGANS = ("liver", "spleen", "stomach")  # a three-organ label map keeps every template computation short
FAST = {"batch_size": 2, "threads": 1, "num_workers": 0, "validation_studies": 2, "validation_organs": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainkill")
    write_sample_dataset(root / "sample", n_studies=3, n_supports=2, seed=11, preset="tiny", progress=False)
    keep_organs(root / "sample", ORGANS)
    models = root / "models"
    conf = {"label_map": root / "sample" / "label_map.json", "medlam_checkpoint": DEMO_MEDLAM, "model_dir": models,
            "template_store": models / "templates.pt"}
    return {"root": root, "studies": root / "sample" / "studies", "conf": conf, "models": models,
            "trained": models / "medlam_trained", "templates": models / "templates.pt", "query": "synct_0002",
            "demo_fp": PatchEmbedder.from_checkpoint(DEMO_MEDLAM).fingerprint}


def keep_organs(sample: Path, organs) -> None:
    """Reduce the dataset's label map and labels to `organs` (same ids)."""
    label_map = json.loads((sample / "label_map.json").read_text())
    kept = {name: label_map[name] for name in organs}
    (sample / "label_map.json").write_text(json.dumps(kept))
    for path in [*(sample / "studies" / "labels" / "final").glob("*.nii.gz"), *(sample / "ground_truth").glob("*.nii.gz")]:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.where(np.isin(data, list(kept.values())), data, 0).astype(data.dtype),
                                 img.affine, img.header), path)


def wait_train(url: str, timeout: float = 1800) -> dict:
    deadline, seen = time.monotonic() + timeout, []
    while True:
        status = httpx.get(f"{url}/train/", timeout=30)
        stats = httpx.get(f"{url}/info/", timeout=30).json()["train_stats"].get("medlam", {})
        seen.append(stats)
        if status.status_code == 200 and status.json().get("status") in ("DONE", "ERROR"):
            return {"task": status.json(), "stats": stats, "seen": seen}
        assert time.monotonic() < deadline, f"training still running: {status.text[:300]}"
        time.sleep(1.0)


def assert_store_consistent(setup, fingerprints: set[str]) -> TemplateSet:
    """The template file loads, was made with one of `fingerprints`, and only holds studies with a final label
    whose files are complete."""
    templates = TemplateSet.load(setup["templates"])
    assert templates.weights_fingerprint in fingerprints
    finals = {p.name.split(".")[0]: p for p in (setup["studies"] / "labels" / "final").glob("*.nii.gz")}
    for path in finals.values():
        np.asanyarray(nib.load(path).dataobj)  # complete: reads to the end
    held = {s.study_id for entries in templates.supports.values() for s in entries}
    assert held <= set(finals), held - set(finals)
    assert not list((setup["studies"] / "labels" / "final").glob("*.nii.gz.*"))  # no visible partial label
    return templates


def test_9_training_publishes_versions_and_keeps_worse_weights_aside(setup):
    with running_server(setup["studies"], setup["conf"], log_path=setup["root"] / "s1.log") as url:
        wait_for_templates(url)
        r = httpx.post(f"{url}/train/medlam", json={**FAST, "iterations": 2, "validation_tolerance": 1.0}, timeout=60)
        assert r.status_code == 200, r.text
        run = wait_train(url)
        stats = run["stats"]
        print("\npublished run:", json.dumps({k: stats.get(k) for k in ("status", "epoch", "total_epochs",
                                                                         "best_metric", "total_time", "version")}))
        assert run["task"]["status"] == "DONE" and stats["status"] == "published" and stats["version"] == 1
        assert {"epoch", "total_epochs", "best_metric", "start_ts", "total_time"} <= set(stats)
        assert "current_time" not in stats and 0 <= stats["best_metric"] <= 1
        assert any("current_time" in s and "total_time" not in s for s in run["seen"])  # written while running
        v1 = (setup["trained"] / "versions" / "v001.pt").read_bytes()
        assert (setup["trained"] / "medlam.pt").read_bytes() == v1

        r = httpx.post(f"{url}/train/medlam", json={**FAST, "iterations": 3, "learning_rate": 10.0}, timeout=60)
        assert r.status_code == 200, r.text
        run = wait_train(url)
        stats = run["stats"]
        validation = stats["validation"]
        print("worse run:", stats["status"], "IoU current", validation["current"]["mean_iou"], "new",
              validation["new"]["mean_iou"])
        assert stats["status"] == "rejected" and validation["decision"] == "rejected"
        assert validation["new"]["mean_iou"] < validation["current"]["mean_iou"]
        assert (setup["trained"] / "medlam.pt").read_bytes() == v1  # not published
        assert Path(stats["rejected"]).exists() and sorted(p.name for p in (setup["trained"] / "versions").glob("*.pt")) == ["v001.pt"]
        assert "total_time" in stats


def test_kill_during_training_keeps_the_published_weights(setup):
    v1 = (setup["trained"] / "medlam.pt").read_bytes()
    setup["demo_store"] = setup["templates"].read_bytes()  # made with the demo weights (test 9 ran no infer)
    process: list = []
    with running_server(setup["studies"], setup["conf"], log_path=setup["root"] / "s2.log", process=process) as url:
        r = httpx.post(f"{url}/train/medlam", json={**FAST, "iterations": 500, "validation_studies": 0}, timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 900
        while httpx.get(f"{url}/info/", timeout=30).json()["train_stats"].get("medlam", {}).get("status") != "training":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(2.0)
        kill_now(process[0])
    assert (setup["trained"] / "medlam.pt").read_bytes() == v1
    assert sorted(p.name for p in (setup["trained"] / "versions").glob("*.pt")) == ["v001.pt"]
    stats = json.loads((setup["trained"] / "train_stats.json").read_text())  # complete JSON
    assert stats["status"] == "training" and "total_time" not in stats
    # the start-up rebuild for v1 runs beside the training: killed before or after it finished
    v1_fp = PatchEmbedder.from_checkpoint(setup["trained"] / "medlam.pt").fingerprint
    assert_store_consistent(setup, {setup["demo_fp"], v1_fp})


def test_kill_during_template_rebuild_keeps_the_old_templates(setup):
    setup["templates"].write_bytes(setup["demo_store"])  # stale for v1 whatever the last kill left
    process: list = []
    with running_server(setup["studies"], setup["conf"], log_path=setup["root"] / "s3.log", process=process) as url:
        # the weights changed (v1): the start-up sync rebuilds every support
        assert httpx.get(f"{url}/info/", timeout=30).json()["templates"]["updating"] is True
        time.sleep(2.0)
        kill_now(process[0])
    templates = assert_store_consistent(setup, {setup["demo_fp"]})
    assert templates.summary()["liver"]["supports"] == 2


def test_kill_during_final_label_save_then_restart_converges(setup):
    query = setup["query"]
    label_bytes = (setup["root"] / "sample" / "ground_truth" / f"{query}.nii.gz").read_bytes()
    target = setup["studies"] / "labels" / "final" / f"{query}.nii.gz"
    v1_fp = PatchEmbedder.from_checkpoint(setup["trained"] / "medlam.pt").fingerprint
    process: list = []
    with running_server(setup["studies"], setup["conf"], log_path=setup["root"] / "s4.log", process=process) as url:
        wait_for_templates(url)
        saving = threading.Thread(target=lambda: httpx.put(
            f"{url}/datastore/label?image={query}&tag=final", files={"label": ("l.nii.gz", label_bytes)}, timeout=900))
        saving.daemon = True
        saving.start()
        deadline = time.monotonic() + 300
        while not target.exists():  # the label is stored first, then its templates are computed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        kill_now(process[0])
    assert target.read_bytes() == label_bytes
    assert_store_consistent(setup, {v1_fp})

    # restart pinned to the untrained weights (one setting restores them): the store converges
    conf = {**setup["conf"], "medlam_version": "0"}
    with running_server(setup["studies"], conf, log_path=setup["root"] / "s5.log") as url:
        info = wait_for_templates(url)["templates"]
        assert info["weights_fingerprint"] == setup["demo_fp"] and info["stale"] is False
        assert query in info["organs"]["liver"]["study_ids"] and info["organs"]["liver"]["supports"] == 3
        r = httpx.post(f"{url}/infer/medlam?image={query}&output=json", data={"params": '{"organs": "liver"}'},
                       timeout=600)
        assert r.status_code == 200, r.text
    assert_store_consistent(setup, {setup["demo_fp"]})
