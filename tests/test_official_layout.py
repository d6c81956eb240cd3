"""The app with an official-layout MedLAM checkpoint (base 24, 64^3 patches at 3 mm), through a real
MONAI Label server on a tiny generated datastore.

The state dict has exactly the layout of the official `medlam.pth` (plain, `module.` prefixes) but
random values, so its boxes mean nothing: the test checks that the weights load unchanged, that the
template store is rebuilt for them (a store made with the demo weights is there at start), and that
/infer/medlam and /infer/medlsam answer with a box per requested organ.
"""

from __future__ import annotations

import json

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch

from medlsam.medlam.checkpoint import load_medlam, weights_fingerprint
from medlsam.medlam.network import MedLAMConfig, MedLAMNet
from medlsam.medlam.patches import PatchEmbedder
from medlsam.medlam.templates import TemplateSet, compute_support
from medlsam.paths import DEMO_MEDLAM
from medlsam.synthetic import write_sample_dataset
from server_process import running_server, wait_for_templates

pytestmark = pytest.mark.server

# The official network costs about a second per 64^3 patch on a 2-core CPU, so the support labels
# only two organs short enough in z (< 80 mm) to have a single SPL part: 12 template patches, and a
# localization of 10 + 12 + 12 patches per request, keep the test to a few minutes in CI. The state
# dict itself stays full size.
ORGANS = ["adrenal_left", "adrenal_right"]


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    torch.manual_seed(0)
    net = MedLAMNet(MedLAMConfig(base_channels=24, patch_size=(64, 64, 64), spacing_mm=(3.0, 3.0, 3.0)))
    path = tmp_path_factory.mktemp("official") / "medlam.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One support labelling only ORGANS, one query."""
    root = tmp_path_factory.mktemp("sample")
    write_sample_dataset(root, n_studies=2, n_supports=1, seed=3, preset="tiny", progress=False)
    label_map = json.loads((root / "label_map.json").read_text())
    keep = [label_map[o] for o in ORGANS]
    for path in (root / "studies" / "labels" / "final").glob("*.nii.gz"):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj).copy()
        data[~np.isin(data, keep)] = 0
        nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return root


def test_official_file_loads_unchanged(official_file):
    state = torch.load(official_file, weights_only=True)
    assert all(k.startswith("module.") for k in state)
    net, cfg = load_medlam(official_file)
    assert (cfg.base_channels, cfg.patch_size, cfg.spacing_mm) == (24, (64, 64, 64), (3.0, 3.0, 3.0))
    assert sum(p.numel() for p in net.parameters()) == 15_067_878
    assert all(torch.equal(v, state[f"module.{k}"]) for k, v in net.state_dict().items())


def test_server_rebuilds_templates_for_official_weights_and_answers(official_file, dataset, tmp_path):
    studies = dataset / "studies"
    model_dir = tmp_path / "models"
    store = model_dir / "templates.pt"
    # a store made with the demo weights: the server must notice and rebuild it for the official ones
    demo = PatchEmbedder.from_checkpoint(DEMO_MEDLAM)
    label_map = json.loads((dataset / "label_map.json").read_text())
    stale = TemplateSet(demo.fingerprint, demo.net.config.to_dict())
    support = sorted((studies / "labels" / "final").glob("*.nii.gz"))[0]
    stale.add(compute_support(demo, nib.load(studies / support.name), nib.load(support), label_map, "old"), label_map)
    stale.save(store)

    official_fingerprint = weights_fingerprint(load_medlam(official_file)[0])
    conf = {"label_map": dataset / "label_map.json", "medlam_checkpoint": official_file, "model_dir": model_dir,
            "template_store": store}
    with running_server(studies, conf, log_path=dataset / "server.log", timeout=300) as url:
        info = wait_for_templates(url, timeout=1800)["templates"]
        assert info["weights_fingerprint"] == official_fingerprint != demo.fingerprint
        assert info["stale"] is False and set(info["organs"]) == set(ORGANS)
        assert TemplateSet.load(store).weights_fingerprint == official_fingerprint
        query = sorted(p.name.split(".")[0] for p in studies.glob("*.nii.gz") if p.name != support.name)[0]
        shape = np.array(nib.load(studies / f"{query}.nii.gz").shape)
        # one organ per request keeps the official network's CPU cost (~5 s per 64^3 patch) CI-sized
        for model, organ in zip(("medlam", "medlsam"), ORGANS):
            response = httpx.post(f"{url}/infer/{model}?image={query}&output=json",
                                  data={"params": json.dumps({"organs": [organ]})}, timeout=1800)
            assert response.status_code == 200, response.text
            organs = response.json()["organs"]
            assert set(organs) == {organ}
            for organ in organs.values():
                lo, hi = map(np.array, organ["box_voxel"])
                assert lo.shape == hi.shape == (3,)
                assert np.all(lo >= 0) and np.all(hi <= shape - 1) and np.all(lo <= hi)
