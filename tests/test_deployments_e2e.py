"""End to end, with real servers on loopback: a Prefect server, the moto S3 server, the
process work pool, ``prefect deploy --all`` from the real prefect.yaml, a worker, a scene
uploaded to the bucket, ``segcore watch`` emitting ``segcore.scene.arrived``, and the triggered
``segment_scene`` run completing with mask, report and artifact. Every wait is bounded; every
process started here is stopped in teardown (by its own process group id).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from segcore.config import InputContract, ModelSpec
from segcore.io.uri import exists, get_fs, read_bytes
from segcore.models import build_model
from segcore.models.checkpoint import save_checkpoint
from tests.prefectstack import free_port, stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")


def _run(args: list[str], env: dict, timeout: float = 120) -> str:
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_COLORS": "false",
        "COLUMNS": "200",
    })
    log = tmp_path / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--no-scheduler", "--analytics-off"],
            env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "the Prefect server to be healthy", log=log)
        yield env
    finally:
        stop(proc)


def _scene(path: Path) -> None:
    """A bright background with two dark blobs (tissue-like foreground)."""
    yy, xx = np.mgrid[:256, :224]
    img = np.full((256, 224, 3), 235, np.uint8)
    for cy, cx, r in ((80, 70, 40), (170, 150, 50)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (120, 60, 140)
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, img)


def test_event_triggered_deployment_segments_an_arrived_scene(prefect_server, s3_server,
                                                               tmp_path, monkeypatch):
    t0 = time.monotonic()

    def stage(what: str) -> None:  # printed with the captured output when the test fails
        print(f"[e2e {time.monotonic() - t0:6.1f} s] {what}", flush=True)

    env = dict(prefect_server)
    base = s3_server.make_bucket()
    env.update({
        "SEGCORE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "SEGCORE_INBOX": f"{base}/inbox",
        "SEGCORE_OUT": f"{base}/out",
        "SEGCORE_MODEL": f"{base}/models/tiny.safetensors",
    })
    for k in ("SEGCORE_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, env[k])  # for our own uploads and checks below

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                                  kwargs={"depth": 2, "width": 4}))
    save_checkpoint(model.eval(), env["SEGCORE_MODEL"], InputContract(channels=3))

    _run([PREFECT, "work-pool", "create", "segcore-process", "--type", "process",
          "--base-job-template", str(ROOT / "deployments" / "process-pool.json")], env)
    stage("work pool created")
    wlog = tmp_path / "worker.log"
    with open(wlog, "wb") as fh:  # starts while we deploy; polls the pool every 2 s
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "segcore-process", "--limit", "1"],
            cwd=ROOT, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=fh,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = _run([PREFECT, "--no-prompt", "deploy", "--all"], env, timeout=300)
        stage("deployed")
        assert "segment-scene/on-arrival" in out, out
        fs, _ = get_fs(env["SEGCORE_INBOX"])
        _scene(tmp_path / "arrival-1.tif")
        scene_uri = f"{env['SEGCORE_INBOX']}/arrival-1.tif"
        fs.put(str(tmp_path / "arrival-1.tif"), scene_uri)
        state = f"{base}/state/watch.json"
        watch = [str(BIN / "python"), "-m", "segcore", "watch", env["SEGCORE_INBOX"], "--once",
                 "--state", state]
        stage("scene uploaded")
        lines = _run(watch, env).splitlines()
        stage("arrival announced")
        assert json.loads(lines[0]) == {"event": "segcore.scene.arrived", "uri": scene_uri,
                                        "scene_id": "arrival-1"}
        assert json.loads(lines[-1])["announced"] == 1
        assert json.loads(_run(watch, env).splitlines()[-1])["announced"] == 0  # once only

        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            DeploymentFilter,
            DeploymentFilterName,
        )

        with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
            def finished_run():
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["on-arrival"])))
                done = [r for r in runs if r.state and r.state.is_final()]
                return done[0] if done else None

            run = wait_for(finished_run, 300, "the triggered flow run to finish", interval=1,
                        log=wlog)
            stage(f"flow run finished: {run.state.type.value}, "
                  f"{(run.end_time - run.start_time).total_seconds():.1f} s running")
            assert run.state.is_completed(), f"{run.state}\n{wlog.read_text()[-4000:]}"
            assert run.parameters["src"] == scene_uri
            assert run.parameters["out"] == env["SEGCORE_OUT"]
            assert len(run.parameters["event_id"]) == 36  # "{{ event.id | string }}"
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            assert any(a.key == "segcore-arrival-1" and scene_uri in a.data for a in arts)
            nightly = client.read_deployment_by_name("segment-batch/nightly")
            assert nightly.schedules[0].schedule.cron == "0 2 * * *"
            assert nightly.parameters["prefix"] == env["SEGCORE_INBOX"]

        res = f"{env['SEGCORE_OUT']}/arrival-1"
        for name in ("COMPLETE", "report.json", "report.md", "preview.png",
                     "result.zarr/labels/mask/zarr.json"):
            assert exists(f"{res}/{name}"), name
        report = json.loads(read_bytes(f"{res}/report.json"))
        assert report["src"] == scene_uri and report["tiles_total"] >= 1
        # prefect.yaml's options: objects and the exports, listed in the report
        assert report["objects"]["objects"] >= 0
        for fmt, name in (("qupath", "objects.qupath.geojson"), ("cog", "mask.cog.tif")):
            assert report["uris"][f"export:{fmt}"].endswith(name) and exists(f"{res}/{name}")
        # exactly one run: the event fired once and the flow's own events do not retrigger it
        assert len(client_runs(env)) == 1
    finally:
        stop(worker)


def client_runs(env: dict) -> list:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        return client.read_flow_runs()
