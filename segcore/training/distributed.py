"""Distributed data-parallel training over Dask workers: one DDP rank per worker.

The rendezvous address is rank 0's own worker address and a port found free there (its
interface becomes ``GLOO_SOCKET_IFNAME``); gloo on CPU, nccl
when the worker sees a GPU. A worker's GPU is pinned by its environment (``CUDA_VISIBLE_DEVICES``
set by LocalCUDACluster or a Nanny ``env``), so inside the rank the device is ``cuda:0``.
Every rank draws the same global batch from the same seed and trains on its slice, so N ranks
with batch B/N follow one process with batch B (up to BatchNorm statistics, which are per rank).

A lost worker stops the run at the next collective (the peer's connection closes), every rank
is cancelled, and the run can go on from its last checkpoint (``resumes``, or ``--resume``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from urllib.parse import urlparse

from segcore.errors import ConfigError, SegcoreError, WorkerLostError
from segcore.training.config import TrainConfig
from segcore.training.loop import TrainResult

log = logging.getLogger(__name__)


@contextmanager
def glibc_default_malloc() -> Iterator[None]:
    """Start Dask worker processes without the ``MALLOC_TRIM_THRESHOLD_=65536`` that Dask's
    nanny puts in every worker's environment. Setting it turns off glibc's adaptive mmap
    threshold, so every large tensor a training step frees goes back to the OS and is faulted in
    again next step: a 2-rank gloo DDP u2netp step (4 x 64 x 64 per rank) took 0.89 s with the
    variable against 0.60 s without it (docs/RESULTS.md, "DDP on this CPU machine"). Wrap the
    creation of the cluster: the nanny reads the setting when it is built, and an earlier nanny
    in this process may have copied the variable into ``os.environ``, which would win."""
    import dask.config

    key = "MALLOC_TRIM_THRESHOLD_"
    saved = os.environ.pop(key, None)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{key}": None}):
            yield
    finally:
        if saved is not None:
            os.environ[key] = saved


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _own_host() -> str | None:
    """The host part of this Dask worker's own address (None outside a worker)."""
    try:
        from distributed import get_worker

        return urlparse(get_worker().address).hostname
    except ValueError:
        return None


def _interface_of(addr: str | None) -> str | None:
    """The network interface that carries ``addr`` (an IP), e.g. 'eth0'; None if none does."""
    if not addr:
        return None
    import psutil  # a dependency of distributed

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addrs):
            return name
    return None


def _rank_main(cfg: TrainConfig, rank: int, world: int, host: str, port: int,
               timeout_s: float) -> TrainResult:
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    device = torch.device("cuda:0") if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(0)
    if not gpu and cfg.threads is None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if host in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        iface = _interface_of(_own_host())
        if iface:  # gloo would otherwise pick the interface the hostname resolves to
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        from segcore.training.loop import run

        return run(cfg, progress=False, rank=rank, world=world, device=device)
    finally:
        dist.destroy_process_group()


def train_distributed(cfg: TrainConfig, client, n_workers: int, timeout_s: float = 600.0,
                      resumes: int = 0, wait_s: float = 600.0) -> TrainResult:
    """Train with DDP on ``n_workers`` of the client's workers; returns rank 0's result
    (rank 0 writes the checkpoints). Each worker runs one long task, so give workers one
    thread slot (``threads_per_worker=1``) or they may be asked to run two ranks.

    When a rank's worker is lost the run stops (:class:`WorkerLostError`); with ``resumes``
    it waits up to ``wait_s`` for ``n_workers`` workers again (a restarted or replacement
    worker) and goes on from the last checkpoint, at most ``resumes`` times."""
    for attempt in range(resumes + 1):
        try:
            return _train_once(cfg, client, n_workers, timeout_s)
        except WorkerLostError:
            from segcore.training.loop import state_uri

            if attempt == resumes or not _exists(state_uri(cfg.out)):
                raise
            log.warning("a DDP rank's worker was lost; waiting for %d workers, then resuming "
                        "from %s (%d of %d)", n_workers, cfg.out, attempt + 1, resumes)
            client.wait_for_workers(n_workers, timeout=wait_s)
            cfg = cfg.model_copy(update={"resume": cfg.out})
    raise AssertionError("unreachable")


def _train_once(cfg: TrainConfig, client, n_workers: int, timeout_s: float) -> TrainResult:
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if n_workers < 1:
        raise ConfigError(f"n_workers {n_workers} must be >= 1")
    if len(workers) < n_workers:
        raise ConfigError(f"asked for {n_workers} DDP ranks but the cluster has {len(workers)} "
                          "workers; start more workers or lower --workers")
    if cfg.batch % n_workers:
        raise ConfigError(f"batch {cfg.batch} must be divisible by --workers {n_workers}")
    # the rendezvous is served by rank 0 itself: its worker's own address, a port free there
    # (not the scheduler's host, which is another machine in a multi-host cluster)
    rank0 = workers[0]
    host = urlparse(rank0).hostname or "127.0.0.1"
    port = client.run(_free_port, workers=[rank0])[rank0]
    futures = [client.submit(_rank_main, cfg, r, n_workers, host, port, timeout_s,
                             workers=[w], allow_other_workers=False, pure=False,
                             key=f"segcore-ddp-rank{r}-{port}")
               for r, w in enumerate(workers[:n_workers])]
    try:
        results = client.gather(futures)
    except Exception as e:
        # a rank failed: most often its worker was lost (killed, preempted, its host gone),
        # and the other ranks stopped at their next collective (gloo: the peer's connection
        # closed, or ``timeout_s``). A rank pinned to a lost worker would wait for that worker
        # for ever: cancel every rank, so that the cluster is free for the resumed run.
        client.cancel(futures, force=True)
        if isinstance(e, SegcoreError):  # the rank's own refusal (data, config): as it is
            raise
        from segcore.training.loop import state_uri

        last = cfg.out if _exists(state_uri(cfg.out)) else None
        how = (f"the last checkpoint is {last}: run again with --resume {last} (flow: "
               f"cfg.resume) to go on from it" if last else
               "no checkpoint was written yet: run it again")
        raise WorkerLostError(f"DDP training on {n_workers} workers stopped: a rank failed "
                              f"({type(e).__name__}: {str(e)[:300]}); {how}") from e
    return results[0]


def _exists(uri: str) -> bool:
    from segcore.io.uri import exists

    return exists(uri)
