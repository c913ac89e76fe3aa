"""Shared pieces of the flows: retry policy, task options, per-scene artifacts.

Flows are thin: each task body calls one segcore function. Nothing here is needed by segcore.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prefect.cache_policies import NO_CACHE

from segcore.cluster import ClusterConfig
from segcore.errors import ConfigError, InputError, StorageError
from segcore.io.uri import join, write_bytes_atomic

# Retries: a few attempts with back-off, only for transient storage/network failures.
RETRIES = 2
RETRY_DELAYS = [2, 10]


def is_transient(exc: BaseException | None) -> bool:
    """Storage/network errors are worth retrying; bad input or config never is."""
    if exc is None or isinstance(exc, (InputError, ConfigError)):
        return False
    return isinstance(exc, (StorageError, OSError, TimeoutError))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only if the failure was transient."""
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - we classify the task's own exception
        return is_transient(e)
    return False


# every segcore step passes objects (plans, reports) in-process; nothing to cache by input hash
STEP = {"retries": RETRIES, "retry_delay_seconds": RETRY_DELAYS,
        "retry_condition_fn": retry_transient, "cache_policy": NO_CACHE}


def cluster_config(cluster: ClusterConfig | None, scheduler: str | None) -> ClusterConfig:
    """The cluster a flow run uses: ``cluster`` as given; else, with ``scheduler``
    (``tcp://HOST:8786``), that running Dask scheduler, its workers advertising GPU=1 as
    ``deployments/hosts.sh gpu-worker`` starts them; else a local cluster.

    ``scheduler`` is what prefect.yaml fills from ``$SEGCORE_SCHEDULER`` at deploy time; an
    unset variable templates to "", which counts as not given.
    """
    scheduler = (scheduler or "").strip()
    if not scheduler:
        return cluster or ClusterConfig()
    if cluster is not None:
        raise ConfigError(f"got both cluster={cluster!r} and scheduler={scheduler!r}; give one "
                          "(the deployment's scheduler comes from SEGCORE_SCHEDULER at deploy "
                          "time: unset it and redeploy, or drop the cluster parameter)")
    return ClusterConfig(mode="address", address=scheduler, gpu_resources=True)


def artifact_key(scene_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"segcore-{scene_id}".lower()).strip("-")
    return key[:100]


def report_markdown(scene_id: str, report: dict[str, Any], status: str,
                    event_id: str | None = None) -> str:
    """A markdown table of a scene's report, with its result URIs."""
    rows = [("status", status)]
    if event_id:
        rows.append(("event", event_id))
    for k in ("src", "out", "model", "tiles_total", "tiles_run", "tiles_skipped_background",
              "tiles_resumed", "seconds", "mpx_per_s", "tile", "halo", "exact"):
        if k in report:
            rows.append((k, report[k]))
    scene = report.get("scene") or {}
    if scene:
        rows.append(("scene", f"{scene.get('height')} x {scene.get('width')} x "
                     f"{scene.get('channels')} ({scene.get('format')})"))
    objects = report.get("objects") or {}
    if objects:
        rows.append(("objects", objects.get("objects")))
        rows += [(f"objects: {name}", n) for name, n in (objects.get("per_class") or {}).items()]
    lines = [f"# segcore scene `{scene_id}`", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in rows]
    uris = report.get("uris") or {}
    if uris:
        lines += ["", "| result | URI |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in uris.items()]
    for w in report.get("warnings") or []:
        lines.append(f"\n> warning: {w}")
    return "\n".join(lines) + "\n"


def publish_report(out: str, scene_id: str, report: dict[str, Any], status: str,
                   event_id: str | None = None) -> str:
    """Create the scene's Prefect markdown artifact and a copy of it beside the results
    (``OUT/<scene>/report.md``). Returns the artifact id."""
    from prefect.artifacts import create_markdown_artifact

    md = report_markdown(scene_id, report, status, event_id)
    write_bytes_atomic(join(out, "report.md"), md.encode())
    art = create_markdown_artifact(markdown=md, key=artifact_key(scene_id),
                                   description=f"segcore {status}: {report.get('src', '')}")
    return str(art)


def as_dict(model: Any) -> dict[str, Any]:
    return json.loads(model.model_dump_json()) if hasattr(model, "model_dump_json") else model


AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
           "AWS_DEFAULT_REGION", "SEGCORE_S3_ENDPOINT_URL")


def apply_aws_block(name: str | None) -> list[str]:
    """Load a prefect-aws ``AwsCredentials`` block and export it as the standard AWS variables
    (plus SEGCORE_S3_ENDPOINT_URL from its ``aws_client_parameters.endpoint_url``) for this flow
    process and the local Dask workers it starts afterwards. Returns the variables set.

    Without a block, s3:// uses the standard AWS environment/profile chain as is.
    """
    if not name:
        return []
    import os

    from prefect_aws import AwsCredentials

    try:
        creds = AwsCredentials.load(name)
    except ValueError as e:
        raise ConfigError(f"AwsCredentials block {name!r} not found ({e}); create it with "
                          "AwsCredentials(...).save(name) or drop aws_block") from e
    secret = creds.aws_secret_access_key
    env = {
        "AWS_ACCESS_KEY_ID": creds.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret.get_secret_value() if secret else None,
        "AWS_SESSION_TOKEN": creds.aws_session_token,
        "AWS_PROFILE": creds.profile_name,
        "AWS_DEFAULT_REGION": creds.region_name,
        "SEGCORE_S3_ENDPOINT_URL": creds.aws_client_parameters.endpoint_url,
    }
    env = {k: str(v) for k, v in env.items() if v}
    os.environ.update(env)
    return sorted(env)
