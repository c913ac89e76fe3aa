"""`segcore watch PREFIX`: announce each new scene under a prefix as a Prefect event.

Emits ``segcore.scene.arrived`` (resource ``segcore.scene.<uri>``, payload ``{uri, scene_id}``)
once per new scene, remembering what it announced in a JSON at ``--state``. An event-triggered
deployment (prefect.yaml) turns each event into a ``segment_scene`` run. Needs
``PREFECT_API_URL`` unless ``--dry-run``. Prefect is imported here, inside ``run`` only.
"""

from __future__ import annotations

import argparse
import json
import os

from segcore.errors import ConfigError
from segcore.io.uri import join
from segcore.watch import EVENT_NAME, WatchConfig, event_resource, watch


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", help="folder, s3://bucket/prefix or glob where scenes land")
    p.add_argument("--state", help="URI of the announced-scenes JSON "
                   "(default: PREFIX/.segcore-watch.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="list once and exit (default)")
    g.add_argument("--max-iterations", type=int, help="poll this many times, then exit")
    g.add_argument("--forever", action="store_true", help="poll until interrupted")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between polls")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be announced; emit nothing, remember nothing")


def _prefect_emitter():
    """(emit, flush) that send Prefect events; refuses to run without a Prefect API."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError("segcore watch: PREFECT_API_URL is not set, so events would be "
                          "dropped; export PREFECT_API_URL=http://HOST:4200/api (or --dry-run)")

    def emit(uri: str, sid: str) -> None:
        emit_event(EVENT_NAME, resource=event_resource(uri, sid),
                   payload={"uri": uri, "scene_id": sid})
        print(json.dumps({"event": EVENT_NAME, "uri": uri, "scene_id": sid}), flush=True)

    return emit, EventsWorker.drain_all


def run(args: argparse.Namespace) -> int:
    if args.max_iterations is not None and args.max_iterations < 1:
        raise ConfigError(f"--max-iterations {args.max_iterations} must be >= 1")
    if args.interval < 0:
        raise ConfigError(f"--interval {args.interval} must be >= 0")
    prefix = args.prefix
    state = args.state or join(prefix, ".segcore-watch.json")
    cfg = WatchConfig(prefix=prefix, state=state)
    iterations = None if args.forever else (args.max_iterations or 1)
    if args.dry_run:
        from segcore.watch import list_scenes, load_state, scene_id

        seen = load_state(cfg.state)["announced"]
        for uri in list_scenes(cfg.prefix, cfg.suffixes):
            if uri not in seen:
                print(json.dumps({"event": EVENT_NAME, "uri": uri, "scene_id": scene_id(uri),
                                  "dry_run": True}))
        return 0
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    emit, flush = _prefect_emitter()
    new = watch(cfg, emit, flush, interval=args.interval, max_iterations=iterations)
    print(json.dumps({"announced": len(new), "state": cfg.state}), flush=True)
    return 0
