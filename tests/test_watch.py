"""segcore.watch: listing scenes under a prefix and announcing each exactly once."""

from __future__ import annotations

import json

import pytest

from segcore.cli import main
from segcore.errors import InputError
from segcore.watch import WatchConfig, announce_new, list_scenes, scene_id, watch


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_scene_id_strips_suffixes_and_unsafe_chars():
    assert scene_id("s3://b/in/slide 01.ome.tiff") == "slide_01"
    assert scene_id("/data/a/tile.zarr/") == "tile"
    assert scene_id("file:///x/y/S2A_T32.tif") == "S2A_T32"
    with pytest.raises(InputError, match="rename"):
        scene_id("/x/.tif")


def test_list_scenes_filters_and_globs(tmp_path):
    for name in ("a.tif", "b.svs", "c.txt", ".hidden.tif", "_tmp.tif"):
        _touch(tmp_path / name)
    (tmp_path / "d.zarr").mkdir()
    _touch(tmp_path / "d.zarr" / "zarr.json")
    (tmp_path / "folder").mkdir()
    got = [u.rsplit("/", 1)[-1] for u in list_scenes(str(tmp_path))]
    assert got == ["a.tif", "b.svs", "d.zarr"]
    assert [u.rsplit("/", 1)[-1] for u in list_scenes(str(tmp_path / "*.tif"))] == ["a.tif"]
    with pytest.raises(InputError, match="no such prefix"):
        list_scenes(str(tmp_path / "missing"))


def test_announce_once_per_new_object(tmp_path):
    inbox = tmp_path / "inbox"
    _touch(inbox / "s1.tif")
    cfg = WatchConfig(prefix=str(inbox), state=str(tmp_path / "state" / "watch.json"))
    sent: list[tuple[str, str]] = []
    flushed: list[int] = []

    def emit(uri, sid):
        sent.append((uri, sid))

    assert announce_new(cfg, emit, lambda: flushed.append(len(sent))) == [str(inbox / "s1.tif")]
    assert announce_new(cfg, emit) == []  # remembered
    _touch(inbox / "s2.tif")
    # bounded loop: three polls, the new object is announced once
    calls = []
    assert watch(cfg, emit, interval=5, max_iterations=3, sleep=calls.append) == [
        str(inbox / "s2.tif")]
    assert calls == [5, 5]
    assert [s for _, s in sent] == ["s1", "s2"]
    assert flushed == [1]  # state saved only after delivery was flushed
    state = json.loads((tmp_path / "state" / "watch.json").read_text())
    assert set(state["announced"]) == {str(inbox / "s1.tif"), str(inbox / "s2.tif")}


def test_corrupt_state_is_refused_with_advice(tmp_path):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "state.json"
    bad.write_text("{nope")
    with pytest.raises(InputError, match="delete it"):
        announce_new(WatchConfig(prefix=str(tmp_path / "in"), state=str(bad)), print)


def test_cli_dry_run_and_missing_api(tmp_path, capsys, monkeypatch):
    _touch(tmp_path / "in" / "x.tif")
    assert main(["watch", str(tmp_path / "in"), "--dry-run"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == [{"event": "segcore.scene.arrived", "uri": str(tmp_path / "in" / "x.tif"),
                    "scene_id": "x", "dry_run": True}]
    monkeypatch.setenv("PREFECT_API_URL", "")
    assert main(["watch", str(tmp_path / "in"), "--once"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err
    assert not (tmp_path / "in" / ".segcore-watch.json").exists()  # nothing remembered
    assert main(["watch", str(tmp_path / "missing"), "--dry-run"]) == 2
    assert "no such prefix" in capsys.readouterr().err
