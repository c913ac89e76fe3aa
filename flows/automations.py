"""Recovery automations for a self-hosted Prefect server (docs/RELIABILITY.md, item 6).

A flow run whose process dies without reporting its end (a worker stopped with SIGTERM kills
its flow-run processes; a node lost; an OOM kill) stays ``Running`` for good. Two
automations close that gap:

1. **unresponsive runs are crashed** (Prefect's own recipe, "detect zombie flows"): flow
   runs emit a heartbeat event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (set it on
   the workers, e.g. 30); a run that goes ``within`` seconds without a heartbeat or a final
   state is set ``Crashed``;
2. **a crashed arrival runs again**: when a run of a watched ``segment_scene`` deployment
   (default ``segment-scene/on-arrival``) crashes, the same deployment runs the same scene
   again at once (``src``, ``event_id``, and ``recovery`` + 1); the new run resumes from the
   scene's verified shard records. Only that scene is touched (a sweep over the inbox could
   meet scenes that live runs are writing), and the flow refuses ``recovery`` above
   ``MAX_RECOVERIES``, so a scene that kills its process every time ends ``Failed`` there
   instead of looping. The nightly sweep stays the backstop.

Run once per server after ``prefect deploy`` (idempotent: automations of the same name are
replaced)::

    PREFECT_API_URL=... python -m flows.automations [--within 90] [--watch NAME]
"""

from __future__ import annotations

import argparse
from datetime import timedelta

UNRESPONSIVE = "segcore: unresponsive runs are crashed"
RERUN = "segcore: a crashed arrival runs again"
FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def unresponsive_runs(within: float = 90.0):
    """The automation that marks runs silent for ``within`` seconds as Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=UNRESPONSIVE,
        description="A flow run with no heartbeat and no final state for "
                    f"{within:g} s lost its process: mark it Crashed (segcore flows.automations)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within:g} s: the run's process "
                                            "is gone (segcore recovery automation)")],
    )


def rerun_crashed(watched_ids: list):
    """The automation that runs a crashed run of a watched ``segment_scene`` deployment again
    with its scene, its event id and ``recovery`` one higher (the flow refuses to go past
    ``MAX_RECOVERIES``, so a scene that crashes its process every time stops there)."""
    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=RERUN,
        description="Run a crashed event-triggered scene again; it resumes from its verified "
                    "shard records (segcore flows.automations)",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match_related=ResourceSpecification({
                "prefect.resource.role": "deployment",
                "prefect.resource.id": [f"prefect.deployment.{i}" for i in watched_ids]}),
            posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        # "inferred": the deployment of the crashed run; single-expression templates keep
        # their types (rendered through JSON)
        actions=[RunDeployment(source="inferred", parameters={
            "src": "{{ flow_run.parameters.src }}",
            "event_id": "{{ flow_run.parameters.event_id }}",
            "recovery": "{{ ((flow_run.parameters.recovery or 0) + 1) }}"})],
    )


def ensure(within: float = 90.0, watch: tuple[str, ...] = ("segment-scene/on-arrival",)
           ) -> dict[str, str]:
    """Create (or replace) both automations on the server of ``PREFECT_API_URL``; returns
    {name: automation id}."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        watched = [client.read_deployment_by_name(n).id for n in watch]
        for old in client.read_automations():
            if old.name in (UNRESPONSIVE, RERUN):
                client.delete_automation(old.id)
    made = {}
    for a in (unresponsive_runs(within), rerun_crashed(watched)):
        made[a.name] = str(a.create().id)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.automations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--within", type=float, default=90.0,
                   help="seconds without a heartbeat before a run is crashed (at least 2-3x "
                        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    p.add_argument("--watch", action="append", default=None,
                   help="segment_scene deployment whose crashed runs run again (repeatable; "
                        "default segment-scene/on-arrival)")
    args = p.parse_args(argv)
    for name, ident in ensure(args.within,
                              tuple(args.watch or ("segment-scene/on-arrival",))).items():
        print(f"{name}: {ident}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
