"""segcore across hosts: six network namespaces on one machine (tests/multihost.py), each with
its own address, directory and TMPDIR, the other hosts' directories hidden from it.

storage (moto S3) / db (PostgreSQL + Prefect server) / sched (dask scheduler) / gpu1, gpu2
(``dask worker ADDRESS --resources GPU=1``) / ctl (flows run here). The flows run unchanged with
``ClusterConfig(mode="address")``; scenes and checkpoint reach the workers as s3 URIs only.
Needs root (CI runs ``make test`` as root); skipped with the reason elsewhere.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from tests import multihost as mh

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(300)]

_reason = mh.unavailable_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

SCENE = 256  # px square: 9 shards per scene (tile 128 with its halo)


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
    # scenes and model are made and uploaded by the same ctl process (one interpreter start)
    return mh.ctl(bed, "batch", bed.bucket, mh.scheduler_address(), str(SCENE), timeout=200)


def test_bed_starts_in_bounded_time(bed, batch):
    assert bed.startup_s < 150  # six hosts, PostgreSQL initdb, Prefect's migrations on it
    assert batch["span"]["tasks_first_start_to_last_stop"] > 0
    print(f"bed up in {bed.startup_s:.1f} s; remote batch {batch['remote_s']:.1f} s; "
          f"timings {batch.get('timings')}; tasks {batch['span']}")


def test_hosts_are_separate(bed, batch):
    """Each host has only its own address; a host cannot see another host's directory."""
    out = bed.run("gpu1", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"{mh.ip('gpu1')}/24" in out
    assert bed.run("gpu1", ["ls", "-A", str(bed.dir("ctl"))]).stdout.strip() == ""
    assert bed.run("ctl", ["ls", str(bed.dir("ctl") / "in")]).stdout.split() == [
        "s0.tif", "s1.tif", "s2.tif"]
    # nothing listens on the machine's own loopback for the bed: the scheduler is not on 127.0.0.1
    r = bed.run("ctl", [str(mh.VENV_BIN / "python"), "-c",
                        f"import socket; socket.create_connection(('127.0.0.1', {mh.SCHED_PORT}),"
                        " 1)"], check=False)
    assert r.returncode != 0


def test_segment_batch_across_hosts_matches_local(bed, batch):
    first, second = batch["first"], batch["second"]
    assert (first["scenes"], first["segmented"], first["skipped"]) == (3, 3, 0)
    assert first["tiles_run"] == batch["local"]["tiles_run"] > 3
    assert (second["segmented"], second["skipped"], second["tiles_run"]) == (0, 3, 0)
    assert batch["identical"] == {"s0": True, "s1": True, "s2": True}
    # both GPU hosts did work, and only the two of them are in the cluster
    workers = batch["workers"]
    hosts = sorted(a.split("//")[1].rsplit(":", 1)[0] for a in workers)
    assert hosts == [mh.ip("gpu1"), mh.ip("gpu2")]
    assert all(w["resources"] == {"GPU": 1} for w in workers.values())
    busy = {a.split("//")[1].rsplit(":", 1)[0] for a, n in batch["tasks_per_worker"].items()
            if n > 0}
    assert busy == {mh.ip("gpu1"), mh.ip("gpu2")}, batch["tasks_per_worker"]


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
    assert batch["first"]["segmented"] == 3
    # and the results exist only in the bucket (plus ctl's own local reference run)
    assert bed.run("gpu1", ["find", str(bed.dir("gpu1")), "-name", "*.zarr"]).stdout == ""


def test_prefect_server_runs_on_postgresql(bed, batch):
    rows = mh.psql(bed, "select f.name, r.state_type, count(*) from flow_run r "
                        "join flow f on f.id = r.flow_id group by 1, 2 order by 1, 2")
    runs = {(name, state): int(n) for name, state, n in rows}
    assert runs.get(("segment-batch", "COMPLETED"), 0) >= 3, runs
    tasks = mh.psql(bed, "select count(*) from task_run where name like 'infer%'")
    assert int(tasks[0][0]) >= 3
    # nothing of Prefect's database is on the db host's disk as SQLite
    assert bed.run("db", ["find", str(bed.dir("db")), "-name", "*.db"]).stdout == ""


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
    assert (r["segmented"], r["tiles_run"]) == (3, batch["local"]["tiles_run"])
    assert r["identical"] == {"s0": True, "s1": True, "s2": True}
    sched_log = (bed.dir("sched") / "scheduler.log").read_text(errors="replace")
    assert "Remove worker" in sched_log and mh.ip("gpu2") in sched_log
