"""``train_model``: a manual deployment wrapping segcore.training.train(TrainConfig)."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import STEP
from segcore.cluster import ClusterConfig
from segcore.training import TrainConfig, train

WORKER_LOSS_RESUMES = 2


@task(name="train", **{**STEP, "retries": 0})  # a crashed run resumes from cfg.resume instead
def train_task(cfg: TrainConfig, cluster: ClusterConfig | None = None, ranks: int = 1) -> dict:
    if cluster is None:  # in this (the Prefect worker's) process
        return asdict(train(cfg, progress=False))
    from segcore.cluster import open_client
    from segcore.training.distributed import train_distributed

    # one rank per Dask worker (a GPU worker each with resources GPU=1), rank 0 writes; a
    # lost worker: wait for a replacement and go on from the last checkpoint (twice at most)
    with open_client(cluster) as (client, _):
        return asdict(train_distributed(cfg, client, ranks, resumes=WORKER_LOSS_RESUMES))


@flow(name="train-model", validate_parameters=True)
def train_model(cfg: TrainConfig, cluster: ClusterConfig | None = None, ranks: int = 1) -> dict:
    """Train a model; the checkpoint (with its contract) goes to ``cfg.out``. With ``cluster``
    the training runs on its Dask workers, ``ranks`` DDP ranks (one per worker), not here."""
    res = train_task(cfg, cluster, ranks)
    best = res.get("best_val")
    md = "\n".join([
        f"# segcore training `{cfg.arch}`", "", "| field | value |", "|---|---|",
        f"| data | `{cfg.data}` |", f"| checkpoint | `{res['checkpoint']}` |",
        f"| best | `{res.get('best')}` |", f"| steps | {res['steps']} |",
        f"| seconds | {res['seconds']:.1f} |",
        f"| final loss | {res['losses'][-1]:.4f} |" if res.get("losses") else "| final loss | - |",
        f"| best val Dice | {best:.4f} |" if best is not None else "| best val Dice | - |",
        f"| curve | `{res.get('curve')}` |",
    ])
    create_markdown_artifact(markdown=md + "\n", key="segcore-train",
                             description=f"segcore training: {cfg.out}")
    return {k: v for k, v in res.items() if k not in ("losses",)}
