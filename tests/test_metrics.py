"""The metric against confusion matrices computed by hand (datasets.md §7)."""
import math

import numpy as np
import pytest
import torch

from common.metrics import (SYNTHIA13, SYNTHIA16, acc_per_class, confusion_matrix, evaluate, format_table,
                            iou_per_class, mean_iou, summarize)


def test_confusion_matrix_by_hand_rows_are_ground_truth():
    # pixel pairs (gt, pred): (0,0) (0,1) (1,1) (2,0) and one ignored pixel predicted as 2
    target = np.array([[0, 0, 1], [2, 255, 1]])
    pred = np.array([[0, 1, 1], [0, 2, 1]])
    conf = confusion_matrix(pred, target, 3)
    expected = np.array([[1, 1, 0],
                         [0, 2, 0],
                         [1, 0, 0]])
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)
    # IoU_0 = 1 / (2 + 2 - 1) = 1/3, IoU_1 = 2 / (2 + 3 - 2) = 2/3, IoU_2 = 0 / (1 + 0 - 0) = 0
    np.testing.assert_allclose(iou_per_class(conf), [1 / 3, 2 / 3, 0.0])
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    np.testing.assert_allclose(acc_per_class(conf), [0.5, 1.0, 0.0])


def test_torch_inputs_and_accumulation_equal_one_big_matrix():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (5, 7, 9))
    p = rng.integers(0, 4, (5, 7, 9))
    t[0, :2] = 255
    total = sum(confusion_matrix(torch.from_numpy(p[i]), torch.from_numpy(t[i]), 4) for i in range(5))
    np.testing.assert_array_equal(total, confusion_matrix(p, t, 4))
    assert total.sum() == (t != 255).sum()


def test_absent_class_is_nan_and_excluded_but_false_positive_counts():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])  # class 2 absent from gt but predicted once; class 3 absent everywhere
    conf = confusion_matrix(pred, target, 4)
    iou = iou_per_class(conf)
    assert iou[2] == 0.0
    assert math.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_perfect_and_empty_predictions():
    target = np.array([[0, 1], [2, 255]])
    perfect = confusion_matrix(np.array([[0, 1], [2, 0]]), target, 3)
    assert mean_iou(perfect) == 1.0
    everything_wrong = confusion_matrix(np.array([[1, 2], [0, 0]]), target, 3)
    assert mean_iou(everything_wrong) == 0.0
    # an image made only of ignore pixels contributes nothing; all-NaN gives NaN without a warning
    empty = confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 255), 3)
    assert empty.sum() == 0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(mean_iou(empty))


def test_out_of_range_prediction_raises_the_spec_message():
    with pytest.raises(ValueError, match=r"prediction contains class 19 but num_classes is 19 \(valid 0..18\)"):
        confusion_matrix(np.array([19]), np.array([0]), 19)
    # an out-of-range prediction on an ignored pixel is not an error
    confusion_matrix(np.array([19]), np.array([255]), 19)


def test_synthia_miou16_and_miou13_from_per_class_ious():
    conf = np.zeros((19, 19), np.int64)
    for c in range(19):
        if c in (9, 14, 16):
            continue  # never occurs in SYNTHIA, never predicted: NaN
        conf[c, c] = 10
        conf[c, (c + 1) % 19] = c  # IoU decreases with the class id
    s = summarize(conf, [f"c{i}" for i in range(19)], synthia=True)
    iou = iou_per_class(conf)
    assert s["miou16"] == pytest.approx(np.nanmean(iou[list(SYNTHIA16)]))
    assert s["miou13"] == pytest.approx(np.nanmean(iou[list(SYNTHIA13)]))
    assert len(SYNTHIA16) == 16 and len(SYNTHIA13) == 13 and not {3, 4, 5} & set(SYNTHIA13)
    assert "mIoU16" in format_table(conf, [f"c{i}" for i in range(19)], "h", synthia=True)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_evaluate_upsamples_logits_to_the_native_label_and_writes_pictures(tmp_path):
    # label 8x8: left half class 0, right half class 1; the model sees a 4x4 input and predicts from the image
    label = np.zeros((8, 8), np.int64)
    label[:, 4:] = 1
    label[0, 0] = 255
    image = torch.zeros(3, 8, 8)
    image[0, :, 4:] = 1.0
    ds = _ListDataset([{"image": image, "label": label, "name": "a.png"}] * 3)

    def predict(x):  # (1, 3, 4, 4) -> (1, 2, 2, 2) logits at stride 2
        assert x.shape[-2:] == (4, 4)
        r = torch.nn.functional.avg_pool2d(x[:, :1], 2)
        return torch.cat([1 - r, r], 1) * 10

    out = evaluate(predict, ds, 2, ["a", "b"], np.array([[0, 0, 0], [255, 255, 255]], np.uint8),
                   device=torch.device("cpu"), input_size=(4, 4), desc="toy val", pictures_dir=tmp_path,
                   num_pictures=2, progress=False)
    assert out["miou"] == 1.0
    assert sum(out["gt_pixels"].values()) == 3 * 63
    assert out["resolution"] == "input 4x4, metric at native label size"
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert "mIoU 100.00" in out["table"]
