"""Scene readers: every format round-trips regions exactly; levels; metadata; bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from segcore.errors import ConfigError, InputError
from segcore.io.readers import open_scene, scene_info
from tests.conftest import shared_dataset

RNG = np.random.default_rng(7)
REGIONS = [(0, 1, 0, 1), (3, 40, 5, 77), (17, 130, 60, 99), (0, 130, 0, 99)]  # on 130 x 99


def _img(h=130, w=99, c=None, dtype=np.uint8):
    shape = (h, w) if c is None else (h, w, c)
    if np.dtype(dtype).kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def _check(uri, expected, level=None, regions=REGIONS):
    exp = expected if expected.ndim == 3 else expected[..., None]
    with open_scene(str(uri), level=level) as scene:
        assert (scene.info.height, scene.info.width, scene.info.channels) == exp.shape
        assert scene.info.dtype == exp.dtype.name
        for y0, y1, x0, x1 in regions:
            got = scene.read(y0, y1, x0, x1)
            assert got.dtype == exp.dtype and got.flags.c_contiguous
            np.testing.assert_array_equal(got, exp[y0:y1, x0:x1])
        return scene.info


# --- TIFF family -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "c,dtype,kw",
    [
        (None, np.uint8, {"tile": (32, 32), "compression": "zlib"}),
        (3, np.uint8, {"tile": (32, 48), "photometric": "rgb"}),
        (None, np.uint16, {"rowsperstrip": 16, "compression": "zlib"}),
        (None, np.float32, {"tile": (64, 64)}),
        (5, np.uint16, {"photometric": "minisblack", "planarconfig": "separate", "tile": (32, 32)}),
        (4, np.uint16, {"photometric": "minisblack", "planarconfig": "contig"}),
        (3, np.uint8, {"tile": (32, 32), "bigtiff": True, "photometric": "rgb"}),
    ],
)
def test_tiff_roundtrip(tmp_path, c, dtype, kw):
    arr = _img(c=c, dtype=dtype)
    if kw.get("planarconfig") == "separate":
        data = np.moveaxis(arr, -1, 0)  # tifffile wants (S, Y, X) for separate planes
    else:
        data = arr
    bigtiff = kw.pop("bigtiff", False)
    p = tmp_path / "x.tif"
    tifffile.imwrite(p, data, bigtiff=bigtiff, **kw)
    info = _check(p, arr)
    assert info.format == "tiff" and info.level == 0 and info.level_shapes == ((130, 99),)


def test_tiff_rgba_drops_alpha_and_int16_becomes_float32(tmp_path):
    rgba = _img(c=4)
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples="unassalpha")
    _check(tmp_path / "a.tif", rgba[..., :3])
    i16 = RNG.integers(-3000, 3000, (40, 30), dtype=np.int16)
    tifffile.imwrite(tmp_path / "i.tif", i16)
    _check(tmp_path / "i.tif", i16.astype(np.float32), regions=[(0, 40, 0, 30)])
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((8, 8), np.complex64))
    with pytest.raises(InputError, match="complex64 is not supported"):
        open_scene(str(tmp_path / "c.tif"))


def _pyramid(tmp_path, name="pyr.tif", **kw):
    """Three levels (130x99, 65x50, 33x25) with 0.5 um pixels; returns (path, levels)."""
    lv = [_img(c=3)]
    lv += [lv[0][::2, ::2].copy(), lv[0][::4, ::4].copy()]
    p = tmp_path / name
    with tifffile.TiffWriter(p) as tw:
        tw.write(
            lv[0],
            tile=(32, 32),
            subifds=2,
            photometric="rgb",
            resolution=(20000, 20000),
            resolutionunit="CENTIMETER",
            **kw,
        )
        for a in lv[1:]:
            tw.write(a, tile=(32, 32), subfiletype=1, photometric="rgb")
    return p, lv


def test_pyramidal_tiff_levels_and_mpp(tmp_path):
    p, lv = _pyramid(tmp_path)
    for i, a in enumerate(lv):
        info = _check(p, a, level=i, regions=[(0, a.shape[0], 0, a.shape[1]), (1, 9, 2, 20)])
        assert info.level == i and info.level_shapes == ((130, 99), (65, 50), (33, 25))
    info = scene_info(str(p))
    assert info.pixel_size == pytest.approx(0.5) and info.pixel_unit == "micrometer"
    # pixel sizes 0.5, ~1.0, ~2.0: the finest level >= 0.9 * mpp, else the coarsest
    for mpp, want in [
        (0.46, 0),  # within 10 % of the finest level
        (0.5, 0),
        (0.55, 0),
        (0.6, 1),
        (1.0, 1),
        (1.1, 1),
        (2.0, 2),
        (9, 2),
    ]:
        assert scene_info(str(p), mpp=mpp).level == want, mpp
    assert scene_info(str(p), mpp=1.0).pixel_size == pytest.approx(0.5 * (130 / 65 + 99 / 50) / 2)
    with pytest.raises(ConfigError, match=r"pyr\.tif: mpp 0\.1 asks for pixels finer than the "
                       r"scene's finest level \(level 0, 130x99, 0\.5 um/px\)"):
        open_scene(str(p), mpp=0.1)  # never silently the finest level: that would not upsample
    with pytest.raises(ConfigError, match="not both"):
        open_scene(str(p), level=1, mpp=1.0)
    with pytest.raises(ConfigError, match="level 3 does not exist"):
        open_scene(str(p), level=3)
    with pytest.raises(ConfigError, match="mpp must be > 0"):
        open_scene(str(p), mpp=0)


def test_ome_tiff_pyramid_and_channels(tmp_path):
    chans = _img(c=3, dtype=np.uint16)
    p = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(p) as tw:
        data = np.moveaxis(chans, -1, 0)  # (C, Y, X): not RGB, three channels
        tw.write(
            data,
            tile=(32, 32),
            subifds=1,
            photometric="minisblack",
            metadata={"axes": "CYX", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"},
        )
        tw.write(data[:, ::2, ::2], tile=(32, 32), subfiletype=1, photometric="minisblack")
    info = _check(p, chans)
    assert info.format == "ome-tiff" and info.pixel_size == pytest.approx(0.25)
    info1 = _check(p, chans[::2, ::2], level=1, regions=[(0, 65, 0, 50)])
    assert info1.pixel_size == pytest.approx(0.25 * (2 + 99 / 50) / 2)


def test_svs_jpeg_pyramid_mpp(tmp_path):
    a = np.zeros((512, 768, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 768)[None, :]
    a[..., 1] = np.linspace(0, 255, 512)[:, None]
    a[..., 2] = 128
    head = "Aperio Image Library v12.0.0\r\n"
    p = tmp_path / "s.svs"
    with tifffile.TiffWriter(p) as tw:
        tw.write(
            a,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "768x512 (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = 0.25",
        )
        tw.write(
            a[::8, ::8],
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "thumbnail",
        )
        tw.write(
            a[::4, ::4].copy(),
            tile=(64, 64),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "192x128 -> 192x128 - |",
        )
    info = scene_info(str(p), mpp=1.0)
    assert info.format == "svs" and info.level == 1 and info.pixel_size == pytest.approx(1.0)
    assert info.level_shapes == ((512, 768), (128, 192))
    with open_scene(str(p), mpp=0.25) as s:
        assert s.info.level == 0 and s.info.pixel_size == pytest.approx(0.25)
        got = s.read(100, 400, 200, 700).astype(int)
        assert np.abs(got - a[100:400, 200:700]).max() <= 8  # JPEG, smooth ramps


def _geotiff(path, arr, nodata=None, transform=None, epsg=32616, **kw):
    keys = [1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg, 3076, 0, 1, 9001]
    if epsg == 4326:
        keys = [1, 1, 0, 3, 1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, 4326]
    tags = [(34735, "H", len(keys), keys, True)]
    if transform is None:
        tags += [
            (33550, "d", 3, (0.5, 0.5, 0.0), True),
            (33922, "d", 6, (0, 0, 0, 733601.0, 3725139.0, 0), True),
        ]
    else:
        tags += [(34264, "d", 16, transform, True)]
    if nodata is not None:
        tags.append((42113, "s", 0, str(nodata), True))
    tifffile.imwrite(path, arr, extratags=tags, **kw)


def test_geotiff_metadata_and_overviews(tmp_path):
    a = _img(dtype=np.uint16)
    p = tmp_path / "g.tif"
    _geotiff(p, a, nodata=0, tile=(32, 32))
    info = _check(p, a)
    assert info.format == "geotiff" and info.nodata == 0.0
    assert info.geo == {"crs": "EPSG:32616", "transform": [0.5, 0, 733601.0, 0, -0.5, 3725139.0]}
    assert info.pixel_size == 0.5 and info.pixel_unit == "meter"
    # rotated ModelTransformation, geographic CRS, float nodata
    m = (1e-5, 2e-6, 0, -115.2, 3e-6, -1e-5, 0, 36.1, 0, 0, 0, 0, 0, 0, 0, 1)
    f = _img(dtype=np.float32)
    _geotiff(tmp_path / "r.tif", f, nodata="-9999", transform=m, epsg=4326)
    info = _check(tmp_path / "r.tif", f)
    assert info.geo["crs"] == "EPSG:4326" and info.nodata == -9999.0
    assert info.geo["transform"] == [1e-5, 2e-6, -115.2, 3e-6, -1e-5, 36.1]
    assert info.pixel_unit == "degree" and info.pixel_size == pytest.approx(np.hypot(1e-5, 3e-6))
    # a COG-like overview: transform scaled, origin kept
    with tifffile.TiffWriter(tmp_path / "cog.tif") as tw:
        keys = [1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32616]
        tw.write(
            a,
            tile=(32, 32),
            extratags=[
                (34735, "H", len(keys), keys, True),
                (33550, "d", 3, (0.5, 0.5, 0.0), True),
                (33922, "d", 6, (0, 0, 0, 100.0, 200.0, 0), True),
            ],
        )
        tw.write(a[::2, ::2], tile=(32, 32), subfiletype=1)
    info = scene_info(str(tmp_path / "cog.tif"), mpp=1.0)
    assert info.level == 1 and info.pixel_size == pytest.approx((130 / 65 + 99 / 50) / 4)
    assert info.geo["transform"] == pytest.approx([99 / 50 * 0.5, 0, 100.0, 0, -1.0, 200.0])


# --- PNG / JPEG --------------------------------------------------------------------------
def test_png_modes(tmp_path):
    grey, rgb, rgba = _img(), _img(c=3), _img(c=4)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert _check(tmp_path / "g.png", grey).format == "png"
    _check(tmp_path / "rgb.png", rgb)
    _check(tmp_path / "rgba.png", rgba[..., :3])
    g16 = _img(dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    _check(tmp_path / "g16.png", g16)
    import imagecodecs

    rgb16 = _img(c=3, dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    _check(tmp_path / "rgb16.png", rgb16)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    _check(tmp_path / "p.png", np.asarray(pal.convert("RGB")))
    # content, not extension: a PNG named .tif is read as a PNG
    (tmp_path / "png.tif").write_bytes((tmp_path / "rgb.png").read_bytes())
    assert _check(tmp_path / "png.tif", rgb).format == "png"


def test_jpeg(tmp_path):
    rgb = _img(c=3)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    expected = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    assert _check(tmp_path / "a.jpg", expected).format == "jpeg"
    Image.fromarray(_img()).save(tmp_path / "g.jpg")
    assert scene_info(str(tmp_path / "g.jpg")).channels == 1


# --- Zarr --------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", ["yx", "yxc", "cyx", "cyx-unnamed", "yxc-unnamed"])
def test_zarr_array_axes(tmp_path, axes):
    arr = _img(c=None if axes == "yx" else 3, dtype=np.uint16)
    data = np.moveaxis(arr, -1, 0) if axes.startswith("cyx") else arr
    names = None if "unnamed" in axes else tuple(axes)
    z = zarr.create_array(
        tmp_path / "a.zarr",
        shape=data.shape,
        chunks=(1, 32, 32)[-data.ndim :] if axes.startswith("cyx") else (32, 32, 3)[: data.ndim],
        dtype=data.dtype,
        dimension_names=names,
    )
    z[...] = data
    assert _check(tmp_path / "a.zarr", arr).format == "zarr"


def _ome_zarr(root, levels, axes=("c", "y", "x"), scale0=0.5, unit="micrometer", extra=None):
    g = zarr.open_group(root, mode="w")
    datasets = []
    for i, a in enumerate(levels):
        data = np.moveaxis(a, -1, 0) if axes[0] == "c" else a
        z = g.create_array(
            str(i), shape=data.shape, dtype=data.dtype, chunks=tuple(min(n, 32) for n in data.shape)
        )
        z[...] = data
        f = levels[0].shape[0] / a.shape[0]
        sc = [1.0 if ax == "c" else scale0 * f for ax in axes]
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": sc}]}
        )
    ax = [
        {"name": n, "type": "channel"} if n == "c" else {"name": n, "type": "space", "unit": unit}
        for n in axes
    ]
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": ax, "datasets": datasets}]}
    if extra:
        g.attrs["segcore"] = extra
    return root


def test_ome_zarr_multiscales(tmp_path):
    a = _img(c=3)
    lv = [a, a[::2, ::2].copy()]
    geo = {"crs": "EPSG:32616", "transform": [0.5, 0.0, 10.0, 0.0, -0.5, 20.0]}
    root = _ome_zarr(tmp_path / "o.zarr", lv, extra={"geo": geo, "nodata": 0})
    info = _check(root, a)
    assert info.format == "ome-zarr" and info.level_shapes == ((130, 99), (65, 50))
    assert info.pixel_size == 0.5 and info.pixel_unit == "micrometer" and info.nodata == 0
    assert info.geo == geo
    info = _check(root, lv[1], level=1, regions=[(0, 65, 0, 50), (5, 6, 7, 9)])
    assert scene_info(str(root), mpp=1.0).level == 1
    assert info.geo["transform"] == pytest.approx([0.5 * 99 / 50, 0, 10.0, 0, -1.0, 20.0])
    yxc = _ome_zarr(tmp_path / "yxc.zarr", [a], axes=("y", "x", "c"), unit="nanometer")
    assert _check(yxc, a).pixel_size == pytest.approx(5e-4)


def test_ome_zarr_written_by_ome_zarr_py(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    a = _img(c=3)
    store = parse_url(str(tmp_path / "w.zarr"), mode="w").store
    root = zarr.group(store=store)
    write_image(np.moveaxis(a, -1, 0), root, axes="cyx", scaler=None)
    assert _check(tmp_path / "w.zarr", a).format == "ome-zarr"


# --- pickling, laziness, S3 --------------------------------------------------------------
def test_scene_pickles_as_uri_and_reopens(tmp_path):
    p, lv = _pyramid(tmp_path)
    with open_scene(str(p), mpp=1.0) as scene:
        first = scene.read(3, 20, 4, 30)
        blob = pickle.dumps(scene)
    assert len(blob) < 2000 and b"ZarrTiffStore" not in blob
    clone = pickle.loads(blob)
    assert clone.info == scene.info and clone.info.level == 1
    np.testing.assert_array_equal(clone.read(3, 20, 4, 30), first)
    np.testing.assert_array_equal(clone.read(0, 65, 0, 50), lv[1])
    clone.close()


def test_region_outside_image_is_config_error(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _img())
    with open_scene(str(tmp_path / "a.tif")) as s:
        for bad in [(0, 131, 0, 5), (-1, 5, 0, 5), (5, 4, 0, 5), (0, 5, 90, 100)]:
            with pytest.raises(ConfigError, match=r"a\.tif: region .* not inside"):
                s.read(*bad)
        assert s.read(4, 4, 0, 5).shape == (0, 5, 1)


def _tiled_with_bad_tile(tmp_path):
    """A 256 x 256 zlib-tiled TIFF whose tile (row 3, col 3) holds garbage."""
    a = _img(256, 256)
    p = tmp_path / "bad.tif"
    tifffile.imwrite(p, a, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(p) as t:
        off, n = t.pages[0].dataoffsets[15], t.pages[0].databytecounts[15]
    raw = bytearray(p.read_bytes())
    raw[off : off + n] = b"\x00" * n
    p.write_bytes(bytes(raw))
    return p, a


def test_corrupt_tile_raises_on_read_and_other_tiles_still_read(tmp_path):
    p, a = _tiled_with_bad_tile(tmp_path)
    with open_scene(str(p)) as s:
        # a small region decodes only its own tiles: the corrupt one is never touched
        np.testing.assert_array_equal(s.read(0, 100, 0, 190)[..., 0], a[:100, :190])
        with pytest.raises(
            InputError, match=r"bad\.tif: cannot decode region y 150:200, x 180:256"
        ):
            s.read(150, 200, 180, 256)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match=r"nope\.tif: no such file"):
        open_scene(str(tmp_path / "nope.tif"))
    (tmp_path / "text.tif").write_text("this is not an image\n")
    with pytest.raises(InputError, match=r"text\.tif: not an image"):
        open_scene(str(tmp_path / "text.tif"))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        open_scene(str(tmp_path / "empty.png"))
    # truncated: the header promises tiles that are not in the file
    tifffile.imwrite(tmp_path / "full.tif", _img(256, 256), tile=(64, 64))
    raw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"trunc\.tif: truncated TIFF: \d+ of 16 tiles"):
        open_scene(str(tmp_path / "trunc.tif"))
    (tmp_path / "hdr.tif").write_bytes(raw[:6])
    with pytest.raises(InputError, match=r"hdr\.tif: not a readable TIFF"):
        open_scene(str(tmp_path / "hdr.tif"))
    # a PNG cut short opens (header) but its read fails with a clear message
    Image.fromarray(_img(c=3)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    with open_scene(str(tmp_path / "cut.png")) as s, pytest.raises(InputError, match="cut.png"):
        s.read(0, 10, 0, 10)
    # Zarr without an array, a plain directory, a stack
    zarr.open_group(tmp_path / "empty.zarr", mode="w").create_group("labels")
    with pytest.raises(InputError, match=r"empty\.zarr: Zarr group has no array"):
        open_scene(str(tmp_path / "empty.zarr"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="is a directory but not a Zarr"):
        open_scene(str(tmp_path / "dir"))
    tifffile.imwrite(tmp_path / "stack.tif", _img(c=None).reshape(1, 130, 99).repeat(5, 0))
    with pytest.raises(InputError, match="not a stack"):
        open_scene(str(tmp_path / "stack.tif"))
    Image.fromarray(_img()).save(tmp_path / "g.png")
    with pytest.raises(ConfigError, match="has no pixel size"):
        open_scene(str(tmp_path / "g.png"), mpp=0.5)


@pytest.mark.server
def test_s3_tiff_and_ome_zarr(tmp_path, s3_server):
    import fsspec

    from segcore.io.uri import storage_options

    bucket = s3_server.make_bucket()
    p, lv = _pyramid(tmp_path)
    root = _ome_zarr(tmp_path / "o.zarr", [lv[0], lv[1]])
    fs = fsspec.filesystem("s3", **storage_options("s3://x"))
    fs.put(str(p), f"{bucket}/scenes/pyr.tif")
    fs.put(str(root), f"{bucket}/scenes/o.zarr", recursive=True)
    uri = f"{bucket}/scenes/pyr.tif"
    info = _check(uri, lv[1], level=1, regions=[(0, 65, 0, 50), (7, 30, 3, 41)])
    assert info.format == "tiff" and info.uri == uri
    with open_scene(uri, mpp=0.5) as opened:
        blob = pickle.dumps(opened)
    with pickle.loads(blob) as scene:  # reopens over S3 on its first read
        np.testing.assert_array_equal(scene.read(10, 70, 20, 90), lv[0][10:70, 20:90])
    info = _check(f"{bucket}/scenes/o.zarr", lv[0])
    assert info.format == "ome-zarr" and info.level_shapes == ((130, 99), (65, 50))
    with pytest.raises(InputError, match="no such file"):
        open_scene(f"{bucket}/scenes/missing.tif")


# --- real files --------------------------------------------------------------------------
@pytest.mark.data
def test_real_svs():
    path = shared_dataset("wsi-cmu1-small-region") / "CMU-1-Small-Region.svs"
    with open_scene(str(path), mpp=0.5) as s:
        i = s.info
        assert (i.format, i.height, i.width, i.channels, i.dtype) == ("svs", 2967, 2220, 3, "uint8")
        assert i.pixel_size == pytest.approx(0.499) and i.pixel_unit == "micrometer"
        region = s.read(1000, 1300, 700, 1111)
    ref = tifffile.imread(path, key=0)
    np.testing.assert_array_equal(region, ref[1000:1300, 700:1111])


@pytest.mark.data
def test_real_geotiffs():
    d = shared_dataset("satellite-spacenet-solaris")
    with open_scene(str(d / "buildings_atlanta" / "image_pan.tif"), mpp=0.5) as s:
        i = s.info
        assert (i.format, i.height, i.width, i.channels, i.dtype) == (
            "geotiff",
            900,
            900,
            1,
            "uint16",
        )
        assert i.geo == {"crs": "EPSG:32616", "transform": [0.5, 0, 733601.0, 0, -0.5, 3725139.0]}
        assert (i.pixel_size, i.pixel_unit, i.nodata) == (0.5, "meter", 0.0)
        ref = tifffile.imread(d / "buildings_atlanta" / "image_pan.tif")
        np.testing.assert_array_equal(s.read(100, 300, 450, 900)[..., 0], ref[100:300, 450:900])
    i = scene_info(str(d / "roads_vegas" / "image_pan.tif"), mpp=0.3)
    assert i.geo["crs"] == "EPSG:4326" and i.pixel_unit == "degree" and i.level == 0
    a, b, c, dd, e, f = i.geo["transform"]
    assert (a, -e) == pytest.approx((2.7e-6, 2.7e-6)) and (c, f) == pytest.approx(
        (-115.2338076, 36.1423377)
    )


def test_zarr_v2_array_with_xarray_dims(tmp_path):
    arr = _img(c=4, dtype=np.float32)
    z = zarr.create_array(
        tmp_path / "v2.zarr", shape=arr.shape, chunks=(32, 32, 4), dtype=arr.dtype, zarr_format=2
    )
    z[...] = arr
    z.attrs["_ARRAY_DIMENSIONS"] = ["y", "x", "band"]
    assert _check(tmp_path / "v2.zarr", arr).channels == 4


def test_geotiff_pixel_is_point_shifts_half_a_pixel():
    from segcore.io.geo import geotiff_geo

    keys = {
        "GTRasterTypeGeoKey": 2,
        "ProjectedCSTypeGeoKey": 32616,
        "ModelPixelScale": [2.0, 2.0, 0.0],
        "ModelTiepoint": [0, 0, 0, 100.0, 200.0, 0],
    }
    assert geotiff_geo(keys) == {"crs": "EPSG:32616", "transform": [2.0, 0, 99.0, 0, -2.0, 201.0]}
    assert geotiff_geo({**keys, "ProjectedCSTypeGeoKey": 32767})["crs"] is None  # user-defined


def test_level_for_a_model_pixel_size(tmp_path):
    """Levels 0.5 / ~1.0 / ~2.0 um: a model's pixel size picks the level nearest it (within
    1.3x), else the choice is refused with the levels and the fix; a scene without a pixel
    size, or in metres for a micrometre model, uses level 0 and says so."""
    p, _ = _pyramid(tmp_path)
    for size, want in [(0.5, 0), (0.42, 0), (1.0, 1), (1.2, 1), (2.0, 2), (2.5, 2)]:
        sc = open_scene(str(p), model_scale=(size, "micrometer", "m"))
        assert sc.info.level == want, size
        assert f"level {want} (" in sc.info.notes[-1] and f"trained at {size:g} um/px" in \
            sc.info.notes[-1]
        sc.close()
    for size in (0.3, 1.45, 3.0):
        with pytest.raises(ConfigError, match=r"pyr\.tif: no level is at the scale the model m "
                           r"was trained at .*levels 0: 0\.5 um/px, 1: .*Pass --level \d"):
            open_scene(str(p), model_scale=(size, "micrometer", "m"))
    assert open_scene(str(p), level=2, model_scale=(0.5, "micrometer", "m")).info.level == 2
    with open_scene(str(p), model_scale=(0.5, "meter", "m")) as sc:
        assert sc.info.level == 0 and "pixels in micrometer" in sc.info.notes[-1]
    png = tmp_path / "x.png"
    Image.fromarray(_img(c=3)).save(png)
    with open_scene(str(png), model_scale=(0.5, "micrometer", "m")) as sc:
        assert sc.info.level == 0 and "no pixel size" in sc.info.notes[-1]
