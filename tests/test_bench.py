"""The benchmark harness (bench/) end to end in its --quick configuration: real subprocesses,
real segcore segment runs, real output checks. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import add_ratios, spread

ROOT = Path(__file__).resolve().parents[1]


def _bench(comparison: str, tmp: Path) -> tuple[dict, str]:
    """``python -m bench COMPARISON --quick`` into ``tmp``: (its JSON result, its stdout)."""
    results = tmp / "results"
    cmd = [sys.executable, "-m", "bench", comparison, "--quick", "--workdir", str(tmp / "work"),
           "--results", str(results), "--tag", "t", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((results / f"{comparison}-t.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def compare(tmp_path_factory):
    return _bench("compare", tmp_path_factory.mktemp("bench-compare"))


def _rows(result: dict) -> dict[str, dict]:
    return {r["contender"]: r for r in result["rows"]}


@pytest.mark.slow
def test_compare_quick_measures_every_contender(compare):
    result, stdout = compare
    rows = _rows(result)
    assert set(rows) == {"bare", "segment", "segment-w2", "monai-0.25", "monai-0.5"}
    for name, row in rows.items():
        if row.get("skipped"):
            assert name.startswith("monai"), row
            continue
        assert len(row["runs"]) == 1
        for key in ("seconds", "mpx_per_s", "wall", "peak_rss_mb"):
            assert row["summary"][key]["median"] > 0, (name, key)
    assert rows["bare"]["vs_bare"] == pytest.approx(1.0)
    assert rows["segment"]["runs"][0]["report"]["tiles_run"] > 0
    env = result["environment"]
    assert env["torch"] and env["cpu_model"] and env["affinity"] >= 1
    assert "no GPU" in stdout or env["cuda_device"]
    assert "| contender | tile | Mpx/s" in stdout  # the markdown table


@pytest.mark.slow
def test_segment_output_equals_bare_whole_image_at_fp32(compare):
    result, _ = compare
    assert result["config"]["amp"] == "none"
    rows = _rows(result)
    for name in ("segment", "segment-w2"):
        dev = rows[name]["deviation"]
        assert dev["pixels"] == 256 * 256  # the whole scene: bare ran on all of it
        assert dev["max_abs"] == 0 and dev["mean_abs"] == 0 and dev["label_flips"] == 0, dev
        assert rows[name]["runs"][0]["report"]["exact"] is True


@pytest.mark.slow
def test_compare_quick_monai_rows(compare):
    if importlib.util.find_spec("monai") is None:  # (importorskip would import it: seconds)
        pytest.skip("monai is not installed (the .[bench] extra)")
    result, _ = compare
    rows = _rows(result)
    for name, overlap in (("monai-0.25", 0.25), ("monai-0.5", 0.5)):
        row = rows[name]
        assert not row.get("skipped")
        run = row["runs"][0]
        assert run["overlap"] == overlap and run["roi"] == 128 and run["seconds"] > 0
        dev = row["deviation"]
        assert dev["pixels"] == 256 * 256 and 0 <= dev["mean_abs"] <= dev["max_abs"] <= 1


@pytest.mark.slow
def test_io_quick_runs_the_zero_cost_model_on_three_scene_kinds(tmp_path):
    result, stdout = _bench("io", tmp_path)
    rows = {(r["scene_kind"], r["contender"]): r for r in result["rows"]}
    for kind in ("tiff", "svs", "zarr"):
        seg = rows[(kind, "segment-w0")]
        assert seg["report"]["tiles_run"] > 0 and seg["summary"]["mpx_per_s"]["median"] > 0
        floors = rows[(kind, "floors")]["summary"]
        for key in ("decode_mpx_per_s", "normalize_mpx_per_s", "write_mpx_per_s"):
            assert floors[key]["median"] > 0, (kind, key)
    assert "| scene | contender |" in stdout


def test_spread_and_ratios():
    assert spread([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    rows = [{"contender": "bare", "summary": {"mpx_per_s": spread([4.0])}},
            {"contender": "segment", "summary": {"mpx_per_s": spread([1.0]),
                                                 "wall_mpx_per_s": spread([0.5])}}]
    add_ratios(rows)
    assert rows[1]["vs_bare"] == 0.25 and rows[1]["wall_vs_bare"] == 0.125
