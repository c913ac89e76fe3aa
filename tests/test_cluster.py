"""segcore.cluster: sizing, config validation, and GPU pinning with fake GPU workers on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from segcore.cluster import (
    ClusterConfig,
    gpu_worker_specs,
    local_sizing,
    open_client,
    rotated_devices,
)


def test_local_sizing_never_exceeds_cpus():
    assert local_sizing(ClusterConfig(), cpus=2) == (1, 2)
    assert local_sizing(ClusterConfig(), cpus=16) == (8, 2)
    assert local_sizing(ClusterConfig(), cpus=1) == (1, 1)
    assert local_sizing(ClusterConfig(n_workers=3, threads_per_worker=1), cpus=2) == (3, 1)


def test_config_refuses_inconsistent_modes():
    with pytest.raises(ValidationError, match="address"):
        ClusterConfig(mode="address")
    with pytest.raises(ValidationError, match="fake_gpus"):
        ClusterConfig(mode="local", fake_gpus=2)
    with pytest.raises(ValidationError, match="extra"):
        ClusterConfig(mode="local", n_worker=2)  # typo refused
    assert ClusterConfig().inference_resources() is None
    # a task holds a GPU's share 1/lanes: lanes tasks side by side on one GPU worker
    assert ClusterConfig(mode="gpu", fake_gpus=1, gpu_lanes=1).inference_resources() == \
        {"GPU": 1}
    assert ClusterConfig(mode="gpu", fake_gpus=1, gpu_lanes=2).inference_resources() == \
        {"GPU": 0.5}
    # auto: the host's cores per GPU (at most 4); with an address, what hosts.sh starts (4)
    auto = ClusterConfig(mode="gpu", fake_gpus=2)
    assert [auto.lanes_per_gpu(cpus=c) for c in (1, 2, 4, 16, 64)] == [1, 1, 2, 4, 4]
    assert gpu_worker_specs(ClusterConfig(mode="gpu", fake_gpus=2, gpu_lanes=3)
                            )["gpu-0"]["options"]["nthreads"] == 3
    assert ClusterConfig(mode="address", address="tcp://h:1",
                         gpu_resources=True).inference_resources() == {"GPU": 0.25}
    with pytest.raises(ValidationError, match="gpu_lanes"):
        ClusterConfig(mode="gpu", fake_gpus=1, gpu_lanes=0)


def test_rotation_matches_dask_cuda():
    ids = ["0", "1", "2", "3"]
    assert [rotated_devices(ids, i) for i in range(4)] == ["0,1,2,3", "1,2,3,0", "2,3,0,1",
                                                           "3,0,1,2"]
    specs = gpu_worker_specs(ClusterConfig(mode="gpu", gpus=("2", "5"), cpu_workers=1))
    assert {k: v["options"].get("resources") for k, v in specs.items()} == {
        "gpu-2": {"GPU": 1}, "gpu-5": {"GPU": 1}, "cpu-0": None}
    assert specs["gpu-5"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == "5,2"


def _infer_like(i: int) -> dict:
    """Stands in for an inference task: where it ran, which device it saw, and when."""
    from distributed import get_worker

    t0 = time.monotonic()
    time.sleep(0.15)
    return {"i": i, "worker": get_worker().name, "pid": os.getpid(),
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "t0": t0, "t1": time.monotonic()}


def max_overlap(rs: list[dict]) -> int:
    events = sorted([(r["t0"], 1) for r in rs] + [(r["t1"], -1) for r in rs],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_gpu_lanes_run_that_many_tasks_side_by_side_per_gpu():
    """gpu_lanes=2: each inference task holds GPU=0.5, so a GPU worker (a thread per lane, 4
    threads here so only the resource can limit them) runs two at once, never three."""
    cfg = ClusterConfig(mode="gpu", fake_gpus=1, gpu_lanes=2, threads_per_worker=4)
    with open_client(cfg) as (client, resources):
        assert resources == {"GPU": 0.5}
        rows = client.gather(client.map(_infer_like, range(8), resources=resources,
                                        pure=False))
    assert {r["worker"] for r in rows} == {"gpu-0"}
    assert max_overlap(rows) == 2


def test_fake_gpu_workers_pin_devices_and_serialise_inference():
    # 2 fake GPUs with 2 threads each (so only the GPU resource can serialise them) + 1 CPU worker
    cfg = ClusterConfig(mode="gpu", fake_gpus=2, cpu_workers=1, threads_per_worker=2,
                        gpu_lanes=1)
    with open_client(cfg) as (client, resources):
        assert resources == {"GPU": 1}
        envs = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        names = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
        assert set(names) == {"gpu-0", "gpu-1", "cpu-0"}
        assert sorted(envs.values(), key=str) == sorted(["0,1", "1,0", ""], key=str)

        futs = client.map(_infer_like, range(12), resources=resources, pure=False)
        rows = client.gather(futs)
        # also tasks without resources may go anywhere: the CPU worker is alive and usable
        anywhere = client.gather(client.map(_infer_like, range(6), pure=False,
                                            workers=["cpu-0"]))

        # "at most one per GPU" needs concurrency to be possible at all: without resources the
        # same tasks overlap on a 2-thread worker (control for the check below)
        ctl = client.gather(client.map(_infer_like, range(4), pure=False, workers=["gpu-0"]))

    assert {r["worker"] for r in rows} <= {"gpu-0", "gpu-1"}
    assert {r["worker"] for r in rows} == {"gpu-0", "gpu-1"}  # both GPUs used
    first = {r["worker"]: r["cvd"].split(",")[0] for r in rows}
    assert first == {"gpu-0": "0", "gpu-1": "1"}  # each worker sees a distinct first device
    assert all(r["cvd"] == "" for r in anywhere)

    for w in ("gpu-0", "gpu-1"):
        assert max_overlap([r for r in rows if r["worker"] == w]) == 1
    assert max_overlap(ctl) == 2


def test_address_mode_reports_unreachable_scheduler():
    from segcore.errors import StorageError

    with pytest.raises(StorageError, match="127.0.0.1:9"):
        with open_client(ClusterConfig(mode="address", address="tcp://127.0.0.1:9",
                                                  connect_timeout=2)):
            pass


def test_segcore_does_not_import_prefect():
    code = ("import sys, segcore, segcore.cluster, segcore.watch, segcore.cli.watch; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('prefect', 'prefect_dask', 'flows')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
