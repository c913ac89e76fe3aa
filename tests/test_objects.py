"""Objects with global ids across shards: the instance map equals one labelling of the whole
mask (up to id permutation), an object over a four-shard corner is one object, and the table's
measurements equal whole-image measurements."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage


def _threshold_model(path):
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
    save_checkpoint(model, str(path), InputContract(channels=3), spec)
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
    assert (t["max_probability"] <= 1).all() and (t["class"] == "foreground").all()
    assert summary["per_class"] == {"foreground": n}
    csv = (tmp_path / "out" / "objects.csv").read_text().splitlines()
    assert len(csv) == n + 1 and csv[0].startswith('"id","class"')
    # the instance pyramid is the nearest-neighbour pyramid of level 0
    lv1 = root["labels/instances/1"][:]
    assert np.array_equal(lv1, inst[::2, ::2])
    ome = root["labels"].attrs["ome"]["labels"]
    assert ome == ["mask", "instances"]


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
           "--no-skip-background", "--quiet", "--objects", "--connectivity", "8"]
    r = subprocess.run(seg, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    n = ndimage.label(m, structure=np.ones((3, 3)))[1]
    assert rep["objects"]["objects"] == n and rep["objects"]["per_class"] == {"foreground": n}
    assert rep["objects"]["connectivity"] == 8 and "objects" in rep["timings"]
    assert (tmp_path / "out" / "objects.parquet").exists()
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
