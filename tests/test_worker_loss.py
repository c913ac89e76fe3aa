"""Worker loss: one Dask worker process is killed with SIGKILL in the middle of a scene (right
after it wrote a shard's data, before that shard's record: the worst moment), on a real
LocalCluster of two worker processes built the way the product builds it
(segcore.cluster.open_client). The run completes, the mask and probabilities are
bit-identical to an undisturbed run, and no shard was ever written by two processes at once.

The moment is picked by the test hook ``SEGCORE_FAULT_KILL="N:DIR"`` (segcore.shards.KILL_ENV),
read by the workers: the first worker process to have written N shards' data kills itself
(``os.kill(getpid(), SIGKILL)``, the same signal as ``kill -9``); every shard-data write is
journalled to DIR/writes.log with its process and start/end times.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np
import pytest

from segcore.cluster import ClusterConfig, open_client
from segcore.pipeline import SegmentConfig, segment
from segcore.shards import KILL_ENV
from tests.test_pipeline import make_model, make_scene, read_result

pytestmark = pytest.mark.slow


def test_sigkill_of_a_worker_mid_scene_completes_bit_identical(tmp_path, monkeypatch):
    _, _, ckpt = make_model(tmp_path)  # a small U-Net (depth 2, width 4): real convolutions
    _, src = make_scene(tmp_path, 256, 224)
    cfg = dict(src=src, model=ckpt, tile=64, halo=16, device="cpu", amp="none",
               skip_background=False, shards_per_task=3, pyramid=False)
    ref = segment(SegmentConfig(out=str(tmp_path / "ref"), **cfg), progress=False)
    total = ref.tiles_total  # 8 x 7 shards of 32 px

    hook = tmp_path / "hook"
    hook.mkdir()
    monkeypatch.setenv(KILL_ENV, f"5:{hook}")  # read by the worker processes spawned below
    out = str(tmp_path / "out")
    t0 = time.perf_counter()
    with open_client(ClusterConfig(n_workers=2, threads_per_worker=1,
                                   processes=True)) as (client, resources):
        pids_before = set(client.run(os.getpid).values())
        t1 = time.perf_counter()
        rep = segment(SegmentConfig(out=out, **cfg), client=client, resources=resources,
                      progress=False)
        t2 = time.perf_counter()
        pids_after = set(client.run(os.getpid).values())

    killed_pid, killed_key = (hook / "killed").read_text().split()
    killed_pid = int(killed_pid)
    writes: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for line in (hook / "writes.log").read_text().splitlines():
        pid, key, a, b = line.split()
        writes[key].append((float(a), float(b), int(pid)))
    rewritten = {k: v for k, v in writes.items() if len(v) > 1}
    print(f"\nkilled pid {killed_pid} after writing {killed_key}; {len(writes)} shards written, "
          f"{len(rewritten)} twice; report: run {rep.tiles_run}, resumed {rep.tiles_resumed}; "
          f"cluster start {t1 - t0:.1f} s, segment {t2 - t1:.1f} s")

    # one worker really died mid-scene and was replaced (the nanny restarts it)
    assert killed_pid in pids_before and killed_pid not in pids_after
    assert len(pids_after) == 2
    # the run completed and equals the undisturbed one, bit for bit
    assert rep.tiles_run + rep.tiles_resumed == rep.tiles_total == total
    assert rep.tiles_resumed >= 1  # the rerun trusted the dead worker's verified records
    a, b = read_result(str(tmp_path / "ref")), read_result(out)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # every shard was written; the one whose record the dead worker never wrote was written
    # again by another process, after the first write had ended: never two writers at once
    assert set(writes) == {t for t in _keys(total, out)}
    assert killed_key in rewritten
    assert rewritten[killed_key][0][2] == killed_pid
    assert rewritten[killed_key][-1][2] != killed_pid
    for key, spans in writes.items():
        spans.sort()
        for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"shard {key} written by two processes at once: {spans}"


def _keys(total: int, out: str) -> set[str]:
    from segcore.io.uri import get_fs

    fs, path = get_fs(f"{out}/shards")
    keys = {p.rsplit("/", 1)[1][:-len(".json")] for p in fs.ls(path)}
    assert len(keys) == total
    return keys
