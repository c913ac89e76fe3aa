"""Metrics on small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from segcore.training import metrics as M


def test_dice_iou_pixel_error_by_hand():
    truth = np.zeros((4, 4), np.uint8)
    truth[0, :4] = 1                      # 4 foreground pixels
    pred = np.zeros((4, 4), bool)
    pred[0, :2] = True                    # 2 true positives
    pred[3, 3] = True                     # 1 false positive; 2 false negatives
    assert M.dice(truth, pred) == pytest.approx(4 / 7)
    assert M.iou(truth, pred) == pytest.approx(2 / 5)
    assert M.pixel_error(truth, pred) == pytest.approx(3 / 16)
    assert M.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_rand_error_merge_by_hand():
    truth = np.array([[1, 1, 0, 1, 1]])   # two segments separated by a boundary pixel
    pred = np.ones((1, 5), bool)          # one segment: a merge
    # pairs of pixels (sum of n^2 minus n, n = 4 labelled pixels): joint n_ij = (2, 2) -> 8 - 4
    # = 4; truth sizes (2, 2) -> 4; pred size 4 -> 16 - 4 = 12; F = 4 / ((4 + 12) / 2) = 0.5
    assert M.rand_error(truth, pred) == pytest.approx(0.5)
    assert M.rand_error(truth, truth) == pytest.approx(0.0)
    # "background" regions: membranes are class 1, cells the complement
    assert M.rand_error(1 - truth, ~pred, regions="background") == pytest.approx(0.5)


def test_mae_and_maxf():
    truth = np.array([[1, 1, 0, 0]])
    prob = np.array([[0.9, 0.6, 0.4, 0.1]])
    assert M.mae(truth, prob) == pytest.approx((0.1 + 0.4 + 0.4 + 0.1) / 4)
    f, thr = M.max_f([truth], [prob])
    assert f == pytest.approx(1.0) and 0.4 < thr <= 0.6  # a perfect separating threshold


def test_maxf_averages_precision_and_recall_over_images_first():
    t1, p1 = np.array([1, 0]), np.array([0.8, 0.2])
    t2, p2 = np.array([1, 0]), np.array([0.3, 0.7])
    # brute-force reference at every threshold k/255
    best = 0.0
    for k in range(256):
        ps, rs = [], []
        for t, p in ((t1, p1), (t2, p2)):
            pred = np.round(p * 255) >= k
            tp = (pred & (t == 1)).sum()
            ps.append(tp / max(pred.sum(), 1))
            rs.append(tp / (t == 1).sum())
        P, R = np.mean(ps), np.mean(rs)
        best = max(best, 1.3 * P * R / max(0.3 * P + R, 1e-12))
    f, _ = M.max_f([t1, t2], [p1, p2])
    assert f == pytest.approx(best)
    # at k in (0.3, 0.7]: image 1 perfect, image 2 P=0,R=0 -> P=R=0.5 -> F=0.5;
    # at k <= 0.3: P = (1 + 0.5)/2 = 0.75, R = 1 -> F = 1.3*0.75/(0.225+1) = 0.7959...
    assert f == pytest.approx(1.3 * 0.75 / 1.225)


def test_image_metrics_keys():
    t = np.eye(8, dtype=np.uint8)
    m = M.image_metrics(t, t.astype(float))
    assert m["dice"] == 1.0 and m["pixel_error"] == 0.0 and m["mae"] == 0.0
