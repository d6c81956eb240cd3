"""Which localizer the app uses: `--conf localizer`, the per-request `localizer` param and `auto`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi import HTTPException

APP = Path(__file__).resolve().parents[1] / "apps" / "medlsam"
sys.path.insert(0, str(APP))

from medlsam.paths import DEMO_MEDLAM  # noqa: E402
from tasks.localizers import localizer_param, resolve  # noqa: E402
from tasks.settings import AppSettings  # noqa: E402


def settings(tmp_path, **conf) -> AppSettings:
    return AppSettings.from_conf({"model_dir": str(tmp_path / "models"), **conf}, str(tmp_path), str(tmp_path / "s"))


def test_conf_localizer_is_checked(tmp_path):
    assert settings(tmp_path).localizer == "auto"
    assert settings(tmp_path, localizer="Registration").localizer == "registration"
    with pytest.raises(ValueError, match="medlam, registration"):
        settings(tmp_path, localizer="atlas")


def test_request_param_unknown_value_is_a_422():
    assert localizer_param(None, "auto") == "auto" and localizer_param("", "medlam") == "medlam"
    assert localizer_param(" MedLAM ", "auto") == "medlam"
    with pytest.raises(HTTPException) as err:
        localizer_param("elastix", "auto")
    assert err.value.status_code == 422 and "registration" in err.value.detail


def test_auto_is_registration_with_the_demo_weights_only(tmp_path):
    plain = settings(tmp_path)
    assert resolve("auto", plain, DEMO_MEDLAM) == "registration"
    official = tmp_path / "models" / "medlam.pth"
    assert resolve("auto", plain, official) == "medlam"  # official (or trained) weights in use
    assert resolve("auto", settings(tmp_path, medlam_checkpoint=str(DEMO_MEDLAM)), DEMO_MEDLAM) == "medlam"
    assert resolve("registration", settings(tmp_path, medlam_checkpoint="x.pt"), official) == "registration"
    assert resolve("medlam", plain, DEMO_MEDLAM) == "medlam"
    assert plain.atlas_store.parent == plain.template_store.parent


def test_mode_auto_is_spl_for_registration_and_wpl_for_medlam(tmp_path):
    from tasks.requests import mode_param

    assert settings(tmp_path).mode == "AUTO"
    assert mode_param(None, "AUTO", "registration") == "SPL" and mode_param(None, "AUTO", "medlam") == "WPL"
    assert mode_param("wpl", "AUTO", "registration") == "WPL" and mode_param(" auto ", "WPL", "medlam") == "WPL"
    assert mode_param(None, "SPL", "medlam") == "SPL"
    with pytest.raises(HTTPException) as err:
        mode_param("XYZ", "AUTO", "medlam")
    assert err.value.status_code == 422 and "auto" in err.value.detail
    with pytest.raises(ValueError, match="mode must be auto"):
        settings(tmp_path, mode="full")
