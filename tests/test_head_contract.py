"""The head-family contract the engine and evaluation rely on, proved with a family unlike YOLO: a two-stage-style
head whose training forward needs the targets and returns its own losses, and whose decode already gives final
boxes (the shape torchvision's RetinaNet / FCOS / Faster R-CNN take in the next build)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from detect.eval.evaluate import evaluate
from detect.losses import build_criterion
from detect.models import DetectorSpec, PartSpec, build_detector
from detect.models.heads.base import DetectionHead
from detect.models.registry import HEADS, LOSSES, register_head, register_loss
from detect.precision import Precision
from detect.train.engine import EpochStart, Optimization, Schedule, StepState, train_one_epoch


class BoxPerImageHead(DetectionHead):
    """Predicts one box and one score per image from pooled features; needs the targets in training."""

    default_loss = "sum_of_head_losses"
    needs_targets = True

    def __init__(self, num_classes: int, in_channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        self.num_classes, self.strides = num_classes, tuple(strides)
        self.regress = nn.Linear(in_channels[-1], 4 + num_classes)
        self.seen_targets: list[torch.Tensor] = []

    def forward(self, features: list[torch.Tensor], image_size: tuple[int, int], targets: torch.Tensor | None = None):
        out = self.regress(features[-1].mean(dim=(2, 3)))  # [B, 4 + C]
        height, width = image_size
        boxes = out[:, :4].sigmoid() * torch.tensor([width, height, width, height])  # [B, 4] (unordered corners)
        boxes = torch.cat((boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])), dim=1)
        if targets is None:
            return {"boxes": boxes, "logits": out[:, 4:]}
        self.seen_targets.append(targets)
        first = torch.stack([targets[targets[:, 0] == b][0, 2:] for b in range(out.shape[0])])  # [B, 4]
        return {"loss_box": (boxes - first).abs().mean() / 100, "loss_cls": out[:, 4:].pow(2).mean()}

    def decode(self, raw: dict, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        scores, labels = raw["logits"].sigmoid().max(dim=1)
        rows = zip(raw["boxes"], scores, labels, strict=True)
        return [{"boxes": b[None], "scores": s[None], "labels": c[None]} for b, s, c in rows]

    def postprocess(self, decoded: list[dict], conf: float, iou: float, max_det: int, multi_label: bool = False):
        return [{k: v[d["scores"] > conf][:max_det] for k, v in d.items()} for d in decoded]


@pytest.fixture
def toy_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HEADS, "_factories", dict(HEADS._factories))
    monkeypatch.setattr(LOSSES, "_factories", dict(LOSSES._factories))
    register_head("box_per_image")(BoxPerImageHead)

    @register_loss("sum_of_head_losses")
    def sum_of_head_losses(head: nn.Module, loss: dict, assign: dict):
        def criterion(raw: dict, targets: torch.Tensor):
            return sum(raw.values()), {name.removeprefix("loss_"): value.detach() for name, value in raw.items()}

        return criterion


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for b in range(count):
        images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=generator)
        targets = torch.tensor([[0, 0, 8.0, 8, 40, 40], [1, 1, 16, 4, 60, 30]])
        metas = [{"ratio": (1.0, 1.0), "pad": (0, 0), "orig_size": (64, 64), "image_id": 2 * b + i + 1, "index": i}
                 for i in range(2)]  # fmt: skip
        batches.append((images, targets, metas))
    return batches


def test_a_family_that_takes_targets_and_returns_final_boxes_trains_and_evaluates(toy_family: None) -> None:
    spec = DetectorSpec(2, PartSpec("cspdarknet_n"), PartSpec("yolov8", {"scale": "n"}), PartSpec("box_per_image"))
    model = build_detector(spec)
    criterion = build_criterion(model.head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    schedule = Schedule(0.01, 0.01, 1, "linear", 0.9, 0, 0.0, 0.9, 2, 2)
    stats = train_one_epoch(model, criterion, _batches(2), Optimization(optimizer, schedule), StepState(),
                            EpochStart(0), Precision(torch.device("cpu")))  # fmt: skip
    assert set(stats) == {"box", "cls", "img_per_s", "lr/pg0"} and stats["box"] > 0
    assert len(model.head.seen_targets) == 2  # the training forward got the targets
    gt = {"images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.jpg"} for i in (1, 2)],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 32, 32], "area": 1024,
                           "iscrowd": 0}], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}  # fmt: skip
    metrics, predictions, _ = evaluate(model, _batches(1), gt, [1, 2], Precision(torch.device("cpu")), conf=0.0)
    assert len(predictions) == 2 and {p["image_id"] for p in predictions} == {1, 2}
    assert len(metrics["coco_stats"]) == 12
