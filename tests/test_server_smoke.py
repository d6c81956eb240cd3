"""The app starts as a real MONAI Label server, answers /info/, and stops cleanly."""

import shutil

import httpx
import pytest

from server_process import running_server

pytestmark = pytest.mark.server


def test_server_starts_answers_info_and_stops(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    with running_server(studies, {"labels": "liver,spleen"}) as url:  # a new datastore: organs named at start-up
        info = httpx.get(f"{url}/info/", timeout=30).json()
        assert info["name"] == "MedLSAM"
        assert "datastore" in info
    # the port is released after shutdown
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/info/", timeout=2)


def test_a_datastore_without_label_map_stops_the_server_with_the_fix(tmp_path):
    """A user's own folder with no label map: the server does not start on made-up organ names."""
    studies = tmp_path / "my-ct"
    studies.mkdir()
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="server exited"):
        with running_server(studies, log_path=log):
            pass
    text = log.read_text()
    assert "no label map" in text and "--conf labels" in text
