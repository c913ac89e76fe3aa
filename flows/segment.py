"""Flows that segment scenes: one scene, or every scene under a prefix.

A scene's results go to ``OUT/<scene-id>/`` (see segcore.pipeline for the layout). Prefect tasks
are the scene steps (plan, infer, finalize, publish); the per-shard fan-out runs as Dask futures
inside ``infer`` on the cluster ``ClusterConfig`` describes, inference holding ``{"GPU": 1}`` in
GPU mode. Re-running on the same inputs skips complete scenes and, inside a half-done scene,
complete shards (the pipeline's per-shard records).
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field, create_model

from flows.common import STEP, apply_aws_block, as_dict, cluster_config, publish_report
from flows.ingest import IMAGE, IngestOptions, ingest_config, ingest_task
from segcore import pipeline
from segcore.cluster import ClusterConfig, open_client
from segcore.config import Frozen
from segcore.errors import ConfigError
from segcore.io.uri import join
from segcore.pipeline import SegmentConfig
from segcore.watch import SCENE_SUFFIXES, list_scenes, scene_id

# automatic re-runs of a scene whose runs crashed (flows/automations.py) before it fails
MAX_RECOVERIES = 2

# The flow's per-scene options are SegmentConfig minus what the flow decides (src, out, model).
_SCENE_FIELDS = {k: (f.annotation, f) for k, f in SegmentConfig.model_fields.items()
                 if k not in ("src", "out", "model")}
SceneOptions = create_model("SceneOptions", __base__=Frozen, **_SCENE_FIELDS)  # type: ignore[call-overload]
SceneOptions.__doc__ = "Segmentation options for every scene of a flow run (SegmentConfig fields)."


class BatchOptions(Frozen):
    max_parallel_scenes: int = Field(2, ge=1, le=64, description="scenes in flight at once")
    suffixes: tuple[str, ...] = SCENE_SUFFIXES


def scene_config(src: str, out: str, model: str, options: Any = None,
                 ingested: bool = False) -> SegmentConfig:
    """The SegmentConfig of one scene: results under ``out/<scene-id>``; with ``ingested``
    the source is the scene's ingested copy ``out/<scene-id>/image.zarr``."""
    if not src or not out or not model:
        raise ConfigError(f"segment_scene needs src, out and model (got src={src!r}, "
                          f"out={out!r}, model={model!r}); set them as flow parameters")
    opts = options.model_dump() if options is not None else {}
    sid = scene_id(src)
    if ingested:
        src = join(out, sid, IMAGE)
    return SegmentConfig(src=src, out=join(out, sid), model=model, **opts)


@dataclass
class Planned:
    plan: Any  # pipeline.ScenePlan
    state: str  # 'new', 'resume' or 'complete'
    t0: float


@task(name="plan", task_run_name="plan-{cfg.src}", **STEP)
def plan_task(cfg: SegmentConfig) -> Planned:
    t0 = time.perf_counter()
    p = pipeline.plan(cfg)
    state = pipeline.prepare(p)
    return Planned(p, state, t0)


@task(name="infer", **STEP)
def infer_task(planned: Planned, address: str, resources: dict | None) -> list[dict]:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return pipeline.run_shards(planned.plan, client, resources, progress=False)


@task(name="finalize", **STEP)
def finalize_task(planned: Planned, results: list[dict], address: str) -> dict:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        report = pipeline.finalize(planned.plan, results, time.perf_counter() - planned.t0,
                                   client)
    return as_dict(report)


@task(name="publish", **STEP)
def publish_task(out: str, sid: str, report: dict, status: str,
                 event_id: str | None = None) -> str:
    return publish_report(out, sid, report, status, event_id)


def run_scene(cfg: SegmentConfig, address: str, resources: dict | None,
              event_id: str | None = None, ingest_from: Any = None) -> dict:
    """[ingest ->] plan -> infer -> finalize -> publish for one scene; a complete scene is
    only published. ``ingest_from``: the IngestConfig that produces ``cfg.src`` first."""
    sid = cfg.out.rstrip("/").rsplit("/", 1)[-1]
    if ingest_from is not None and not pipeline.is_complete(cfg.out):
        ingest_task(ingest_from, address)
    if pipeline.is_complete(cfg.out):
        report = as_dict(pipeline.load_report(cfg.out))
        publish_task(cfg.out, sid, report, "skipped (already complete)", event_id)
        return {**report, "status": "skipped"}
    planned = plan_task(cfg)
    if planned.state == "complete":
        report = as_dict(pipeline.load_report(cfg.out))
        status = "skipped"
    else:
        results = infer_task(planned, address, resources)
        report = finalize_task(planned, results, address)
        status = "resumed" if planned.state == "resume" else "segmented"
    publish_task(cfg.out, sid, report, status, event_id)
    return {**report, "status": status}


@flow(name="segment-scene", task_runner=ThreadPoolTaskRunner(max_workers=4),
      validate_parameters=True)
def segment_scene(src: str, out: str, model: str, options: SceneOptions | None = None,  # type: ignore[valid-type]
                  cluster: ClusterConfig | None = None, event_id: str | None = None,
                  ingest: IngestOptions | None = None,  # type: ignore[valid-type]
                  aws_block: str | None = None, scheduler: str | None = None,
                  recovery: int = 0) -> dict:
    """Segment one scene into ``out/<scene-id>/`` (skipped if already complete). With
    ``ingest``, the scene is first converted to ``out/<scene-id>/image.zarr`` and segmented
    from there. ``aws_block``: a prefect-aws AwsCredentials block for s3:// (else the standard
    AWS environment/profile). ``scheduler``: ``tcp://HOST:8786`` of a running Dask scheduler
    with GPU=1 workers, instead of ``cluster`` (prefect.yaml sets it from $SEGCORE_SCHEDULER;
    "" = not given). ``recovery``: how many runs of this scene crashed before this one (set
    by the recovery automation, flows/automations.py); above ``MAX_RECOVERIES`` the run
    fails at once instead of crashing again."""
    log = get_run_logger()
    if recovery > MAX_RECOVERIES:
        raise ConfigError(
            f"{src}: {recovery} runs of this scene crashed (lost their process: out of memory, "
            f"a node lost, a worker stopped); not re-running it automatically more than "
            f"{MAX_RECOVERIES} times. Look at the crashed runs' logs and the worker's, fix the "
            "cause, then run the deployment for this scene by hand")
    if recovery:
        log.warning("scene %s: recovery run %d after a crashed run; finished shards are "
                    "resumed", src, recovery)
    apply_aws_block(aws_block)
    cluster = cluster_config(cluster, scheduler)
    cfg = scene_config(src, out, model, options, ingested=ingest is not None)
    ing = ingest_config(src, out, ingest) if ingest is not None else None
    log.info("scene %s -> %s", cfg.src, cfg.out)
    if pipeline.is_complete(cfg.out):  # no cluster needed to skip
        result = run_scene(cfg, "", None, event_id)
    else:
        with open_client(cluster) as (client, resources):
            result = run_scene(cfg, client.scheduler.address, resources, event_id, ing)
    log.info("scene %s: %s (%s tiles run, %s resumed)", scene_id(src), result["status"],
             result.get("tiles_run"), result.get("tiles_resumed"))
    return result


@flow(name="segment-batch", task_runner=ThreadPoolTaskRunner(max_workers=8),
      validate_parameters=True)
def segment_batch(prefix: str, out: str, model: str, options: SceneOptions | None = None,  # type: ignore[valid-type]
                  cluster: ClusterConfig | None = None,
                  batch: BatchOptions | None = None,
                  ingest: IngestOptions | None = None,  # type: ignore[valid-type]
                  aws_block: str | None = None, scheduler: str | None = None) -> dict:
    """Segment every scene under ``prefix`` (local, s3://, or a glob) into ``out/<scene-id>/``,
    up to ``batch.max_parallel_scenes`` at once on one shared cluster; complete scenes are
    skipped. ``scheduler``: as segment_scene's."""
    apply_aws_block(aws_block)
    cluster = cluster_config(cluster, scheduler)
    batch = batch or BatchOptions()
    log = get_run_logger()
    scenes = list_scenes(prefix, batch.suffixes)
    ids = [scene_id(s) for s in scenes]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{prefix}: several scenes map to the same output id {dup}; "
                          "rename them or segment them into different OUT prefixes")
    cfgs = [scene_config(s, out, model, options, ingested=ingest is not None) for s in scenes]
    ings = {c.out: ingest_config(s, out, ingest) if ingest is not None else None
            for s, c in zip(scenes, cfgs, strict=True)}
    todo = [c for c in cfgs if not pipeline.is_complete(c.out)]
    log.info("%d scene(s) under %s: %d to run, %d already complete", len(cfgs), prefix,
             len(todo), len(cfgs) - len(todo))
    sid = {c.out: c.out.rstrip("/").rsplit("/", 1)[-1] for c in cfgs}
    results: dict[str, Any] = {sid[c.out]: {"status": "skipped", "out": c.out}
                               for c in cfgs if c not in todo}
    failures: dict[str, str] = {}
    if todo:
        with open_client(cluster) as (client, resources):
            address = client.scheduler.address
            # one thread per scene in flight; each thread runs that scene's Prefect tasks in
            # the flow run's context, so they appear under this flow run
            with ThreadPoolExecutor(max_workers=batch.max_parallel_scenes) as pool:
                futs = {c: pool.submit(contextvars.copy_context().run, run_scene, c, address,
                                       resources, None, ings[c.out]) for c in todo}
                for c, f in futs.items():
                    try:
                        results[sid[c.out]] = f.result()
                    except Exception as e:  # noqa: BLE001 - reported per scene, raised below
                        failures[sid[c.out]] = f"{type(e).__name__}: {e}"
    summary = {
        "scenes": len(cfgs), "segmented": sum(1 for r in results.values()
                                              if r["status"] in ("segmented", "resumed")),
        "skipped": sum(1 for r in results.values() if r["status"] == "skipped"),
        "failed": failures,
        "tiles_run": sum(int(r.get("tiles_run") or 0) for r in results.values()
                         if r["status"] != "skipped"),
        "results": {k: r.get("out") for k, r in results.items()},
    }
    if failures:
        raise RuntimeError(f"segment_batch: {len(failures)} of {len(cfgs)} scene(s) failed: "
                           f"{failures}; rerun to resume them")
    return summary
