"""The seam report: sampled shards recomputed with a larger halo (exact mode: they agree;
an approximate halo: the check sees the difference), neighbouring windows compared in blend
mode, figures in the report and a heat map."""

import json

import numpy as np
from PIL import Image

from segcore.pipeline import SegmentConfig, segment
from segcore.seams import sample
from segcore.tiling import plan_tiles
from tests.test_pipeline import make_model, make_scene


def _run(tmp_path, name, size=(300, 390), **kw):
    _, _, ckpt = make_model(tmp_path, kwargs={"depth": 3, "width": 4})
    _, src = make_scene(tmp_path, *size)
    out = tmp_path / name
    rep = segment(SegmentConfig(src=src, out=str(out), model=ckpt, tile=128,
                                skip_background=False, seams=3, prob_dtype="float16", **kw),
                  progress=False)
    return rep, out


def test_exact_run_agrees_with_a_larger_halo_and_an_approximate_one_does_not(tmp_path):
    rep, out = _run(tmp_path, "exact")
    s = rep.seams
    assert rep.exact and s["exact"] and s["mode"].startswith("exact")
    assert s["shards_checked"] == 3 and len(s["per_shard"]) == 3
    assert all(r["check_halo"] > rep.halo for r in s["per_shard"])
    assert s["pixels_compared"] == sum(r["pixels"] for r in s["per_shard"]) > 0
    assert s["max_abs_prob_diff"] <= 2e-3  # float16 storage, float sums in another window
    assert s["label_flip_fraction"] <= 1e-3
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["seams"]["shards_checked"] == 3 and "seams" in on_disk["timings"]
    heat = np.asarray(Image.open(out / "seams.png"))
    assert heat.shape[:2] == (300, 390) and (heat == 96).all(-1).any()  # grey: not checked
    assert rep.uris["seams"].endswith("seams.png")

    # no halo at all: not exact, and the check measures by how much
    approx, _ = _run(tmp_path, "approx", halo=0)
    assert not approx.exact
    # (an untrained model depends little on its context: 0.0044 here, against 0 exact)
    assert approx.seams["max_abs_prob_diff"] > 2e-3 >= s["max_abs_prob_diff"]
    assert approx.seams["mean_abs_prob_diff"] > 5 * s["mean_abs_prob_diff"]


def test_blend_mode_compares_neighbouring_windows(tmp_path):
    rep, out = _run(tmp_path, "blend", size=(200, 260), blend=True)
    s = rep.seams
    assert s["mode"].startswith("blend") and s["shards_checked"] == 3
    assert all(r["neighbours"] for r in s["per_shard"])
    assert s["pixels_compared"] > 0 and 0 <= s["label_flip_fraction"] <= 1
    assert s["max_abs_prob_diff"] >= s["mean_abs_prob_diff"] >= 0
    assert (out / "seams.png").stat().st_size > 0


def test_sample_spreads_over_run_tiles():
    grid = plan_tiles(1000, 1000, 256, 32, 16)
    n = len(grid.tiles)
    run = tuple(i % 3 != 0 for i in range(n))
    picked = sample(grid.tiles, run, 4, blend=False)
    assert len(picked) == 4 and all(run[i] for i in picked) and picked == sorted(set(picked))
    assert picked[0] == 1 and picked[-1] == max(i for i in range(n) if run[i])
    assert sample(grid.tiles, run, 0, blend=False) == []
    assert len(sample(grid.tiles, run, 10_000, blend=False)) == sum(run)
    last = next(i for i, t in enumerate(grid.tiles)
                if t.row == max(u.row for u in grid.tiles) and t.col == max(u.col for u in grid.tiles))
    assert last not in sample(grid.tiles, (True,) * n, n, blend=True)  # no right/lower neighbour
