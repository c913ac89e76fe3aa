"""Hostile and broken inputs through the other verbs: `ingest`, `train` and `evaluate` (issue
13, item 4; `segment` has its own table in tests/test_hostile_inputs.py). They share the
readers and the checkpoint loader with `segment`; these cases check that they also share its
refusals: one error line naming the input and the fix, a non-zero exit, no traceback, nothing
left that looks complete, and code in a pickled checkpoint never run. Training and evaluation
treat NaN and +-inf pixels as missing, as inference does.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from segcore.cli import main
from segcore.config import ModelSpec
from segcore.models.checkpoint import checkpoint_bytes
from tests.test_hostile_inputs import Evil, huge_tiff
from tests.test_pipeline import make_model

ROOT = Path(__file__).resolve().parents[1]


def pairs(root: Path, images: list[np.ndarray], ext: str = "png") -> str:
    """A data folder (images/ + masks/) with the given images and half-foreground masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, img in enumerate(images):
        name = f"{i:03d}"
        if ext == "png":
            Image.fromarray(img).save(root / "images" / f"{name}.png")
        else:
            tifffile.imwrite(root / "images" / f"{name}.tif", img,
                             photometric="rgb" if img.ndim == 3 and img.shape[2] == 3
                             else "minisblack")
        m = np.zeros(img.shape[:2], np.uint8)
        m[:, : img.shape[1] // 2] = 255
        Image.fromarray(m).save(root / "masks" / f"{name}.png")
    return str(root)


def rgb8(n: int = 2, side: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (side, side, 3)).astype(np.uint8) for _ in range(n)]


def refused(capfd, verb: str, rc: int, needles: tuple[str, ...]) -> str:
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"segcore {verb}:")]
    assert rc != 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    print(f"\n| {verb} | `{lines[0]}` | {rc} |")
    return lines[0]


@pytest.fixture(scope="module")
def model8(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("m8"))[2]


# --- evaluate -------------------------------------------------------------------------------
def test_evaluate_refuses_16_bit_images_for_an_8_bit_model(model8, tmp_path, capfd):
    data = pairs(tmp_path / "d", [(i.astype(np.uint16) * 257) for i in rgb8()], ext="tif")
    rc = main(["evaluate", "--model", model8, "--data", data, "--out", str(tmp_path / "ev")])
    refused(capfd, "evaluate", rc, ("000.tif", "uint16", "8-bit", "convert"))
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_evaluate_refuses_a_pickled_checkpoint_without_running_it(tmp_path, capfd):
    data = pairs(tmp_path / "d", rgb8())
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil(str(marker))}, evil)
    rc = main(["evaluate", "--model", str(evil), "--data", data])
    refused(capfd, "evaluate", rc, ("evil.pt", "not a segcore checkpoint"))
    assert not marker.exists()  # refused without unpickling
    torch.load(evil, weights_only=False)  # check of the check: the payload does run
    assert marker.exists()


def test_evaluate_refuses_weights_that_do_not_fit_their_spec(tmp_path, capfd):
    model, contract, _ = make_model(tmp_path)
    spec = ModelSpec(arch="unet", in_channels=3, out_channels=1, kwargs={"depth": 2, "width": 8})
    bad = tmp_path / "mismatch.safetensors"
    bad.write_bytes(checkpoint_bytes(model, contract, spec=spec))
    rc = main(["evaluate", "--model", str(bad), "--data", pairs(tmp_path / "d", rgb8())])
    refused(capfd, "evaluate", rc, ("mismatch.safetensors", "weights do not match the spec",
                                    "re-export it"))


# --- train ----------------------------------------------------------------------------------
TRAIN = ["--arch", "unet", "--model-kwargs", '{"depth": 2, "width": 4}', "--patch", "32",
         "--batch", "2", "--steps", "3", "--threads", "1", "--no-bf16", "--quiet"]


def test_train_names_a_missing_data_folder(tmp_path, capfd):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out), *TRAIN])
    refused(capfd, "train", rc, ("nowhere",))
    assert not (out / "model.safetensors").exists()


def test_train_names_a_truncated_image(tmp_path, capfd):
    data = pairs(tmp_path / "d", rgb8(3), ext="tif")
    victim = Path(data) / "images" / "001.tif"
    victim.write_bytes(victim.read_bytes()[:300])
    out = tmp_path / "run"
    rc = main(["train", "--data", data, "--out", str(out), *TRAIN])
    refused(capfd, "train", rc, ("001.tif",))
    assert not (out / "model.safetensors").exists()


def test_train_and_evaluate_treat_nan_and_inf_as_missing(tmp_path, capfd):
    """Float images with NaN, +inf and -inf pixels: the statistics, the training loss and the
    evaluation stay finite (before: +-inf went into the statistics' clip and the model)."""
    from segcore.training.data import input_stats, load_folder, unit_mapper
    from segcore.training.predict import to_unit

    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(3):
        x = rng.normal(100, 20, (48, 48, 3)).astype(np.float32)
        x[:4, :4] = np.nan
        x[10:14, 10:14] = np.inf
        x[20:24, 20:24, 1] = -np.inf
        imgs.append(x)
    data = pairs(tmp_path / "d", imgs, ext="tif")
    samples = load_folder(data, None, "binary")
    stats = input_stats(samples)
    assert all(math.isfinite(v) for k in ("low", "high", "mean", "std") for v in stats[k])
    assert 40 < stats["low"][0] < stats["high"][0] < 160  # the infinities did not count

    from segcore.config import Normalization

    norm = Normalization(mode="stats", scale=1.0, **stats)
    u = unit_mapper(norm)(imgs[0])
    assert np.isfinite(u).all() and (u >= 0).all() and (u <= 1).all()
    fill = (np.asarray(stats["mean"]) - stats["low"]) / (np.asarray(stats["high"]) -
                                                          np.asarray(stats["low"]))
    assert np.allclose(u[11, 11], fill, atol=1e-5) and np.allclose(u[21, 21, 1], fill[1],
                                                                   atol=1e-5)
    t = to_unit(torch.from_numpy(imgs[0]).permute(2, 0, 1)[None], norm)
    assert torch.isfinite(t).all()
    assert np.allclose(t[0].permute(1, 2, 0).numpy(), u, atol=1e-5)

    from segcore.training.loop import train
    from tests.test_training import cfg_for

    out = tmp_path / "run.safetensors"
    res = train(cfg_for(Path(data), out, patch=32, batch=2, steps=3, warmup=1,
                        normalization="stats"))
    assert len(res.losses) == 3 and all(math.isfinite(v) for v in res.losses), res.losses
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(out), "--data", data,
                 "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics["mean"].values())


# --- ingest ---------------------------------------------------------------------------------
def test_ingest_refuses_a_zero_byte_file(tmp_path, capfd):
    src = tmp_path / "empty.tif"
    src.write_bytes(b"")
    dst = tmp_path / "out.zarr"
    rc = main(["ingest", str(src), str(dst), "--quiet"])
    refused(capfd, "ingest", rc, ("empty.tif", "is empty"))
    assert not dst.exists()


def test_ingest_refuses_a_text_file_named_tif(tmp_path, capfd):
    src = tmp_path / "notes.tif"
    src.write_text("this is not an image\n")
    dst = tmp_path / "out.zarr"
    rc = main(["ingest", str(src), str(dst), "--quiet"])
    refused(capfd, "ingest", rc, ("notes.tif",))
    assert not dst.exists()


DRIVER = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
from segcore.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[2:])
print("RESULT", rc, round(time.perf_counter() - t0, 2),
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)
"""


def test_ingest_refuses_a_huge_declared_tiff_without_allocating(tmp_path):
    src = huge_tiff(tmp_path / "huge.tif", 10**6, 10**6)
    dst = tmp_path / "out.zarr"
    r = subprocess.run([sys.executable, "-c", DRIVER, str(8 << 30), "ingest", src, str(dst),
                        "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert last, r.stderr[-3000:]
    _, rc, seconds, maxrss_mb = last[0].split()
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("segcore ingest:")]
    print(f"\n| ingest | `{lines[0] if lines else ''}` | {rc} | {seconds} s, {maxrss_mb} MB |")
    assert int(rc) != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert "huge.tif" in lines[0]
    assert int(maxrss_mb) < 1500 and float(seconds) < 30
    assert not dst.exists() or not any(dst.rglob("zarr.json"))
    assert resource.RLIMIT_AS  # the limit the child ran under exists on this platform


def test_ingest_never_deletes_what_is_not_its_own(tmp_path, capfd):
    """zarr's mode 'w' deletes what is at the output: ingest refuses another scene's ingest,
    a Zarr it did not write and a folder holding other files (each left untouched), and
    re-ingests the same scene in place."""
    import zarr

    from tests.test_pipeline import make_scene

    _, a = make_scene(tmp_path, 64, 64, name="a.tif")
    _, b = make_scene(tmp_path, 64, 64, name="b.tif", seed=1)
    dst = tmp_path / "a.zarr"
    assert main(["ingest", a, str(dst), "--quiet"]) == 0
    before = (dst / "zarr.json").read_bytes()
    rc = main(["ingest", b, str(dst), "--quiet"])
    refused(capfd, "ingest", rc, ("a.zarr", "another scene", "a.tif", "another output prefix"))
    assert (dst / "zarr.json").read_bytes() == before
    assert main(["ingest", f"{tmp_path}/./a.tif", str(dst), "--quiet"]) == 0  # same scene

    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(str(foreign), shape=(4, 4), dtype="uint8")
    rc = main(["ingest", a, str(foreign), "--quiet"])
    refused(capfd, "ingest", rc, ("foreign.zarr", "not written by segcore ingest"))
    assert zarr.open_array(str(foreign)).shape == (4, 4)

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    rc = main(["ingest", a, str(docs), "--quiet"])
    refused(capfd, "ingest", rc, ("docs", "not a segcore Zarr", "would be deleted"))
    assert (docs / "thesis.txt").read_text() == "years of work"
