"""Find scenes under a prefix and announce each new one exactly once.

``list_scenes`` is shared by the batch flow and the watcher. ``announce_new`` lists a prefix,
calls ``emit(uri, scene_id)`` for every scene not yet in the state file, then records them in a
small JSON document at a URI (local or s3://). The event transport is injected: segcore never
imports Prefect (the CLI passes a function that emits a ``segcore.scene.arrived`` event).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from segcore.config import Frozen
from segcore.errors import InputError, StorageError
from segcore.io.uri import get_fs, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

EVENT_NAME = "segcore.scene.arrived"
RESOURCE_PREFIX = "segcore.scene."
SCENE_SUFFIXES: tuple[str, ...] = (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff",
                                   ".tif", ".svs", ".ndpi", ".png", ".jpg", ".jpeg")


class WatchConfig(Frozen):
    prefix: str = Field(description="where scenes land: a folder, s3://bucket/path, or a glob")
    state: str = Field(description="URI of the JSON that remembers announced scenes")
    suffixes: tuple[str, ...] = SCENE_SUFFIXES


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""


def scene_id(uri: str) -> str:
    """A stable, path-safe id from a scene URI: its file name without scene suffixes."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    low = name.lower()
    for suf in SCENE_SUFFIXES:
        if low.endswith(suf):
            name = name[: -len(suf)]
            break
    sid = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not sid:
        raise InputError(f"{uri}: cannot derive a scene id from this name; rename the file")
    return sid


def list_scenes(prefix: str, suffixes: tuple[str, ...] = SCENE_SUFFIXES) -> list[str]:
    """Scene URIs directly under ``prefix`` (or matching it, if it is a glob), sorted.

    Files and ``*.zarr`` folders whose names end with one of ``suffixes`` count as scenes;
    temporary or hidden names (starting with '.' or '_') do not.
    """
    fs, path = get_fs(prefix)
    proto = _protocol(prefix)
    sfx = tuple(s.lower() for s in suffixes)
    try:
        fs.invalidate_cache()  # listings are cached per filesystem instance; we poll
        if any(c in path for c in "*?["):
            entries = [fs.info(p) for p in fs.glob(path)]
        else:
            if not fs.exists(path):
                raise InputError(f"{prefix}: no such prefix; create it or fix the URI")
            entries = fs.ls(path, detail=True)
    except FileNotFoundError as e:
        raise InputError(f"{prefix}: no such prefix; create it or fix the URI") from e
    except OSError as e:
        raise StorageError(f"{prefix}: listing failed: {e}") from e
    out = []
    for e in entries:
        name = e["name"].rstrip("/")
        base = name.rsplit("/", 1)[-1]
        if base.startswith((".", "_")) or not base.lower().endswith(sfx):
            continue
        is_dir = e.get("type") == "directory"
        if is_dir and not base.lower().endswith(".zarr"):
            continue
        out.append(proto + name)
    return sorted(out)


def load_state(uri: str) -> dict[str, Any]:
    """The announced-scenes document ({'announced': {uri: {...}}}); empty if absent."""
    fs, path = get_fs(uri)
    try:
        if not fs.exists(path):
            return {"announced": {}}
    except OSError as e:
        raise StorageError(f"{uri}: cannot read watch state: {e}") from e
    try:
        doc = json.loads(read_bytes(uri))
    except json.JSONDecodeError as e:
        raise InputError(f"{uri}: watch state is not JSON ({e}); delete it to re-announce "
                         "everything, or point --state elsewhere") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("announced"), dict):
        raise InputError(f"{uri}: watch state lacks an 'announced' mapping; delete it or "
                         "point --state elsewhere")
    return doc


def save_state(uri: str, doc: dict[str, Any]) -> None:
    write_bytes_atomic(uri, json.dumps(doc, indent=1, sort_keys=True).encode())


def announce_new(cfg: WatchConfig, emit: Callable[[str, str], Any],
                 flush: Callable[[], Any] | None = None) -> list[str]:
    """Emit once for every scene under ``cfg.prefix`` not yet announced; return their URIs.

    The state is written after ``flush`` (delivery), so a crash re-announces rather than
    forgets (the triggered flow is idempotent: a complete scene is skipped).
    """
    doc = load_state(cfg.state)
    announced = doc["announced"]
    new = [u for u in list_scenes(cfg.prefix, cfg.suffixes) if u not in announced]
    for uri in new:
        emit(uri, scene_id(uri))
    if new:
        if flush is not None:
            flush()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for uri in new:
            announced[uri] = {"scene_id": scene_id(uri), "announced_at": now}
        save_state(cfg.state, doc)
    return new


def watch(cfg: WatchConfig, emit: Callable[[str, str], Any],
          flush: Callable[[], Any] | None = None, interval: float = 30.0,
          max_iterations: int | None = 1, sleep: Callable[[float], Any] = time.sleep
          ) -> list[str]:
    """Poll ``max_iterations`` times (None: forever), ``interval`` seconds apart."""
    found: list[str] = []
    i = 0
    while max_iterations is None or i < max_iterations:
        if i:
            sleep(interval)
        new = announce_new(cfg, emit, flush)
        if new:
            log.info("announced %d new scene(s) under %s", len(new), cfg.prefix)
        found += new
        i += 1
    return found


def event_resource(uri: str, sid: str) -> dict[str, str]:
    """The Prefect event resource naming one scene (match on 'segcore.scene.*')."""
    return {"prefect.resource.id": f"{RESOURCE_PREFIX}{uri}",
            "prefect.resource.name": sid, "segcore.scene.uri": uri, "segcore.scene.id": sid}
