"""The metric against confusion matrices computed by hand (mmseg's convention: one matrix over the set)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from common.metrics import (RESIZE_PROTOCOLS, SYNTHIA13, SYNTHIA16, acc_per_class, confusion_matrix, evaluate,
                            format_table, iou_per_class, mean_iou, resize_image, resize_label, summarize)

PAL2 = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)


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
    msg = r"prediction contains class 19 but num_classes is 19 \(valid 0..18\)"
    with pytest.raises(ValueError, match=msg):
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


# ---- resizing as the references do it ----------------------------------------------------------------------
# (W, H) -> (W', H') pairs of the protocols: MADM's 512x512 test resize of DSEC, FMB, DELIVER, a 1024-wide
# halving, Mapillary-like halvings of odd sizes, Cityscapes 2048x1024 -> 1024x512, and one upscale.
PROTOCOL_SIZES = [((640, 440), (512, 512)), ((800, 600), (512, 512)), ((1042, 1042), (512, 512)),
                  ((1024, 1024), (512, 512)), ((640, 480), (320, 240)), ((4001, 3001), (2000, 1500)),
                  ((3263, 2447), (1631, 1223)), ((2048, 1024), (1024, 512)), ((80, 55), (512, 512))]


def _pil_label(lab: np.ndarray, size) -> np.ndarray:
    return np.asarray(Image.fromarray(lab.astype(np.uint8)).resize(size, Image.NEAREST)).astype(np.int64)


def test_resize_label_is_pillow_nearest_for_every_size():
    rng = np.random.default_rng(0)
    random_sizes = [((int(a), int(b)), (int(c), int(d))) for a, b, c, d in rng.integers(2, 300, (300, 4))]
    for (w, h), size in PROTOCOL_SIZES + random_sizes:
        lab = rng.integers(0, 256, (h, w))
        ref = _pil_label(lab, size)
        np.testing.assert_array_equal(resize_label(lab, size), ref, err_msg=f"{(w, h)} -> {size}")
        np.testing.assert_array_equal(resize_label(torch.from_numpy(lab), size), ref)
    # torch's "nearest-exact" agrees at the protocol sizes (not on every rounding boundary of other sizes)
    for (w, h), size in PROTOCOL_SIZES:
        lab = rng.integers(0, 256, (h, w))
        np.testing.assert_array_equal(resize_label(lab, size, "nearest-exact"), _pil_label(lab, size))
    # torch's legacy "nearest" picks other pixels: every column when halving 640, half of them for 640 -> 512
    lab = np.tile(np.arange(640) % 256, (4, 1))
    for size, frac in (((320, 4), 1.0), ((512, 4), 0.5)):
        differs = (resize_label(lab, size, "nearest") != _pil_label(lab, size)).any(0).mean()
        assert differs == frac


def _image(rng, w, h) -> np.ndarray:
    """uint8 (h, w, 3): a smooth gradient plus texture, so both aliasing and rounding show."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 11.0)[..., None]
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def test_pil_bilinear_option_matches_pillow():
    rng = np.random.default_rng(1)
    for (w, h), (W, H) in PROTOCOL_SIZES[:5] + [((80, 55), (512, 512)), ((640, 440), (64, 64))]:
        img = _image(rng, w, h)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        ref = np.asarray(Image.fromarray(img).resize((W, H), Image.BILINEAR)).astype(np.float64) / 255
        got = resize_image(x, (W, H), "pil-bilinear")[0].permute(1, 2, 0).double().numpy()
        diff = np.abs(got - ref)
        # Pillow rounds to uint8 after each of its two passes: measured max 1.0015 / 255 (Pillow 13)
        assert diff.max() <= 1.01 / 255 and diff.mean() < 0.35 / 255, ((w, h), (W, H), diff.max() * 255)
        plain = resize_image(x, (W, H), "bilinear")[0].permute(1, 2, 0).double().numpy()
        if W < w / 1.5:  # shrinking: the mmseg / OpenCV option (no antialiasing) is a different image
            assert np.abs(plain - ref).max() > 20 / 255
        # float32 ("F") images, as Pillow resizes grey modalities without rounding: float precision
        g = img[..., 0].astype(np.float32) / 255
        ref_f = np.asarray(Image.fromarray(g).resize((W, H), Image.BILINEAR))
        got_f = resize_image(torch.from_numpy(g)[None, None], (W, H), "pil-bilinear")[0, 0].numpy()
        assert np.abs(got_f - ref_f).max() < 1e-4


def test_evaluate_resizes_like_madm_and_like_mmseg():
    # MADM: a 640x440 test image and label go to 512x512 with Pillow (image BILINEAR, label NEAREST). The
    # model predicts the Pillow-resized label exactly, so mIoU = 1 iff evaluate resized the label that way.
    rng = np.random.default_rng(2)
    img = _image(rng, 640, 440)
    label = rng.integers(0, 3, (440, 640))
    label[label == 2] = 255
    expected_x = torch.from_numpy(np.array(Image.fromarray(img).resize((512, 512), Image.BILINEAR)))
    expected_x = expected_x.permute(2, 0, 1)[None].float() / 255
    target = torch.from_numpy(_pil_label(label, (512, 512))).clamp(max=1)
    seen = []

    def predict(x):
        seen.append(x)
        return torch.nn.functional.one_hot(target, 2).permute(2, 0, 1)[None].float()
    ds = _ListDataset([{"image": torch.from_numpy(img).permute(2, 0, 1).float() / 255,
                        "label": torch.from_numpy(label), "name": "a.png"}])
    kw = dict(device=torch.device("cpu"), input_size=(512, 512), metric_size="input", progress=False)
    out = evaluate(predict, ds, 2, ["a", "b"], PAL2, **kw, **RESIZE_PROTOCOLS["madm"])
    assert out["miou"] == 1.0 and out["aacc"] == 1.0
    assert (out["image_resize"], out["label_resize"]) == ("pil-bilinear", "pil-nearest")
    assert (seen[0] - expected_x).abs().max() <= 1.01 / 255
    # the legacy torch rule scores the same perfect prediction below 1
    assert evaluate(predict, ds, 2, ["a", "b"], PAL2, **kw, label_resize="nearest")["miou"] < 0.9
    # mmseg: plain bilinear input, the default; keep-ratio sizes per image through a callable input_size
    seen.clear()
    target = torch.from_numpy(np.where(label == 255, 0, label))
    out = evaluate(predict, ds, 2, ["a", "b"], PAL2, device=torch.device("cpu"), progress=False,
                   input_size=lambda hw: (hw[1] // 2, hw[0] // 2))
    plain = torch.nn.functional.interpolate(ds[0]["image"][None], size=(220, 320), mode="bilinear",
                                            align_corners=False)
    assert seen[0].shape[-2:] == (220, 320) and torch.equal(seen[0], plain)
    assert out["image_resize"] == "bilinear"
    assert out["resolution"] == "input 320x220, metric at native label size"


def test_unknown_resize_option_is_a_one_line_error():
    from common.cli import UserError
    ds = _ListDataset([{"image": torch.zeros(3, 4, 4), "label": np.zeros((4, 4), np.int64)}])
    with pytest.raises(UserError) as e:
        evaluate(lambda x: x[:, :2], ds, 2, ["a", "b"], PAL2, device=torch.device("cpu"), progress=False,
                 image_resize="bicubic")
    assert str(e.value) == "error: image_resize: unknown value 'bicubic'. Expected bilinear or pil-bilinear."
    with pytest.raises(UserError, match="Expected pil-nearest or nearest-exact or nearest"):
        resize_label(np.zeros((4, 4)), (2, 2), "area")
