import math
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn

from montage.nn.losses import VGGFeatures, edge_loss, gram, sobel, soft_dice_loss
from montage.nn.unet import AttentionGate, PretrainedWeightsError, _load_resnet
from montage.platform.metrics import alpha_metrics, binary_metrics, boundary_band, trimap_metrics
from montage.platform.task import Task
from montage.tasks.segmentation.losses import SegLossConfig, SegmentationLoss
from montage.tasks.segmentation.model import SegmentationUNet, SegModelConfig


class ListIdentity(nn.Module):
    """A stand-in 'VGG' whose single feature map is the input itself."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


def test_binary_metrics_by_hand() -> None:
    pred = torch.tensor([[1, 1, 0, 0]])
    target = torch.tensor([[1, 0, 1, 0]])
    m = binary_metrics(pred, target)  # tp=fp=fn=tn=1
    assert m["iou"].item() == pytest.approx(1 / 3)
    for key in ("dice", "accuracy", "precision", "recall", "specificity", "f1"):
        assert m[key].item() == pytest.approx(0.5), key
    empty = binary_metrics(torch.zeros(1, 4), torch.zeros(1, 4))
    assert empty["iou"].item() == 1.0 and empty["accuracy"].item() == 1.0
    miss = binary_metrics(torch.zeros(1, 4), torch.tensor([[0, 1, 1, 1]]))
    assert miss["iou"].item() == 0.0 and miss["recall"].item() == 0.0 and miss["f1"].item() == 0.0


def test_alpha_metrics_by_hand() -> None:
    pred = torch.full((2, 1, 10, 10), 0.5)
    target = torch.zeros(2, 1, 10, 10)
    m = alpha_metrics(pred, target)
    assert m["sad"].shape == (2,)
    assert m["sad"][0].item() == pytest.approx(50 / 1000)
    assert m["mse"][0].item() == pytest.approx(0.25)
    assert m["grad"][0].item() == pytest.approx(0.0, abs=1e-6)  # both flat
    step = torch.zeros(1, 1, 10, 10)
    step[..., 5:] = 1
    assert alpha_metrics(step, target[:1])["grad"].item() > 0


def test_dice_bce_edge_perceptual_by_hand() -> None:
    assert soft_dice_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.25)
    ramp = torch.arange(4.0).repeat(4, 1).view(1, 1, 4, 4)  # columns 0, 1, 2, 3
    g = sobel(ramp)
    assert g.shape == (1, 2, 4, 4)
    assert g[0, 0, 1].tolist() == [4.0, 8.0, 8.0, 4.0]  # replicate padding at the borders
    assert g[0, 1].abs().sum().item() == 0.0
    assert edge_loss(ramp, torch.zeros_like(ramp)).item() == pytest.approx(3.0)

    cfg = SegLossConfig(vgg_weights="random")
    loss = SegmentationLoss(cfg, vgg=ListIdentity())
    logits = torch.zeros(1, 1, 4, 4)  # p = 0.5 everywhere
    target = torch.ones(1, 1, 4, 4)
    image = torch.ones(1, 3, 4, 4)
    terms = loss(logits, target, image)
    assert terms["bce"].item() == pytest.approx(math.log(2))
    assert terms["dice"].item() == pytest.approx(1 - (2 * 8 + 1) / (8 + 16 + 1))
    assert terms["edge"].item() == pytest.approx(0.0)
    assert terms["perceptual"].item() == pytest.approx(0.5)  # |1·0.5 − 1·1|
    valid = torch.zeros(1, 1, 4, 4)
    valid[..., :2] = 1
    logits2 = torch.full((1, 1, 4, 4), 5.0)
    logits2[..., 2:] = -5.0  # wrong only where ignored
    assert loss(logits2, target, image, valid)["bce"].item() == pytest.approx(math.log1p(math.exp(-5)))


def test_weighted_total_uses_config_weights() -> None:
    terms = {"bce": torch.tensor(2.0), "dice": torch.tensor(3.0), "edge": torch.tensor(5.0)}
    assert Task.weighted_total(terms, {"bce": 1.0, "dice": 0.5, "edge": 0.0}).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="every loss weight is zero"):
        Task.weighted_total(terms, {})


def test_gram_matrix() -> None:
    x = torch.ones(1, 2, 2, 2)
    assert torch.allclose(gram(x), torch.full((1, 2, 2), 4 / 8))


def test_attention_gate_formula_and_shapes() -> None:
    gate = AttentionGate(g_ch=8, x_ch=4, inter_ch=2)
    for p in gate.parameters():
        nn.init.zeros_(p)
    nn.init.constant_(gate.psi.bias, 1.0)
    g, x = torch.randn(2, 8, 16, 16), torch.randn(2, 4, 16, 16)
    out = gate(g, x)
    assert out.shape == x.shape
    assert gate.coefficients(g, x).shape == (2, 1, 16, 16)
    assert torch.allclose(out, x * torch.sigmoid(torch.tensor(1.0)))  # α = σ(ψ(ReLU(0)) + 1)


def test_unet_shapes_attention_maps_and_size() -> None:
    cfg = SegModelConfig(encoder="tiny", pretrained=False, decoder_channels=[16, 16, 8, 8, 8])
    model = SegmentationUNet(cfg).eval()
    x = torch.rand(2, 3, 64, 64)
    assert model(x).shape == (2, 1, 64, 64)
    maps = model.decoder.attention_maps(model.encoder(x))
    assert [m.shape[-1] for m in maps] == [4, 8, 16, 32]  # one gate per skip
    n = sum(p.numel() for p in model.parameters())
    assert 5_000 < n < 60_000, n
    ckpt = SegmentationUNet(
        SegModelConfig(encoder="tiny", pretrained=False, decoder_channels=[16, 16, 8, 8, 8], grad_checkpointing=True)
    ).train()
    ckpt(torch.rand(2, 3, 64, 64)).sum().backward()  # checkpointed decoder trains
    assert all(p.grad is not None for p in ckpt.decoder.parameters())


def test_full_resolution_skip_reaches_the_finest_decoder_block() -> None:
    cfg = SegModelConfig(
        encoder="small", pretrained=False, full_res_skip=16, decoder_channels=[64, 32, 16, 16, 16], attention=True
    )
    model = SegmentationUNet(cfg).eval()
    assert model.encoder.strides == [1, 2, 4, 8, 16, 32] and model.encoder.channels[0] == 16
    with torch.no_grad():
        feats = model.encoder(torch.rand(1, 3, 64, 64))
        assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4, 2]
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    assert [m.shape[-1] for m in model.decoder.attention_maps(feats)] == [
        4,
        8,
        16,
        32,
        64,
    ]  # the last gate is at full size
    with pytest.raises(ValueError, match="decoder needs 5 channel widths"):
        SegmentationUNet(
            SegModelConfig(
                encoder="small", pretrained=False, full_res_skip=16, decoder_channels=[16, 16, 16, 16, 16, 16]
            )
        )


def test_trimap_metrics_by_hand() -> None:
    target = torch.zeros(1, 1, 12, 12)
    target[..., 3:9, 3:9] = 1  # a 6×6 square
    band = boundary_band(target, 1)
    assert band.sum() == 8 * 8 - 4 * 4  # dilated 8×8 minus eroded 4×4
    perfect = trimap_metrics(target, target, 1)
    assert perfect["acc"].item() == 1 and perfect["sad"].item() == 0 and perfect["mse"].item() == 0
    pred = target.clone()
    pred[..., 2, 3:9] = 0.8  # a row outside the square, inside the band, predicted foreground
    m = trimap_metrics(pred, target, 1)
    assert m["acc"].item() == pytest.approx(1 - 6 / 48)
    assert m["sad"].item() == pytest.approx(6 * 0.8 / 1000)
    assert m["mse"].item() == pytest.approx(6 * 0.64 / 48)
    pred[..., 0, 0] = 1  # far from the boundary: not counted
    assert trimap_metrics(pred, target, 1)["acc"].item() == pytest.approx(1 - 6 / 48)


def test_resnet34_channels() -> None:
    model = SegmentationUNet(SegModelConfig(encoder="resnet34", pretrained=False))
    assert model.encoder.channels == [64, 64, 128, 256, 512]
    with torch.no_grad():
        feats = model.encoder(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 64, 128, 256, 512]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]


def test_pretrained_offline_fails_clearly_and_local_path_works(monkeypatch, tmp_path: Path) -> None:
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match="weights_path"):
        _load_resnet("resnet18", pretrained=True, weights_path=None)
    with pytest.raises(PretrainedWeightsError, match="vgg_weights"):
        VGGFeatures(weights="imagenet")
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    loaded = _load_resnet("resnet18", pretrained=True, weights_path=str(path))
    assert torch.equal(loaded.conv1.weight, ref.conv1.weight)
    with pytest.raises(PretrainedWeightsError, match="not found"):
        _load_resnet("resnet18", pretrained=True, weights_path=str(tmp_path / "nope.pth"))
    # a VGG16 state_dict file (torchvision's layout, classifier included): the taps are torchvision's layers
    vgg = torchvision.models.vgg16(weights=None).eval()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    taps = VGGFeatures(["relu2_2", "relu4_3"], str(tmp_path / "vgg16.pth"))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = vgg.features[:23]((x - taps.mean) / taps.std)
        assert torch.equal(taps(x)[-1], ref) and len(taps.features) == 23
    with pytest.raises(PretrainedWeightsError, match="not found"):
        VGGFeatures(weights=str(tmp_path / "nope.pth"))


def test_random_vgg_is_deterministic_and_frozen() -> None:
    a, b = VGGFeatures(["relu1_2"], "random"), VGGFeatures(["relu1_2"], "random")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(a(x)[0], b(x)[0])
    assert not any(p.requires_grad for p in a.parameters())
    with pytest.raises(ValueError, match="unknown VGG16 layers"):
        VGGFeatures(["relu9_9"], "random")


@pytest.mark.parametrize("stride,cin,cout", [(1, 8, 8), (2, 8, 16)])
def test_the_tiny_encoders_basic_block_is_torchvisions(stride: int, cin: int, cout: int) -> None:
    """Same seed, same weights and keys, same output as torchvision's BasicBlock (train and eval mode)."""
    from torchvision.models.resnet import BasicBlock

    from montage.nn.unet import _BasicBlock

    def down() -> nn.Module | None:
        if stride == 1 and cin == cout:
            return None
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    torch.manual_seed(0)
    ours = _BasicBlock(cin, cout, stride, down(), nn.BatchNorm2d)
    torch.manual_seed(0)
    theirs = BasicBlock(cin, cout, stride, down())
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, cin, 16, 16)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)
