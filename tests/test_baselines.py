"""The classical baselines beside each trained model (``Task.baselines``) and the harmonization
global colour head."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from montage.core.config import load_config
from montage.core.paths import packaged_config
from montage.core.registry import TASKS
from montage.platform.baselines import compare, measure_baselines, strongest
from montage.platform.metrics import fmse_255
from montage.tasks.harmonization.baselines import colour_transfer, transfer_one
from montage.tasks.harmonization.model import HarmModelConfig, HarmonizationUNet, apply_transform
from montage.tasks.pix2pix.baselines import triangulate, warp_piecewise_affine, warped_mean_faces
from montage.tasks.segmentation.baselines import grabcut_one


def _task(name: str, *overrides: str):
    cfg = load_config(
        name, TASKS.get(name).spec, packaged_config(f"{name}-smoke"), ["tracking.enabled=false", *overrides]
    )
    return TASKS.get(name)(cfg)


def _square_scene(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.normal([0.3, 0.5, 0.6], 0.05, (size, size, 3))
    mask = np.zeros((size, size), np.float32)
    mask[8:24, 10:22] = 1
    return img.clip(0, 1), mask


def test_transfer_moves_the_foreground_statistics_to_the_background() -> None:
    real, mask = _square_scene()
    fg = mask > 0
    comp = real.copy()
    comp[fg] = comp[fg] * np.array([0.6, 1.2, 0.9]) + np.array([0.1, -0.05, 0.02])  # a per-channel re-lighting
    for space in ("rgb", "lab"):
        out = transfer_one(comp, mask, space)
        np.testing.assert_array_equal(out[~fg], comp[~fg])  # the background is untouched
        np.testing.assert_allclose(out[fg].mean(0), real[~fg].mean(0), atol=0.01 if space == "rgb" else 0.03)
    rgb = transfer_one(comp, mask, "rgb")
    np.testing.assert_allclose(rgb[fg].std(0), real[~fg].std(0), rtol=0.02)
    # the composite's error mostly goes away (real fg and bg share their statistics here)
    assert ((rgb - real)[fg] ** 2).mean() < 0.1 * ((comp - real)[fg] ** 2).mean()
    with pytest.raises(ValueError, match="valid: lab, rgb"):
        transfer_one(comp, mask, "hsv")
    np.testing.assert_array_equal(transfer_one(comp, mask * 0, "rgb"), comp)  # no foreground: unchanged


def test_harmonization_baselines_are_keyed_like_eval_step() -> None:
    task = _task("harmonization", "loss.perceptual=0", "loss.style=0")  # no VGG to build
    _, val = task.datasets()
    batch = {k: torch.stack([val[i][k] for i in range(4)]) for k in ("composite", "mask", "target")}
    base = task.baselines(batch)
    assert set(base) == {"composite", "transfer_lab", "transfer_rgb"}
    net = task.build_nets()["net"]
    from montage.platform.task import Modules

    metrics = task.eval_step(Modules({"net": net.eval()}), batch)
    for name, values in base.items():
        assert set(values) <= set(metrics), name
        assert all(v.shape == (4,) for v in values.values())
    # the composite row is the identity model (the zero-initialised pixel head)
    torch.testing.assert_close(base["composite"]["fmse"], metrics["fmse"])
    assert base["transfer_rgb"]["fmse"].mean() < base["composite"]["fmse"].mean()


def test_a_12_channel_transform_is_a_colour_matrix_per_pixel() -> None:
    x = torch.rand(2, 3, 5, 7)
    mask = torch.ones(2, 1, 5, 7)
    mat = torch.tensor([[0.5, 0.2, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, 0.8]])
    bias = torch.tensor([0.05, -0.02, 0.01])
    t = torch.cat([(mat - torch.eye(3)).flatten(), bias])[None, :, None, None].expand(2, 12, 5, 7)
    expected = (torch.einsum("ij,bjhw->bihw", mat, x) + bias.view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(apply_transform(x, mask, t), expected)
    torch.testing.assert_close(apply_transform(x, mask * 0, t), x)  # outside the mask: the composite
    with pytest.raises(ValueError, match="6 or 12 channels"):
        apply_transform(x, mask, t[:, :7])


def test_the_global_head_starts_as_the_rgb_transfer_and_keeps_the_background() -> None:
    task = _task("harmonization", "model.head=global")
    _, val = task.datasets()
    batch = {k: torch.stack([val[i][k] for i in range(6)]) for k in ("composite", "mask", "target")}
    torch.manual_seed(0)
    net = HarmonizationUNet(HarmModelConfig(widths=[8, 16, 32], head="global")).eval()
    with torch.no_grad():
        out = net(batch["composite"], batch["mask"])
    ref = colour_transfer(batch["composite"], batch["mask"], "rgb")
    a, b = fmse_255(out, batch["target"], batch["mask"]), fmse_255(ref, batch["target"], batch["mask"])
    torch.testing.assert_close(a, b, rtol=0.05, atol=2.0)  # the head clamps extreme gains
    bg = batch["mask"].expand_as(out) == 0
    torch.testing.assert_close(out[bg], batch["composite"][bg])
    assert net.transform(batch["composite"], batch["mask"]).shape == (6, 12, 32, 32)
    with pytest.raises(ValueError, match="valid: pixel, global"):
        HarmModelConfig(head="matrix")


def test_grabcut_from_the_box_finds_a_contrasting_object_and_is_seeded() -> None:
    img = np.full((48, 48, 3), (40, 60, 200), np.uint8)
    truth = np.zeros((48, 48), bool)
    cv2.circle(img, (24, 26), 12, (230, 180, 40), -1)
    cv2.circle(truth.view(np.uint8), (24, 26), 12, 1, -1)
    pred = grabcut_one(img, truth)
    iou = (pred.astype(bool) & truth).sum() / (pred.astype(bool) | truth).sum()
    assert iou > 0.9
    np.testing.assert_array_equal(grabcut_one(img, truth), pred)
    assert not grabcut_one(img, np.zeros_like(truth)).any()


def test_segmentation_baselines_beside_eval_step() -> None:
    task = _task("segmentation")
    _, val = task.datasets()
    batch = {k: torch.stack([val[i][k] for i in range(4)]) for k in val[0]}
    base = task.baselines(batch)["grabcut"]
    assert {"iou", "dice", "trimap_acc", "alpha_sad"} <= set(base)
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in base.values())
    assert 0.2 < float(base["iou"].mean()) <= 1.0


def test_piecewise_affine_warp_moves_the_image_with_its_landmarks() -> None:
    size = 32
    img = np.zeros((size, size, 3), np.float32)
    img[10:14, 10:14] = 1.0
    src = np.array([[8.0, 8.0], [16.0, 8.0], [16.0, 16.0], [8.0, 16.0], [12.0, 12.0]])
    tris = triangulate(src, size)
    assert len(tris) >= 8 and tris.max() < len(src) + 8
    from montage.tasks.pix2pix.baselines import _anchors

    anchors = _anchors(size)
    same = warp_piecewise_affine(img, np.concatenate([src, anchors]), np.concatenate([src, anchors]), tris)
    np.testing.assert_allclose(same, img, atol=1e-5)
    moved = warp_piecewise_affine(img, np.concatenate([src, anchors]), np.concatenate([src + 3, anchors]), tris)
    ys, xs = np.nonzero(moved[..., 0] > 0.5)
    assert abs(xs.mean() - 14.5) < 1.0 and abs(ys.mean() - 14.5) < 1.0  # the square followed its landmarks


def test_pix2pix_baselines_and_the_warp_beats_the_mean_face() -> None:
    task = _task("pix2pix")
    train, val = task.datasets()
    assert task.mean_landmarks.shape == (48, 2)
    base = measure_baselines(task, val, batch_size=4)
    assert set(base) == {"mean_face", "warped_mean_face"}
    assert set(base["mean_face"]) == {"l1", "psnr", "ssim"}
    assert base["warped_mean_face"]["l1"] < base["mean_face"]["l1"]  # the shape is in the landmarks
    name, value = strongest(base, "l1", "min")
    assert name == "warped_mean_face" and value == base["warped_mean_face"]["l1"]
    c = compare(0.5 * value, base, "l1", "min")
    assert c.beats and c.ratio == pytest.approx(0.5)
    assert not compare(2 * value, base, "l1", "min").beats
    with pytest.raises(KeyError, match="mean_face"):
        strongest(base, "fmse", "min")
    one = warped_mean_faces(task.mean_face, task.mean_landmarks.numpy(), task.mean_landmarks[None])
    torch.testing.assert_close(one[0], task.mean_face, atol=1e-4, rtol=0)  # mean landmarks: the mean face


def test_channel_pruning_keeps_what_the_global_head_reads() -> None:
    from montage.platform.pruning import prune_channels
    from montage.tasks.harmonization.task import TransformOnly

    torch.manual_seed(0)
    net = HarmonizationUNet(HarmModelConfig(widths=[8, 16, 32], head="global")).eval()
    x, m = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    spec = TransformOnly(net)
    report = prune_channels(spec, (x, m), 0.5)
    assert report.params_after < 0.8 * report.params_before
    with torch.no_grad():
        assert spec(x, m).shape == (2, 12, 32, 32)  # the bottleneck the MLP pools and the 6-channel head kept
    assert net.head.out_channels == 6
