"""The client side of the multi-host test bed (tests/multihost.py): runs on the ``ctl`` host
with ``PREFECT_API_URL`` pointing at the ``db`` host and ``SEGCORE_S3_ENDPOINT_URL`` at the
``storage`` host, exactly as a user's own machine would. Each command prints one JSON line.

    python tests/multihost_ctl.py setup BUCKET SIZE      scenes + tiny model, uploaded to s3
    python tests/multihost_ctl.py batch BUCKET SCHED [SIZE]  (with SIZE: setup first, in the
                                                         same process) segment_batch on the
                                                         remote cluster, the same batch
                                                         locally, compared
    python tests/multihost_ctl.py time BUCKET SCHED OUT  one timed remote batch into OUT
    python tests/multihost_ctl.py compare BUCKET OUT     s3://BUCKET/OUT vs the local run
    python tests/multihost_ctl.py train BUCKET SCHED     train_model, 2 DDP ranks on the GPU
                                                         hosts, vs one process here
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
N_SCENES = 3


def options():
    from flows.segment import SceneOptions

    return SceneOptions(tile=128, shards_per_task=1, skip_background=False, pyramid=False,
                        device="cpu", amp="none")


def remote(sched: str):
    from segcore.cluster import ClusterConfig

    return ClusterConfig(mode="address", address=sched, gpu_resources=True,
                         connect_timeout=30)


def setup(bucket: str, size: int) -> dict:
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
    for i in range(N_SCENES):
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
    for i in range(N_SCENES):
        a, b = read_mask(f"{base}/out/s{i}"), read_mask(str(HERE / "out" / f"s{i}"))
        same[f"s{i}"] = bool(a.shape == b.shape and np.array_equal(a, b))
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


def compare(bucket: str, out: str) -> dict:
    """Masks of ``s3://BUCKET/OUT`` against this host's local reference run (``batch``)."""
    same = {}
    for i in range(N_SCENES):
        a, b = read_mask(f"s3://{bucket}/{out}/s{i}"), read_mask(str(HERE / "out" / f"s{i}"))
        same[f"s{i}"] = bool(a.shape == b.shape and np.array_equal(a, b))
    return {"identical": same}


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "setup":
        res = setup(argv[1], int(argv[2]))
    elif cmd == "batch":
        made = setup(argv[1], int(argv[3])) if len(argv) > 3 else None
        res = {**batch(argv[1], argv[2]), "setup": made}
    elif cmd == "train":
        res = train(argv[1], argv[2])
    elif cmd == "compare":
        res = compare(argv[1], argv[2])
    elif cmd == "time":
        res = timed(argv[1], argv[2], argv[3])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
