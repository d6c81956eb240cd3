"""`medlsam run`: whole datasets, sequential and on Ray, resumable; and /batch/infer/medlsam.

Fast tests use no model (sources, the output folder, the runner with a stub processor). Slow
tests run the real pipeline (demo MedLAM + LiteMedSAM) on tiny generated studies with two organs:
sequential vs Ray (2 local workers) voxel-identical, a Ray worker killed mid-study, resume, a
broken study; and the MONAI Label batch endpoint through a real server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from medlsam.batch import (BatchOutput, BatchSettings, LocalExecutor, RayExecutor, StudyRef, datastore_studies,
                           datastore_supports, file_studies, run_batch)
from medlsam.cli import main as cli_main
from medlsam.paths import DEMO_MEDLAM
from medlsam.synthetic import write_sample_dataset

N_STUDIES, N_SUPPORTS = 5, 2
ORGANS = ["liver", "spleen"]  # two organs keep the CPU cost small
RAY_INIT = {"num_cpus": 2, "object_store_memory": 80 * 2**20, "include_dashboard": False,
            "log_to_driver": False}


# --- fast: sources, output folder, runner --------------------------------------------------------
def _touch_nifti(path: Path, value: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.float32), np.eye(4)), str(path))


def test_datastore_studies_split_supports_from_queries(tmp_path):
    for sid in ("a", "b", "c"):
        _touch_nifti(tmp_path / f"{sid}.nii.gz")
    _touch_nifti(tmp_path / "labels" / "final" / "b.nii.gz")
    assert [r.study_id for r in datastore_studies(tmp_path)] == ["a", "c"]
    assert [r.study_id for r in datastore_studies(tmp_path, "labeled")] == ["b"]
    assert [r.study_id for r in datastore_studies(tmp_path, "all")] == ["a", "b", "c"]
    assert datastore_supports(tmp_path) == [(tmp_path / "b.nii.gz", tmp_path / "labels" / "final" / "b.nii.gz")]
    with pytest.raises(ValueError, match="unlabeled"):
        datastore_studies(tmp_path, "some")


def test_file_studies_from_folder_and_list(tmp_path):
    for sid in ("x1", "x2"):
        _touch_nifti(tmp_path / "imgs" / f"{sid}.nii.gz")
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/x2.nii.gz\n# comment\n")
    assert [r.study_id for r in file_studies([tmp_path / "imgs"])] == ["x1", "x2"]
    refs = file_studies([listing])
    assert [r.study_id for r in refs] == ["x2"] and refs[0].load().shape == (4, 4, 4)
    with pytest.raises(FileNotFoundError):
        file_studies([tmp_path / "missing.nii.gz"])


class _StubResult:
    def __init__(self, labels):
        self.labels = labels

    def report(self):
        return {"label_names": {"organ": 1}, "absent": [], "voxels": {"organ": int((self.labels == 1).sum())},
                "timings": {"localize_s": 0.0, "segment_s": 0.0, "total_s": 0.0}}


class _StubProcessor:
    """Thresholds the image (no model); a study named 'bad*' raises."""

    def __init__(self, output):
        self.output, self.calls = output, []

    def process(self, ref, attempt=1):
        self.calls.append(ref.study_id)
        try:
            if ref.study_id.startswith("bad"):
                raise ValueError("this study is broken")
            image = ref.load()
            return self.output.write_success(ref, image.affine, _StubResult((image.get_fdata() > 0).astype(np.uint8)),
                                             {"load_s": 0.0}, attempt)
        except Exception as exc:
            return self.output.write_failure(ref, exc, attempt)


def test_runner_records_failures_resumes_and_refuses_other_settings(tmp_path):
    refs = []
    for sid, value in (("s1", 1.0), ("bad1", 1.0), ("s2", 0.0)):
        _touch_nifti(tmp_path / "in" / f"{sid}.nii.gz", value)
        refs.append(StudyRef(sid, str(tmp_path / "in" / f"{sid}.nii.gz")))
    output = BatchOutput(tmp_path / "out", "key1")
    output.prepare({"k": 1})
    (output.labels_dir / ".s1.nii.gz.abc.tmp.nii.gz").write_bytes(b"half")  # left by a killed writer
    output.prepare({"k": 1})
    assert not list(output.labels_dir.glob(".*tmp*"))
    stub = _StubProcessor(output)
    summary = run_batch(refs, output, LocalExecutor(lambda: stub), progress=False)
    assert (summary.ok, summary.failed, summary.skipped) == (2, ["bad1"], 0)
    bad = output.read_result("bad1")
    assert bad["status"] == "error" and "this study is broken" in bad["error"]
    assert np.asarray(nib.load(output.label_path("s1")).dataobj).sum() == 64
    rows = output.csv_rows()
    assert [(r["study_id"], r["status"]) for r in rows] == [("s1", "ok"), ("bad1", "error"), ("s2", "ok")]

    # resume: only the failed study runs again; a lost CSV row is restored from the result file
    lines = output.summary_csv.read_text().splitlines()
    output.summary_csv.write_text("\n".join(lines[:-1]) + "\n")  # drop s2's row
    stub.calls.clear()
    summary = run_batch(refs, output, LocalExecutor(lambda: stub), progress=False)
    assert stub.calls == ["bad1"] and summary.skipped == 2
    assert sorted(r["study_id"] for r in output.csv_rows() if r["status"] == "ok") == ["s1", "s2"]

    with pytest.raises(ValueError, match="other settings"):
        BatchOutput(tmp_path / "out", "key2").prepare({"k": 2})
    with pytest.raises(ValueError, match="two query studies"):
        run_batch(refs + refs[:1], output, LocalExecutor(lambda: stub), progress=False)


@pytest.mark.slow
def test_dicomweb_source_lists_ct_series_and_loads_them_in_hu(tmp_path):
    from medlsam.batch import dicomweb_studies
    from medlsam.dicom import dicom_layout, write_ct_series
    from medlsam.dicom.orthanc import find_orthanc, start_orthanc, upload
    from medlsam.synthetic import generate_study
    from server_process import free_port

    try:
        find_orthanc()
    except Exception as exc:  # noqa: BLE001 - `make test` installs it (dicomweb-deps)
        pytest.skip(f"Orthanc not installed: {exc}")
    study = generate_study(seed=3, preset="tiny")
    ct = write_ct_series(study.image, tmp_path / "ct", "synct_batch")
    mr = write_ct_series(study.image, tmp_path / "mr", "synct_batch", modality="MR")
    orthanc = start_orthanc(tmp_path / "orthanc", free_port())
    try:
        upload(orthanc.url, ct.files + mr.files)
        refs = dicomweb_studies(orthanc.dicomweb_url)
        assert [(r.study_id, r.kind, r.study_uid) for r in refs] == [(ct.series_uid, "dicomweb", ct.study_uid)]
        image = refs[0].load()
        expected = dicom_layout(study.image)
        assert image.shape == expected.shape and np.allclose(image.affine, expected.affine, atol=1e-3)
        assert np.abs(image.get_fdata() - np.clip(np.rint(expected.get_fdata()), -1024, None)).max() < 0.5
        with pytest.raises(ValueError, match="not found"):
            dicomweb_studies(orthanc.dicomweb_url, series=[mr.series_uid])
    finally:
        orthanc.stop()


def test_run_key_ignores_threads_and_device_but_not_the_method():
    base = BatchSettings(templates_path="t.pt", medlam_checkpoint="m.pt", templates_digest="abc")
    assert base.run_key() == BatchSettings("other.pt", "m.pt", threads=4, device="cuda", templates_digest="abc").run_key()
    assert base.run_key() != BatchSettings("t.pt", "m.pt", mode="SPL", templates_digest="abc").run_key()
    assert base.run_key() != BatchSettings("t.pt", "m.pt", templates_digest="abd").run_key()


# --- slow: the real pipeline -------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    write_sample_dataset(root, n_studies=N_STUDIES, n_supports=N_SUPPORTS, seed=11, preset="tiny", progress=False)
    return root


def run_cli(dataset: Path, out: Path, *extra: str) -> int:
    return cli_main(["run", "--datastore", str(dataset / "studies"), "--out", str(out), "--organs", *ORGANS,
                     "--medlam", str(DEMO_MEDLAM), "--threads-per-worker", "1", *extra])


def labels_of(out: Path) -> dict[str, np.ndarray]:
    return {p.name.split(".")[0]: np.asarray(nib.load(p).dataobj) for p in sorted((out / "labels").glob("*.nii.gz"))}


@pytest.fixture(scope="module")
def sequential(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "out"
    assert run_cli(dataset, out) == 0
    return out


@pytest.mark.slow
def test_sequential_run_writes_label_json_and_csv_per_study(dataset, sequential):
    queries = [r.study_id for r in datastore_studies(dataset / "studies")]
    assert len(queries) == N_STUDIES - N_SUPPORTS
    labels = labels_of(sequential)
    assert sorted(labels) == queries
    for sid in queries:
        image = nib.load(dataset / "studies" / f"{sid}.nii.gz")
        label = nib.load(sequential / "labels" / f"{sid}.nii.gz")
        assert label.shape == image.shape and np.allclose(label.affine, image.affine)
        result = json.loads((sequential / "results" / f"{sid}.json").read_text())
        assert result["status"] == "ok" and set(result["organs"]) == set(ORGANS)
        for organ in ORGANS:
            entry = result["organs"][organ]
            assert {"box_voxel", "present", "confidence"} <= set(entry)
            if entry["present"]:
                assert result["voxels"][organ] == int((labels[sid] == entry["id"]).sum()) > 0
        assert {"localize_s", "segment_s", "load_s", "write_s"} <= set(result["timings"])
    rows = BatchOutput(sequential).csv_rows()
    assert sorted(r["study_id"] for r in rows) == queries and {r["status"] for r in rows} == {"ok"}
    # most organs are found (tiny studies, demo weights): the labels are not empty
    assert sum(int(r["foreground_voxels"]) for r in rows) > 1000


@pytest.mark.slow
def test_resume_skips_finished_studies(dataset, sequential, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sequential, out)
    victim = sorted((out / "results").glob("*.json"))[0]
    victim.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.nii.gz")}
    n_rows = len(BatchOutput(out).csv_rows())
    capsys.readouterr()
    assert run_cli(dataset, out) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == N_STUDIES - N_SUPPORTS - 1 and summary["ok"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.nii.gz")}
    redone = victim.name.replace(".json", ".nii.gz")
    assert [n for n in before if before[n] != after[n]] == [redone]
    assert len(BatchOutput(out).csv_rows()) == n_rows + 1
    assert labels_of(out).keys() == labels_of(sequential).keys()
    for sid, label in labels_of(out).items():
        assert np.array_equal(label, labels_of(sequential)[sid])


@pytest.mark.slow
def test_broken_study_is_recorded_and_the_others_finish(dataset, sequential, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    good = sorted((dataset / "studies").glob("*.nii.gz"))[-1]
    shutil.copy(good, queries / good.name)
    (queries / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    code = cli_main(["run", "--templates", str(sequential / "templates.pt"), "--queries", str(queries),
                     "--out", str(out), "--organs", *ORGANS, "--medlam", str(DEMO_MEDLAM), "--threads-per-worker", "1"])
    assert code == 1
    broken = json.loads((out / "results" / "broken.json").read_text())
    assert broken["status"] == "error" and "not a readable NIfTI" in broken["error"]
    sid = good.name.split(".")[0]
    assert json.loads((out / "results" / f"{sid}.json").read_text())["status"] == "ok"
    assert np.array_equal(labels_of(out)[sid], labels_of(sequential)[sid])
    statuses = {r["study_id"]: r["status"] for r in BatchOutput(out).csv_rows()}
    assert statuses == {"broken": "error", sid: "ok"}


def test_run_without_medlam_weights_registers_the_supports_as_the_app_does(dataset, tmp_path, capsys):
    """No --medlam: `auto` picks registration (and SPL), as the app's default; resumable like MedLAM runs."""
    from medlsam.segment import dice

    out = tmp_path / "reg"
    args = ["run", "--datastore", str(dataset / "studies"), "--out", str(out), "--organs", *ORGANS,
            "--threads-per-worker", "1", "--limit", "1"]  # one study keeps it in the fast suite
    assert cli_main(args) == 0
    run = json.loads((out / "run.json").read_text())["settings"]
    assert run["localizer"] == "registration" and run["mode"] == "SPL" and run["medlam_checkpoint"] == ""
    assert sorted(p.stem for p in (out / "atlases").glob("*.npz")) == [f"synct_{i:04d}" for i in range(N_SUPPORTS)]
    label_map = json.loads((dataset / "label_map.json").read_text())
    scores = []
    for sid, label in labels_of(out).items():
        result = json.loads((out / "results" / f"{sid}.json").read_text())
        assert result["status"] == "ok" and result["mode"] == "SPL"
        truth = np.asarray(nib.load(dataset / "ground_truth" / f"{sid}.nii.gz").dataobj)
        scores += [dice(label == result["organs"][o]["id"], truth == label_map[o]) for o in ORGANS
                   if (truth == label_map[o]).any()]
    print(f"\nregistration run: Dice {np.round(scores, 3).tolist()}")
    # tiny studies (96 px, thick slices), 2 supports: 0.36-0.74 measured over 3 studies
    assert len(scores) == 2 and min(scores) > 0.25
    capsys.readouterr()
    assert cli_main(args) == 0  # the same supports: every study is skipped
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == 1 and summary["ok"] == 0
    assert cli_main(["run", "--templates", str(tmp_path / "t.pt"), "--datastore", str(dataset / "studies"),
                     "--out", str(tmp_path / "bad"), "--localizer", "registration"]) == 2
    assert "--templates holds MedLAM templates" in capsys.readouterr().err


def _ray_settings(sequential: Path, out: Path) -> BatchSettings:
    run = json.loads((sequential / "run.json").read_text())["settings"]
    settings = BatchSettings(**{**run, "templates_path": str(out / "templates.pt")})
    out.mkdir(parents=True)
    shutil.copy(sequential / "templates.pt", out / "templates.pt")
    return settings


@pytest.mark.slow
def test_ray_two_workers_give_identical_labels_and_survive_a_killed_worker(dataset, sequential, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    settings = _ray_settings(sequential, out)
    output = BatchOutput(out, settings.run_key())
    output.prepare(settings.to_dict())
    refs = datastore_studies(dataset / "studies")
    executor = RayExecutor(settings, out, workers=2, threads_per_worker=1, init_options=RAY_INIT)
    killed = []

    def kill_soon(row):
        # the worker that just answered gets its next study at once; kill it while on that study
        if not killed and len(refs) > 2:
            pid = int(row["worker"].rsplit(":", 1)[1])
            killed.append(pid)
            threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()

    try:
        executor.start()
        pids = {int(w["worker"].rsplit(":", 1)[1]) for w in executor.worker_info()}
        assert len(pids) == 2  # two worker processes, one model set each
        summary = run_batch(refs, output, executor, progress=False, on_row=kill_soon)
    finally:
        executor.close()
    assert summary.ok == len(refs) and not summary.failed
    assert sum(executor.deaths.values()) >= 1 and executor.requeued >= 1
    results = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    assert max(r["attempt"] for r in results) == 2  # the killed worker's study ran again elsewhere
    assert killed[0] not in {int(r["worker"].rsplit(":", 1)[1]) for r in results if r["attempt"] == 2}
    ray_labels, seq_labels = labels_of(out), labels_of(sequential)
    assert ray_labels.keys() == seq_labels.keys()
    for sid in seq_labels:
        assert np.array_equal(ray_labels[sid], seq_labels[sid]), sid
    assert not [p for p in out.rglob(".*tmp*")]
    assert len({r["worker"] for r in results}) >= 2


@pytest.mark.slow
def test_cli_with_local_ray(dataset, sequential, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    assert run_cli(dataset, out, "--ray", "--workers", "2", "--limit", "2", "--ray-object-store-mb", "80") == 0
    rows = BatchOutput(out).csv_rows()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    for sid, label in labels_of(out).items():
        assert np.array_equal(label, labels_of(sequential)[sid])


# --- slow: MONAI Label's /batch/infer/medlsam through a real server ----------------------------
@pytest.mark.slow
@pytest.mark.server
def test_batch_infer_endpoint_on_the_datastore(dataset, sequential, tmp_path):
    from server_process import running_server, wait_for_templates

    studies = tmp_path / "ds"
    shutil.copytree(dataset / "studies", studies)
    # supports annotate only ORGANS: the server's template sync stays as cheap as the CLI's
    keep = [json.loads((dataset / "label_map.json").read_text())[o] for o in ORGANS]
    for path in (studies / "labels" / "final").glob("*.nii.gz"):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.where(np.isin(data, keep), data, 0).astype(np.uint8), img.affine), str(path))
    model_dir, out = tmp_path / "models", tmp_path / "batch-out"
    conf = {"label_map": dataset / "label_map.json", "medlam_checkpoint": DEMO_MEDLAM, "model_dir": model_dir,
            "template_store": model_dir / "templates.pt"}
    queries = [r.study_id for r in datastore_studies(studies)]
    with running_server(studies, conf, log_path=tmp_path / "server.log") as url:
        wait_for_templates(url)
        # refused before anything starts: unknown study, unknown organ, a synchronous run
        bad = httpx.post(f"{url}/batch/infer/medlsam", json={"images": ["nope"]}, timeout=60)
        assert bad.status_code == 404 and "nope" in bad.text, bad.text
        bad = httpx.post(f"{url}/batch/infer/medlsam", json={"images": queries[:1], "organs": ["brain"]}, timeout=60)
        assert bad.status_code == 422 and "brain" in bad.text, bad.text
        bad = httpx.post(f"{url}/batch/infer/medlsam?run_sync=true", json={"images": queries[:1]}, timeout=60)
        assert bad.status_code == 422 and "run_sync" in bad.text, bad.text

        def run_task(**request):
            started = httpx.post(f"{url}/batch/infer/medlsam", timeout=60, **request)
            assert started.status_code == 200, started.text
            deadline = time.monotonic() + 1200
            while True:
                task = httpx.get(f"{url}/batch/infer", timeout=30).json()
                if task["status"] in ("DONE", "ERROR"):
                    return task
                assert time.monotonic() < deadline, "batch task did not finish"
                time.sleep(2)

        # a list of ids, then all unlabeled studies as MONAI Label runs it: the first study is skipped
        task = run_task(json={"images": queries[:1], "organs": ORGANS, "output": str(out)})
        assert task["status"] == "DONE", task
        assert [r["study_id"] for r in BatchOutput(out).csv_rows()] == queries[:1]
        task = run_task(params={"images": "unlabeled"}, json={"organs": ORGANS, "output": str(out)})
        assert task["status"] == "DONE", task
        datastore = httpx.get(f"{url}/datastore/?output=all", timeout=30).json()
    rows = BatchOutput(out).csv_rows()
    assert sorted(r["study_id"] for r in rows) == queries and {r["status"] for r in rows} == {"ok"}
    assert len(rows) == len(queries)  # the study of the first call was not segmented twice
    for sid in queries:
        result = json.loads((out / "results" / f"{sid}.json").read_text())
        assert set(result["organs"]) == set(ORGANS) and "timings" in result
        assert (studies / "labels" / "original" / f"{sid}.nii.gz").exists()
        assert "original" in datastore["objects"][sid]["labels"]
    # the same labels as `medlsam run` on the same supports
    server_labels, seq_labels = labels_of(out), labels_of(sequential)
    for sid in queries:
        agree = np.mean(server_labels[sid] == seq_labels[sid])
        assert agree > 0.999, (sid, agree)
