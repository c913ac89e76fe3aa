"""DDP over a real Dask LocalCluster (2 worker processes, gloo on CPU) follows the loss curve of
one process with the same global batch and seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from segcore.errors import ConfigError
from segcore.models.checkpoint import read_checkpoint
from segcore.training import AugmentConfig, TrainConfig, train
from segcore.training.distributed import train_distributed

from .test_training import write_pairs

pytestmark = pytest.mark.slow


def test_two_ranks_match_one_process(tmp_path):
    data = write_pairs(tmp_path / "data", n=6, size=64)
    # GroupNorm: per-sample statistics, so splitting the batch changes nothing but float order
    cfg = TrainConfig(data=str(data), arch="unet",
                      model_kwargs={"depth": 2, "width": 4, "norm": "group"}, patch=64, batch=4,
                      steps=6, warmup=2, lr=5e-3, seed=7, bf16=False, threads=1,
                      augment=AugmentConfig(elastic_sigma=4), out=str(tmp_path / "one.safetensors"))
    one = train(cfg, progress=False)
    ddp_cfg = cfg.model_copy(update={"out": str(tmp_path / "ddp.safetensors")})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(ConfigError, match="3 DDP ranks"):
            train_distributed(ddp_cfg, client, 3)
        ddp = train_distributed(ddp_cfg, client, 2)
    assert ddp.steps == one.steps == 6
    np.testing.assert_allclose(ddp.losses, one.losses, rtol=1e-4, atol=1e-5)
    assert ddp.losses[-1] < ddp.losses[0]
    _, a = read_checkpoint(Path(one.checkpoint).read_bytes())
    _, b = read_checkpoint(Path(ddp.checkpoint).read_bytes())
    for k in a:  # the weights agree too (same updates up to float reduction order)
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-3, atol=1e-4)


def _trim_threshold() -> str | None:
    import os

    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_training_workers_start_without_dask_malloc_trim():
    """Dask's nanny puts MALLOC_TRIM_THRESHOLD_=65536 into every worker (and into this process's
    environment); training workers must start without it (0.60 vs 0.89 s per DDP step)."""
    from segcore.training.distributed import glibc_default_malloc

    kw = dict(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with LocalCluster(**kw) as control, Client(control) as client:  # the default, as a control
        assert set(client.run(_trim_threshold).values()) == {"65536"}
    with glibc_default_malloc():
        cluster = LocalCluster(**kw)
    with cluster, Client(cluster) as client:
        assert set(client.run(_trim_threshold).values()) == {None}


def test_a_lost_rank_stops_the_run_and_it_resumes_from_its_checkpoint(tmp_path):
    """kill -9 rank 1's worker after the step-4 checkpoint: the run stops within the gloo
    timeout with a WorkerLostError naming the checkpoint (rank 1's task, pinned to the dead
    worker, is cancelled instead of waiting for it), the nanny restarts the worker, and
    resuming on the same cluster reaches the same weights and losses as an uninterrupted
    2-rank run; with ``resumes=1`` (the train_model flow) it resumes by itself."""
    import os
    import signal
    import threading
    import time

    import torch

    from segcore.errors import WorkerLostError
    from segcore.training.loop import state_uri

    data = write_pairs(tmp_path / "data", n=6, size=64)
    base = TrainConfig(data=str(data), arch="unet",
                       model_kwargs={"depth": 2, "width": 4, "norm": "group"}, patch=64,
                       batch=4, steps=16, warmup=2, lr=5e-3, seed=7, bf16=False, threads=1,
                       checkpoint_every=4, augment=AugmentConfig(elastic_sigma=4),
                       out=str(tmp_path / "ref.safetensors"))
    cfg = base.model_copy(update={"out": str(tmp_path / "lost.safetensors")})
    kw = dict(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        ref = train_distributed(base, client, 2)
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        pid = client.run(os.getpid, workers=[workers[1]])[workers[1]]
        state = Path(state_uri(cfg.out))
        killed: dict = {}

        def kill_after_first_checkpoint():
            deadline = time.monotonic() + 120
            while not state.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            killed["at"] = time.monotonic()
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
        killer.start()
        with pytest.raises(WorkerLostError, match="--resume") as err:
            train_distributed(cfg, client, 2, timeout_s=30)
        stopped = time.monotonic() - killed["at"]
        killer.join(5)
        assert cfg.out in str(err.value)
        assert stopped < 40, stopped  # within the gloo timeout, not the 600 s default
        step = torch.load(state, weights_only=True)["step"]
        assert 4 <= step < 16
        client.wait_for_workers(2, timeout=60)  # the nanny brought rank 1's worker back
        rest = train_distributed(cfg.model_copy(update={"resume": cfg.out}), client, 2)

        # the same loss with resumes=1 (what the train_model flow passes): no hand needed
        auto_cfg = base.model_copy(update={"out": str(tmp_path / "auto.safetensors")})
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        pid = client.run(os.getpid, workers=[workers[1]])[workers[1]]
        state = Path(state_uri(auto_cfg.out))
        killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
        killer.start()
        auto = train_distributed(auto_cfg, client, 2, timeout_s=30, resumes=1, wait_s=60)
        killer.join(5)
        assert "at" in killed
    print(f"\nrank 1 killed after the step-{step} checkpoint; the run stopped {stopped:.1f} s "
          f"later; resumed from step {step} to {rest.steps}; with resumes=1 it went on by "
          f"itself to step {auto.steps}")
    _, a = read_checkpoint(Path(ref.checkpoint).read_bytes())
    for res in (rest, auto):
        assert res.steps == ref.steps == 16
        np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-5, atol=1e-6)
        _, b = read_checkpoint(Path(res.checkpoint).read_bytes())
        for k in a:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6)
