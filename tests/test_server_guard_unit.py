"""The server guard's pieces without a server: id rules, JSON params, request checks, the work queue,
header checks, weight versions, trainer options and stats (the server tests: test_server_guard.py)."""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException

APP = Path(__file__).resolve().parents[1] / "apps" / "medlsam"
sys.path.insert(0, str(APP))

from medlsam.errors import InputError, NotFoundError  # noqa: E402
from medlsam.io import check_nifti_header  # noqa: E402
from tasks.guard import ids  # noqa: E402
from tasks.guard.config import GuardSettings  # noqa: E402
from tasks.guard.middleware import Guard  # noqa: E402
from tasks.guard.policy import needs_authorization  # noqa: E402
from tasks.guard.uploads import json_object, nrrd_shape  # noqa: E402
from tasks.guard.work import WorkQueue  # noqa: E402
from tasks.settings import trained_checkpoints  # noqa: E402
from tasks.train_medlam import parse_options  # noqa: E402
from tasks.weights import TrainStats, WeightVersions  # noqa: E402


@pytest.mark.parametrize("name", ["synct_0005", "3: CT ABDOMEN", "Segment_1 (copy)", "Tête 2", "1.2.840.113619",
                                  "_scratch", "a..b"])
def test_slicer_node_names_are_valid_new_image_ids(name):
    assert ids.check_new_image_id(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", ".hidden", "..", "", "x ", "x.", "/etc/passwd",
                                  "name\x00", "x" * 201, "tab\there"])
def test_path_tricks_are_refused_as_image_ids(name):
    with pytest.raises(InputError):
        ids.check_new_image_id(name)


def test_new_image_ids_stay_in_the_datastore_folder(tmp_path):
    class Store(ids.LocalDatastore):
        def __init__(self, studies):
            self.studies = str(studies)

    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "link").symlink_to(tmp_path)
    store = Store(tmp_path / "studies")
    assert ids.check_new_image_id("ok", store, ".nii.gz") == "ok"
    assert ids.check_new_image_id("link", store, ".nii.gz")  # a file named link.nii.gz: still inside


@pytest.mark.parametrize("tag,ok", [("final", True), ("original", True), ("my-tag_2", True), ("../x", False),
                                    ("a/b", False), ("", False), ("x" * 65, False), ("a.b", False)])
def test_label_tags(tag, ok):
    if ok:
        assert ids.check_tag(tag) == tag
    else:
        with pytest.raises(InputError):
            ids.check_tag(tag)


def test_session_ids_must_look_like_uuids():
    assert ids.check_session_id("6f1c2a3e-1d2b-11ef-9a3c-0242ac120002")
    for bad in ("../../etc", "x", "", "6f1c2a3e/../.."):
        with pytest.raises(NotFoundError):
            ids.check_session_id(bad)


def test_upload_suffixes():
    assert ids.upload_suffix("/tmp/tmpab12.nii.gz") == ".nii.gz"
    assert ids.upload_suffix("label.seg.nrrd") == ".seg.nrrd"
    assert ids.upload_suffix("3: CT.ABDOMEN.nii") == ".nii"
    assert ids.upload_suffix("rois.json") == ".json"
    assert ids.upload_suffix("noext") == ".nii.gz"
    assert ids.upload_suffix("../../x.NII.GZ") == ".nii.gz"
    assert ids.image_suffix("a.nrrd") == ".nrrd"
    with pytest.raises(InputError):
        ids.image_suffix("photo.png")


@pytest.mark.parametrize("text,message", [
    ("[1]", "JSON object"), ("null", "JSON object"), ('"s"', "JSON object"), ("x", "not valid JSON"),
    ('{"a": Infinity}', "finite"), ('{"a": -Infinity}', "finite"), ('{"a": NaN}', "finite"),
    ('{"a": 1e400}', "finite"), ('{"a": [1, 2, 1e999]}', "finite"), ('{"a": 12345678901234567890123}', "digits"),
    ('{"a": ' + "[" * 3000 + "]" * 3000 + "}", "JSON"),
])
def test_params_must_be_a_json_object_of_finite_numbers(text, message):
    with pytest.raises(InputError, match=message):
        json_object(text)


def test_params_that_are_fine():
    assert json_object("") == {} and json_object(None) == {}
    assert json_object('{"roi": [1, 2.5, -3], "seed": 7, "label": "liver"}') == {"roi": [1, 2.5, -3], "seed": 7,
                                                                                  "label": "liver"}


def scope(method="GET", path="/info/", host="127.0.0.1:8000", client="127.0.0.1", **headers):
    raw = [(b"host", host.encode())] + [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": method, "path": path, "headers": raw, "scheme": "http", "client": (client, 5)}


def test_loopback_mode_accepts_writes_only_from_this_machine():
    guard = Guard(GuardSettings())
    assert guard.settings.auth_mode == "loopback"
    assert guard.refusal(scope("PUT", "/datastore/label")) is None
    assert guard.refusal(scope("POST", "/train/medlam", client="::1")) is None
    status, message = guard.refusal(scope("POST", "/train/medlam", client="192.168.1.20"))
    assert status == 403 and "MEDLSAM_API_TOKEN" in message
    # reads and OHIF's computing POSTs stay open from anywhere
    assert guard.refusal(scope("GET", "/info/", client="192.168.1.20")) is None
    assert guard.refusal(scope("POST", "/infer/medlsam", client="192.168.1.20")) is None
    assert guard.refusal(scope("POST", "/activelearning/random", client="192.168.1.20")) is None
    assert guard.refusal(scope("GET", "/datastore/dataset", client="192.168.1.20"))[0] == 403


def test_token_mode_wants_the_token_for_writes():
    guard = Guard(GuardSettings(api_token="t" * 20))
    assert guard.refusal(scope("DELETE", "/datastore/image"))[0] == 401
    assert guard.refusal(scope("DELETE", "/datastore/image", authorization="Bearer wrong"))[0] == 401
    assert guard.refusal(scope("DELETE", "/datastore/image", authorization="Bearer " + "t" * 20)) is None
    assert guard.refusal(scope("DELETE", "/datastore/image", authorization="bearer " + "t" * 20)) is None
    assert guard.refusal(scope("GET", "/datastore/image", client="10.0.0.5")) is None


def test_host_and_origin_checks():
    guard = Guard(GuardSettings(allowed_hosts=["ws.example.org"]))
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "10.1.2.3", "ws.example.org:8000"):
        assert guard.refusal(scope(host=host)) is None, host
    assert guard.refusal(scope(host="attacker.example:8000"))[0] == 400
    write = dict(method="POST", path="/infer/medlam")
    assert guard.refusal(scope(**write, origin="http://127.0.0.1:8000")) is None  # the server's own page
    assert guard.refusal(scope(**write, origin="http://localhost:3000")) is None  # OHIF dev server
    assert guard.refusal(scope(**write, origin="https://evil.example"))[0] == 403
    assert guard.refusal(scope(**write, origin="null"))[0] == 403
    assert guard.refusal(scope("GET", "/info/", origin="https://evil.example")) is None  # CORS hides the answer


def test_policy_lists():
    assert needs_authorization("PUT", "/datastore/image") and needs_authorization("POST", "/train/")
    assert needs_authorization("POST", "/reload") and needs_authorization("PUT", "/session/")
    assert not needs_authorization("POST", "/infer/sam") and not needs_authorization("GET", "/datastore/image")
    assert not needs_authorization("OPTIONS", "/datastore/dataset")


def test_settings_from_conf(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLSAM_API_TOKEN", "short")
    with pytest.raises(ValueError, match="16 characters"):
        GuardSettings.from_conf({})
    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-token-123\n")
    s = GuardSettings.from_conf({"api_token_file": str(token_file), "cors_origins": "http://viewer:3000/,https://x.y",
                                 "max_upload_mb": "5"})
    assert s.api_token == "a-long-enough-token-123" and s.auth_mode == "token"
    assert "http://viewer:3000" in s.cors_origins and s.max_upload_bytes == 5 << 20
    with pytest.raises(ValueError):
        GuardSettings.from_conf({"workers": "0"})


def test_work_queue_is_bounded():
    queue = WorkQueue(workers=1, queue_length=1, wait_s=5, retry_after_s=7)
    import threading

    running, release = threading.Event(), threading.Event()

    def hold():
        with queue.slot("hold"):
            running.set()
            release.wait(5)

    threads = [threading.Thread(target=hold), threading.Thread(target=hold)]
    for t in threads:
        t.start()
    running.wait(5)
    time.sleep(0.1)
    assert queue.admitted == 2
    with pytest.raises(HTTPException) as refused:
        with queue.slot("third"):
            pass
    assert refused.value.status_code == 503 and refused.value.headers["Retry-After"] == "7"
    release.set()
    for t in threads:
        t.join(5)
    assert queue.admitted == 0
    with queue.slot("again"):
        assert queue.admitted == 1


def test_header_checks_refuse_huge_declared_shapes_unread(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.int16)
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + bytes(1 << 20)))
    started = time.monotonic()
    with pytest.raises(InputError, match="64000000000 voxels"):
        check_nifti_header(bomb, 10**8)
    assert time.monotonic() - started < 2
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), small)
    assert check_nifti_header(small, 1000) == (4, 5, 6)
    with pytest.raises(InputError, match="not a readable NIfTI"):
        check_nifti_header(tmp_path / "small.nii.gz" if False else _garbage(tmp_path), 1000)
    nrrd = tmp_path / "x.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 300\nencoding: gzip\n\n" + b"\0" * 10)
    assert nrrd_shape(nrrd) == (512, 512, 300)


def _garbage(folder: Path) -> Path:
    path = folder / "garbage.nii.gz"
    path.write_bytes(b"not an image")
    return path


def test_weight_versions_and_pinning(tmp_path):
    versions = WeightVersions(tmp_path / "medlam_trained")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights A")
    b.write_bytes(b"weights B")
    assert versions.publish(a, {"validation": "x"}) == 1
    assert versions.publish(b, {}) == 2
    assert versions.versions() == [1, 2] and versions.latest.read_bytes() == b"weights B"
    assert json.loads(versions.path(1).with_suffix(".json").read_text())["version"] == 1
    kept = versions.reject(a, {"why": "worse"})
    assert kept.read_bytes() == b"weights A" and versions.latest.read_bytes() == b"weights B"
    assert trained_checkpoints(versions.dir, "latest") == [versions.latest]
    assert trained_checkpoints(versions.dir, "1") == [versions.path(1)]
    assert trained_checkpoints(versions.dir, "0") == []
    with pytest.raises(ValueError, match="v001, v002"):
        trained_checkpoints(versions.dir, "7")
    with pytest.raises(ValueError):
        trained_checkpoints(versions.dir, "previous")


def test_train_options_are_checked():
    assert parse_options({})["iterations"] == 100
    assert parse_options({"iterations": 3.0, "learning_rate": 1})["iterations"] == 3
    for bad in ({"iterations": -1}, {"iterations": 2.5}, {"learning_rate": "fast"}, {"batch_size": True},
                {"learning_rate": float("inf")}, {"device": "tpu"}, {"validation_tolerance": 2}):
        with pytest.raises(InputError):
            parse_options(bad)


def test_train_stats_have_the_keys_clients_read(tmp_path):
    stats = TrainStats(tmp_path / "train_stats.json", total_epochs=50)
    stats.update(epoch=10, best_metric=0.42)
    running = json.loads((tmp_path / "train_stats.json").read_text())
    assert {"epoch", "total_epochs", "best_metric", "start_ts", "current_time"} <= set(running)
    assert "total_time" not in running and running["epoch"] / running["total_epochs"] == 0.2
    stats.finish(status="published", epoch=50)
    done = TrainStats.read(tmp_path / "train_stats.json")
    assert "total_time" in done and "current_time" not in done and 0 <= done["best_metric"] <= 1
