"""MedLAM pretraining loop: a few iterations on tiny CT volumes, resume, stop, CLI, DDP (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medlsam.cli import main as cli_main
from medlsam.medlam.checkpoint import load_medlam, weights_fingerprint
from trainers.medlam import TrainConfig, train
from trainers.medlam.loop import CHECKPOINT

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def write_ct(path: Path, seed: int, shape=(48, 44, 40)) -> str:
    """A small CT-like study in HU: air, an elliptic body, a bright and a dark blob."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = ((x - 24) / 20) ** 2 + ((y - 22) / 16) ** 2 < 1
    hu[body] = 40.0
    hu[body & (((x - 18) / 5) ** 2 + ((y - 22) / 5) ** 2 + ((z - 12 - seed) / 6) ** 2 < 1)] = 400.0
    hu[body & (((x - 30) / 6) ** 2 + ((y - 20) / 4) ** 2 + ((z - 28) / 6) ** 2 < 1)] = -700.0
    hu += rng.normal(0, 20, shape)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([-5.0, -5.0, 5.0, 1.0])), str(path))
    return str(path)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studies")
    return [write_ct(folder / f"s{i}.nii.gz", i) for i in range(3)]


def tiny_cfg(**kw) -> TrainConfig:
    values = dict(base_channels=2, patch_size=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0), batch_size=2,
                  mss_pairs=1, samples_per_volume=4, num_workers=0, iterations=3, log_every=1,
                  learning_rate=1e-3, threads=1, checkpoint_every_s=0.0)
    values.update(kw)
    return TrainConfig(**values)


def test_train_resume_and_publish(tmp_path, studies):
    reports = []
    out = tmp_path / "run"
    published = train(tiny_cfg(iterations=3), studies, str(out), progress=reports.append)
    assert published == str(out / "medlam.pt")
    assert [r["iteration"] for r in reports] == [1, 2, 3]
    keys = {"iteration", "total", "loss", "loss_rdr", "loss_mss", "seconds"}
    assert keys <= set(reports[0]) and all(np.isfinite(reports[-1][k]) for k in ("loss", "loss_rdr", "loss_mss"))
    assert reports[0]["loss_rdr"] > 1.0  # mm^2 of a random network: far from zero
    net, cfg = load_medlam(published)
    assert cfg.spacing_mm == (6.0, 6.0, 6.0) and cfg.base_channels == 2
    first = weights_fingerprint(net)
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["iteration"] == 3
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard scalars"
    assert len(list((out / "cache").glob("*.npy"))) == 3
    assert "iter 3/3" in (out / "train.log").read_text()

    # resume: continues at iteration 4 with the saved weights and optimizer state
    reports.clear()
    train(tiny_cfg(iterations=5), studies, str(out), resume=True, progress=reports.append)
    assert [r["iteration"] for r in reports] == [4, 5]
    assert torch.load(out / CHECKPOINT, weights_only=True)["iteration"] == 5
    net2, _ = load_medlam(out / "medlam.pt")
    assert weights_fingerprint(net2) != first
    # a finished run resumed with the same target publishes again without training
    reports.clear()
    train(tiny_cfg(iterations=5), studies, str(out), resume=True, progress=reports.append)
    assert reports == []
    # a different network cannot resume this checkpoint
    with pytest.raises(ValueError, match="different network configuration"):
        train(tiny_cfg(iterations=6, base_channels=3), studies, str(out), resume=True)


def test_should_stop_ends_early_and_still_publishes(tmp_path, studies):
    calls = []
    path = train(tiny_cfg(iterations=50), studies, str(tmp_path / "run"), should_stop=lambda: len(calls) >= 2,
                 progress=calls.append)
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["iteration"] == 2
    assert os.path.isfile(path)


def test_init_weights_and_bad_inputs(tmp_path, studies):
    first = train(tiny_cfg(iterations=1), studies, str(tmp_path / "a"))
    start, _ = load_medlam(first)
    # lr 0 is refused; a tiny one keeps the weights close to the start
    with pytest.raises(ValueError, match="learning_rate"):
        tiny_cfg(learning_rate=0.0)
    out = train(tiny_cfg(iterations=1, init_weights=first, learning_rate=1e-12), studies, str(tmp_path / "b"))
    after, _ = load_medlam(out)
    diffs = [float((a - b).abs().max()) for a, b in zip(start.state_dict().values(), after.state_dict().values())]
    assert max(diffs) < 1e-6
    with pytest.raises(FileNotFoundError, match="not found"):
        train(tiny_cfg(), [str(tmp_path / "missing.nii.gz")], str(tmp_path / "c"))
    mri = tmp_path / "mri.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(40, 40, 40).astype(np.float32) * 500, np.eye(4)), str(mri))
    with pytest.raises(ValueError, match="usable CT"):
        train(tiny_cfg(), [str(mri)], str(tmp_path / "d"))


def test_cli_train_resume(tmp_path, studies, capsys):
    folder = Path(studies[0]).parent
    out = tmp_path / "cli"
    args = ["train", str(folder), "--out", str(out), "--iterations", "2", "--spacing", "6", "--patch-size", "32",
            "--base-channels", "2", "--batch-size", "2", "--mss-pairs", "1", "--workers", "0", "--threads", "1"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip().endswith("medlam.pt")
    # same output folder without --resume is refused; with --resume it continues
    assert cli_main(args) == 2
    assert "--resume" in capsys.readouterr().err
    at = args.index("--iterations") + 1
    assert cli_main(args[:at] + ["4"] + args[at + 1:] + ["--resume"]) == 0
    assert torch.load(out / CHECKPOINT, weights_only=True)["iteration"] == 4
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["iterations"] == 4 and saved["spacing_mm"] == [6.0, 6.0, 6.0]
    assert cli_main(["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_ddp_two_processes_gloo(tmp_path, studies):
    """torchrun with 2 CPU processes: gloo, DistributedSampler, rank-0 checkpointing, ranks in sync."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medlsam.cli", "train", *studies, "--out", str(out), "--iterations", "2", "--spacing", "6",
           "--patch-size", "32", "--base-channels", "2", "--batch-size", "2", "--mss-pairs", "1",
           "--workers", "0", "--threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log
    assert "ranks in sync: True (2)" in log
    assert torch.load(out / CHECKPOINT, weights_only=True)["iteration"] == 2
    load_medlam(out / "medlam.pt")
