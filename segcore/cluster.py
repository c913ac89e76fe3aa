"""Dask workers for segcore: a local cluster sized to the machine, an existing scheduler, or one
worker per GPU, each pinned with ``CUDA_VISIBLE_DEVICES`` and advertising ``{"GPU": 1}``.

Inference tasks are submitted with the resources :func:`open_client` returns, so in GPU mode they
run only on GPU workers, at most ``gpu_lanes`` at a time per GPU (each task holds GPU=1/lanes:
lanes share the worker's one model, and its lock queues their forwards, so the device runs one
batch at a time while the other lanes read, decode, write); reading, ingest and pyramids need no
resource and run anywhere. ``fake_gpus=N`` builds the same GPU worker specs on a CPU-only machine
(that is how the pinning is tested). This module is a pure library: no Prefect.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, model_validator

from segcore.config import Frozen
from segcore.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

GPU_RESOURCES: dict[str, float] = {"GPU": 1}


class ClusterConfig(Frozen):
    """Where the Dask work runs.

    - ``local``: a LocalCluster of worker processes sized to the machine (``n_workers`` x
      ``threads_per_worker`` <= CPU count unless given), ``processes=False`` for threads only.
    - ``address``: connect to a running scheduler (``tcp://host:8786``), e.g. one started by
      dask-jobqueue or dask-kubernetes; ``gpu_resources=True`` if its workers advertise GPU=1.
    - ``gpu``: one worker per GPU (``gpus`` ids, else ``CUDA_VISIBLE_DEVICES``, else all
      torch sees), each with CUDA_VISIBLE_DEVICES rotated to start at its GPU (as dask-cuda),
      ``resources={"GPU": 1}``, ``gpu_lanes`` threads; plus ``cpu_workers`` resource-free
      workers.
      ``fake_gpus=N`` builds N such workers on CPU (tests, dry runs).
    """

    mode: Literal["local", "address", "gpu"] = "local"
    address: str | None = Field(None, description="scheduler address for mode='address'")
    n_workers: int | None = Field(None, ge=1, le=512)
    threads_per_worker: int | None = Field(None, ge=1, le=256)
    processes: bool = True
    memory_limit: str | float | int | None = "auto"
    gpus: tuple[str, ...] | None = Field(None, description="GPU ids for mode='gpu'")
    fake_gpus: int = Field(0, ge=0, le=64)
    cpu_workers: int = Field(0, ge=0, le=512, description="extra resource-free workers, gpu mode")
    gpu_resources: bool = Field(False, description="mode='address': workers advertise GPU=1")
    gpu_lanes: int | Literal["auto"] = Field(
        "auto", description="shard tasks side by side per GPU worker (GPU=1/lanes each): "
        "'auto' = the host's cores per GPU in gpu mode (at most 4), 4 with an address (what "
        "deployments/hosts.sh gpu-worker starts threads for)")
    use_dask_cuda: bool = Field(True, description="gpu mode: use dask_cuda if importable")
    connect_timeout: float = Field(20.0, gt=0, description="seconds, mode='address'")
    dashboard: bool = False

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.mode == "address" and not self.address:
            raise ValueError("mode='address' needs address='tcp://HOST:PORT' of a running scheduler")
        if self.mode != "address" and self.address:
            raise ValueError(f"address={self.address!r} is only used with mode='address'")
        if self.fake_gpus and self.mode != "gpu":
            raise ValueError("fake_gpus only makes sense with mode='gpu'")
        if self.fake_gpus and self.gpus:
            raise ValueError("give either gpus=... (real) or fake_gpus=N, not both")
        if self.gpu_lanes != "auto" and not 1 <= int(self.gpu_lanes) <= 16:
            raise ValueError(f"gpu_lanes={self.gpu_lanes}: use 1-16 or 'auto'")
        return self

    def inference_resources(self) -> dict[str, float] | None:
        """Worker resources each inference task must hold (None: run anywhere): a GPU's share
        1/lanes, so ``lanes`` tasks run side by side on one GPU worker."""
        if self.mode == "gpu" or (self.mode == "address" and self.gpu_resources):
            return {k: v / self.lanes_per_gpu() for k, v in GPU_RESOURCES.items()}
        return None

    def lanes_per_gpu(self, cpus: int | None = None) -> int:
        from segcore.execute import MAX_LANES, available_cores

        if self.gpu_lanes != "auto":
            return int(self.gpu_lanes)
        if self.mode != "gpu":
            return MAX_LANES
        n = len(gpu_ids(self))
        return max(1, min(MAX_LANES, (cpus or available_cores()) // n))


def local_sizing(cfg: ClusterConfig, cpus: int | None = None) -> tuple[int, int]:
    """(n_workers, threads_per_worker) for a local cluster: never more threads than CPUs."""
    cpus = cpus or os.cpu_count() or 1
    threads = cfg.threads_per_worker or min(2, cpus)
    workers = cfg.n_workers or max(1, cpus // threads)
    return workers, threads


def gpu_ids(cfg: ClusterConfig) -> list[str]:
    """The GPU ids a gpu-mode cluster pins, in order."""
    if cfg.fake_gpus:
        return [str(i) for i in range(cfg.fake_gpus)]
    if cfg.gpus:
        return list(cfg.gpus)
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    try:
        import torch

        n = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        n = 0
    if n == 0:
        raise ConfigError(
            "cluster mode 'gpu' found no GPU (CUDA_VISIBLE_DEVICES unset, torch sees none): "
            "use mode='local', give gpus=('0',...), or fake_gpus=N to test on CPU")
    return [str(i) for i in range(n)]


def rotated_devices(ids: list[str], i: int) -> str:
    """CUDA_VISIBLE_DEVICES of worker i: the list rotated to start at its GPU (as dask-cuda)."""
    return ",".join(ids[i:] + ids[:i])


def gpu_worker_specs(cfg: ClusterConfig) -> dict[str, dict[str, Any]]:
    """SpecCluster worker specs: one Nanny per GPU (pinned, GPU=1, a thread per lane) + CPU
    workers."""
    from distributed import Nanny

    ids = gpu_ids(cfg)
    threads = cfg.threads_per_worker or cfg.lanes_per_gpu()
    specs: dict[str, dict[str, Any]] = {}
    for i, dev in enumerate(ids):
        specs[f"gpu-{dev}"] = {"cls": Nanny, "options": {
            "nthreads": threads,
            "env": {"CUDA_VISIBLE_DEVICES": rotated_devices(ids, i)},
            "resources": dict(GPU_RESOURCES),
            "memory_limit": cfg.memory_limit if cfg.memory_limit is not None else 0,
            "name": f"gpu-{dev}",
        }}
    for j in range(cfg.cpu_workers):
        specs[f"cpu-{j}"] = {"cls": Nanny, "options": {
            "nthreads": cfg.threads_per_worker or 1,
            # an empty CUDA_VISIBLE_DEVICES hides every GPU from a CPU worker
            "env": {"CUDA_VISIBLE_DEVICES": ""},
            "memory_limit": cfg.memory_limit if cfg.memory_limit is not None else 0,
            "name": f"cpu-{j}",
        }}
    return specs


def make_cluster(cfg: ClusterConfig):
    """Start the cluster a config describes (not for mode='address'). Caller closes it."""
    from distributed import LocalCluster, Scheduler, SpecCluster

    dash = ":0" if cfg.dashboard else None
    if cfg.mode == "local":
        workers, threads = local_sizing(cfg)
        # threads-only clusters talk in-process (inproc://); process clusters on loopback
        where = {"host": "127.0.0.1"} if cfg.processes else {}
        return LocalCluster(n_workers=workers, threads_per_worker=threads,
                            processes=cfg.processes, memory_limit=cfg.memory_limit,
                            dashboard_address=dash, **where)
    if cfg.mode == "gpu":
        if (not cfg.fake_gpus and cfg.use_dask_cuda and not cfg.cpu_workers
                and importlib.util.find_spec("dask_cuda") is not None):
            from dask_cuda import LocalCUDACluster  # optional extra [gpu], imported lazily

            ids = gpu_ids(cfg)
            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(ids),
                                    threads_per_worker=cfg.threads_per_worker or cfg.lanes_per_gpu(),
                                    resources=dict(GPU_RESOURCES), dashboard_address=dash,
                                    memory_limit=cfg.memory_limit, host="127.0.0.1")
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": dash or ":0",
                                                   "dashboard": cfg.dashboard,
                                                   "host": "127.0.0.1"}}
        return SpecCluster(workers=gpu_worker_specs(cfg), scheduler=scheduler,
                           name="segcore-gpu")
    raise ConfigError(f"make_cluster: mode {cfg.mode!r} has no cluster to start; use open_client")


@contextlib.contextmanager
def open_client(cfg: ClusterConfig | None = None
                ) -> Iterator[tuple[Any, dict[str, float] | None]]:
    """``with open_client(cfg) as (client, resources):`` submit inference with ``resources``.

    Starts (and afterwards closes) a local or GPU cluster, or connects to ``cfg.address``.
    """
    from distributed import Client

    cfg = cfg or ClusterConfig()
    resources = cfg.inference_resources()
    if cfg.mode == "address":
        try:
            client = Client(cfg.address, timeout=cfg.connect_timeout)
        except OSError as e:
            raise StorageError(
                f"cannot reach the Dask scheduler at {cfg.address}: {e}; start it or fix "
                "the address") from e
        with client:
            yield client, resources
        return
    cluster = make_cluster(cfg)
    try:
        with Client(cluster) as client:
            if cfg.mode == "gpu":
                client.wait_for_workers(len(cluster.workers), timeout=120)
            log.info("dask cluster %s: %d workers", cfg.mode, len(client.scheduler_info()["workers"]))
            yield client, resources
    finally:
        cluster.close()
