"""Shipped pretrained models: checksums, cards, names resolved by the CLI, evaluate, train
--init and the flow's library call; the level a model's pixel size picks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segcore.cli import main
from segcore.errors import CheckpointError, UnknownModelError
from segcore.models import pretrained
from segcore.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAX_SHIPPED_BYTES = 25 * 2**20


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _he_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Pink tissue with dark purple blobs (H&E-like), uint8 RGB."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (236, 190, 220)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(h * w // 600):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (90, 50, 140)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def name() -> str:
    """The nuclei model (the one the demo uses); the index must hold it."""
    assert "nuclei-he" in pretrained.shipped(), sorted(pretrained.shipped())
    return "nuclei-he"


def test_every_shipped_file_matches_its_index_and_has_a_card():
    ms = pretrained.shipped()
    assert ms, "no shipped models in segcore/models/shipped/index.json"
    total = 0
    for m in ms.values():
        data = m.path.read_bytes()
        total += len(data) + m.card_path.stat().st_size
        assert hashlib.sha256(data).hexdigest() == m.sha256, m.name
        model, ck = load_checkpoint(m.name)  # resolves the name, checks both digests
        assert ck.spec.arch == m.arch
        assert (ck.contract.pixel_size, ck.contract.pixel_unit) == (m.pixel_size, m.pixel_unit)
        card = m.card_path.read_text()
        for needed in ("## Training data", "## Licence", "segcore train", "## Test",
                       "## Validation", "seed", "## Known failure cases", "## Input"):
            assert needed in card, f"{m.card}: no {needed!r}"
        licence = card.split("## Licence", 1)[1].split("\n## ", 1)[0].lower()
        for word in ("research use", "unknown", "cc0", "cc by", "mit"):
            if word in m.licence.lower():  # what the listing says, the card's section says
                assert word in licence, (m.name, word)
    assert total <= MAX_SHIPPED_BYTES, f"shipped models take {total / 2**20:.1f} MiB"


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch, name):
    copy = tmp_path / "shipped"
    shutil.copytree(pretrained.shipped_dir(), copy)
    f = copy / pretrained.shipped()[name].file
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # a weight byte
    f.write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "shipped_dir", lambda: copy)
    pretrained._checked.clear()
    with pytest.raises(CheckpointError, match=f"shipped model '{name}'.*damaged.*reinstall"):
        pretrained.resolve(name)
    f.unlink()
    with pytest.raises(CheckpointError, match="missing from this installation"):
        pretrained.resolve(name)


def test_unknown_name_lists_the_shipped_ones(name):
    with pytest.raises(UnknownModelError, match=rf"'nuclei-hx'.*shipped: .*{name}.*did you "
                                                 rf"mean '{name}'"):
        pretrained.resolve("nuclei-hx")
    assert pretrained.resolve("runs/a.safetensors") == "runs/a.safetensors"  # a path: as is
    assert pretrained.resolve("s3://b/m") == "s3://b/m"


def test_a_local_file_named_like_a_model_wins(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    Path(name).write_bytes(b"x")
    assert pretrained.resolve(name) == name


def test_segcore_models_lists_and_prints_cards(name):
    rc, out, _ = _cli("models")
    assert rc == 0 and name in out and "test:" in out and "data licence" in out
    rc, out, _ = _cli("models", "--json")
    rows = {r["name"]: r for r in json.loads(out)["shipped"]}
    assert rows[name]["sha256"] == pretrained.shipped()[name].sha256
    rc, out, _ = _cli("models", "--card", name)
    assert rc == 0 and "## Training data" in out
    rc, _, err = _cli("models", "--card", "nope")
    assert rc != 0 and "shipped:" in err


def test_segment_evaluate_and_train_init_resolve_the_name(tmp_path, name):
    img = _he_like(192, 224)
    scene = tmp_path / "he.tif"
    tifffile.imwrite(scene, img, photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")  # 0.5 um/px
    rc, out, err = _cli("segment", str(scene), str(tmp_path / "out"), "--model", name,
                        "--tile", "256", "--quiet")
    assert rc == 0, err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["model"] == name and rep["model_sha256"]
    assert any("level 0" in w and "trained at 0.5 um/px" in w for w in rep["warnings"])
    # evaluate and train --init on a two-image folder
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(2):
        im = _he_like(128, 128, seed=i + 1)
        Image.fromarray(im).save(data / "images" / f"t{i}.png")
        Image.fromarray(((im[..., 0] < 150) * 255).astype(np.uint8)).save(
            data / "masks" / f"t{i}.png")
    rc, out, err = _cli("evaluate", "--model", name, "--data", str(data))
    assert rc == 0, err
    assert json.loads(out)["model"] == name and 0 <= json.loads(out)["mean"]["dice"] <= 1
    ck = str(tmp_path / "ft.safetensors")
    rc, out, err = _cli("train", "--init", name, "--data", str(data), "--steps", "2",
                        "--patch", "64", "--batch", "2", "--quiet", "--out", ck)
    assert rc == 0, err
    _, tuned = load_checkpoint(ck)
    _, base = load_checkpoint(name)
    assert tuned.spec == base.spec and tuned.contract == base.contract
    assert tuned.extra["init"] == name and tuned.extra["init_sha256"] == base.sha256
    rc, _, err = _cli("train", "--init", name, "--arch", "u2netp", "--data", str(data),
                      "--steps", "1", "--out", str(tmp_path / "x.safetensors"))
    assert rc != 0 and "fine-tuning keeps the model's architecture" in err


def test_level_follows_the_model_pixel_size(tmp_path, name):
    """A 0.25 / 0.5 / 1.0 um pyramid: the 0.5 um model runs on level 1 and the report says
    why; a 0.25 / 1.0 pyramid has no level near 0.5 um: refused with the levels and the fix."""
    img = _he_like(256, 256)

    def pyramid(path, factors):
        with tifffile.TiffWriter(path) as tw:
            tw.write(img, tile=(64, 64), subifds=len(factors) - 1, photometric="rgb",
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")  # 0.25 um
            for f in factors[1:]:
                tw.write(img[::f, ::f].copy(), tile=(64, 64), subfiletype=1,
                         photometric="rgb")
        return str(path)

    good = pyramid(tmp_path / "good.tif", (1, 2, 4))
    rc, _, err = _cli("segment", good, str(tmp_path / "o1"), "--model", name, "--tile",
                      "256", "--quiet")
    assert rc == 0, err
    rep = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert rep["scene"]["level"] == 1 and rep["scene"]["height"] == 128
    assert any(w.startswith("level 1 (128x128, 0.5 um/px) chosen") for w in rep["warnings"])
    bad = pyramid(tmp_path / "bad.tif", (1, 4))
    rc, _, err = _cli("segment", bad, str(tmp_path / "o2"), "--model", name, "--quiet")
    assert rc != 0 and "no level is at the scale" in err and "--level" in err
    assert not (tmp_path / "o2").exists()  # refused before anything is written
    rc, _, err = _cli("segment", bad, str(tmp_path / "o3"), "--model", name, "--level", "0",
                      "--tile", "256", "--quiet")
    assert rc == 0, err  # the user's explicit level wins


@pytest.mark.slow
def test_the_wheel_holds_the_weights_and_cards(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path), "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("segcore-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for m in pretrained.shipped().values():
        for f in (m.file, m.card):
            assert f"segcore/models/shipped/{f}" in names, f
    assert "segcore/models/shipped/index.json" in names
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB")


def test_the_whole_photo_model_resizes_in_evaluate_and_segment_says_it_does_not(tmp_path):
    """salient learned whole photos at 64 px: evaluate resizes (to 64 and back to the photo),
    segment runs the scene's pixels and says so in the report."""
    assert "salient" in pretrained.shipped()
    data = tmp_path / "photos"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    yy, xx = np.mgrid[:90, :120]
    blob = (yy - 45) ** 2 / 30**2 + (xx - 60) ** 2 / 40**2 < 1
    img = np.full((90, 120, 3), (40, 90, 160), np.uint8)  # sky-blue background
    img[blob] = (230, 200, 40)
    Image.fromarray(img).save(data / "images" / "p.png")
    Image.fromarray((blob * 255).astype(np.uint8)).save(data / "masks" / "p.png")
    rc, out, err = _cli("evaluate", "--model", "salient", "--data", str(data))
    assert rc == 0, err
    res = json.loads(out)
    assert res["resize"] == 64 and res["model"] == "salient"
    assert 0 <= res["mean"]["max_f"] <= 1
    rc, out, err = _cli("segment", str(data / "images" / "p.png"), str(tmp_path / "out"),
                        "--model", "salient", "--workers", "0", "--quiet")
    assert rc == 0, err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("resized to 64 px" in w for w in rep["warnings"]), rep["warnings"]
