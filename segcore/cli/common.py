"""Shared CLI plumbing: cluster flags, config validation with readable messages."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from segcore.errors import ConfigError


def validated(config_cls: type, **kwargs: Any):
    """Build a config model; pydantic's errors become one ConfigError naming each field."""
    try:
        return config_cls(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        parts = [f"--{'.'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}"
                 if err["loc"] else err["msg"] for err in e.errors()]
        raise ConfigError("; ".join(parts)) from None


def add_channel_args(p: argparse.ArgumentParser, ingest: bool = False,
                     train: bool = False) -> None:
    what = ("keep only these channels, in this order" if ingest else
            "train on these channels, in this order (recorded in the checkpoint)" if train else
            "give the model these channels, in this order (default: the channels the "
            "checkpoint names, picked by name, else all)")
    p.add_argument("--channels", metavar="LIST",
                   help=f"{what}: channel names (B04,B03,B02 or DAPI) or band numbers counted "
                        "from 1, as GDAL and QGIS do (4,3,2 = the 4th, 3rd and 2nd band)")
    p.add_argument("--channel-names", metavar="LIST",
                   help="names for the file's channels, one per channel in file order (e.g. "
                        "B01,B02,...,B8A for a Sentinel-2 stack without band descriptions); "
                        "replaces names the file has")


def add_grow_args(p: argparse.ArgumentParser) -> None:
    """``--grow`` / ``--grow-threshold`` (segment --objects and the objects verb)."""
    p.add_argument("--grow", type=int, default=0, metavar="N",
                   help="objects: grow each component N px over unlabelled pixels, the surer "
                        "object winning contested ones (a seeded watershed limited to N px, "
                        "for models trained with --class-map instances-borders; default 0)")
    p.add_argument("--grow-threshold", type=float, default=0.0, metavar="P",
                   help="objects: grow only into pixels with foreground probability >= P")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None,
                   help="local Dask worker processes; 0 = run in this process without Dask "
                        "(default: segment and objects run in this process on lanes, the "
                        "other verbs start workers sized to the machine)")
    g.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    g.add_argument("--gpus", type=int, default=None,
                   help="one worker per GPU (pinned with CUDA_VISIBLE_DEVICES); needs CUDA")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


@contextlib.contextmanager
def client_from_args(args: argparse.Namespace, in_process_default: bool = False
                     ) -> Iterator[Any]:
    """Yield (client or None, inference resources or None). ``in_process_default``: without
    --workers, --scheduler or --gpus, run in this process (None) rather than a local cluster."""
    from segcore.cluster import ClusterConfig, open_client

    local = args.workers == 0 or (in_process_default and args.workers is None and not args.gpus)
    if local and not args.scheduler:
        yield None, None
        return
    if args.scheduler:
        cfg = validated(ClusterConfig, mode="address", address=args.scheduler)
    elif args.gpus:
        cfg = validated(ClusterConfig, mode="gpu", gpus=tuple(str(i) for i in range(args.gpus)))
    else:
        cfg = validated(ClusterConfig, mode="local", n_workers=args.workers)
    with open_client(cfg) as (client, resources):
        yield client, resources
