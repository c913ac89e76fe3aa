"""Orchestration overhead per scene: the ``segment_scene`` flow vs ``segcore.pipeline.segment``
called directly, on the same scene, model and cluster configuration (cluster start-up included
in both, since the flow starts its own cluster).

    .venv/bin/python scripts/bench_orchestration.py --size 1024 --repeats 3

Uses ``PREFECT_API_URL`` if set, else a temporary Prefect server (prefect_test_harness; its
start-up is not counted). Prints one JSON line with medians and the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="scene edge in pixels (RGB)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--width", type=int, default=8, help="U-Net base width (depth 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", action="store_true", help="process-based LocalCluster")
    args = ap.parse_args()

    import contextlib

    import numpy as np
    import tifffile
    import torch

    from flows.segment import SceneOptions, segment_scene
    from segcore.cluster import ClusterConfig, open_client
    from segcore.config import InputContract, ModelSpec
    from segcore.models import build_model
    from segcore.models.checkpoint import save_checkpoint
    from segcore.pipeline import SegmentConfig, segment

    tmp = Path(tempfile.mkdtemp(prefix="segcore-bench-"))
    torch.manual_seed(0)
    m = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                              kwargs={"depth": 2, "width": args.width}))
    model = str(tmp / "model.safetensors")
    save_checkpoint(m.eval(), model, InputContract(channels=3))
    rng = np.random.default_rng(0)
    src = str(tmp / "scene.tif")
    tifffile.imwrite(src, (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8),
                     tile=(256, 256))
    opts = SceneOptions(tile=args.tile, skip_background=False, device="cpu", amp="none",
                        pyramid=True)
    cluster = ClusterConfig(n_workers=1, threads_per_worker=2, processes=args.processes)

    harness = contextlib.nullcontext()
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.testing.utilities import prefect_test_harness

        harness = prefect_test_harness(server_startup_timeout=120)
    direct, flow = [], []
    with harness:
        segment_scene(src, str(tmp / "warm"), model, opts, cluster)  # warm imports/caches
        for i in range(args.repeats):
            t = time.perf_counter()
            with open_client(cluster) as (client, res):
                r = segment(SegmentConfig(src=src, out=str(tmp / f"direct-{i}" / "scene"),
                                          model=model, **opts.model_dump()), client, res,
                            progress=False)
            direct.append(time.perf_counter() - t)
            t = time.perf_counter()
            f = segment_scene(src, str(tmp / f"flow-{i}"), model, opts, cluster)
            flow.append(time.perf_counter() - t)
            assert f["tiles_run"] == r.tiles_run == r.tiles_total
    d, fl = statistics.median(direct), statistics.median(flow)
    print(json.dumps({"scene": f"{args.size}x{args.size}x3", "tiles": r.tiles_total,
                      "repeats": args.repeats, "direct_s": [round(x, 2) for x in direct],
                      "flow_s": [round(x, 2) for x in flow], "direct_median_s": round(d, 2),
                      "flow_median_s": round(fl, 2), "overhead_s": round(fl - d, 2),
                      "overhead_pct": round(100 * (fl - d) / d, 1),
                      "cluster": cluster.model_dump(include={"n_workers", "threads_per_worker",
                                                             "processes"})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
