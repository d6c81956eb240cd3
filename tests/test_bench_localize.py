"""`medlsam bench-localize` end to end on one tiny generated support: each phase in its own process."""

from __future__ import annotations

import json

import pytest

from medlsam.cli import main

pytestmark = pytest.mark.slow


def test_bench_localize_reports_every_phase_with_its_own_peak_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench-localize", "--data", str(tmp_path / "data"), "--preset", "tiny", "--supports", "1",
                 "--layouts", "demo", "--organs", "liver", "spleen", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    phases = report["layouts"]["demo"]["runs"]["auto"]
    assert list(phases) == ["load", "templates", "localize_wpl", "localize_spl"]
    assert all("error" not in p for p in phases.values()), phases
    assert phases["load"]["forward_calls"] == 0 and phases["templates"]["forward_calls"] > 0
    assert phases["templates"]["organs"] == 2 and phases["templates"]["points"] >= 24
    assert set(phases["localize_wpl"]["boxes"]) == {"liver", "spleen"}
    # SPL localizes every part as well: more forward passes than WPL
    assert phases["localize_spl"]["forward_calls"] > phases["localize_wpl"]["forward_calls"]
    # each phase's peak is its own (not the parent's), and above the bare interpreter's
    for p in phases.values():
        assert 100 < p["peak_rss_mb"] < 4000 and p["seconds"] >= 0
    assert report["device"] == "cpu"
    assert "localize_wpl" in capsys.readouterr().out


def test_official_wpl_only_templates_hold_one_part_per_organ_and_skip_spl(tmp_path):
    from medlsam.paths import DEMO_MEDLAM

    out = tmp_path / "bench.json"
    # the demo weights stand in for the official file here: only the template options are under test
    code = main(["bench-localize", "--data", str(tmp_path / "data"), "--preset", "tiny", "--supports", "1",
                 "--layouts", "official", "--official", str(DEMO_MEDLAM), "--official-wpl-only",
                 "--organs", "liver", "spleen", "--out", str(out)])
    assert code == 0
    entry = json.loads(out.read_text())["layouts"]["official"]
    phases = entry["runs"]["auto"]
    assert entry["wpl_only_templates"] is True
    assert list(phases) == ["load", "templates", "localize_wpl"]
    assert all("error" not in p for p in phases.values()), phases
    # one SPL part per organ, the WPL points again: 2 x 6 points per organ, 6 distinct patches at most
    assert phases["templates"]["points"] == 2 * 12
    assert phases["templates"]["forward_calls"] <= -(-12 // phases["templates"]["batch_size"])
    assert set(phases["localize_wpl"]["boxes"]) == {"liver", "spleen"}
