import numpy as np
import pytest

from seg.metrics import ConfusionMatrix


def test_metrics_match_hand_computed_values():
    # truth / prediction over 3 classes, with two ignored pixels (255)
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = ConfusionMatrix(3, ignore_index=255)
    conf.update(pred, truth)
    # rows truth, columns prediction
    assert conf.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = conf.compute()
    # class 0: tp 1, fp 1, fn 1 -> IoU 1/3, Dice 2/4
    # class 1: tp 2, fp 1, fn 0 -> IoU 2/3, Dice 4/5
    # class 2: tp 1, fp 0, fn 1 -> IoU 1/2, Dice 2/3
    assert m["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["dice_per_class"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["dice"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["pixel_error"] == pytest.approx(2 / 6)
    assert m["pixels"] == 6


def test_absent_class_is_left_out_of_the_means():
    conf = ConfusionMatrix(3, ignore_index=None)
    conf.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))
    m = conf.compute()
    assert m["iou"][2] is None
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_updates_accumulate_like_one_big_update():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, size=(3, 50, 60))
    pred = rng.integers(0, 4, size=(3, 50, 60))
    one = ConfusionMatrix(4)
    one.update(pred, truth)
    many = ConfusionMatrix(4)
    for p, t in zip(pred, truth):
        many.update(p, t)
    assert (one.matrix == many.matrix).all()
    assert one.matrix.sum() == truth.size
