"""Boundary-aware targets from instance-id masks: touching instances must come out as separate
objects of the binary target, on a drawn case and on real DSB 2018 nuclei (when ../shared is
there)."""

from __future__ import annotations

import numpy as np
import tifffile
from scipy import ndimage

from segcore.training.data import load_folder, separate_instances
from segcore.training.losses import border_weight_map
from tests.conftest import shared_dataset

EIGHT = np.ones((3, 3), bool)


def assert_instances_stay_apart(labels: np.ndarray, target: np.ndarray) -> None:
    comps, n = ndimage.label(target, structure=EIGHT)
    for c in range(1, n + 1):
        ids = np.unique(labels[comps == c])
        assert len(ids) == 1 and ids[0] > 0, f"component {c} spans instances {ids}"
    assert not target[labels == 0].any()  # background stays background


def test_touching_squares_are_split_by_a_background_line():
    lab = np.zeros((20, 30), np.uint16)
    lab[4:16, 3:15] = 7
    lab[4:16, 15:27] = 9  # shares an edge with 7
    lab[17:19, 0:3] = 4   # alone, touching the image border
    t = separate_instances(lab)
    assert ndimage.label(lab > 0, structure=EIGHT)[1] == 2  # naive foreground merges 7 and 9
    assert ndimage.label(t, structure=EIGHT)[1] == 3
    assert_instances_stay_apart(lab, t)
    assert not t[4:16, 14:16].any() and t[10, 13] and t[10, 16]  # only the shared edge goes
    assert t[17:19, 0:3].all()  # an isolated object loses nothing, even at the image border
    # the U-Net border weight map now sees two objects and weights the gap between them
    w = border_weight_map(t)
    assert w[10, 14] > 5 * w[1, 1]


def test_folder_loader_and_real_nuclei(tmp_path):
    lab = np.zeros((32, 32), np.uint16)
    lab[2:12, 2:12], lab[2:12, 12:20] = 300, 301  # ids above 255: uint16 masks
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.full((32, 32), 90, np.uint8))
    tifffile.imwrite(tmp_path / "masks" / "a.tif", lab)
    s = load_folder(str(tmp_path), class_map="instances-borders")[0]
    assert ndimage.label(s.mask, structure=EIGHT)[1] == 2
    d = shared_dataset("nuclei-dsb2018-stardist")  # skips when ../shared is absent
    real = tifffile.imread(d / "mask2d.tif")
    t = separate_instances(real)
    assert_instances_stay_apart(real, t)
    # every nucleus survives (a thin neck may split one into two parts; none are merged)
    assert set(np.unique(real[t > 0])) == set(np.unique(real)) - {0}
    assert t.sum() > 0.85 * (real > 0).sum()  # only contact lines are removed
