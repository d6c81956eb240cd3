"""MedLAM network layout (official checkpoint), forward shapes, checkpoint round trips and errors."""

from __future__ import annotations

import os

import pytest
import torch

from medlsam.medlam.checkpoint import infer_config, load_medlam, save_medlam, weights_fingerprint
from medlsam.medlam.network import MedLAMConfig, MedLAMNet, relative_offset_mm

torch.set_num_threads(1)


def official_layout(b: int = 24, patch: int = 64, n_classes: int = 3) -> dict[str, tuple]:
    """Every parameter of the official medlam.pth (METHOD section 3), written out independently."""
    blocks = {
        "conv0_1": (1, 2 * b), "conv0_2": (2 * b, 2 * b),
        "conv1_1": (2 * b, 2 * b), "conv1_2": (2 * b, 2 * b),
        "conv2_1": (2 * b, 2 * b), "conv2_2": (2 * b, 4 * b),
        "conv3_1": (4 * b, 4 * b), "conv3_2": (4 * b, 8 * b),
        "conv4_1": (8 * b, 8 * b), "conv4_2": (8 * b, 16 * b),
        "conv5_1": (24 * b, 8 * b), "conv5_2": (8 * b, 8 * b),
        "conv6_1": (12 * b, 4 * b), "conv6_2": (4 * b, 4 * b),
        "conv7_1": (6 * b, 4 * b), "conv7_2": (4 * b, 4 * b),
        "conv8_1": (6 * b, 4 * b), "conv8_2": (4 * b, 4 * b),
    }  # fmt: skip
    layout = {}
    for name, (cin, cout) in blocks.items():
        layout[f"{name}.model.conv1_1.Conv.weight"] = (cout, cin, 3, 3, 3)
        layout[f"{name}.model.conv1_1.Conv.bias"] = (cout,)
    layout["classification.0.weight"] = (n_classes, 4 * b, 1, 1, 1)
    layout["classification.0.bias"] = (n_classes,)
    fc_in = 16 * b * (patch // 16) ** 3
    layout.update({
        "fc1.weight": (8 * b, fc_in), "fc1.bias": (8 * b,),
        "fc2.weight": (4 * b, 8 * b), "fc2.bias": (4 * b,),
        "fc3.weight": (3, 4 * b), "fc3.bias": (3,),
    })  # fmt: skip
    return layout


def test_official_configuration_matches_checkpoint_layout():
    net = MedLAMNet(MedLAMConfig())
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == official_layout(24, 64, 3)
    assert got["fc1.weight"] == (192, 24576)
    n_params = sum(p.numel() for p in net.parameters())
    assert 15.0e6 < n_params < 15.2e6  # METHOD: 15.1 M
    # InstanceNorm without affine: no norm parameters or buffers at all
    assert not [k for k in got if "norm" in k]


def test_small_configuration_layout_and_forward_shapes():
    cfg = MedLAMConfig(base_channels=2, patch_size=(48, 32, 32))
    net = MedLAMNet(cfg).eval()
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got["fc1.weight"] == (16, 16 * 2 * 3 * 2 * 2)
    x = torch.rand(3, 1, 48, 32, 32)
    out = net(x, features=True)
    assert out.latent.shape == (3, 3)
    assert [tuple(f.shape) for f in out.features] == [(3, 8, 12, 8, 8), (3, 8, 24, 16, 16), (3, 8, 48, 32, 32)]
    cheap = net(x, features=False)
    assert cheap.features is None
    torch.testing.assert_close(cheap.latent, out.latent)
    # features are not normalized (their norms differ from 1)
    norms = out.features[2].norm(dim=1)
    assert (norms - 1).abs().max() > 1e-3


def test_forward_rejects_bad_inputs():
    net = MedLAMNet(MedLAMConfig(base_channels=2, patch_size=(32, 32, 32)))
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        net(torch.rand(1, 32, 32, 32))
    with pytest.raises(ValueError, match="patch size"):
        net(torch.rand(1, 1, 48, 32, 32))
    # features only on a larger multiple-of-16 volume is fine without the RDR head
    out = net(torch.rand(1, 1, 48, 32, 32), latent=False)
    assert out.latent is None and out.features[2].shape[2:] == (48, 32, 32)
    with pytest.raises(ValueError, match="multiple"):
        net(torch.rand(1, 1, 40, 32, 32), latent=False)
    with pytest.raises(ValueError, match="multiple"):
        MedLAMConfig(patch_size=(60, 64, 64))
    with pytest.raises(ValueError, match="at least 32"):
        MedLAMConfig(patch_size=(16, 32, 32))
    with pytest.raises(ValueError, match="base_channels"):
        MedLAMConfig(base_channels=0)


def test_relative_offset_formula_sign_and_range():
    r = (1500.0, 600.0, 600.0)
    p_q = torch.zeros(1, 3)
    p_s = torch.tensor([[0.1, -0.2, 5.0]])
    d = relative_offset_mm(p_q, p_s, r)
    expected = torch.tensor([[1500 * torch.tanh(torch.tensor(0.1)), -600 * torch.tanh(torch.tensor(0.2)), 600 * torch.tanh(torch.tensor(5.0))]])
    torch.testing.assert_close(d, expected)
    assert d[0, 2] < 600.0  # bounded by r
    torch.testing.assert_close(relative_offset_mm(p_s, p_q, r), -d)


def test_save_load_round_trip(tmp_path):
    cfg = MedLAMConfig(base_channels=2, patch_size=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0))
    net = MedLAMNet(cfg).eval()
    path = save_medlam(tmp_path / "m.pt", net, cfg, extra={"iterations": 7})
    assert not [p for p in os.listdir(tmp_path) if p != "m.pt"]  # no temp files left behind
    loaded, loaded_cfg = load_medlam(path)
    assert loaded_cfg == cfg and loaded_cfg.spacing_mm == (6.0, 6.0, 6.0)
    assert weights_fingerprint(loaded) == weights_fingerprint(net)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).latent, net(x).latent)
    # the fingerprint changes with the weights
    with torch.no_grad():
        loaded.fc3.bias.add_(1e-3)
    assert weights_fingerprint(loaded) != weights_fingerprint(net)


@pytest.mark.parametrize("wrap", ["module_prefix", "nested_state_dict", "plain"])
def test_loads_official_style_files(tmp_path, wrap):
    cfg = MedLAMConfig(base_channels=2, patch_size=(32, 32, 32))
    net = MedLAMNet(cfg)
    state = net.state_dict()
    if wrap == "module_prefix":
        raw = {f"module.{k}": v for k, v in state.items()}  # DataParallel, as the official file
    elif wrap == "nested_state_dict":
        raw = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        raw = dict(state)
    torch.save(raw, tmp_path / "medlam.pth")
    loaded, loaded_cfg = load_medlam(tmp_path / "medlam.pth")
    assert loaded_cfg.base_channels == 2 and loaded_cfg.patch_size == (32, 32, 32)
    assert weights_fingerprint(loaded) == weights_fingerprint(net)


def test_infer_config_of_official_shapes():
    layout = official_layout(24, 64, 3)
    fake = {k: torch.empty(s) for k, s in layout.items() if k in ("conv0_1.model.conv1_1.Conv.weight", "fc1.weight", "classification.0.weight")}
    cfg = infer_config(fake)
    assert (cfg.base_channels, cfg.patch_size, cfg.n_classes) == (24, (64, 64, 64), 3)


def test_shape_mismatch_names_key_and_configuration(tmp_path):
    net = MedLAMNet(MedLAMConfig(base_channels=2, patch_size=(32, 32, 32)))
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.conv5_1.model.conv1_1.Conv.weight"] = torch.zeros(16, 40, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        load_medlam(tmp_path / "bad.pth")
    message = str(info.value)
    assert "conv5_1.model.conv1_1.Conv.weight" in message
    assert "(16, 40, 3, 3, 3)" in message and "(16, 48, 3, 3, 3)" in message
    assert "base_channels=2" in message
    # an explicit configuration that does not fit the file is refused the same way
    good = tmp_path / "good.pt"
    save_medlam(good, net, net.config)
    with pytest.raises(ValueError, match="conv0_1.model.conv1_1.Conv.weight.*base_channels=3"):
        load_medlam(good, config=MedLAMConfig(base_channels=3, patch_size=(32, 32, 32)))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_medlam(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_medlam(tmp_path / "junk.pth")
    torch.save({"something": 1}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no state dict"):
        load_medlam(tmp_path / "empty.pth")
