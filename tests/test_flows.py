"""Prefect flows under prefect_test_harness: one scene (local, s3://), a batch, resume.

Real components throughout: a Dask LocalCluster (threads, for speed), the moto S3 server on
loopback, a temporary Prefect server. Scenes are small random RGB TIFFs, the model a U-Net of
depth 2 and width 4 saved as a real checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("prefect")

from flows.common import artifact_key, is_transient  # noqa: E402
from flows.segment import SceneOptions, segment_batch, segment_scene  # noqa: E402
from segcore.cluster import ClusterConfig  # noqa: E402
from segcore.config import InputContract, ModelSpec  # noqa: E402
from segcore.errors import ConfigError, InputError, StorageError  # noqa: E402
from segcore.io.uri import exists, get_fs, join, read_bytes  # noqa: E402
from segcore.models import build_model  # noqa: E402
from segcore.models.checkpoint import save_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

CLUSTER = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
OPTIONS = SceneOptions(tile=128, shards_per_task=1, skip_background=False, pyramid=False,
                       device="cpu", amp="none")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    torch.manual_seed(0)
    m = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                              kwargs={"depth": 2, "width": 4}))
    uri = str(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    save_checkpoint(m.eval(), uri, InputContract(channels=3))
    return uri


def write_scene(path, seed: int, h: int = 150, w: int = 130) -> str:
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img)
    return str(path)


def read_mask(out: str) -> np.ndarray:
    from segcore.io.zarrstore import open_group

    return np.asarray(open_group(join(out, "result.zarr"), mode="r")["labels/mask/0"][:])


def artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_retry_only_transient_errors():
    assert is_transient(StorageError("s3 503"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(InputError("bad file"))
    assert not is_transient(ConfigError("bad halo"))
    assert not is_transient(RuntimeError("bug"))


def test_segment_scene_local_then_skips(harness, model_uri, tmp_path):
    src = write_scene(tmp_path / "in" / "slide-A.tif", 1)
    out = str(tmp_path / "out")
    r = segment_scene(src, out, model_uri, OPTIONS, CLUSTER)
    assert r["status"] == "segmented"
    scene_out = join(out, "slide-A")
    assert r["out"] == scene_out and exists(join(scene_out, "COMPLETE"))
    assert r["tiles_run"] == r["tiles_total"] > 1
    assert read_mask(scene_out).shape == (150, 130)
    md = read_bytes(join(scene_out, "report.md")).decode()
    assert "| tiles_run |" in md and scene_out in md
    arts = artifacts(artifact_key("slide-A"))
    assert arts and "tiles_total" in arts[0].data and arts[0].type == "markdown"
    again = segment_scene(src, out, model_uri, OPTIONS, CLUSTER)
    assert again["status"] == "skipped" and again["tiles_total"] == r["tiles_total"]


def test_segment_scene_takes_a_shipped_model_by_name(harness, tmp_path):
    """The flow passes the name through (each worker resolves it in its own install); the
    report names the model and its digest."""
    from segcore.models.pretrained import shipped

    src = write_scene(tmp_path / "in" / "he.tif", 3, 96, 96)
    opts = OPTIONS.model_copy(update={"tile": 256})  # the model's field is 107 px
    r = segment_scene(src, str(tmp_path / "out"), "nuclei-he", opts, CLUSTER)
    assert r["status"] == "segmented" and r["model"] == "nuclei-he"
    assert "nuclei-he" in shipped() and r["model_sha256"]
    with pytest.raises(Exception, match="shipped: .*nuclei-he"):
        segment_scene(src, str(tmp_path / "out2"), "nuclei-hx", opts, CLUSTER)


def test_flow_parameters_are_validated(harness, model_uri, tmp_path):
    with pytest.raises(Exception, match="tile"):
        segment_scene(str(tmp_path / "x.tif"), str(tmp_path), model_uri, {"tile": 3})
    with pytest.raises(InputError, match="missing.tif"):
        segment_scene(str(tmp_path / "missing.tif"), str(tmp_path / "o"), model_uri, OPTIONS,
                      CLUSTER)


def test_recovery_runs_are_bounded(harness, model_uri, tmp_path):
    """The recovery automation re-runs a crashed scene with recovery + 1; past MAX_RECOVERIES
    the flow fails at once (Failed, not another crash), naming the scene, writing nothing."""
    from flows.segment import MAX_RECOVERIES

    src = write_scene(tmp_path / "s.tif", 0)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"{MAX_RECOVERIES + 1} runs of this scene crashed"):
        segment_scene(src, str(out), model_uri, OPTIONS, CLUSTER,
                      recovery=MAX_RECOVERIES + 1)
    assert not out.exists()
    r = segment_scene(src, str(out), model_uri, OPTIONS, CLUSTER, recovery=MAX_RECOVERIES)
    assert r["status"] == "segmented"


def test_resume_recomputes_only_missing_shards(harness, model_uri, tmp_path, monkeypatch):
    src = write_scene(tmp_path / "in" / "scene.tif", 2, h=200, w=190)
    whole = segment_scene(src, str(tmp_path / "whole"), model_uri, OPTIONS, CLUSTER)
    n = whole["tiles_total"]
    assert n >= 4
    k = 2
    monkeypatch.setenv("SEGCORE_FAULT_SHARD", str(k))
    with pytest.raises(RuntimeError, match="injected fault"):
        segment_scene(src, str(tmp_path / "out"), model_uri, OPTIONS, CLUSTER)
    scene_out = join(str(tmp_path / "out"), "scene")
    assert not exists(join(scene_out, "COMPLETE"))
    monkeypatch.delenv("SEGCORE_FAULT_SHARD")
    r = segment_scene(src, str(tmp_path / "out"), model_uri, OPTIONS, CLUSTER)
    assert r["status"] == "resumed"
    assert r["tiles_run"] == 1 and r["tiles_resumed"] == n - 1  # only shard k recomputed
    np.testing.assert_array_equal(read_mask(scene_out), read_mask(whole["out"]))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_segment_batch_writes_every_scene_then_skips(harness, model_uri, tmp_path, where,
                                                      request, monkeypatch):
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        monkeypatch.setenv("SEGCORE_S3_ENDPOINT_URL", s3.endpoint_url)
        base = s3.make_bucket()
        fs, _ = get_fs(base)
        for i in range(3):
            fs.put(write_scene(tmp_path / "in" / f"s{i}.tif", 10 + i), f"{base}/in/s{i}.tif")
        fs.put(model_uri, f"{base}/models/tiny.safetensors")
        model = f"{base}/models/tiny.safetensors"
        prefix, out = f"{base}/in", f"{base}/out"
    else:
        for i in range(3):
            write_scene(tmp_path / "in" / f"s{i}.tif", 10 + i)
        (tmp_path / "in" / "notes.txt").write_text("not a scene")
        prefix, out, model = str(tmp_path / "in"), str(tmp_path / "out"), model_uri
    first = segment_batch(prefix, out, model, OPTIONS, CLUSTER, {"max_parallel_scenes": 2})
    assert (first["scenes"], first["segmented"], first["skipped"]) == (3, 3, 0)
    for i in range(3):
        assert exists(join(out, f"s{i}", "COMPLETE"))
        assert exists(join(out, f"s{i}", "report.json"))
        assert read_mask(join(out, f"s{i}")).shape == (150, 130)
    second = segment_batch(prefix, out, model, OPTIONS, CLUSTER)
    assert (second["scenes"], second["segmented"], second["skipped"]) == (3, 0, 3)
    assert second["tiles_run"] == 0


def test_ingest_then_segment_matches_direct(harness, model_uri, tmp_path):
    from flows.ingest import IngestOptions, ingest_scene, is_ingested

    src = write_scene(tmp_path / "in" / "big.tif", 5)
    out = str(tmp_path / "out")
    ing = IngestOptions(chunk=64, shard=128)
    dst = ingest_scene(src, out, ing, CLUSTER)
    assert dst == join(out, "big", "image.zarr") and is_ingested(dst)
    r = segment_scene(src, out, model_uri, OPTIONS, CLUSTER, ingest=ing)
    assert r["status"] == "segmented" and r["src"] == dst
    direct = segment_scene(src, str(tmp_path / "direct"), model_uri, OPTIONS, CLUSTER)
    np.testing.assert_array_equal(read_mask(join(out, "big")), read_mask(direct["out"]))


def test_train_model_flow_writes_checkpoint_and_artifact(harness, tmp_path):
    from PIL import Image

    from flows.train import train_model
    from segcore.models.checkpoint import load_checkpoint
    from segcore.training import TrainConfig

    rng = np.random.default_rng(3)
    for i in range(2):
        img = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
        (tmp_path / "d" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "d" / "images" / f"{i}.png")
        Image.fromarray(((img[..., 0] > 128) * 255).astype(np.uint8)).save(
            tmp_path / "d" / "masks" / f"{i}.png")
    cfg = TrainConfig(data=str(tmp_path / "d"), arch="unet",
                      model_kwargs={"depth": 2, "width": 4}, patch=32, batch=2, steps=2,
                      warmup=0, bf16=False, device="cpu", out=str(tmp_path / "m.safetensors"))
    res = train_model(cfg)
    assert res["steps"] == 2 and res["checkpoint"] == cfg.out
    _, ckpt = load_checkpoint(cfg.out)
    assert ckpt.spec.arch == "unet" and ckpt.spec.kwargs["width"] == 4
    assert artifacts("segcore-train")


def test_segment_scene_on_s3_with_aws_credentials_block(harness, model_uri, tmp_path, s3_server,
                                                         monkeypatch):
    from prefect_aws import AwsCredentials

    from flows.common import AWS_ENV

    base = s3_server.make_bucket()
    fs, _ = get_fs(base)
    fs.put(write_scene(tmp_path / "S2_tile.tif", 7), f"{base}/in/S2_tile.tif")
    fs.put(model_uri, f"{base}/models/tiny.safetensors")
    AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing",
                   region_name="us-east-1",
                   aws_client_parameters={"endpoint_url": s3_server.endpoint_url}).save(
        "moto-test", overwrite=True)
    for k in AWS_ENV:  # only the block may tell the flow where S3 is
        monkeypatch.delenv(k, raising=False)
    r = segment_scene(f"{base}/in/S2_tile.tif", f"{base}/out", f"{base}/models/tiny.safetensors",
                      OPTIONS, CLUSTER, aws_block="moto-test")
    assert r["status"] == "segmented" and r["out"] == f"{base}/out/S2_tile"
    for name in ("COMPLETE", "report.json", "report.md", "preview.png",
                 "result.zarr/labels/mask/zarr.json"):
        assert exists(f"{base}/out/S2_tile/{name}"), name
    assert read_mask(r["out"]).shape == (150, 130)


def test_recovery_automation_parameters_render():
    """The re-run action's parameters, rendered by the Prefect server's own template code
    (upgrade, validate, render) for a first crash and a crashed recovery run: the scene, its
    event id and recovery + 1, typed. (A template that does not render makes the action fail
    on the server, silently for the user: it happened.)"""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.utilities.user_templates import (
        render_user_template_sync,
        validate_user_template,
    )

    from flows.automations import UNRESPONSIVE, rerun_crashed, unresponsive_runs

    action = rerun_crashed(["00000000-0000-0000-0000-000000000001"]).actions[0]
    assert action.source == "inferred"
    params = dict(action.parameters)
    RunDeployment._upgrade_v1_templates(params)
    for before, after in (({}, 1), ({"recovery": 1}, 2)):
        ctx = {"flow_run": {"parameters": {"src": "s3://b/in/a.tif", "event_id": "e-1",
                                           **before}}}
        got = {}
        for key, value in params.items():
            template = value["value"]["template"]
            validate_user_template(template)
            got[key] = json.loads(render_user_template_sync(template, ctx))
        assert got == {"src": "s3://b/in/a.tif", "event_id": "e-1", "recovery": after}
    crash = unresponsive_runs(90)
    assert crash.name == UNRESPONSIVE and crash.trigger.within.total_seconds() == 90
