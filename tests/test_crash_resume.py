"""Flow crash (issue 13, item 2): the process running a flow is killed with SIGKILL mid-way,
then the work is run again as a user would. A real Prefect server on loopback, the real
prefect.yaml deployed to a process work pool, flows run in their own processes.

- ``segment_scene``, run by hand (``python -c``), is killed right after it wrote a shard's
  data and before that shard's record (the test hook ``SEGCORE_FAULT_KILL``, read by the
  flow process, which runs the Dask work in its own threads); the scene is then re-run through
  the ``segment-scene/on-arrival`` deployment and a process worker. Only unfinished shards
  are recomputed (the report's resumed count equals the records left by the killed run) and
  the probabilities and mask, every level, equal an undisturbed run bit for bit.
- ``ingest_scene`` is killed from outside (SIGKILL to its process group, once part of the
  shards are written); a re-run redoes the ingest whole (it keeps no per-shard records) and
  the image equals an undisturbed ingest and the source pixels, bit for bit.
- ``segcore train`` is killed from outside once a periodic checkpoint exists; ``--resume``
  continues from that checkpoint's step (the progress bar starts there) and the final weights
  and the whole loss history equal an uninterrupted run with the same seed (CPU, fp32, one
  thread: deterministic). A crash between writing a checkpoint and its training state is
  also covered (in process): the resume still equals the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from segcore.io.ingest import IngestConfig, ingest
from segcore.pipeline import SegmentConfig, plan, segment
from segcore.shards import KILL_ENV, verified_complete
from tests.prefectstack import PREFECT, PYTHON, PrefectStack, stop, wait_for
from tests.test_pipeline import make_model, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.server]

# the flow's Dask work in threads of the flow process: killing that process kills it all
CLUSTER = {"n_workers": 1, "threads_per_worker": 1, "processes": False}
OPTIONS = {"tile": 64, "halo": 16, "device": "cpu", "amp": "none", "skip_background": False,
           "shards_per_task": 3}
KILL_AFTER = 9  # shards' data written when the flow process dies


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    _, _, model = make_model(root)  # U-Net depth 2, width 4: real convolutions
    st = PrefectStack(root / "stack", {"SEGCORE_INBOX": str(root / "inbox"),
                                       "SEGCORE_OUT": str(root / "out"),
                                       "SEGCORE_MODEL": model})
    st.data, st.model, st.out = root, model, str(root / "out")
    try:
        st.start_server()
        st.deploy("on-arrival")
        st.start_worker(limit=1)
        yield st
    finally:
        st.close()


def _levels(group_uri: str) -> dict[str, np.ndarray]:
    """Every array of an OME-Zarr group (probabilities and mask, every level)."""
    root = zarr.open_group(group_uri, mode="r")
    out = {}

    def walk(g, prefix=""):
        for name, a in g.arrays():
            out[prefix + name] = a[:]
        for name, sub in g.groups():
            walk(sub, prefix + name + "/")

    walk(root)
    return out


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _flow_code(call: str) -> str:
    return f"import json\nfrom flows.segment import segment_scene\nfrom flows.ingest import " \
           f"ingest_scene\nr = {call}\nprint('RESULT ' + json.dumps(r, default=str))\n"


def test_killed_segment_scene_resumes_only_unfinished_shards_via_the_deployment(stack,
                                                                                 tmp_path):
    _, src = make_scene(tmp_path, 256, 224, name="crash-scene.tif")
    cfg = dict(src=src, model=stack.model, **OPTIONS)
    ref = segment(SegmentConfig(out=str(tmp_path / "ref"), **cfg), progress=False)
    total = ref.tiles_total  # 8 x 7 shards of 32 px

    hook = tmp_path / "hook"
    hook.mkdir()
    log = tmp_path / "killed.log"
    call = f"segment_scene({src!r}, {stack.out!r}, {stack.model!r}, {OPTIONS!r}, {CLUSTER!r})"
    t0 = time.monotonic()
    proc = stack.python(_flow_code(call), log,
                        env={KILL_ENV: f"{KILL_AFTER}:{hook}", "SEGCORE_IO_THREADS": "1"})
    rc = proc.wait(timeout=600)
    t_killed = time.monotonic() - t0
    assert rc == -signal.SIGKILL, log.read_text()[-4000:]
    killed_pid, killed_key = (hook / "killed").read_text().split()
    assert int(killed_pid) == proc.pid  # the flow process itself died

    scene_out = Path(stack.out) / "crash-scene"
    assert not (scene_out / "COMPLETE").exists() and not (scene_out / "report.json").exists()
    p = plan(SegmentConfig(out=str(scene_out), **cfg))
    root = zarr.open_group(str(scene_out / "result.zarr"), mode="r")
    records = {f.stem for f in (scene_out / "shards").iterdir()}
    done = {t.key for t in p.grid.tiles if verified_complete(str(scene_out), root, t)}
    # one writer thread: shards 1..N-1 have data and record, shard N data only
    assert records == done and len(done) == KILL_AFTER - 1
    assert killed_key not in records

    # the Prefect run of the killed process is left as it was (nobody reported its end)
    with stack.client() as c:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        runs = [r for r in c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(
            any_=["segment-scene"]))) if r.parameters.get("src") == src]
    assert len(runs) == 1 and not runs[0].state.is_final()

    # re-run through the deployment (prefect.yaml's on-arrival, run by the worker)
    t1 = time.monotonic()
    stack.run([PREFECT, "deployment", "run", "segment-scene/on-arrival",
               "--param", f"src={src}", "--param", f"options={json.dumps(OPTIONS)}",
               "--param", f"cluster={json.dumps(CLUSTER)}"])

    def rerun():
        with stack.client() as c:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

            got = [r for r in c.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["on-arrival"])))
                   if r.parameters.get("src") == src and r.state and r.state.is_final()]
        return got[0] if got else None

    run = wait_for(rerun, 420, "the deployment's re-run to finish", interval=1,
                   log=stack.worker_log)
    t_rerun = time.monotonic() - t1
    assert run.state.is_completed(), stack.worker_log.read_text()[-4000:]
    rep = json.loads((scene_out / "report.json").read_text())
    print(f"\n[crash] segment_scene killed after {KILL_AFTER} shard writes ({t_killed:.1f} s, "
          f"process start included); {len(done)} of {total} shards recorded; re-run via the "
          f"deployment: run {rep['tiles_run']}, resumed {rep['tiles_resumed']} "
          f"({t_rerun:.1f} s from `prefect deployment run` to the run's end)", flush=True)
    assert rep["tiles_total"] == total
    assert rep["tiles_resumed"] == len(done)
    assert rep["tiles_run"] == total - len(done)
    assert (scene_out / "COMPLETE").exists()
    _assert_same_arrays(_levels(str(tmp_path / "ref" / "result.zarr")),
                        _levels(str(scene_out / "result.zarr")))


def _files(folder: Path) -> int:
    return sum(len(f) for _, _, f in os.walk(folder)) if folder.exists() else 0


def test_killed_ingest_scene_reruns_bit_identical(stack, tmp_path):
    import tifffile

    img = (np.random.default_rng(5).random((512, 512, 3)) * 255).astype(np.uint8)
    src = str(tmp_path / "ingest-scene.tif")
    tifffile.imwrite(src, img, tile=(64, 64), photometric="rgb")
    opts = {"chunk": 32, "shard": 64}
    ref = ingest(IngestConfig(src=src, dst=str(tmp_path / "ref.zarr"), **opts), None,
                 progress=False)
    n_shards = _files(Path(ref) / "0" / "c")  # level 0: 8 x 8 shards x 3 channels
    dst = Path(stack.out) / "ingest-scene" / "image.zarr"
    call = f"ingest_scene({src!r}, {stack.out!r}, {opts!r}, {CLUSTER!r})"
    log = tmp_path / "killed.log"
    proc = stack.python(_flow_code(call), log)
    try:
        # kill -9 from outside, once a tenth of the level-0 shards is written
        wait_for(lambda: proc.poll() is not None or _files(dst / "0" / "c") >= n_shards // 10,
                 420, "the ingest to be under way", interval=0.05, log=log)
        written = _files(dst / "0" / "c")
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        stop(proc)
    assert rc == -signal.SIGKILL, log.read_text()[-4000:]
    assert n_shards // 10 <= written < n_shards
    from flows.ingest import is_ingested

    assert not is_ingested(str(dst))  # a half-written ingest never looks complete

    log2 = tmp_path / "rerun.log"
    t0 = time.monotonic()
    rerun = stack.python(_flow_code(call), log2)
    assert rerun.wait(timeout=600) == 0, log2.read_text()[-4000:]
    secs = time.monotonic() - t0
    assert is_ingested(str(dst))
    print(f"\n[crash] ingest_scene killed with {written} of {n_shards} level-0 shard files "
          f"written; re-run ingested it whole in {secs:.1f} s (process start included)",
          flush=True)
    got = _levels(str(dst))
    _assert_same_arrays(_levels(ref), got)
    assert np.array_equal(got["0"], img.transpose(2, 0, 1))


# -- training ------------------------------------------------------------------------------
STEPS = 120
EVERY = 10
TRAIN_ARGS = ["--arch", "unet", "--model-kwargs", '{"depth": 2, "width": 4}', "--patch", "64",
              "--batch", "4", "--steps", str(STEPS), "--warmup", "5", "--lr", "5e-3",
              "--seed", "0", "--threads", "1", "--device", "cpu", "--no-bf16",
              "--checkpoint-every", str(EVERY), "--fg-fraction", "0.5",
              "--augment", '{"elastic_sigma": 4}']


def _state_step(out: Path) -> int:
    from segcore.training.loop import state_uri

    p = Path(state_uri(str(out)))
    if not p.exists():
        return 0
    return int(torch.load(p, weights_only=True, map_location="cpu")["step"])


def _weights(uri: Path) -> dict[str, torch.Tensor]:
    from segcore.models.checkpoint import read_checkpoint

    return read_checkpoint(uri.read_bytes())[1]


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    from tests.test_training import write_pairs

    data = write_pairs(tmp_path / "data", n=8)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [PYTHON, "-m", "segcore", "train", "--data", str(data), *TRAIN_ARGS]
    ref = tmp_path / "ref" / "m.safetensors"
    r = subprocess.run([*cmd, "--out", str(ref), "--quiet"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "run" / "m.safetensors"
    log = tmp_path / "killed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*cmd, "--out", str(out), "--quiet"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or _state_step(out) >= 3 * EVERY, 420,
                 "a periodic checkpoint", interval=0.05, log=log)
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9, between two checkpoints or anywhere
        rc = proc.wait(timeout=60)
    finally:
        stop(proc)
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    saved = _state_step(out)
    assert 3 * EVERY <= saved < STEPS and saved % EVERY == 0
    assert not Path(str(out) + ".history.json").exists()  # it never finished

    r = subprocess.run([*cmd, "--out", str(out), "--resume", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the progress bar starts at the saved step: training continued from there
    bar = re.findall(rf"(\d+)/{STEPS}", r.stderr)
    assert bar and int(bar[0]) == saved, r.stderr[-2000:]
    assert json.loads(r.stdout[r.stdout.index("{"):])["steps"] == STEPS
    a, b = _weights(ref), _weights(out)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads(Path(str(ref) + ".history.json").read_text())
    hb = json.loads(Path(str(out) + ".history.json").read_text())
    assert hb["losses"] == ha["losses"] and len(hb["losses"]) == STEPS
    print(f"\n[crash] segcore train killed after the step-{saved} checkpoint; --resume went "
          f"on from step {bar[0]} to {STEPS}: weights and all {STEPS} losses equal the "
          f"uninterrupted run", flush=True)


class _Died(BaseException):
    """The process dying (nothing catches a BaseException subclass on the way out)."""


def test_crash_between_checkpoint_and_state_still_resumes_exactly(tmp_path, monkeypatch):
    """The checkpoint and its training state are two files. A process that dies after
    writing the step-k checkpoint but before its state left weights of step k beside the
    optimizer and sampler of step k - every; the resume must still equal an uninterrupted
    run (the state carries the weights of its own step)."""
    from segcore.training import loop
    from segcore.training.loop import train
    from tests.test_training import cfg_for, write_pairs

    data = write_pairs(tmp_path / "data", n=4)
    full = train(cfg_for(data, tmp_path / "full.safetensors", steps=8), progress=False)
    cfg = cfg_for(data, tmp_path / "half.safetensors", steps=8, checkpoint_every=2)
    real = loop._save_state

    def dying(uri, state):
        if state["step"] == 4:
            raise _Died()
        real(uri, state)

    monkeypatch.setattr(loop, "_save_state", dying)
    with pytest.raises(_Died):
        train(cfg, progress=False)
    monkeypatch.undo()
    from segcore.models.checkpoint import read_checkpoint

    ckpt, _ = read_checkpoint((tmp_path / "half.safetensors").read_bytes())
    assert ckpt.extra["step"] == 4 and _state_step(tmp_path / "half.safetensors") == 2
    rest = train(cfg.model_copy(update={"resume": str(tmp_path / "half.safetensors")}),
                 progress=False)
    assert rest.steps == 8 and rest.losses == full.losses
    a, b = _weights(tmp_path / "full.safetensors"), _weights(tmp_path / "half.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
