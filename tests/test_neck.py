"""PAN-FPN neck: widths and depths per scale, wiring on any backbone's channels, exact parameter counts."""

from __future__ import annotations

import pytest
import torch

from backbones.errors import UserError
from detect.models.necks.pan import PAN, build_pan


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("scale", "in_channels", "out_channels", "blocks"),
    [
        ("n", (64, 128, 256), (64, 128, 256), 1),
        ("s", (128, 256, 512), (128, 256, 512), 1),
        ("m", (192, 384, 576), (192, 384, 576), 2),  # max_channels 768: 1024 is capped before the 0.75 width
        ("l", (256, 512, 512), (256, 512, 512), 3),
        ("x", (320, 640, 640), (320, 640, 640), 3),
    ],
)
def test_scale_widths_and_depths(
    scale: str, in_channels: tuple[int, int, int], out_channels: tuple[int, int, int], blocks: int
) -> None:
    with torch.device("meta"):
        neck = build_pan(in_channels, scale)
    assert neck.out_channels == out_channels
    assert neck.in_channels == in_channels
    assert all(len(c2f.blocks) == blocks for c2f in (neck.top_down_p4, neck.top_down_p3, neck.bottom_up_p5))


def test_parameter_counts_equal_yolov8_layers_10_to_21() -> None:
    # Ultralytics yolov8n / yolov8m: sum of the parameters of layers 10..21 (Upsample, Concat, C2f, Conv).
    with torch.device("meta"):
        assert _num_params(build_pan((64, 128, 256), "n")) == 986_880
        assert _num_params(build_pan((192, 384, 576), "m")) == 10_224_768


def test_forward_on_foreign_backbone_channels() -> None:
    # resnet50's C3/C4/C5 widths: the neck's inputs follow the backbone, its outputs follow the scale.
    torch.manual_seed(0)
    neck = build_pan((512, 1024, 2048), "n").eval()
    assert neck.top_down_p4.split_conv.conv.in_channels == 2048 + 1024
    assert neck.top_down_p3.split_conv.conv.in_channels == 128 + 512
    assert neck.bottom_up_p4.split_conv.conv.in_channels == 64 + 128
    assert neck.bottom_up_p5.split_conv.conv.in_channels == 128 + 2048
    feats = [torch.randn(2, 512, 8, 12), torch.randn(2, 1024, 4, 6), torch.randn(2, 2048, 2, 3)]
    with torch.no_grad():
        p3, p4, p5 = neck(feats)
    assert p3.shape == (2, 64, 8, 12)
    assert p4.shape == (2, 128, 4, 6)
    assert p5.shape == (2, 256, 2, 3)


def test_concat_order_upsampled_first() -> None:
    # Zero c4 and make c5 matter: the top-down C2f must read the upsampled c5 in its first input channels.
    neck = PAN((4, 4, 4), (8, 8, 8), 1).eval()
    seen: list[torch.Tensor] = []
    neck.top_down_p4.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    c3, c4, c5 = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2), torch.arange(4.0).view(1, 4, 1, 1)
    with torch.no_grad():
        neck([c3, c4, c5])
    merged = seen[0]  # [1, 8, 2, 2]
    assert torch.equal(merged[0, :4], c5[0].expand(4, 2, 2))  # nearest 2x upsampling of a 1x1 map
    assert torch.equal(merged[0, 4:], torch.zeros(4, 2, 2))


def test_bad_input_sizes_and_scale() -> None:
    neck = build_pan((64, 128, 256), "n")
    with pytest.raises(ValueError, match="multiples of 32"):
        neck([torch.zeros(1, 64, 5, 5), torch.zeros(1, 128, 3, 3), torch.zeros(1, 256, 2, 2)])
    with pytest.raises(UserError, match="n, s, m, l, x"):
        build_pan((64, 128, 256), "q")
