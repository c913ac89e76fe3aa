"""Channels and bands by name, input statistics in the checkpoint, nodata, level choice by
physical size: generated 13-band Sentinel-2-like GeoTIFFs (rasterio band descriptions),
fluorescence OME-TIFF and QPTIFF, tiny U-Nets (depth 2, width 4), CPU, ``--workers 0``."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from segcore.cli import main
from segcore.config import InputContract, ModelSpec, Normalization
from segcore.errors import ConfigError, InputError
from segcore.inference import NODATA_LABEL, normalize
from segcore.io.readers import open_scene, resolve_channels, scene_info
from segcore.models import build_model
from segcore.models.checkpoint import load_checkpoint, save_checkpoint
from segcore.models.fields import measure_receptive_field
from segcore.pipeline import SegmentConfig, segment
from segcore.stitching import predict_whole

rasterio = pytest.importorskip("rasterio")

S2 = tuple(f"B{i:02d}" for i in range(1, 13)) + ("B8A",)  # EuroSAT's file order
H, W = 96, 120
RUN = ["--workers", "0", "--quiet", "--tile", "128", "--prob-dtype", "float16"]


def write_geotiff(path, bands: np.ndarray, names=None, nodata=None) -> str:
    from affine import Affine

    c, h, w = bands.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c,
                       dtype=bands.dtype.name, crs="EPSG:32633", nodata=nodata,
                       transform=Affine(10, 0, 500000, 0, -10, 4000000), tiled=True,
                       blockxsize=32, blockysize=32) as ds:
        ds.write(bands)
        if names:
            ds.descriptions = tuple(names)
    return str(path)


def reflectance(seed=0, c=13) -> np.ndarray:
    """(c, H, W) float32 reflectance 0-0.6 with a brighter square (something to segment)."""
    rng = np.random.default_rng(seed)
    a = (rng.random((c, H, W)) * 0.3).astype(np.float32)
    a[:, 30:70, 40:90] += 0.3
    return a


def make_model(path, cin: int, contract: InputContract | None = None, seed=0) -> str:
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch="unet", in_channels=cin, out_channels=1,
                                  kwargs={"depth": 2, "width": 4})).eval()
    contract = contract or InputContract(channels=cin, normalization=Normalization(
        scale=1.0, mean=(0.3,) * cin, std=(0.2,) * cin))
    save_checkpoint(model, str(path), contract)
    return str(path)


def result(out) -> tuple[np.ndarray, np.ndarray, dict]:
    root = zarr.open_group(f"{out}/result.zarr", mode="r")
    return root["0"][:], root["labels/mask/0"][:], root.attrs.asdict()


@pytest.fixture(scope="module")
def s2(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2")
    a = reflectance()
    return {"dir": d, "bands": a, "s13": write_geotiff(d / "s13.tif", a, S2),
            "s3": write_geotiff(d / "s3.tif", a[[3, 2, 1]]),  # B04, B03, B02, no names
            "rgb": make_model(d / "rgb.safetensors", 3)}


# --- reading names, selecting --------------------------------------------------------------
def test_band_descriptions_select_and_pickle(s2):
    info = scene_info(s2["s13"])
    assert info.channel_names == S2 and info.channels == 13 and info.dtype == "float32"
    a = s2["bands"]
    for spec in ("B04,B03,B02", "4,3,2", ["b04", "B03", "2"], (3, 2, 1)):  # ints: 0-based
        with open_scene(s2["s13"], channels=spec) as s:
            assert s.info.channels == 3 and s.info.channel_names == ("B04", "B03", "B02")
            np.testing.assert_array_equal(s.read(5, 40, 7, 60),
                                          a[[3, 2, 1], 5:40, 7:60].transpose(1, 2, 0))
            clone = pickle.loads(pickle.dumps(s))  # reopens from its URI, selection kept
            np.testing.assert_array_equal(clone.read(0, 9, 0, 9), s.read(0, 9, 0, 9))
            with s.at_level(0) as again:
                assert again.info.channel_names == ("B04", "B03", "B02")
    with pytest.raises(InputError, match=r"no channel named 'B13'; its channels are 1 B01, "
                                         r"2 B02, .*12 B12, 13 B8A"):
        open_scene(s2["s13"], channels="B04,B13")
    with pytest.raises(InputError, match=r"band 14 does not exist \(bands count from 1\)"):
        resolve_channels("14", S2, 13, "x.tif")
    with pytest.raises(InputError, match="has no channel names.*--channel-names"):
        open_scene(s2["s3"], channels="B04")
    # names given by the user (Sentinel-2 stacks without descriptions)
    with open_scene(s2["s3"], channel_names=["B04", "B03", "B02"], channels="B02") as s:
        assert s.info.channel_names == ("B02",)
        np.testing.assert_array_equal(s.read(0, H, 0, W)[..., 0], a[1])
    with pytest.raises(ConfigError, match="2 channel name.*scene has 3"):
        open_scene(s2["s3"], channel_names=["B04", "B03"])


def test_ome_tiff_and_qptiff_channel_names(tmp_path):
    rng = np.random.default_rng(1)
    planes = rng.integers(0, 4000, (3, 40, 50)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "f.ome.tif", planes, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "FITC", "Cy3"]},
                               "PhysicalSizeX": 0.5})
    info = scene_info(str(tmp_path / "f.ome.tif"))
    assert (info.format, info.channel_names) == ("ome-tiff", ("DAPI", "FITC", "Cy3"))
    xml = ('<?xml version="1.0" encoding="utf-8"?>\r\n<PerkinElmer-QPI-ImageDescription>'
           "<DescriptionVersion>2</DescriptionVersion><ImageType>FullResolution</ImageType>"
           "<Name>{n}</Name>{b}</PerkinElmer-QPI-ImageDescription>")
    with tifffile.TiffWriter(tmp_path / "s.qptiff") as tw:
        for plane, (n, b) in zip(planes, [("DAPI", "DAPI"), ("Opal 570", "CD8"),
                                          ("Opal 690", None)], strict=True):
            tw.write(plane, software="PerkinElmer-QPI", photometric="minisblack", metadata=None,
                     description=xml.format(n=n, b=f"<Biomarker>{b}</Biomarker>" if b else ""))
    # the biomarker where there is one, else the filter name
    assert scene_info(str(tmp_path / "s.qptiff")).channel_names == ("DAPI", "CD8", "Opal 690")


# --- segment: a 13-band GeoTIFF through an RGB model ---------------------------------------
def test_rgb_model_on_13_bands_by_name_and_by_index(s2, tmp_path, capsys):
    outs = {}
    for tag, src, extra in [("names", s2["s13"], ["--channels", "B04,B03,B02"]),
                            ("index", s2["s13"], ["--channels", "4,3,2"]),
                            ("three", s2["s3"], [])]:
        out = tmp_path / tag
        assert main(["segment", src, str(out), "--model", s2["rgb"], *RUN, *extra]) == 0
        outs[tag] = result(out)
    capsys.readouterr()
    prob, mask, attrs = outs["names"]
    assert attrs["segcore"]["channel_names"] == ["B04", "B03", "B02"]
    assert prob.dtype == np.float16 and float(prob.astype(np.float32).std()) > 1e-4
    for tag in ("index", "three"):
        np.testing.assert_array_equal(outs[tag][0], prob)
        np.testing.assert_array_equal(outs[tag][1], mask)
    report = json.loads((tmp_path / "names" / "report.json").read_text())
    assert report["scene"]["channel_names"] == ["B04", "B03", "B02"]
    assert report["scene"]["channels"] == 3


def test_missing_band_is_refused_with_the_list(s2, tmp_path, capsys):
    named = make_model(tmp_path / "named.safetensors", 3, InputContract(
        channels=3, channel_names=("B04", "B03", "B02"), normalization=Normalization(
            scale=1.0, mean=(0.3,) * 3, std=(0.2,) * 3)))
    # a scene without B03: refused, naming what it has
    d = write_geotiff(tmp_path / "no_b03.tif", s2["bands"][[1, 3, 7]], ("B02", "B04", "B08"))
    rc = main(["segment", d, str(tmp_path / "o1"), "--model", named, *RUN])
    err = capsys.readouterr().err
    assert rc == 2 and "has no B03" in err and "its channels are 1 B02, 2 B04, 3 B08" in err
    assert not (tmp_path / "o1" / "result.zarr").exists()
    # an explicit --channels the scene lacks: refused with the 13 bands
    rc = main(["segment", s2["s13"], str(tmp_path / "o2"), "--model", named, *RUN,
               "--channels", "B04,B03,B13"])
    err = capsys.readouterr().err
    assert rc == 2 and "no channel named 'B13'" in err and "13 B8A" in err
    # names in the checkpoint pick the bands by themselves (same as the 3-band file)
    assert main(["segment", s2["s13"], str(tmp_path / "auto"), "--model", named, *RUN]) == 0
    assert main(["segment", s2["s3"], str(tmp_path / "ref"), "--model", named, *RUN]) == 0
    capsys.readouterr()
    got, ref = result(tmp_path / "auto"), result(tmp_path / "ref")
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert result(tmp_path / "ref")[2]["segcore"].get("channel_names") is None


def test_old_checkpoint_without_names_or_mode_still_works(s2, tmp_path):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from segcore.models.checkpoint import _header_metadata

    with open(s2["rgb"], "rb") as f:
        data = f.read()
    meta = _header_metadata(data, s2["rgb"])
    meta["segcore.contract"] = json.dumps({  # the contract as checkpoints wrote it before
        "channels": 3, "normalization": {"scale": 1.0, "mean": [0.3] * 3, "std": [0.2] * 3},
        "class_names": ["background", "foreground"], "pixel_size": None, "pixel_unit": None})
    old = tmp_path / "old.safetensors"
    old.write_bytes(st_save(st_load(data), metadata=meta))
    _, ckpt = load_checkpoint(str(old))
    assert ckpt.contract.normalization.mode == "scale" and ckpt.contract.channel_names is None
    segment(SegmentConfig(src=s2["s13"], out=str(tmp_path / "o"), model=str(old), tile=128,
                          channels="4,3,2", prob_dtype="float16"), progress=False)
    segment(SegmentConfig(src=s2["s13"], out=str(tmp_path / "n"), model=s2["rgb"], tile=128,
                          channels="4,3,2", prob_dtype="float16"), progress=False)
    np.testing.assert_array_equal(result(tmp_path / "o")[0], result(tmp_path / "n")[0])


# --- train: statistics and band names in the checkpoint ------------------------------------
def test_13_band_model_carries_statistics_and_names(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    imgs = []
    for i in range(3):
        a = reflectance(seed=10 + i)
        a[5, :6, :6] = np.nan  # NaN values are left out of the statistics
        imgs.append(a)
        write_geotiff(data / "images" / f"{i}.tif", a, S2, nodata=-9999.0)
        m = np.zeros((H, W), np.uint8)
        m[30:70, 40:90] = 255
        Image.fromarray(m).save(data / "masks" / f"{i}.png")
    ckpt_uri = tmp_path / "s2.safetensors"
    rc = main(["train", "--data", str(data), "--arch", "unet", "--model-kwargs",
               '{"depth": 2, "width": 4}', "--patch", "32", "--batch", "2", "--steps", "3",
               "--warmup", "1", "--threads", "1", "--augment", '{"elastic_sigma": 0}',
               "--quiet", "--out", str(ckpt_uri)])
    assert rc == 0
    capsys.readouterr()
    model, ckpt = load_checkpoint(str(ckpt_uri))
    c = ckpt.contract
    assert c.channel_names == S2 and c.channels == 13
    n = c.normalization
    assert n.mode == "stats" and n.scale == 1.0 and n.percentiles == (0.5, 99.5)
    x = np.concatenate([a.reshape(13, -1) for a in imgs], axis=1)
    for k in (0, 5, 12):  # the robust percentiles, then mean/std after clipping
        v = x[k][np.isfinite(x[k])].astype(np.float64)
        lo, hi = np.percentile(v, (0.5, 99.5))
        assert (n.low[k], n.high[k]) == pytest.approx((lo, hi), rel=1e-6)
        assert (n.mean[k], n.std[k]) == pytest.approx(
            (np.clip(v, lo, hi).mean(), np.clip(v, lo, hi).std()), rel=1e-5)
    # inference applies them: a scene whose bands are stored in another order (names pick
    # them back), NaN and nodata filled with the mean (0 after normalisation)
    scene = reflectance(seed=99)
    scene[:, 50:54, 10:14] = -9999.0  # nodata pixels
    order = list(range(13))[::-1]
    src = write_geotiff(tmp_path / "rev.tif", scene[order], [S2[i] for i in order],
                        nodata=-9999.0)
    out = tmp_path / "out"
    rep = segment(SegmentConfig(src=src, out=str(out), model=str(ckpt_uri), tile=128,
                                prob_dtype="float16"), progress=False)
    prob, mask, _ = result(out)
    raw = scene.transpose(1, 2, 0)
    xin = normalize(raw, c, nodata=-9999.0)
    by_hand = (np.clip(raw, n.low, n.high) - np.asarray(n.mean)) / np.asarray(n.std)
    by_hand[50:54, 10:14] = 0.0
    np.testing.assert_allclose(xin.transpose(1, 2, 0), by_hand, atol=1e-4)
    rf = measure_receptive_field(model, 13)

    def pred(b):
        with torch.inference_mode():
            return torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(b)))).numpy()

    ref = predict_whole(pred, xin, pad=rf.radius, multiple=4)
    ref[:, 50:54, 10:14] = 0.0
    assert rep.exact and np.abs(prob.astype(np.float32) - ref).max() < 2e-3
    assert (mask[50:54, 10:14] == NODATA_LABEL).all() and (mask != NODATA_LABEL).sum() == \
        H * W - 16


def test_train_channels_select_by_name_or_index(tmp_path):
    from segcore.cli.train import add_parser, build_config
    from segcore.training.data import load_folder

    d = tmp_path / "d"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    a = reflectance(seed=3)
    write_geotiff(d / "images" / "0.tif", a, S2)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(d / "masks" / "0.png")
    for spec in ("B04,B03,B02", "4,3,2"):
        (s,) = load_folder(str(d), channels=spec)
        assert s.channel_names == ("B04", "B03", "B02") and s.image.shape == (H, W, 3)
        np.testing.assert_array_equal(s.image, a[[3, 2, 1]].transpose(1, 2, 0))
    import argparse

    p = argparse.ArgumentParser()
    add_parser(p)
    cfg = build_config(p.parse_args(["--data", str(d), "--steps", "1", "--out", "x",
                                     "--channels", "4,3,2", "--normalization", "stats"]))
    assert cfg.channels == ("4", "3", "2") and cfg.normalization == "stats"


# --- fluorescence: --channels DAPI to a 1-channel model ------------------------------------
def test_ome_tiff_dapi_to_a_one_channel_model(tmp_path, capsys):
    rng = np.random.default_rng(5)
    planes = rng.integers(0, 3000, (3, H, W)).astype(np.uint16)
    planes[0, 20:60, 30:80] += 20000  # nuclei in DAPI only
    tifffile.imwrite(tmp_path / "fl.ome.tif", planes, photometric="minisblack", tile=(32, 32),
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "FITC", "Cy3"]}})
    tifffile.imwrite(tmp_path / "dapi.tif", planes[0], photometric="minisblack", tile=(32, 32))
    with open_scene(str(tmp_path / "fl.ome.tif"), channels="DAPI") as s:
        assert (s.info.channels, s.info.channel_names) == (1, ("DAPI",))
    model = make_model(tmp_path / "nuc.safetensors", 1, InputContract(
        channels=1, normalization=Normalization(mode="stats", scale=1.0, mean=(9000.0,),
                                                std=(9000.0,), low=(0.0,), high=(24000.0,))))
    for tag, src, extra in [("ome", "fl.ome.tif", ["--channels", "DAPI"]),
                            ("one", "dapi.tif", [])]:
        assert main(["segment", str(tmp_path / src), str(tmp_path / tag), "--model", model,
                     *RUN, *extra]) == 0
    rc = main(["segment", str(tmp_path / "fl.ome.tif"), str(tmp_path / "bad"), "--model",
               model, *RUN])  # three channels for a one-channel model, no selection
    assert rc == 2 and "expects 1" in capsys.readouterr().err
    got, ref = result(tmp_path / "ome"), result(tmp_path / "one")
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


# --- nodata ----------------------------------------------------------------------------------
def test_nan_and_nodata_pixels_come_out_as_nodata_and_empty_tiles_are_skipped(s2, tmp_path):
    a = s2["bands"].copy()
    a[:, :48, :60] = np.nan  # covers the first tile core (80 px cores, halo 24: 4 tiles)
    a[:, :H, :3] = np.nan
    a[:, 90:, 100:] = -9999.0  # the nodata value in every band
    a[1, 70:75, 70:75] = np.nan  # one band NaN: filled, but the pixel holds data
    a[3, 80:85, 20:25] = -9999.0  # one band at nodata: a valid value there
    src = write_geotiff(tmp_path / "nd.tif", a, S2, nodata=-9999.0)
    out = tmp_path / "out"
    rep = segment(SegmentConfig(src=src, out=str(out), model=s2["rgb"], tile=64,
                                channels="B04,B03,B02"), progress=False)
    prob, mask, attrs = result(out)
    sel = a[[3, 2, 1]]
    nod = (np.isnan(sel) | (sel == -9999.0)).all(0)
    np.testing.assert_array_equal(mask == NODATA_LABEL, nod)
    assert (prob[:, nod] == 0).all() and rep.tiles_skipped_background >= 1
    assert attrs["segcore"]["nodata_label"] == NODATA_LABEL
    props = zarr.open_group(f"{out}/result.zarr/labels/mask", mode="r").attrs["ome"][
        "image-label"]["properties"]
    assert {"label-value": 255, "class": "nodata"} in props
    # the model's input: NaN values and nodata pixels are 0 (the mean), a lone -9999 is not
    c = InputContract(channels=3, normalization=Normalization(scale=1.0, mean=(0.3,) * 3,
                                                              std=(0.2,) * 3))
    x = normalize(sel.transpose(1, 2, 0), c, nodata=-9999.0)
    assert (x[:, nod] == 0).all() and (x[2, 70:75, 70:75] == 0).all()  # B02
    assert (x[0, 80:85, 20:25] == pytest.approx((-9999.0 - 0.3) / 0.2))
    assert np.isfinite(x).all()


# --- level choice by physical size for every format ----------------------------------------
def test_mpp_for_png_jpeg_zarr_and_finer_than_finest(tmp_path, capsys):
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "half.png", dpi=(50800, 50800))  # 0.5 um (pHYs)
    Image.fromarray(img).save(tmp_path / "one.jpg", dpi=(25400, 25400))  # 1 um (JFIF)
    assert scene_info(str(tmp_path / "half.png")).pixel_size == pytest.approx(0.5)
    assert scene_info(str(tmp_path / "one.jpg"), mpp=1.0).pixel_size == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"half\.png: mpp 0\.25 asks for pixels finer than the "
                                          r"scene's finest level \(level 0, 64x80, 0\.5 um/px\)"):
        open_scene(str(tmp_path / "half.png"), mpp=0.25)
    # OME-Zarr: levels by their scale transforms; ingest keeps the pixel size for Zarr
    assert main(["ingest", str(tmp_path / "half.png"), str(tmp_path / "h.zarr"), "--workers",
                 "0", "--quiet", "--chunk", "16", "--shard", "32"]) == 0
    capsys.readouterr()
    root = zarr.open_group(str(tmp_path / "h.zarr"), mode="r")
    assert len(root.attrs["ome"]["multiscales"][0]["datasets"]) == 1  # 80 px: one level
    assert scene_info(str(tmp_path / "h.zarr"), mpp=0.5).pixel_size == pytest.approx(0.5)
    big = np.random.default_rng(1).integers(0, 255, (600, 520, 3)).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png", dpi=(50800, 50800))
    assert main(["ingest", str(tmp_path / "big.png"), str(tmp_path / "b.zarr"), "--workers",
                 "0", "--quiet", "--chunk", "64", "--shard", "256"]) == 0
    info = scene_info(str(tmp_path / "b.zarr"), mpp=1.0)
    assert info.format == "ome-zarr" and info.level == 1 and info.pixel_size == \
        pytest.approx(1.0, rel=0.01)
    rc = main(["segment", str(tmp_path / "b.zarr"), str(tmp_path / "o"), "--model",
               make_model(tmp_path / "m.safetensors", 3), "--mpp", "0.2", *RUN])
    err = capsys.readouterr().err
    assert rc == 2 and "b.zarr: mpp 0.2 asks for pixels finer" in err and "0.5 um/px" in err


def test_ingest_channels_keeps_names_for_segment(s2, tmp_path, capsys):
    dst = tmp_path / "rgb.zarr"
    assert main(["ingest", s2["s13"], str(dst), "--channels", "B04,B03,B02", "--workers", "0",
                 "--quiet", "--chunk", "32", "--shard", "64"]) == 0
    capsys.readouterr()
    info = scene_info(str(dst))
    assert (info.format, info.channels, info.channel_names) == ("ome-zarr", 3,
                                                                ("B04", "B03", "B02"))
    labels = [ch["label"] for ch in zarr.open_group(str(dst), mode="r").attrs["ome"]["omero"][
        "channels"]]
    assert labels == ["B04", "B03", "B02"]
    with open_scene(str(dst)) as z, open_scene(s2["s3"]) as t:
        np.testing.assert_array_equal(z.read(0, H, 0, W), t.read(0, H, 0, W))
