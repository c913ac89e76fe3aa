"""Load (issue 13, item 6), on a real Prefect server on loopback with the real prefect.yaml:

1. 50 small scenes through ``segment_batch``, run in its own process as a user would
   (``python -c``), with at most 4 scenes in flight: every scene completes, none is segmented
   twice (Prefect task runs per scene, shard writes journalled, reports), the scenes in flight
   never exceed the bound, and the resident memory of the process tree stays bounded (sampled
   every 0.2 s; the peak is printed and asserted).
2. A burst of 20 ``segcore.scene.arrived`` events (``segcore watch``) into the ``on-arrival``
   deployment, served by a process worker that is restarted in the middle of the burst
   (SIGTERM while a run is in flight, as ``docker stop`` or ``kill`` sends; 10 arrivals
   announced while no worker runs; then a new worker): every arrival becomes exactly one
   run; all those the stop did not interrupt complete; the runs it interrupted (Prefect's
   process worker kills its flow-run processes when it stops, and their runs stay Running)
   are found by the recovery automations (flows/automations.py: no heartbeat for 90 s ->
   Crashed; a crashed arrival runs again with ``recovery`` 1), whose re-runs resume exactly
   their verified shards. In the end all 20 scenes are complete, none segmented twice, and
   nothing was run by hand.

Figures (seconds, peak RSS) are printed with ``-s`` and quoted in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from segcore.config import InputContract, ModelSpec
from segcore.models import build_model
from segcore.models.checkpoint import save_checkpoint
from segcore.shards import KILL_ENV
from tests.prefectstack import PYTHON, PrefectStack, RssSampler, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.server]

N_BATCH = 50
N_BURST = 20
MAX_PARALLEL = 4
WORKER_LIMIT = 2  # flow-run processes at once per worker (each imports torch: 2 cores)
HEARTBEAT = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the workers (Prefect's minimum)
WITHIN = 90  # seconds without a heartbeat before the automation crashes a run
GiB = 2**30


def write_scenes(folder: Path, n: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        p = folder / f"s{i:03d}.tif"
        tifffile.imwrite(p, img)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                                  kwargs={"depth": 2, "width": 4}))
    save_checkpoint(model.eval(), str(root / "tiny.safetensors"), InputContract(channels=3))
    (root / "inbox").mkdir()
    st = PrefectStack(root / "stack", {"SEGCORE_INBOX": str(root / "inbox"),
                                       "SEGCORE_OUT": str(root / "arrivals"),
                                       "SEGCORE_MODEL": str(root / "tiny.safetensors")})
    st.data = root
    try:
        t0 = time.monotonic()
        st.start_postgres()  # as production runs it (SQLite locks under concurrent runs)
        st.start_server()
        print(f"\n[load] {st.database} + server healthy in {time.monotonic() - t0:.1f} s",
              flush=True)
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def deployed(stack):
    """The deployments of prefect.yaml and the recovery automations an operator installs once
    per server (flows/automations.py): only the burst needs them."""
    t0 = time.monotonic()
    stack.deploy("on-arrival", "nightly")
    stack.run([PYTHON, "-m", "flows.automations", "--within", str(WITHIN)])
    print(f"\n[load] deployed in {time.monotonic() - t0:.1f} s", flush=True)
    return stack


def _task_runs(st: PrefectStack, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out: list = []
    with st.client() as c:
        while True:  # the API serves at most 200 per page
            page = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
                any_=[flow_run_id])), limit=200, offset=len(out))
            out += page
            if len(page) < 200:
                return out


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_batch_of_50_scenes_bounded(stack, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    scenes = write_scenes(inbox, N_BATCH)
    journal = tmp_path / "journal"
    journal.mkdir()
    code = (
        "import json\n"
        "from flows.segment import segment_batch\n"
        f"r = segment_batch({str(inbox)!r}, {str(out)!r}, "
        f"{str(stack.data / 'tiny.safetensors')!r},\n"
        "    {'tile': 96, 'device': 'cpu', 'amp': 'none', 'skip_background': False},\n"
        "    {'n_workers': 1, 'threads_per_worker': 2, 'processes': True},\n"
        f"    {{'max_parallel_scenes': {MAX_PARALLEL}}})\n"
        "print('SUMMARY ' + json.dumps(r))\n")
    log = tmp_path / "batch.log"
    t0 = time.monotonic()
    # the journal of every shard-data write (segcore.shards.KILL_ENV, never reaching its kill)
    proc = stack.python(code, log, env={KILL_ENV: f"1000000000:{journal}"})
    with RssSampler(proc.pid) as rss:
        proc.wait(timeout=600)
    secs = time.monotonic() - t0
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    summary = json.loads(text.split("SUMMARY ", 1)[1].splitlines()[0])
    assert (summary["scenes"], summary["segmented"], summary["skipped"]) == (N_BATCH, N_BATCH, 0)
    assert summary["failed"] == {}

    # every scene complete, each segmented once: its report ran every tile, resumed none
    tiles = 0
    for s in scenes:
        sid = Path(s).stem
        assert (out / sid / "COMPLETE").exists(), sid
        rep = json.loads((out / sid / "report.json").read_text())
        assert rep["tiles_run"] == rep["tiles_total"] and rep["tiles_resumed"] == 0, sid
        tiles += rep["tiles_total"]
    writes = (journal / "writes.log").read_text().splitlines()
    assert len(writes) == tiles == summary["tiles_run"]  # no shard written twice
    assert not (journal / "killed").exists()

    # Prefect's record of the run: one plan/infer/finalize/publish per scene, all completed,
    # at most MAX_PARALLEL scenes inferring at once
    with stack.client() as c:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(
            any_=["segment-batch"])))
    runs = [r for r in runs if r.parameters.get("prefix") == str(inbox)]
    assert len(runs) == 1 and runs[0].state.is_completed()
    steps = ("plan", "infer", "finalize", "publish")

    def recorded():  # task runs reach the API through its event pipeline: a little later
        by_step: dict[str, list] = {}
        for t in _task_runs(stack, runs[0].id):
            by_step.setdefault(t.name.split("-", 1)[0], []).append(t)
        done = all(len([t for t in by_step.get(s, []) if t.state.is_final()]) >= N_BATCH
                   for s in steps)
        return by_step if done else None

    by_step = wait_for(recorded, 120, "Prefect to record every task run", interval=1)
    for step in steps:
        got = by_step.get(step, [])
        assert len(got) == N_BATCH, (step, len(got))
        assert all(t.state.is_completed() for t in got), step
    assert sorted(t.name for t in by_step["plan"]) == sorted(f"plan-{s}" for s in scenes)
    spans = [(t.start_time.timestamp(), t.end_time.timestamp()) for t in by_step["infer"]]
    in_flight = _max_overlap(spans)
    assert 1 <= in_flight <= MAX_PARALLEL

    peak = rss.peak
    half = len(rss.samples) // 2
    first = max((r for _, r in rss.samples[:half]), default=0)
    second = max((r for _, r in rss.samples[half:]), default=0)
    print(f"\n[load] batch of {N_BATCH} scenes: {secs:.1f} s (process start to exit), "
          f"{tiles} shards, at most {in_flight} scenes inferring at once; peak RSS of the "
          f"process tree {peak / 2**20:.0f} MiB (first half {first / 2**20:.0f}, second half "
          f"{second / 2**20:.0f}; {len(rss.samples)} samples)", flush=True)
    assert peak < 3 * GiB
    # bounded, not growing with the number of scenes done: the second half of the batch
    # peaks no higher than the first half plus a margin
    assert second < first + 256 * 2**20


def _runs(st: PrefectStack, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with st.client() as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment])), limit=200)


def _records(scene_out: Path) -> int:
    """Shards of a half-done scene whose completion record verifies against its data."""
    import zarr

    from segcore.shards import _digest

    n = 0
    for f in sorted((scene_out / "shards").glob("*.json")) if (scene_out / "shards").exists() \
            else []:
        rec = json.loads(f.read_text())
        y0, y1, x0, x1 = rec["core"]
        root = zarr.open_group(str(scene_out / "result.zarr"), mode="r")
        mask = root["labels/mask/0"][y0:y1, x0:x1]
        prob = root["0"][:, y0:y1, x0:x1]
        n += rec["sha256"] == _digest(mask, prob)
    return n


@pytest.mark.skipif(not os.environ.get("SEGCORE_LOAD_TESTS"),
                    reason="5 minutes on 2 cores (20 flow-run processes, each importing torch); "
                           "run it with `make test-load` (SEGCORE_LOAD_TESTS=1)")
def test_burst_of_20_arrivals_survives_a_worker_restart(deployed, tmp_path):
    stack = deployed
    inbox = stack.data / "inbox"
    out = stack.data / "arrivals"
    # the deployments as prefect.yaml defines them (trigger, schedule, out, model, options),
    # with one change an operator would make on a small machine: Dask in threads
    threads = {"n_workers": 1, "threads_per_worker": 1, "processes": False}
    stack.set_parameters("segment-scene/on-arrival", cluster=threads)
    stack.set_parameters("segment-batch/nightly", cluster=threads)
    state = str(tmp_path / "watch.json")
    watch = [PYTHON, "-m", "segcore", "watch", str(inbox), "--once", "--state", state]
    t0 = time.monotonic()

    def stage(what: str) -> None:
        print(f"[burst {time.monotonic() - t0:6.1f} s] {what}", flush=True)

    half = N_BURST // 2
    beat = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT)}
    worker = stack.start_worker(limit=WORKER_LIMIT, env=beat)
    first = write_scenes(inbox, half)
    assert json.loads(stack.run(watch).splitlines()[-1])["announced"] == half
    stage(f"{half} arrivals announced")
    def half_done() -> bool:  # a scene with shard records and no COMPLETE yet
        return any((out / Path(s).stem / "shards").exists() and
                   not (out / Path(s).stem / "COMPLETE").exists() for s in first)

    with RssSampler(worker.pid) as rss1:
        # stop the worker while a scene is half done (its shards written, its finalize under
        # way) if that moment is caught within 90 s, else while any run is in flight
        t_wait = time.monotonic()
        wait_for(lambda: half_done() or (time.monotonic() - t_wait > 90 and [
            r for r in _runs(stack, "on-arrival") if r.state.is_running()]), 300,
            "a triggered run to be in flight", interval=0.1, log=stack.worker_log)
        stage(f"a run is in flight (a scene half done: {half_done()}): SIGTERM to the worker "
              "(as `docker stop` or `kill` sends)")
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=120)
    stage(f"old worker exited ({worker.returncode})")
    # what the restart left behind: runs it had claimed are neither final nor scheduled
    # (Prefect 3.8.8's process worker kills its flow-run processes when it stops, and nobody
    # reports their end: they stay Running or Pending)
    time.sleep(2)
    lost = {r.parameters["src"]: r.state.name for r in _runs(stack, "on-arrival")
            if not r.state.is_final() and not r.state.is_scheduled()}
    stage(f"runs left neither final nor scheduled by the stop: {sorted(lost.values())}")
    resumable = {s: _records(out / Path(s).stem) for s in lost}
    # arrivals while no worker is polling
    second = write_scenes(inbox, N_BURST - half, start=half)
    assert json.loads(stack.run(watch).splitlines()[-1])["announced"] == N_BURST - half
    stage(f"{N_BURST - half} more arrivals announced with no worker running")
    worker = stack.start_worker(limit=WORKER_LIMIT, env=beat)
    scenes = sorted(first + second)
    with RssSampler(worker.pid) as rss2:
        # the recovery automations: a run silent for WITHIN s is Crashed, and a crashed
        # arrival runs again (recovery 1), resuming its scene; nobody runs anything by hand
        def settled():
            runs = _runs(stack, "on-arrival")
            if len(runs) < N_BURST + len(lost) or not all(r.state.is_final() for r in runs):
                return None
            return runs

        runs = wait_for(settled, 600, "every arrival to be final, the lost ones re-run",
                        interval=2, log=stack.worker_log)
        stage("every run final, the crashed ones re-run by the automation")
    peak = max(rss1.peak, rss2.peak)
    by_src: dict[str, list] = {}
    for r in runs:
        by_src.setdefault(r.parameters["src"], []).append(r)
    assert sorted(by_src) == scenes  # every arrival became a run, the 10 announced
    assert len({r.parameters["event_id"] for r in runs}) == N_BURST  # while no worker ran too
    crashed_after = []
    for s, rs in by_src.items():
        rs.sort(key=lambda r: r.parameters.get("recovery") or 0)
        if s not in lost:  # one run, completed
            assert [r.state.name for r in rs] == ["Completed"], (s, [r.state for r in rs])
            continue
        # crashed by the heartbeat automation, then run again once, completed
        assert [r.state.name for r in rs] == ["Crashed", "Completed"], (s, [r.state for r in rs])
        assert "no heartbeat" in (rs[0].state.message or ""), rs[0].state
        assert rs[1].parameters["recovery"] == 1
        assert rs[1].parameters["event_id"] == rs[0].parameters["event_id"]
        if rs[0].start_time:
            crashed_after.append((rs[0].state.timestamp - rs[0].start_time).total_seconds())
    for s in scenes:
        sid = Path(s).stem
        assert (out / sid / "COMPLETE").exists(), sid
        rep = json.loads((out / sid / "report.json").read_text())
        assert rep["tiles_run"] + rep["tiles_resumed"] == rep["tiles_total"], sid
        if s in lost:  # the re-run resumed exactly the shards with a valid record
            assert rep["tiles_resumed"] == resumable[s], sid
        else:
            assert rep["tiles_resumed"] == 0, sid
    secs = time.monotonic() - t0
    durations = sorted((r.end_time - r.start_time).total_seconds() for r in runs
                       if r.state.is_completed())
    lag = sorted((r.start_time - r.expected_start_time).total_seconds() for r in runs
                 if r.start_time)
    stage(f"{N_BURST} arrivals complete in {secs:.1f} s ({len(lost)} lost in the stop, "
          f"crashed by the automation {', '.join(f'{c:.0f}' for c in crashed_after)} s after "
          f"their start and re-run, resuming {sum(resumable.values())} shards); run time "
          f"median {durations[len(durations) // 2]:.1f} s, start lag median "
          f"{lag[len(lag) // 2]:.1f} s, max {lag[-1]:.1f} s; peak RSS of the worker tree "
          f"{peak / 2**20:.0f} MiB")
    assert peak < 4 * GiB
