"""The head-family contract the engine and evaluation rely on, proved with a family unlike YOLO: a two-stage-style
head whose training forward needs the targets and returns its own losses, and whose decode already gives final
boxes (the shape torchvision's RetinaNet / FCOS / Faster R-CNN take in the next build)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from detect.eval.evaluate import evaluate
from detect.losses import build_criterion
from detect.losses.registry import LOSSES, register_loss
from detect.models import DetectorSpec, PartSpec, build_detector
from detect.models.heads.base import DetectionHead
from detect.models.registry import HEADS, register_head
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
    # The trained head's own detections (no letterbox to undo: ratio 1, pad 0), in COCO's format by hand.
    with torch.no_grad():
        found = model.eval().detect(_batches(1)[0][0].float() / 255, 0.0, 0.7, 300, True)
    expected = []
    for image_id, d in zip((1, 2), found, strict=True):
        (x1, y1, x2, y2), score, label = d["boxes"][0].tolist(), float(d["scores"][0]), int(d["labels"][0])
        bbox = [round(v, 3) for v in (x1, y1, x2 - x1, y2 - y1)]
        expected.append({"image_id": image_id, "category_id": label + 1, "bbox": bbox, "score": round(score, 5)})
    # Ground truth: in each image the box and class the model finds there, so every detection is a true positive at
    # every IoU: AP, AP50, AP75, AR1/10/100 = 1; the area bucket of the boxes 1, the other buckets -1 (no gt).
    annotations = [{"id": k + 1, "image_id": e["image_id"], "category_id": e["category_id"], "bbox": e["bbox"],
                    "area": e["bbox"][2] * e["bbox"][3], "iscrowd": 0} for k, e in enumerate(expected)]  # fmt: skip
    gt = {"images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.jpg"} for i in (1, 2)],
          "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}  # fmt: skip
    metrics, predictions, _ = evaluate(model, _batches(1), gt, [1, 2], Precision(torch.device("cpu")), conf=0.0)
    assert predictions == expected
    buckets = {0 if a["area"] < 32**2 else 1 if a["area"] < 96**2 else 2 for a in annotations}
    by_area = [1.0 if k in buckets else -1.0 for k in range(3)]
    assert np.allclose(metrics["coco_stats"], [1, 1, 1, *by_area, 1, 1, 1, *by_area], rtol=0, atol=1e-12)
    assert metrics["coco_stats"] == cocoeval_stats(gt, expected)  # pycocotools itself on the hand-made results


def cocoeval_stats(gt: dict, detections: list[dict]) -> list[float]:
    """pycocotools' `COCOeval.summarize()` numbers (maxDets 1, 10, 100) for COCO results `detections`."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in detections]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]
