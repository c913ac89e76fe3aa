"""``ingest_scene``: any scene -> a sharded OME-Zarr image at ``OUT/<scene-id>/image.zarr``."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from pydantic import create_model

from flows.common import STEP, apply_aws_block
from segcore.cluster import ClusterConfig, open_client
from segcore.config import Frozen
from segcore.errors import IncompleteResultError, InputError
from segcore.io.ingest import IngestConfig, check_ingested, ingest
from segcore.io.uri import exists, join
from segcore.watch import scene_id

IMAGE = "image.zarr"

_FIELDS = {k: (f.annotation, f) for k, f in IngestConfig.model_fields.items()
           if k not in ("src", "dst")}
IngestOptions = create_model("IngestOptions", __base__=Frozen, **_FIELDS)  # type: ignore[call-overload]
IngestOptions.__doc__ = "Ingest options (IngestConfig fields except src and dst)."


def ingest_config(src: str, out: str, options: Any = None) -> IngestConfig:
    opts = options.model_dump() if options is not None else {}
    return IngestConfig(src=src, dst=join(out, scene_id(src), IMAGE), **opts)


def is_ingested(uri: str) -> bool:
    if not exists(join(uri, "zarr.json")):
        return False
    try:
        check_ingested(uri)
    except (IncompleteResultError, InputError):
        return False
    return True


@task(name="ingest", **STEP)
def ingest_task(cfg: IngestConfig, address: str | None) -> str:
    """Ingest unless a complete ingest is already there (idempotent)."""
    if is_ingested(cfg.dst):
        return cfg.dst
    if address is None:
        return ingest(cfg, None, progress=False)
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return ingest(cfg, client, progress=False)


@flow(name="ingest-scene", validate_parameters=True)
def ingest_scene(src: str, out: str, options: IngestOptions | None = None,  # type: ignore[valid-type]
                 cluster: ClusterConfig | None = None, aws_block: str | None = None) -> str:
    """Convert a scene into ``out/<scene-id>/image.zarr``; returns that URI."""
    apply_aws_block(aws_block)
    cfg = ingest_config(src, out, options)
    if is_ingested(cfg.dst):
        get_run_logger().info("%s: already ingested", cfg.dst)
        return cfg.dst
    with open_client(cluster or ClusterConfig()) as (client, _):
        return ingest_task(cfg, client.scheduler.address)
