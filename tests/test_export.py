"""export_geotiff / `segcore export`: a segmented GeoTIFF comes back as a GeoTIFF whose CRS,
transform and pixels match the input's georeferencing and the Zarr mask."""

import numpy as np
import pytest
import tifffile
import zarr

from segcore.cli import main
from segcore.errors import IncompleteResultError, InputError
from segcore.export import export_geotiff, geotiff_tags
from segcore.io.readers import open_scene
from segcore.pipeline import SegmentConfig, segment
from tests.test_pipeline import make_model, make_scene

ORIGIN = (500000.0, 4650000.0)  # UTM 16N, metres
PIXEL = 0.5


def write_geotiff(path, img):
    """A 1-band uint16 GeoTIFF in EPSG:32616 at 0.5 m, tags written by hand."""
    keys = [1, 1, 0, 4,
            1024, 0, 1, 1,  # GTModelType: projected
            1025, 0, 1, 1,  # GTRasterType: PixelIsArea
            3072, 0, 1, 32616,  # ProjectedCSType
            3076, 0, 1, 9001]  # ProjLinearUnits: metre
    tifffile.imwrite(path, img, tile=(64, 64), metadata=None, extratags=[
        (33550, "d", 3, (PIXEL, PIXEL, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, *ORIGIN, 0.0), True),
        (34735, "H", len(keys), keys, True),
    ])


@pytest.fixture(scope="module")
def geo_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geo")
    _, _, ckpt = make_model(tmp, cin=1, scale=4000.0)  # a 16-bit model
    rng = np.random.default_rng(1)
    img = rng.integers(1, 4000, size=(300, 260)).astype(np.uint16)  # nonzero: no nodata
    src = tmp / "scene.tif"
    write_geotiff(src, img)
    out = str(tmp / "out")
    segment(SegmentConfig(src=str(src), out=out, model=ckpt, tile=128, halo="auto"),
            progress=False)
    return out


@pytest.mark.parametrize("level", [0, 1])
def test_geotiff_round_trips_crs_transform_and_pixels(geo_result, tmp_path, level):
    dst = export_geotiff(geo_result, dst=str(tmp_path / "m.tif"), level=level)
    mask = zarr.open_group(f"{geo_result}/result.zarr", mode="r")[f"labels/mask/{level}"][:]
    assert 0 < mask.mean() < 1 or mask.any()  # a real mask, not all fill
    with open_scene(dst) as s:
        assert s.info.format == "geotiff"
        assert s.info.geo["crs"] == "EPSG:32616"
        size = PIXEL * 2**level
        assert s.info.geo["transform"] == pytest.approx([size, 0, ORIGIN[0], 0, -size,
                                                         ORIGIN[1]])
        assert s.info.pixel_unit == "meter" and s.info.pixel_size == pytest.approx(size)
        assert (s.info.height, s.info.width) == mask.shape
        assert np.array_equal(s.read(0, s.info.height, 0, s.info.width)[..., 0], mask)
    with tifffile.TiffFile(dst) as tif:  # plain tiled deflate TIFF with a class palette
        page = tif.pages[0]
        assert page.is_tiled and page.compression == 8  # ADOBE_DEFLATE
        assert page.photometric == 3 and not tif.is_ome and not tif.is_imagej
        assert tif.geotiff_metadata["GTRasterTypeGeoKey"] == 1  # PixelIsArea


def test_default_dst_and_cli(geo_result, capsys):
    assert main(["export", geo_result]) == 0
    assert capsys.readouterr().out.strip() == f"{geo_result}/mask.tif"
    with open_scene(f"{geo_result}/mask.tif") as s:
        assert s.info.geo["crs"] == "EPSG:32616"
    assert main(["export", geo_result, "--level", "9"]) == 2
    assert "mask level 9 does not exist; the levels are 0, 1" in capsys.readouterr().err


def test_scene_without_geo_gives_plain_tiff(tmp_path):
    _, _, ckpt = make_model(tmp_path)
    _, src = make_scene(tmp_path, 100, 90)
    out = str(tmp_path / "out")
    segment(SegmentConfig(src=src, out=out, model=ckpt, tile=64, halo=16,
                          skip_background=False), progress=False)
    dst = export_geotiff(out)
    mask = zarr.open_group(f"{out}/result.zarr", mode="r")["labels/mask/0"][:]
    with open_scene(dst) as s:
        assert s.info.geo is None and s.info.format == "tiff"
        assert np.array_equal(s.read(0, 100, 0, 90)[..., 0], mask)
    with tifffile.TiffFile(dst) as tif:
        assert not tif.is_geotiff and not tif.is_ome and not tif.is_imagej


def test_incomplete_result_is_refused(tmp_path):
    with pytest.raises(IncompleteResultError, match="no COMPLETE marker"):
        export_geotiff(str(tmp_path / "nothing"))


def test_rotated_and_geographic_transforms():
    tags = {t[0]: t[3] for t in geotiff_tags(
        {"crs": "EPSG:4326", "transform": [0.1, 0.02, 10.0, 0.01, -0.1, 50.0]}, "degree")}
    assert 33550 not in tags and tags[34264][:8] == (0.1, 0.02, 0.0, 10.0, 0.01, -0.1, 0.0, 50.0)
    keys = tags[34735]
    pairs = {keys[i]: keys[i + 3] for i in range(4, len(keys), 4)}
    assert pairs == {1024: 2, 1025: 1, 2048: 4326, 2054: 9102}
    with pytest.raises(InputError, match="not an EPSG code"):
        geotiff_tags({"crs": "ESRI:102003", "transform": [1, 0, 0, 0, -1, 0]}, "meter")


@pytest.mark.server
def test_export_to_s3_is_readable_there(geo_result, s3_server):
    dst = f"{s3_server.make_bucket()}/exports/mask.tif"
    assert export_geotiff(geo_result, dst=dst) == dst
    mask = zarr.open_group(f"{geo_result}/result.zarr", mode="r")["labels/mask/0"][:]
    with open_scene(dst) as s:
        assert s.info.geo["crs"] == "EPSG:32616"
        assert np.array_equal(s.read(0, s.info.height, 0, s.info.width)[..., 0], mask)
