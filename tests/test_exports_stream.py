"""Streamed exports (issue 11): every vector export reads polygons.parquet chunk by chunk and
gives what a whole-frame export (geopandas / GDAL over the whole GeoDataFrame) gives; a failed
export leaves nothing at its destination; the probabilities come out as a valid multi-band COG
equal to the Zarr data, with average overviews."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage

ORIGIN = (500000.0, 4200000.0)  # UTM 16N, metres
PIXEL = 0.5
FORMATS = ("qupath", "gpkg", "geoparquet", "geojson")


def _threshold_model(path, classes=1):
    """A 1x1 convolution: probability sigmoid(40 * c0 / 255 - 20), foreground where channel 0
    is above 127. ``classes=3``: softmax of logits (0, 40 c0 - 20, 20 - 40 c0), three classes."""
    from segcore.config import InputContract, ModelSpec
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    spec = ModelSpec(arch="pointwise", in_channels=3, out_channels=classes, kwargs={})
    model = build_model(spec).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[classes - 1, 0] = 40.0
        model.head.bias[classes - 1] = -20.0
        if classes == 3:
            model.head.weight[2, 0], model.head.bias[2] = -40.0, 20.0
    names = ("background", "foreground") if classes == 1 else ("background", "cell", "gland")
    save_checkpoint(model, str(path), InputContract(channels=3, class_names=names), spec)
    return str(path)


def _geo_scene(path, channel0: np.ndarray) -> None:
    """RGB GeoTIFF in EPSG:32616, north-up, 0.5 m pixels, ``channel0`` in channel 0."""
    img = np.zeros((*channel0.shape, 3), np.uint8)
    img[..., 0] = channel0
    keys = [1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32616, 3076, 0, 1, 9001]
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", metadata=None, extratags=[
        (33550, "d", 3, (PIXEL, PIXEL, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, *ORIGIN, 0.0), True),
        (34735, "H", len(keys), keys, True)])


def _segment(tmp, channel0, prob_dtype="uint8", tile=128, classes=1):
    from segcore.pipeline import SegmentConfig, segment

    _geo_scene(tmp / "g.tif", channel0)
    out = str(tmp / "out")
    segment(SegmentConfig(src=str(tmp / "g.tif"), out=out, tile=tile, skip_background=False,
                          prob_dtype=prob_dtype, model=_threshold_model(tmp / "m.safetensors", classes)),
            progress=False)
    return out


@pytest.fixture(scope="module")
def objects_result(tmp_path_factory):
    """A georeferenced 300 x 390 scene, 128 px shards (12), blobs across shard borders and an
    object with a hole; objects and polygons extracted."""
    from segcore.objects import extract_objects

    rng = np.random.default_rng(11)
    m = ndimage.gaussian_filter(rng.random((300, 390)), 3) > 0.515
    m[120:140, 120:140] = True  # over the corner of four shards
    m[150:180, 20:60] = True
    m[160:170, 30:40] = False  # a hole
    out = _segment(tmp_path_factory.mktemp("objs"), np.where(m, 255, 0))
    extract_objects(out, connectivity=4)
    return out, ndimage.label(m)[1]


def _whole(out):
    """The whole-frame reference: polygons.parquet in one GeoDataFrame, in the scene's CRS."""
    import geopandas as gpd

    frame = gpd.read_parquet(f"{out}/polygons.parquet")
    moved = frame.copy()
    moved["geometry"] = frame.geometry.affine_transform([PIXEL, 0, 0, -PIXEL, *ORIGIN])
    return frame, moved.set_crs(32616)


def _same_geometries(a, b, tolerance):
    import shapely

    a, b = np.asarray(a), np.asarray(b)
    assert len(a) == len(b)
    assert shapely.equals_exact(shapely.normalize(a), shapely.normalize(b),
                                tolerance=tolerance).all()


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_streamed_vector_exports_equal_whole_frame_exports(objects_result, tmp_path,
                                                           monkeypatch, chunk_rows):
    import geopandas as gpd
    import pandas as pd
    import pyarrow.parquet as pq
    import pyogrio
    import shapely
    from pyproj import CRS

    from segcore.objects import vectors
    from segcore.objects.vectors import export_vectors

    out, n = objects_result
    if chunk_rows:  # row groups cut into pieces too: more chunks than shards
        monkeypatch.setattr(vectors, "CHUNK_ROWS", chunk_rows)
    groups = pq.ParquetFile(f"{out}/polygons.parquet").metadata.num_row_groups
    chunks = list(vectors._chunks(out))
    assert groups > 2 and len(chunks) >= groups and sum(map(len, chunks)) == n
    if chunk_rows:
        assert len(chunks) > groups and max(map(len, chunks)) <= chunk_rows
    frame, moved = _whole(out)
    assert len(frame) == n

    # QuPath: pixel coordinates, feature by feature, fields as before
    qp = json.loads(open(export_vectors(out, "qupath", dst=str(tmp_path / "q.json"))).read())
    assert qp["type"] == "FeatureCollection" and len(qp["features"]) == n
    assert [f["properties"]["segcore_id"] for f in qp["features"]] == frame["id"].tolist()
    _same_geometries([shapely.geometry.shape(f["geometry"]) for f in qp["features"]],
                     frame.geometry.values, 0)
    assert [f["properties"]["measurements"]["Area px"] for f in qp["features"]] == \
        frame["area_px"].astype(float).tolist()
    assert len({f["id"] for f in qp["features"]}) == n
    assert {f["properties"]["objectType"] for f in qp["features"]} == {"detection"}

    # GeoPackage: layer 'objects' in EPSG:32616, the same rows and geometries
    path = export_vectors(out, "gpkg", dst=str(tmp_path / "o.gpkg"))
    assert pyogrio.list_layers(path)[:, 0].tolist() == ["objects"]
    gp = gpd.read_file(path, layer="objects")
    assert gp.crs == moved.crs and gp["id"].tolist() == moved["id"].tolist()
    _same_geometries(gp.geometry.values, moved.geometry.values, 1e-9)
    pd.testing.assert_frame_equal(gp.drop(columns="geometry"), moved.drop(columns="geometry"),
                                  check_dtype=False)

    # GeoParquet: as geopandas writes the whole frame (CRS as PROJJSON, bbox, types, rows)
    path = export_vectors(out, "geoparquet", dst=str(tmp_path / "o.parquet"))
    moved.to_parquet(tmp_path / "ref.parquet", index=False)
    got, ref = gpd.read_parquet(path), gpd.read_parquet(tmp_path / "ref.parquet")
    pd.testing.assert_frame_equal(got.drop(columns="geometry"), ref.drop(columns="geometry"))
    _same_geometries(got.geometry.values, ref.geometry.values, 0)
    meta = json.loads(pq.read_schema(path).metadata[b"geo"])
    want = json.loads(pq.read_schema(tmp_path / "ref.parquet").metadata[b"geo"])
    col, wcol = meta["columns"]["geometry"], want["columns"]["geometry"]
    assert CRS.from_json_dict(col["crs"]) == CRS.from_json_dict(wcol["crs"]) == CRS(32616)
    assert col["bbox"] == pytest.approx(wcol["bbox"]) and col["bbox"] == pytest.approx(
        list(moved.total_bounds))
    assert set(col["geometry_types"]) == set(wcol["geometry_types"])
    assert (meta["version"], col["encoding"]) == (want["version"], wcol["encoding"])

    # GeoJSON: RFC 7946 in WGS84, as GDAL writes the whole frame with RFC7946=YES
    path = export_vectors(out, "geojson", dst=str(tmp_path / "o.geojson"))
    ref_path = tmp_path / "ref.geojson"
    moved.to_crs(4326).to_file(ref_path, driver="GeoJSON", engine="pyogrio", RFC7946="YES")
    got, ref = gpd.read_file(path), gpd.read_file(ref_path)
    assert got.crs.to_epsg() == 4326 and got["id"].tolist() == ref["id"].tolist()
    _same_geometries(got.geometry.values, ref.geometry.values, 1e-9)
    raw = json.loads(open(path).read())
    assert "crs" not in raw and len(raw["features"]) == n
    raw_ref = json.loads(ref_path.read_text())
    assert [f["geometry"] for f in raw["features"]] == [f["geometry"] for f in
                                                        raw_ref["features"]]
    for f in raw["features"]:  # lon/lat near 87 W, exterior rings counter-clockwise
        for poly in ([f["geometry"]["coordinates"]] if f["geometry"]["type"] == "Polygon"
                     else f["geometry"]["coordinates"]):
            assert shapely.is_ccw(shapely.LinearRing(poly[0]))
            assert all(not shapely.is_ccw(shapely.LinearRing(h)) for h in poly[1:])
            lon, lat = np.array(poly[0]).mean(axis=0)
            assert -87.5 < lon < -86.5 and 37 < lat < 38.5


def test_a_failed_export_leaves_nothing_at_dst(objects_result, tmp_path):
    """polygons.parquet damaged in its last row group: every export fails mid-stream (after
    writing the earlier chunks) and dst is untouched: absent stays absent, an older file stays
    as it was, no temp file beside it."""
    import pyarrow.parquet as pq

    from segcore.errors import SegcoreError
    from segcore.objects.vectors import export_vectors

    src, _ = objects_result
    out = tmp_path / "out"
    shutil.copytree(src, out)
    poly = out / "polygons.parquet"
    md = pq.ParquetFile(poly).metadata
    last = md.row_group(md.num_row_groups - 1)
    geom = last.column(last.num_columns - 1)
    with open(poly, "r+b") as fh:
        fh.seek(geom.data_page_offset)
        fh.write(b"\xff" * 64)
    dsts = tmp_path / "dst"
    dsts.mkdir()
    (dsts / "old.gpkg").write_bytes(b"an older export")
    for fmt, name in zip(FORMATS, ("q.json", "old.gpkg", "o.parquet", "o.geojson"),
                         strict=True):
        with pytest.raises(SegcoreError, match="row group"):
            export_vectors(str(out), fmt, dst=str(dsts / name))
    assert sorted(p.name for p in dsts.iterdir()) == ["old.gpkg"]
    assert (dsts / "old.gpkg").read_bytes() == b"an older export"


def test_streamed_exports_from_and_to_s3(objects_result, tmp_path, s3_server):
    """A result on s3:// exported to s3://: the same bytes as the local export (qupath,
    geojson), a readable GeoPackage."""
    import geopandas as gpd

    from segcore.io.uri import get_fs, read_bytes
    from segcore.objects.vectors import export_vectors

    src, n = objects_result
    prefix = s3_server.make_bucket() + "/run"
    fs, path = get_fs(prefix)
    fs.put(src + "/", path, recursive=True)
    for fmt in ("qupath", "geojson"):
        local = export_vectors(src, fmt, dst=str(tmp_path / f"{fmt}.json"))
        remote = export_vectors(prefix, fmt)
        assert remote.startswith(prefix + "/objects.")
        assert read_bytes(remote) == open(local, "rb").read()
    remote = export_vectors(prefix, "gpkg", dst=prefix + "/x/objects.gpkg")
    (tmp_path / "r.gpkg").write_bytes(read_bytes(remote))
    assert len(gpd.read_file(tmp_path / "r.gpkg")) == n


@pytest.mark.parametrize(("prob_dtype", "classes"), [("uint8", 1), ("float16", 1), ("uint8", 3)])
def test_probability_cog_valid_and_equal_to_zarr(tmp_path, capsys, prob_dtype, classes):
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from segcore.cli import main

    rng = np.random.default_rng(12)
    field = ndimage.gaussian_filter(rng.random((700, 600)), 6)
    c0 = np.clip((field - field.min()) / np.ptp(field) * 255, 0, 255).astype(np.uint8)
    out = _segment(tmp_path, c0, prob_dtype=prob_dtype, tile=256, classes=classes)
    root = zarr.open_group(f"{out}/result.zarr", mode="r")
    probs = root["0"][:]
    assert root.attrs["segcore"]["probability_encoding"] == (
        "uint8 0-255" if prob_dtype == "uint8" else "float16")
    assert probs.dtype == prob_dtype and len(np.unique(probs)) > 20  # continuous, not 0/1

    assert main(["export", out, "--to", "cog", "--what", "probabilities"]) == 0
    dst = capsys.readouterr().out.strip()
    assert dst == f"{out}/probabilities.cog.tif"
    valid, errors, _ = cog_validate(dst)
    assert valid, errors
    with rasterio.open(dst) as ds:
        assert ds.crs.to_epsg() == 32616 and ds.count == probs.shape[0] == classes
        assert ds.transform == rasterio.Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1])
        assert ds.dtypes[0] == ("uint8" if prob_dtype == "uint8" else "float32")
        assert set(ds.block_shapes) == {(512, 512)} and ds.overviews(1) == [2]
        assert ds.descriptions == (("foreground",) if classes == 1 else
                                   ("background", "cell", "gland")) and ds.nodata is None
        assert ds.profile["compress"] == "deflate"
        data = ds.read()
        assert np.array_equal(data, probs.astype(data.dtype))
        # AVERAGE overviews: each overview pixel is the mean of its 2 x 2 block
        ov = ds.read(out_shape=(classes, ds.height // 2, ds.width // 2)).astype(np.float64)
        mean = probs.astype(np.float64).reshape(classes, 350, 2, 300, 2).mean(axis=(2, 4))
        assert np.abs(ov - mean).max() <= (1.0 if prob_dtype == "uint8" else 1e-3)
