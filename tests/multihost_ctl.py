"""The client side of the multi-host test bed (tests/multihost.py): runs on the ``ctl`` host
with ``PREFECT_API_URL`` pointing at the ``db`` host and ``SEGCORE_S3_ENDPOINT_URL`` at the
``storage`` host, exactly as a user's own machine would. Each command prints one JSON line.

    python tests/multihost_ctl.py setup BUCKET SIZE [N]  N scenes (3) + tiny model, to s3
    python tests/multihost_ctl.py batch BUCKET SCHED [SIZE [N]]  (with SIZE: setup first, in
                                                         the same process) segment_batch on the
                                                         remote cluster, the same batch
                                                         locally, compared
    python tests/multihost_ctl.py time BUCKET SCHED OUT  one timed remote batch into OUT
    python tests/multihost_ctl.py compare BUCKET OUT     s3://BUCKET/OUT vs the local run
    python tests/multihost_ctl.py train BUCKET SCHED     train_model, 2 DDP ranks on the GPU
                                                         hosts, vs one process here
    python tests/multihost_ctl.py trigger BUCKET SCHED   prefect.yaml's on-arrival deployed with
                                                         SEGCORE_SCHEDULER=SCHED, a process
                                                         worker here; prints READY, waits for the
                                                         arrival event (emitted elsewhere) and
                                                         the triggered run, compares its mask
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.test_training's pair writer
HERE = Path.cwd()  # the ctl host's own working directory
N_SCENES = 3  # unless setup is told otherwise; later commands use the scenes in ./in


def options():
    from flows.segment import SceneOptions

    return SceneOptions(tile=128, shards_per_task=1, skip_background=False, pyramid=False,
                        device="cpu", amp="none")


def remote(sched: str):
    from segcore.cluster import ClusterConfig

    return ClusterConfig(mode="address", address=sched, gpu_resources=True,
                         connect_timeout=30)


def setup(bucket: str, size: int, n: int = N_SCENES) -> dict:
    import boto3
    import tifffile
    import torch

    from segcore.config import InputContract, ModelSpec
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint

    s3 = boto3.client("s3", endpoint_url=os.environ["SEGCORE_S3_ENDPOINT_URL"],
                      region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    (HERE / "in").mkdir(exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(10 + i)
        p = HERE / "in" / f"s{i}.tif"
        tifffile.imwrite(p, (rng.random((size, size, 3)) * 255).astype(np.uint8))
        s3.upload_file(str(p), bucket, f"in/s{i}.tif")
    torch.manual_seed(0)
    m = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                              kwargs={"depth": 2, "width": 4}))
    model = HERE / "tiny.safetensors"
    save_checkpoint(m.eval(), str(model), InputContract(channels=3))
    s3.upload_file(str(model), bucket, "models/tiny.safetensors")
    return {"local_model": str(model), "local_in": str(HERE / "in"),
            "keys": sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])}


def scene_ids() -> list[str]:
    """The scenes setup made (this host's ./in), by id."""
    return sorted(p.stem for p in (HERE / "in").glob("*.tif"))


def read_mask(out: str) -> np.ndarray:
    from segcore.io.uri import join
    from segcore.io.zarrstore import open_group

    return np.asarray(open_group(join(out, "result.zarr"), mode="r")["labels/mask/0"][:])


def workers_view(sched: str, paths: list[str]) -> dict:
    """What each worker host sees: its address, TMPDIR, cwd, and whether ctl's paths exist."""
    from distributed import Client

    def look(paths=paths):
        return {"tmpdir": os.environ.get("TMPDIR"), "cwd": os.getcwd(),
                "sees": {p: os.path.exists(p) for p in paths},
                "endpoint": os.environ.get("SEGCORE_S3_ENDPOINT_URL"),
                "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset")}

    with Client(sched, timeout=30) as c:
        info = c.scheduler_info(n_workers=-1)["workers"]
        return {addr: {**v, "name": info[addr].get("name"),
                       "resources": info[addr].get("resources")}
                for addr, v in c.run(look).items()}


def batch(bucket: str, sched: str) -> dict:
    from distributed import Client, get_task_stream

    from flows.segment import segment_batch
    from segcore.cluster import ClusterConfig

    base = f"s3://{bucket}"
    local_model, local_in = str(HERE / "tiny.safetensors"), str(HERE / "in")
    view = workers_view(sched, [local_model, local_in])
    t0 = time.perf_counter()
    with Client(sched, timeout=30) as c, get_task_stream(client=c) as ts:
        first = segment_batch(f"{base}/in", f"{base}/out", f"{base}/models/tiny.safetensors",
                              options(), remote(sched), {"max_parallel_scenes": 3})
    remote_s = time.perf_counter() - t0
    per_worker: dict[str, int] = {}
    busy: dict[str, float] = {}
    for t in ts.data:
        per_worker[t["worker"]] = per_worker.get(t["worker"], 0) + 1
        busy[t["worker"]] = busy.get(t["worker"], 0.0) + sum(
            s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
    starts = [s["start"] for t in ts.data for s in t["startstops"]]
    stops = [s["stop"] for t in ts.data for s in t["startstops"]]
    span = {"tasks_first_start_to_last_stop": max(stops) - min(starts) if starts else None,
            "compute_s_per_worker": busy}
    t1 = time.perf_counter()
    second = segment_batch(f"{base}/in", f"{base}/out", f"{base}/models/tiny.safetensors",
                           options(), remote(sched))
    # the same batch on this host alone: local files, a threads-only local cluster
    local = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
    t2 = time.perf_counter()
    ref = segment_batch(local_in, str(HERE / "out"), local_model, options(), local)
    t3 = time.perf_counter()
    same = {}
    for sid in scene_ids():
        a, b = read_mask(f"{base}/out/{sid}"), read_mask(str(HERE / "out" / sid))
        same[sid] = bool(a.shape == b.shape and np.array_equal(a, b))
    return {"first": first, "second": second, "local": ref, "identical": same,
            "remote_s": remote_s,
            "timings": {"remote": remote_s, "rerun": t2 - t1, "local": t3 - t2,
                        "compare": time.perf_counter() - t3}, "tasks_per_worker": per_worker, "span": span, "workers": view}


def timed(bucket: str, sched: str, out: str) -> dict:
    from flows.segment import segment_batch

    base = f"s3://{bucket}"
    t0 = time.perf_counter()
    r = segment_batch(f"{base}/in", f"{base}/{out}", f"{base}/models/tiny.safetensors",
                      options(), remote(sched), {"max_parallel_scenes": 3})
    res = {"seconds": time.perf_counter() - t0, "tiles_run": r["tiles_run"],
           "segmented": r["segmented"]}
    if (HERE / "out").exists():  # the local reference of `batch` is there: compare with it
        res.update(compare(bucket, out))
    return res


def train(bucket: str, sched: str) -> dict:
    from flows.train import train_model
    from segcore.io.uri import get_fs
    from segcore.training import AugmentConfig, TrainConfig
    from segcore.training import train as train_here
    from tests.test_training import write_pairs

    data = write_pairs(HERE / "pairs", n=6, size=64)
    fs, _ = get_fs(f"s3://{bucket}")
    fs.put(str(data), f"s3://{bucket}/pairs", recursive=True)
    # as tests/test_distributed_training.py: GroupNorm, so 2 x batch 2 == 1 x batch 4
    cfg = TrainConfig(data=f"s3://{bucket}/pairs", arch="unet",
                      model_kwargs={"depth": 2, "width": 4, "norm": "group"}, patch=64, batch=4,
                      steps=4, warmup=1, lr=5e-3, seed=7, bf16=False, threads=1,
                      augment=AugmentConfig(elastic_sigma=4),
                      out=f"s3://{bucket}/models/ddp.safetensors")
    t0 = time.perf_counter()
    ddp = train_model(cfg, remote(sched), ranks=2)
    ddp_s = time.perf_counter() - t0
    one = train_here(cfg.model_copy(update={"out": str(HERE / "one.safetensors")}),
                     progress=False)
    from segcore.io.uri import read_bytes
    from segcore.models.checkpoint import read_checkpoint

    _, a = read_checkpoint(read_bytes(str(HERE / "one.safetensors")))
    _, b = read_checkpoint(read_bytes(f"s3://{bucket}/models/ddp.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    hist = json.loads(read_bytes(f"s3://{bucket}/models/ddp.safetensors.history.json"))
    return {"ddp": ddp, "ddp_s": ddp_s, "one_losses": one.losses, "one_steps": one.steps,
            "ddp_losses": hist["losses"],
            "weights_max_abs_diff": diff, "weights_max_abs": scale, "same_keys": set(a) == set(b)}


POOL = "segcore-process"


def trigger(bucket: str, sched: str) -> dict:
    """Deploy on-arrival from prefect.yaml as an operator would (SEGCORE_* in the environment,
    SEGCORE_SCHEDULER the bed's scheduler), start a Prefect process worker on this host, copy
    s0 into the inbox, print READY, then wait for the run the arrival event triggers. The Dask
    task stream over that window says where its tasks ran."""
    import subprocess

    import boto3
    from distributed import Client, get_task_stream
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from tests.multihost import READY

    base = f"s3://{bucket}"
    env = {**os.environ, "SEGCORE_INBOX": f"{base}/inbox", "SEGCORE_OUT": f"{base}/trig",
           "SEGCORE_MODEL": f"{base}/models/tiny.safetensors", "SEGCORE_SCHEDULER": sched}
    bin_ = Path(sys.executable).parent
    t0 = time.perf_counter()
    api = SyncPrefectClient(os.environ["PREFECT_API_URL"])
    with api:
        template = json.loads((REPO / "deployments" / "process-pool.json").read_text())
        api.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                            base_job_template=template))
    log = open(HERE / "prefect-worker.log", "ab")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(  # polls the pool every second; runs flows as subprocesses
        [str(bin_ / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1"],
        cwd=REPO, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, stdout=log,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # the task's own options (tile 128...) so that the local batch run is the reference
        opts = json.dumps({"options": json.loads(options().model_dump_json())})
        dep = subprocess.run([str(bin_ / "prefect"), "--no-prompt", "deploy", "--name",
                              "on-arrival", "--params", opts], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=180)
        if dep.returncode or "segment-scene/on-arrival" not in dep.stdout:
            raise RuntimeError(f"prefect deploy failed ({dep.returncode}):\n"
                               f"{dep.stdout[-3000:]}\n{dep.stderr[-3000:]}")
        deployed_s = time.perf_counter() - t0
        s3 = boto3.client("s3", endpoint_url=os.environ["SEGCORE_S3_ENDPOINT_URL"],
                          region_name="us-east-1")
        # started beside `batch`: s0 lands in the inbox once batch's setup has uploaded it
        end = time.perf_counter() + 180
        while True:
            try:
                s3.copy_object(Bucket=bucket, Key="inbox/s0.tif",
                               CopySource={"Bucket": bucket, "Key": "in/s0.tif"})
                break
            except s3.exceptions.ClientError:
                if time.perf_counter() > end:
                    raise
                time.sleep(0.5)
        with SyncPrefectClient(os.environ["PREFECT_API_URL"]) as api, \
                Client(sched, timeout=30) as c, get_task_stream(client=c) as ts:
            deployment = api.read_deployment_by_name("segment-scene/on-arrival")
            print(READY, flush=True)
            t1 = time.perf_counter()
            end = t1 + 420  # READY may come while `batch` still runs; the event after it
            run = None
            while time.perf_counter() < end:
                runs = api.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["on-arrival"])))
                done = [r for r in runs if r.state and r.state.is_final()]
                if done:
                    run = done[0]
                    break
                if worker.poll() is not None:
                    raise RuntimeError(f"the Prefect worker exited {worker.returncode}")
                time.sleep(0.5)
            waited_s = time.perf_counter() - t1
            if run is None:
                raise TimeoutError(f"no on-arrival run finished in 420 s; runs: {runs}")
            n_runs = len(api.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["on-arrival"]))))
    finally:
        os.killpg(worker.pid, 15)  # the process group started above
        worker.wait(20)
        log.close()
    # the shard tasks (pipeline.run_shards: run_task-<uuid>) that started during the run;
    # the batch before it has finished, so they are this run's
    t_start = run.start_time.timestamp()
    per_worker: dict[str, int] = {}
    for t in ts.data:
        if t["key"].startswith("run_task-") and min(
                s["start"] for s in t["startstops"]) >= t_start:
            per_worker[t["worker"]] = per_worker.get(t["worker"], 0) + 1
    a = read_mask(f"{base}/trig/s0")
    b = read_mask(str(HERE / "out" / "s0"))
    report = json.loads(s3.get_object(Bucket=bucket, Key="trig/s0/report.json")["Body"].read())
    local = json.loads((HERE / "out" / "s0" / "report.json").read_text())
    return {"state": run.state.type.value, "message": run.state.message,
            "parameters": run.parameters, "deployment_parameters": deployment.parameters,
            "runs": n_runs, "tasks_per_worker": per_worker,
            "tiles_run": report.get("tiles_run"), "local_tiles_run": local.get("tiles_run"),
            "identical": bool(a.shape == b.shape and np.array_equal(a, b)),
            "timings": {"deploy": deployed_s, "ready_to_completed": waited_s,
                        "run": (run.end_time - run.start_time).total_seconds()
                        if run.end_time and run.start_time else None}}


def compare(bucket: str, out: str) -> dict:
    """Masks of ``s3://BUCKET/OUT`` against this host's local reference run (``batch``)."""
    same = {}
    for sid in scene_ids():
        a, b = read_mask(f"s3://{bucket}/{out}/{sid}"), read_mask(str(HERE / "out" / sid))
        same[sid] = bool(a.shape == b.shape and np.array_equal(a, b))
    return {"identical": same}


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "setup":
        res = setup(argv[1], *(int(a) for a in argv[2:4]))
    elif cmd == "batch":
        made = setup(argv[1], *(int(a) for a in argv[3:5])) if len(argv) > 3 else None
        res = {**batch(argv[1], argv[2]), "setup": made}
    elif cmd == "train":
        res = train(argv[1], argv[2])
    elif cmd == "trigger":
        res = trigger(argv[1], argv[2])
    elif cmd == "compare":
        res = compare(argv[1], argv[2])
    elif cmd == "time":
        res = timed(argv[1], argv[2], argv[3])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
