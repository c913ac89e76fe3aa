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
