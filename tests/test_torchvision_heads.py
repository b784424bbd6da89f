"""torchvision's RetinaNet, FCOS and Faster R-CNN as plugdet heads: number-for-number equality with torchvision's own
models, and the tools running each family a config key away.

The reference is torchvision's model itself (`RetinaNet(...)`, `FCOS(...)`, `FasterRCNN(...)`, built with its own
defaults wherever they apply) on the same backbone and neck, with the head weights copied and its resize/normalise
transform made an identity. Equal means equal: the loss parts, and every detection's box, score and label.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import assert_same_evaluation, load_tool
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from backbones import build_backbone
from backbones.checkpoint import load_checkpoint, save_backbone
from backbones.errors import UserError
from detect.cli import run_tool
from detect.losses import build_criterion
from detect.models import Detector, DetectorSpec, PartSpec, build_detector
from detect.models.registry import default_neck

SIZE = 128
NUM_CLASSES = 3
FAMILIES = ("retinanet", "fcos", "faster_rcnn")


class IdentityTransform(GeneralizedRCNNTransform):
    """torchvision's transform with resize and normalisation that change nothing (the input is already a
    letterboxed [0, 1] batch of one size, a multiple of 32)."""

    def __init__(self) -> None:
        super().__init__(SIZE, SIZE, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        return image, target


class BackboneWithNeck(nn.Module):
    """plugdet's backbone and neck as a torchvision detection backbone: an OrderedDict of maps and `out_channels`."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.body, self.neck = copy.deepcopy(detector.backbone), copy.deepcopy(detector.neck)
        self.out_channels = detector.neck.out_channels[0]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.neck(self.body(images))
        return OrderedDict((str(k), m) for k, m in enumerate(maps))


def plugdet_detector(head: str, seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    neck, kwargs = default_neck(head)
    spec = DetectorSpec(NUM_CLASSES, PartSpec("cspdarknet_n"), PartSpec(neck, {**kwargs, "out_channels": 64}),
                        PartSpec(head))  # fmt: skip
    return build_detector(spec)


def torchvision_model(head: str, detector: Detector) -> nn.Module:
    """torchvision's own model of the family on the same backbone + neck, with the plugdet head's weights."""
    backbone = BackboneWithNeck(detector)
    if head == "retinanet":  # torchvision's default anchors (32-512 at P3-P7), head and matcher
        model = RetinaNet(backbone, NUM_CLASSES)
        model.head.load_state_dict(detector.head.net.head.state_dict())
    elif head == "fcos":  # torchvision's default anchors (8-128 at P3-P7), head and centre sampling
        model = FCOS(backbone, NUM_CLASSES)
        model.head.load_state_dict(detector.head.net.head.state_dict())
    else:  # torchvision's defaults need P2-P6; plugdet's backbones start at P3, so the levels are given here
        anchors = AnchorGenerator(((64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 4)
        pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
        model = FasterRCNN(backbone, NUM_CLASSES + 1, rpn_anchor_generator=anchors, box_roi_pool=pool)
        model.rpn.load_state_dict(detector.head.net.rpn.state_dict())
        model.roi_heads.load_state_dict(detector.head.net.roi_heads.state_dict())
    model.transform = IdentityTransform()
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images and four boxes (rows image_index, class_id, x1, y1, x2, y2); image 1 has a box of every class."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1, 10.0, 12.0, 70.0, 90.0], [1, 0, 5.0, 40.0, 60.0, 120.0],
                            [1, 2, 64.0, 8.0, 127.0, 50.0], [1, 1, 30.0, 30.0, 41.0, 45.0]])  # fmt: skip
    return images, targets


def per_image(targets: torch.Tensor, offset: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": targets[targets[:, 0] == i, 2:6], "labels": targets[targets[:, 0] == i, 1].long() + offset}
            for i in range(2)]  # fmt: skip


@pytest.mark.parametrize("head", FAMILIES)
def test_loss_parts_equal_torchvision(head: str) -> None:
    detector = plugdet_detector(head).train()
    reference = torchvision_model(head, detector).train()
    images, targets = batch()
    offset = detector.head.label_offset
    torch.manual_seed(7)  # Faster R-CNN samples anchors and RoIs at random: the same draws on both sides
    expected = reference(list(images), per_image(targets, offset))
    torch.manual_seed(7)
    raw = detector(images, targets) if detector.head.needs_targets else detector(images)
    total, parts = build_criterion(detector.head)(raw, targets)
    assert list(parts) == list(expected)
    for name in parts:
        torch.testing.assert_close(parts[name], expected[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(total, sum(expected.values()), rtol=1e-6, atol=0)
    assert all(float(v.detach()) > 0 for v in parts.values())


@pytest.mark.parametrize("head", FAMILIES)
def test_detections_equal_torchvision(head: str) -> None:
    detector = plugdet_detector(head).eval()
    reference = torchvision_model(head, detector).eval()
    owner = reference.roi_heads if head == "faster_rcnn" else reference
    owner.score_thresh, owner.nms_thresh, owner.detections_per_img = 0.001, 0.6, 50
    images, _ = batch()
    with torch.no_grad():
        expected = reference(list(images))
    found = detector.detect(images, conf=0.001, iou=0.6, max_det=50)
    assert len(found) == len(expected) == 2
    for ours, theirs in zip(found, expected, strict=True):
        assert len(ours["boxes"]) > 0
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=0)
        torch.testing.assert_close(ours["labels"], theirs["labels"] - detector.head.label_offset, rtol=0, atol=0)
        assert bool((ours["scores"][:-1] >= ours["scores"][1:]).all())
        assert int(ours["labels"].min()) >= 0 and int(ours["labels"].max()) < NUM_CLASSES


def test_families_take_their_own_neck_and_torchvision_anchor_sizes() -> None:
    assert default_neck("retinanet") == ("fpn", {"extra": "p6p7"})
    assert default_neck("faster_rcnn") == ("fpn", {"extra": "pool"})
    assert default_neck("yolov8") == ("yolov8", {})
    retinanet = plugdet_detector("retinanet")
    assert retinanet.strides == (8, 16, 32, 64, 128)
    assert retinanet.head.net.anchor_generator.sizes == RetinaNet(BackboneWithNeck(retinanet), 2).anchor_generator.sizes
    assert plugdet_detector("faster_rcnn").strides == (8, 16, 32, 64)


def test_a_family_on_unequal_channels_is_one_line() -> None:
    spec = DetectorSpec(2, PartSpec("cspdarknet_n"), PartSpec("yolov8", {"scale": "n"}), PartSpec("retinanet"))
    with pytest.raises(UserError, match="same channels on every level.*model.neck=fpn"):
        build_detector(spec)


@pytest.mark.parametrize("head", FAMILIES)
@pytest.mark.train
def test_tools_train_validate_and_draw_each_family(
    head: str, synth_cub_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """train_det (flip-only recipe, as the family's config) from a CUB backbone.pt loaded strictly, val_det's COCO
    metrics and predict's pictures, with nothing but `model.head=<family>` (and a narrow FPN to keep it fast)."""
    torch.manual_seed(0)
    backbone = build_backbone("cspdarknet_n")
    save_backbone(tmp_path / "backbone.pt", backbone, "cspdarknet_n", {}, {"top1": 0.5})
    det_argv = [f"data.root={synth_cub_root}", "data.img_size=96", "train.epochs=1", "train.batch_size=4",
                "train.workers=0", "train.mosaic=0", f"model.backbone_weights={tmp_path / 'backbone.pt'}",
                f"model.head={head}", "model.neck_kwargs.out_channels=64",
                f"output_dir={tmp_path / 'det'}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="plugdet"):
        assert run_tool(load_tool("train_det").main, det_argv) == 0
    count = len(backbone.state_dict())
    assert f"backbone cspdarknet_n: transferred {count} tensors" in caplog.text
    rows = (tmp_path / "det" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and "AP" in rows[0]
    weights = str(tmp_path / "det" / "best.pt")
    assert run_tool(load_tool("val_det").main, ["--weights", weights, "--out", str(tmp_path / "val")]) == 0
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert_same_evaluation(metrics, load_checkpoint(weights)["metrics"])  # same weights, same rect batches
    images = str(synth_cub_root / "CUB_200_2011" / "images" / "*" / "*_0000*.jpg")
    argv = ["--weights", weights, "--source", images, "--out", str(tmp_path / "pred"), "--conf", "0.0"]
    assert run_tool(load_tool("predict").main, argv) == 0
    entries = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert entries and all(entry["detections"] for entry in entries)


def test_export_refuses_a_torchvision_family_in_one_line(tmp_path: Path) -> None:
    from detect.interop.export import export_model

    detector = plugdet_detector("retinanet").eval()
    with pytest.raises(UserError, match="RetinaNetFamily head .* not exportable.*YOLO families"):
        export_model(detector, {"class_names": ["a", "b", "c"]}, tmp_path / "m.onnx", img_size=160)
    assert not (tmp_path / "m.onnx").exists()
