"""Objects with global ids across shards: the instance map equals one labelling of the whole
mask (up to id permutation), an object over a four-shard corner is one object, and the table's
measurements equal whole-image measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage


def _threshold_model(path, class_names=None):
    """A 1x1 convolution whose output is foreground exactly where channel 0 is 255."""
    from segcore.config import InputContract, ModelSpec
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    spec = ModelSpec(arch="pointwise", in_channels=3, out_channels=1, kwargs={})
    model = build_model(spec).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0] = 40.0
        model.head.bias.fill_(-20.0)
    contract = InputContract(channels=3) if class_names is None else \
        InputContract(channels=3, class_names=class_names)
    save_checkpoint(model, str(path), contract, spec)
    return str(path)


def _blobs(h, w, seed=0):
    rng = np.random.default_rng(seed)
    m = ndimage.gaussian_filter(rng.random((h, w)), 3) > 0.515
    m[120:140, 120:140] = True  # over the corner of four 128 px shards
    m[60:62, 0:w] = True  # a line through a whole row of shards
    m[200, 127], m[201, 128] = True, True  # diagonal neighbours across a shard edge
    m[255, 255], m[256, 256] = True, True  # diagonal across a shard corner
    return m


def _segment(tmp_path, m, pixel_size=None):
    from segcore.pipeline import SegmentConfig, segment

    img = np.zeros((*m.shape, 3), np.uint8)
    img[..., 0] = np.where(m, 255, 0)
    img[..., 1] = 90
    kw = {"resolution": (1e4 / pixel_size, 1e4 / pixel_size), "resolutionunit": "CENTIMETER"} \
        if pixel_size else {}
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(64, 64), photometric="rgb", **kw)
    out = tmp_path / "out"
    rep = segment(SegmentConfig(src=str(tmp_path / "s.tif"), out=str(out),
                                model=_threshold_model(tmp_path / "m.safetensors"), tile=128,
                                skip_background=False), progress=False)
    root = zarr.open_group(str(out / "result.zarr"), mode="r")
    assert np.array_equal(root["labels/mask/0"][:], m.astype(np.uint8)), "model is not a threshold"
    return str(out), rep


def _table(path):
    import pyarrow.parquet as pq

    return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}


def _same_up_to_permutation(a, b):
    assert np.array_equal(a > 0, b > 0)
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_instances_equal_whole_image_labelling_and_table_measures(tmp_path, connectivity):
    from segcore.objects import extract_objects

    m = _blobs(300, 390)
    out, _ = _segment(tmp_path, m)
    summary = extract_objects(out, connectivity=connectivity)
    root = zarr.open_group(f"{out}/result.zarr", mode="r")
    inst = root["labels/instances/0"][:]
    assert root["labels/instances/0"].shards == root["labels/mask/0"].shards == (128, 128)
    st = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    ref, n = ndimage.label(m, structure=st)
    _same_up_to_permutation(inst, ref)
    assert summary["objects"] == n == inst.max()
    corner = inst[130, 130]
    assert corner > 0 and len(np.unique(inst[120:140, 120:140])) == 1
    assert len(np.unique(inst[60:62, :])) == 1  # the line crossing four shards is one object
    diagonal = inst[200, 127] == inst[201, 128] and inst[255, 255] == inst[256, 256]
    assert diagonal == (connectivity == 8)
    # ids are 1..n, numbered in order of first appearance shard by shard
    assert set(np.unique(inst)) == set(range(n + 1))

    t = _table(f"{out}/objects.parquet")
    assert len(t["id"]) == n and list(t["id"]) == list(range(1, n + 1))
    ids = inst.ravel()
    area = np.bincount(ids, minlength=n + 1)[1:]
    assert np.array_equal(t["area_px"], area)
    yy, xx = np.indices(inst.shape)
    cy = np.bincount(ids, weights=(yy + 0.5).ravel(), minlength=n + 1)[1:] / area
    cx = np.bincount(ids, weights=(xx + 0.5).ravel(), minlength=n + 1)[1:] / area
    assert np.allclose(t["centroid_y_px"], cy) and np.allclose(t["centroid_x_px"], cx)
    boxes = ndimage.find_objects(inst)
    assert list(t["bbox_y0"]) == [b[0].start for b in boxes]
    assert list(t["bbox_x1"]) == [b[1].stop for b in boxes]
    pad = np.pad(inst, 1)
    c = pad[1:-1, 1:-1]
    sides = sum((c != s).astype(int) for s in (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2],
                                                pad[1:-1, 2:]))
    perim = np.bincount(ids, weights=sides.ravel(), minlength=n + 1)[1:]
    assert np.array_equal(t["perimeter_px"], perim)
    prob = root["0"][0].astype(np.float64) / 255
    assert np.allclose(t["mean_probability"],
                       np.bincount(ids, weights=prob.ravel(), minlength=n + 1)[1:] / area)
    assert np.allclose(t["max_probability"],
                       ndimage.maximum(prob, ids.reshape(inst.shape), np.arange(1, n + 1)))
    assert (t["class"] == "foreground").all()
    assert summary["per_class"] == {"foreground": n}
    csv = (tmp_path / "out" / "objects.csv").read_text().splitlines()
    assert len(csv) == n + 1 and csv[0].startswith('"id","class"')
    # the instance pyramid is the nearest-neighbour pyramid of level 0
    lv1 = root["labels/instances/1"][:]
    assert np.array_equal(lv1, inst[::2, ::2])
    ome = root["labels"].attrs["ome"]["labels"]
    assert ome == ["mask", "instances"]


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_objects_on_lanes_write_the_same_bytes_as_one_lane(tmp_path, monkeypatch, kind):
    """Without Dask the shard tasks of every objects pass run on lanes: threads, or spawned
    processes from PROCESS_MIN_SHARDS shards on; the instances (every level, the ones the
    shard tasks write themselves and the ones the pyramid tasks fill), the table and the
    polygons are the same bytes as on one lane."""
    import shutil

    import segcore.objects as objects
    from segcore.objects import extract_objects

    out, _ = _segment(tmp_path, _blobs(300, 390, seed=5))
    other = str(tmp_path / "other")
    shutil.copytree(out, other)
    a = extract_objects(out, connectivity=8, lanes=1)
    monkeypatch.setattr(objects, "PROCESS_MIN_SHARDS", 1 if kind == "processes" else 10**9)
    from segcore import execute

    spawned, real = [], execute.process_lanes

    def counting(n):
        spawned.append(n)
        return real(n)

    monkeypatch.setattr(execute, "process_lanes", counting)
    b = extract_objects(other, connectivity=8, lanes=2)
    assert spawned == ([2] if kind == "processes" else [])
    assert a["objects"] == b["objects"] > 20
    for name in ("objects.parquet", "objects.csv", "polygons.parquet"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "other" / name).read_bytes()
    ra = zarr.open_group(f"{out}/result.zarr", mode="r")["labels/instances"]
    rb = zarr.open_group(f"{other}/result.zarr", mode="r")["labels/instances"]
    levels = sorted(ra.array_keys())
    assert len(levels) > 1 and levels == sorted(rb.array_keys())
    for lv in levels:
        assert np.array_equal(ra[lv][:], rb[lv][:])
    assert np.array_equal(ra["1"][:], ra["0"][:][::2, ::2])


def test_physical_units_and_refusals(tmp_path):
    from segcore.errors import IncompleteResultError
    from segcore.objects import extract_objects

    m = np.zeros((200, 200), bool)
    m[10:30, 10:50] = True  # 20 x 40 px
    out, rep = _segment(tmp_path, m, pixel_size=0.5)
    assert rep.scene["pixel_size"] == pytest.approx(0.5)
    extract_objects(out)
    t = _table(f"{out}/objects.parquet")
    assert len(t["id"]) == 1
    assert t["area_px"][0] == 800 and t["area"][0] == pytest.approx(200.0)  # um^2
    assert t["perimeter_px"][0] == 120 and t["perimeter"][0] == pytest.approx(60.0)
    assert t["centroid_x"][0] == pytest.approx(30 * 0.5) and t["centroid_y"][0] == \
        pytest.approx(20 * 0.5)
    (tmp_path / "out" / "COMPLETE").unlink()
    with pytest.raises(IncompleteResultError, match="COMPLETE"):
        extract_objects(out)


def test_cli_segment_objects_and_objects_verb(tmp_path):
    import json
    import subprocess
    import sys

    m = _blobs(260, 300, seed=1)
    img = np.zeros((*m.shape, 3), np.uint8)
    img[..., 0] = np.where(m, 255, 0)
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(64, 64), photometric="rgb")
    model = _threshold_model(tmp_path / "m.safetensors")
    seg = [sys.executable, "-m", "segcore", "segment", str(tmp_path / "s.tif"),
           str(tmp_path / "out"), "--model", model, "--tile", "128", "--workers", "0",
           "--no-skip-background", "--quiet", "--objects", "--connectivity", "8",
           "--export", "qupath", "--export", "cog"]
    r = subprocess.run(seg, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    n = ndimage.label(m, structure=np.ones((3, 3)))[1]
    assert rep["objects"]["objects"] == n and rep["objects"]["per_class"] == {"foreground": n}
    assert rep["objects"]["connectivity"] == 8 and "objects" in rep["timings"]
    assert (tmp_path / "out" / "objects.parquet").exists()
    assert rep["uris"]["export:qupath"].endswith("objects.qupath.geojson")
    assert rep["uris"]["export:cog"].endswith("mask.cog.tif")
    assert (tmp_path / "out" / "mask.cog.tif").exists()
    assert len(json.loads((tmp_path / "out" / "objects.qupath.geojson").read_text())[
        "features"]) == n
    # an object format without objects is refused at the boundary, before any output
    r = subprocess.run([*seg[:5], str(tmp_path / "o2"), *seg[6:12], "--export", "gpkg"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "objects" in r.stderr and not (tmp_path / "o2").exists()
    # the verb on the finished result, 4-connected this time
    r = subprocess.run([sys.executable, "-m", "segcore", "objects", str(tmp_path / "out"),
                        "--workers", "0", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["objects"] == ndimage.label(m)[1]
    # not a finished result: exit 2 and a message naming it
    r = subprocess.run([sys.executable, "-m", "segcore", "objects", str(tmp_path / "nowhere"),
                        "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_objects_on_s3_with_a_dask_cluster(tmp_path, s3_server):
    """Segment to s3:// (moto on loopback), then find objects with two Dask worker processes:
    tasks carry URIs and small id tables; the result equals the whole-image labelling."""
    from distributed import Client, LocalCluster

    from segcore.io.uri import read_bytes
    from segcore.objects import extract_objects
    from segcore.pipeline import SegmentConfig, segment

    m = _blobs(300, 390, seed=2)
    img = np.zeros((*m.shape, 3), np.uint8)
    img[..., 0] = np.where(m, 255, 0)
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(64, 64), photometric="rgb")
    out = s3_server.make_bucket() + "/run"
    segment(SegmentConfig(src=str(tmp_path / "s.tif"), out=out, tile=128,
                          model=_threshold_model(tmp_path / "m.safetensors"),
                          skip_background=False), progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        summary = extract_objects(out, connectivity=4, client=client)
    ref, n = ndimage.label(m)
    assert summary["objects"] == n
    from segcore.io.zarrstore import open_group

    inst = open_group(out + "/result.zarr")["labels/instances/0"][:]
    _same_up_to_permutation(inst, ref)
    import io

    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(read_bytes(out + "/objects.parquet")))
    assert t.num_rows == n and t.column("area_px").to_pylist() == list(
        np.bincount(inst.ravel())[1:])


def _geo_scene(path, m, pixel=0.5, origin=(500000.0, 4200000.0)):
    """RGB GeoTIFF in EPSG:32616 (UTM 16N), north-up, ``pixel`` m, channel 0 = the mask."""
    img = np.zeros((*m.shape, 3), np.uint8)
    img[..., 0] = np.where(m, 255, 0)
    keys = [1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32616, 3076, 0, 1, 9001]
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", metadata=None, extratags=[
        (33550, "d", 3, (pixel, pixel, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, *origin, 0.0), True),
        (34735, "H", len(keys), keys, True)])


def test_polygons_one_per_object_exact_and_exports(tmp_path):
    import json

    import geopandas as gpd
    import shapely

    from segcore.objects import extract_objects
    from segcore.objects.vectors import export_vectors
    from segcore.pipeline import SegmentConfig, segment

    m = _blobs(300, 390, seed=4)
    m[140:190, 10:70] = False
    m[150:180, 20:60] = True
    m[160:170, 30:40] = False  # an object with a hole
    _geo_scene(tmp_path / "g.tif", m)
    out = str(tmp_path / "out")
    segment(SegmentConfig(src=str(tmp_path / "g.tif"), out=out, tile=128, skip_background=False,
                          model=_threshold_model(tmp_path / "m.safetensors")), progress=False)
    summary = extract_objects(out, connectivity=4)
    n = ndimage.label(m)[1]
    assert summary["objects"] == n and any(f.endswith("polygons.parquet") for f in
                                           summary["files"])
    inst = zarr.open_group(f"{out}/result.zarr", mode="r")["labels/instances/0"][:]
    poly = gpd.read_parquet(f"{out}/polygons.parquet")
    assert len(poly) == n and poly.crs is None
    assert shapely.is_valid(poly.geometry.values).all()
    # pixel-exact: every polygon's area is its pixel count, and it covers exactly its pixels
    assert np.array_equal(poly.geometry.area.to_numpy(), poly["area_px"].to_numpy())
    corner = int(inst[130, 130])
    g = poly.geometry[poly["id"] == corner].iloc[0]
    assert g.geom_type == "Polygon" and g.area == (inst == corner).sum()  # one polygon, 4 shards
    holed = poly.geometry[poly["id"] == int(inst[150, 20])].iloc[0]
    assert len(holed.interiors) == 1 and holed.area == 30 * 40 - 10 * 10
    probe = shapely.points(np.array([[x + 0.5, y + 0.5] for y, x in zip(*np.nonzero(inst), strict=True)]))
    ids = inst[np.nonzero(inst)]
    inside = shapely.contains(poly.geometry.values[ids - 1], probe)
    assert inside.all()
    # written chunk by chunk (a row group per shard that starts objects), in id order, with
    # GeoParquet metadata for the whole file; the per-shard scratch parts are gone
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(f"{out}/polygons.parquet")
    assert meta.metadata.num_row_groups > 1
    assert pq.ParquetFile(f"{out}/objects.parquet").metadata.num_row_groups > 1
    assert list(poly["id"]) == list(range(1, n + 1))
    geo = json.loads(meta.schema_arrow.metadata[b"geo"])["columns"]["geometry"]
    assert geo["bbox"] == list(poly.total_bounds)
    assert set(geo["geometry_types"]) == set(poly.geom_type)
    assert not (tmp_path / "out" / "objects-parts").exists()

    # QuPath: detections with classification and measurements inside properties, pixel coords
    qp = json.loads(open(export_vectors(out, "qupath")).read())
    assert qp["type"] == "FeatureCollection" and len(qp["features"]) == n
    f0 = qp["features"][0]
    assert f0["properties"]["objectType"] == "detection"
    assert f0["properties"]["classification"]["name"] == "foreground"
    assert f0["properties"]["measurements"]["Area px"] == poly["area_px"].iloc[0]
    assert len(f0["id"]) == 36 and len({f["id"] for f in qp["features"]}) == n
    again = json.loads(open(export_vectors(out, "qupath", dst=str(tmp_path / "b.json"))).read())
    assert [f["id"] for f in again["features"]] == [f["id"] for f in qp["features"]]  # stable

    # GeoPackage and GeoParquet in the source CRS, areas in m^2
    for fmt in ("gpkg", "geoparquet"):
        path = export_vectors(out, fmt)
        frame = gpd.read_file(path) if fmt == "gpkg" else gpd.read_parquet(path)
        assert frame.crs.to_epsg() == 32616 and len(frame) == n
        assert np.allclose(frame.geometry.area.to_numpy(), poly["area_px"].to_numpy() * 0.25)
        row = poly[poly["id"] == corner].iloc[0]
        assert frame.geometry[frame["id"] == corner].iloc[0].bounds == pytest.approx((
            500000 + row.bbox_x0 * 0.5, 4200000 - row.bbox_y1 * 0.5,
            500000 + row.bbox_x1 * 0.5, 4200000 - row.bbox_y0 * 0.5))
    # RFC 7946 GeoJSON in WGS84: UTM 16N near 500 km east lies near 87 W
    gj = json.loads(open(export_vectors(out, "geojson")).read())
    lon, lat = np.array(shapely.geometry.shape(gj["features"][0]["geometry"]).centroid.coords)[0]
    assert -87.5 < lon < -86.5 and 37 < lat < 38.5 and "crs" not in gj
    # simplification (in the tasks for whole objects, after the union for the others) keeps
    # every polygon valid and takes vertices away
    extract_objects(out, connectivity=4, simplify=1.5)
    simple = gpd.read_parquet(f"{out}/polygons.parquet")
    assert list(simple["id"]) == list(poly["id"]) and shapely.is_valid(simple.geometry.values).all()
    before = shapely.get_num_coordinates(poly.geometry.values)
    after = shapely.get_num_coordinates(simple.geometry.values)
    assert (after <= before).all() and after.sum() < 0.8 * before.sum()


def test_vector_exports_refuse_what_they_cannot_do(tmp_path):
    import subprocess
    import sys

    from segcore.errors import InputError
    from segcore.objects import extract_objects
    from segcore.objects.vectors import export_vectors

    m = np.zeros((140, 140), bool)
    m[10:20, 10:20] = True
    out, _ = _segment(tmp_path, m)
    with pytest.raises(InputError, match="segcore objects"):
        export_vectors(out, "qupath")
    # the CLI runs the objects step itself when the result has none, and says so
    r = subprocess.run([sys.executable, "-m", "segcore", "export", out, "--to", "qupath"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("objects.qupath.geojson"), r.stderr
    assert "running the objects step first" in r.stderr
    qp = json.loads((tmp_path / "out" / "objects.qupath.geojson").read_text())
    assert len(qp["features"]) == 1
    extract_objects(out)
    with pytest.raises(InputError, match="no CRS"):
        export_vectors(out, "geojson")
    r = subprocess.run([sys.executable, "-m", "segcore", "export", out, "--to", "qupath"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "objects step" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "segcore", "export", out, "--to", "geojson"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CRS" in r.stderr and "Traceback" not in r.stderr


def test_flow_artifact_lists_object_counts():
    from flows.common import report_markdown

    md = report_markdown("s1", {"src": "a.tif", "objects": {"objects": 12, "per_class": {
        "nucleus": 10, "gland": 2}}}, "completed")
    assert "| objects | `12` |" in md and "| objects: nucleus | `10` |" in md
    assert "objects" not in report_markdown("s1", {"src": "a.tif"}, "completed")


def test_cog_of_the_mask_is_valid_with_crs_overviews_and_nodata(tmp_path):
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from segcore.export import export_cog
    from segcore.pipeline import SegmentConfig, segment

    rng = np.random.default_rng(5)
    m = ndimage.gaussian_filter(rng.random((1100, 1300)), 4) > 0.52
    _geo_scene(tmp_path / "g.tif", m)
    out = str(tmp_path / "out")
    segment(SegmentConfig(src=str(tmp_path / "g.tif"), out=out, tile=512, skip_background=False,
                          model=_threshold_model(tmp_path / "m.safetensors")), progress=False)
    dst = export_cog(out)
    valid, errors, _ = cog_validate(dst)
    assert valid, errors
    with rasterio.open(dst) as ds:
        assert ds.crs.to_epsg() == 32616 and ds.nodata == 255
        assert ds.transform.a == 0.5 and ds.transform.e == -0.5
        assert (ds.transform.c, ds.transform.f) == (500000.0, 4200000.0)
        assert ds.block_shapes == [(512, 512)] and len(ds.overviews(1)) >= 1
        assert np.array_equal(ds.read(1), m.astype(np.uint8))
        ov = ds.read(1, out_shape=(ds.height // 2, ds.width // 2))
        assert set(np.unique(ov)) <= {0, 1}  # nearest: classes stay classes


def test_pyramidal_ome_tiff_with_physical_size(tmp_path):
    from segcore.export import export_ome_tiff

    rng = np.random.default_rng(6)
    m = ndimage.gaussian_filter(rng.random((700, 900)), 3) > 0.52
    out, rep = _segment(tmp_path, m, pixel_size=0.25)
    root = zarr.open_group(f"{out}/result.zarr", mode="r")
    for what, grp in (("mask", root["labels/mask"]), ("probabilities", root)):
        dst = export_ome_tiff(out, what=what)
        with tifffile.TiffFile(dst) as tif:
            assert tif.is_ome and tif.is_bigtiff
            s = tif.series[0]
            n_levels = len([k for k in grp.array_keys() if k.isdigit()])
            assert len(s.levels) == n_levels >= 2
            assert np.array_equal(s.levels[0].asarray().reshape(grp["0"].shape), grp["0"][:])
            assert np.array_equal(s.levels[1].asarray().reshape(grp["1"].shape), grp["1"][:])
            assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 512
            assert 'PhysicalSizeX="0.25"' in tif.ome_metadata
            assert 'PhysicalSizeXUnit="µm"' in tif.ome_metadata


def test_object_f1_and_aji_on_hand_made_maps():
    from segcore.objects.metrics import aji, object_f1

    truth = np.zeros((10, 10), int)
    truth[0:4, 0:4] = 1  # 16 px
    truth[6:10, 6:10] = 2  # 16 px
    truth[0:2, 8:10] = 3  # 4 px, missed
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:3] = 5  # 12 px inside object 1: IoU 0.75
    pred[6:10, 6:8] = 7  # 8 px: IoU 0.5 with object 2 (not > 0.5)
    pred[8:10, 0:2] = 9  # 4 px false positive
    s = object_f1(truth, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 2) and s["f1"] == pytest.approx(2 / 6)
    # AJI: (12 + 8 + 0) / (16 + 16 + 4 + 4) = 0.5
    assert aji(truth, pred) == pytest.approx(20 / 40)
    assert aji(truth, truth) == 1.0 and object_f1(truth, truth)["f1"] == 1.0


def test_grow_keeps_touching_objects_apart_and_follows_probability():
    from segcore.objects.grow import grow

    seeds = np.zeros((7, 9), np.uint32)
    seeds[2:5, 1:3], seeds[2:5, 6:8] = 1, 2  # two seeds, a 3-px gap between them
    fg = np.full(seeds.shape, 200, np.uint8)
    fg[2:5, 5] = 240  # seed 2 grows into column 5, seed 1 into column 3 (220): in the next
    fg[2:5, 3] = 220  # step the contested column 4 goes to the surer neighbour, seed 2
    g = grow(seeds, fg, steps=2)
    assert set(np.unique(g)) == {0, 1, 2}
    assert (g[2:5, 3] == 1).all() and (g[2:5, 5] == 2).all()
    assert (g[2:5, 4] == 2).all()
    assert g[0, 1] == 1 and g[0, 0] == 0  # (0, 0) is 3 steps away
    # a threshold stops growth into unsure pixels; 0 steps change nothing
    fg2 = fg.copy()
    fg2[:, 3] = 10
    g2 = grow(seeds, fg2, steps=2, threshold=0.2)
    assert (g2[2:5, 3] == 0).all() and (g2[2:5, 4:6] == 2).all()
    assert np.array_equal(grow(seeds, fg, 0), seeds)
    # equal probabilities: the neighbour on the left wins over the one on the right
    tie = grow(seeds, np.full(seeds.shape, 100, np.uint8), steps=2)
    assert (tie[2:5, 4] == 1).all()
    assert (grow(np.where(seeds > 0, 3 - seeds, 0).astype(np.uint32),
                 np.full(seeds.shape, 100, np.uint8), steps=2)[2:5, 4] == 2).all()


def _soft_model(path, class_map=None):
    """A 1x1 convolution whose foreground probability rises smoothly with channel 0
    (0.5 at 127.5): probabilities worth growing over."""
    from segcore.config import InputContract, ModelSpec
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    spec = ModelSpec(arch="pointwise", in_channels=3, out_channels=1, kwargs={})
    model = build_model(spec).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0] = 12.0
        model.head.bias.fill_(-6.0)
    save_checkpoint(model, str(path), InputContract(channels=3), spec,
                    extra={"class_map": class_map} if class_map else None)
    return str(path)


def test_seeded_growth_across_shards_equals_whole_image_growth(tmp_path):
    """Objects of an instances-borders model are grown shard by shard with a border read from
    the neighbours, and equal the whole image's components grown at once; touching objects are
    never merged, and the table measures the grown objects."""
    from segcore.cli import main
    from segcore.objects import SEEDS, extract_objects
    from segcore.objects.grow import grow
    from segcore.pipeline import SegmentConfig, segment

    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.random((300, 390)), 4)
    ch0 = np.clip((field - field.mean()) / field.std() * 70 + 110, 0, 255).astype(np.uint8)
    img = np.zeros((300, 390, 3), np.uint8)
    img[..., 0], img[..., 1] = ch0, 90
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(64, 64), photometric="rgb")
    out = str(tmp_path / "out")
    segment(SegmentConfig(src=str(tmp_path / "s.tif"), out=out, tile=128, skip_background=False,
                          model=_soft_model(tmp_path / "m.safetensors", "instances-borders")),
            progress=False)
    root = zarr.open_group(f"{out}/result.zarr", mode="r")
    assert root.attrs["segcore"]["class_map"] == "instances-borders"
    mask, fg = root["labels/mask/0"][:], root["0"][0]
    seeds, n = ndimage.label(mask)
    assert n > 10 and root["labels/mask/0"].shards == (128, 128)

    for kwargs, steps, thr in (({"grow": 2}, 2, 0.0), ({"grow": 5, "grow_threshold": 0.3}, 5, 0.3)):
        summary = extract_objects(out, **kwargs)
        assert summary["grow"] == steps and summary["objects"] == n
        inst = zarr.open_group(f"{out}/result.zarr", mode="r")["labels/instances/0"][:]
        ref = grow(seeds.astype(np.uint32), fg, steps, thr)
        assert (ref > 0).sum() > (mask > 0).sum()  # growth did something
        _same_up_to_permutation(inst, ref)
        t = _table(f"{out}/objects.parquet")
        area = np.bincount(inst.ravel(), minlength=n + 1)[1:]
        assert np.array_equal(t["area_px"], area)
        assert SEEDS not in zarr.open_group(f"{out}/result.zarr", mode="r")
    # the CLI: no --grow gives the plain components back
    assert main(["objects", out, "--quiet"]) == 0
    inst = zarr.open_group(f"{out}/result.zarr", mode="r")["labels/instances/0"][:]
    _same_up_to_permutation(inst, seeds)


def test_foreground_class_names_alone_name_the_objects(tmp_path):
    """A model trained with ``--class-names nucleus`` (the foreground named, background
    implied): the result, the table's per-class count and QuPath's classification say
    'nucleus', not '1'; and train's config puts 'background' first itself."""
    from segcore.pipeline import SegmentConfig, segment
    from segcore.training.config import TrainConfig

    assert TrainConfig(data="d", out="o", steps=1, class_names="nucleus").class_names == \
        ("background", "nucleus")
    ckpt = _threshold_model(tmp_path / "nuc.safetensors", class_names=("nucleus",))
    m = _blobs(300, 390, seed=2)
    img = np.zeros((*m.shape, 3), np.uint8)
    img[..., 0] = np.where(m, 255, 0)
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(64, 64), photometric="rgb")
    out = tmp_path / "out"
    rep = segment(SegmentConfig(src=str(tmp_path / "s.tif"), out=str(out), model=str(ckpt),
                                tile=128, skip_background=False, objects=True,
                                exports=("qupath",)), progress=False)
    assert set(rep.objects["per_class"]) == {"nucleus"} and rep.objects["objects"] > 5
    feats = json.loads((out / "objects.qupath.geojson").read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in feats} == {"nucleus"}
    assert set(_table(out / "objects.parquet")["class"]) == {"nucleus"}
