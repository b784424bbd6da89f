"""The YOLO26 detector (csp26 backbone + yolo26 neck + yolo26 end-to-end head) against Ultralytics 8.4.190's
yolo26*.yaml: parameter counts (as trained and fused), the NMS-free eval outputs and the train-mode maps after
`from_ultralytics`, predict() on Ultralytics' bundled photos (rect and square letterbox), the key map, and the
end-to-end decode on hand-made scores."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import InterruptingLoss, load_tool, randomize_bn
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", "/tmp/plugdet-yolo-config")
from ultralytics.nn import tasks  # noqa: E402  (a dev dependency: the parity tests run, never skip)

from backbones import build_backbone  # noqa: E402
from backbones.checkpoint import load_checkpoint  # noqa: E402
from backbones.errors import UserError  # noqa: E402
from detect.boxes import xyxy2cxcywh  # noqa: E402
from detect.cli import run_tool  # noqa: E402
from detect.data.source import read_image_rgb  # noqa: E402
from detect.inference import detect_image  # noqa: E402
from detect.interop.export import export_model
from detect.interop.openvino import OpenVinoDetector  # noqa: E402
from detect.interop.runners import OnnxDetector  # noqa: E402
from detect.interop.ultralytics import from_ultralytics, to_ultralytics_state_dict, ultralytics_family  # noqa: E402
from detect.interop.ultralytics11 import uses_c3k_everywhere  # noqa: E402
from detect.interop.ultralytics26 import our_key_to_yolo26, yolo26_key_to_ours  # noqa: E402
from detect.losses import build_criterion  # noqa: E402
from detect.losses.yolo26 import EndToEndLoss, o2m_weight  # noqa: E402
from detect.models import DetectorSpec, PartSpec, build_detector, build_yolo  # noqa: E402
from detect.models.detector import Detector  # noqa: E402
from detect.models.heads.yolo26 import EndToEndDecoder, Yolo26Head  # noqa: E402
from detect.models.necks.pan26 import PAN26  # noqa: E402
from detect.train.optim import MuSGD, build_musgd_param_groups, build_optimizer  # noqa: E402

SCALES = ["n", "s", "m", "l", "x"]
# Ultralytics' yolo26.yaml summary lines (80 classes, both head branches), DESIGN §5.
YOLO26_PARAMS = {"n": 2_572_280, "s": 10_009_784, "m": 21_896_248, "l": 26_299_704, "x": 58_993_368}
# Ultralytics' fused yolo26n (BatchNorm folded into conv biases, the one-to-many branch dropped), 80 classes.
YOLO26N_FUSED_PARAMS = 2_408_932
# Ultralytics' layers 0-10 (the backbone): the same as YOLO11's, since YOLO26's SPPF adds no parameter.
CSP26_PARAMS = {"n": 1_365_472, "s": 5_441_984, "m": 10_352_192, "l": 12_833_600, "x": 28_847_328}
IMAGE_SIZE = (128, 160)
ASSETS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets"
PHOTOS = [ASSETS / "bus.jpg", ASSETS / "zidane.jpg"]


def _spec(scale: str, num_classes: int = 80) -> DetectorSpec:
    return DetectorSpec(
        num_classes, PartSpec(f"csp26_{scale}"), PartSpec("yolo26", {"scale": scale}), PartSpec("yolo26", {})
    )


def _ultralytics_model(scale: str, num_classes: int = 80, seed: int = 0, gain: float = 30.0) -> nn.Module:
    """A randomly initialised YOLO26 with spread BatchNorm statistics and class logits spread over (0, 1) in both
    branches (their last weights times `gain`), in eval mode with its end-to-end (one-to-one, top-k) inference
    selected."""
    torch.manual_seed(seed)
    model = tasks.DetectionModel(f"yolo26{scale}.yaml", nc=num_classes, verbose=False)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(model, generator=gen)
    with torch.no_grad():
        detect = model.model[-1]
        for seq in [*detect.cv3, *detect.one2one_cv3]:
            seq[-1].weight.mul_(gain)  # scores that depend on the image
            seq[-1].bias.normal_(-3.0, 1.0, generator=gen)
    model.end2end = True  # 8.4.190 builds a yaml model with the one-to-many inference selected
    return model.eval()


@pytest.mark.parametrize("scale", SCALES)
def test_parameter_counts_equal_ultralytics(scale: str) -> None:
    spec = copy.deepcopy(tasks.yaml_model_load(f"yolo26{scale}.yaml"))
    spec["nc"] = 80
    with torch.device("meta"):  # parameters without storage: counting is all we need
        ours = build_detector(_spec(scale))
        theirs, _ = tasks.parse_model(spec, ch=3, verbose=False)
        backbone = build_backbone(f"csp26_{scale}")
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == YOLO26_PARAMS[scale]
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == count  # no frozen DFL bins at reg_max 1
    assert sum(p.numel() for p in backbone.parameters()) == CSP26_PARAMS[scale]
    assert sum(p.numel() for p in theirs[:11].parameters()) == CSP26_PARAMS[scale]


def test_fused_count_equals_ultralytics_fused_model() -> None:
    theirs = tasks.DetectionModel("yolo26n.yaml", nc=80, verbose=False)
    theirs.end2end = True
    theirs.fuse(verbose=False)  # folds BatchNorm, drops the one-to-many branch
    ours = build_yolo("n", 80, family="yolo26").fuse()
    ours.head.fuse()
    assert theirs.model[-1].cv2 is None and ours.head.box_branch is None
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == YOLO26N_FUSED_PARAMS
    with pytest.raises(RuntimeError, match="fused"):
        ours.head.train()


def test_build_yolo_family_yolo26_is_the_same_spec() -> None:
    with torch.device("meta"):
        ours = build_yolo("s", 80, family="yolo26")
    assert isinstance(ours.neck, PAN26) and isinstance(ours.head, Yolo26Head)
    assert ours.backbone.stages[-1].sppf.residual and isinstance(ours.backbone.stages[-1].sppf.reduce_conv.act,
                                                                 nn.Identity)  # fmt: skip
    assert sum(p.numel() for p in ours.parameters()) == YOLO26_PARAMS["s"]
    with pytest.raises(UserError, match="reg_max must be 1"), torch.device("meta"):
        build_yolo("n", 80, family="yolo26", reg_max=16)


@pytest.mark.parametrize(
    "scale", ["n", "s", "m", pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)]
)
@torch.no_grad()
def test_eval_outputs_equal_ultralytics(scale: str) -> None:
    """The end-to-end [B, 300, 6] rows (boxes, score, label) of the one-to-one branch: bit-identical."""
    theirs = _ultralytics_model(scale)
    ours = from_ultralytics(theirs)
    assert not ours.training and ours.num_classes == 80 and isinstance(ours.head, Yolo26Head)
    images = torch.rand(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    reference = theirs(images)[0]
    preds = ours(images)
    assert preds.shape == reference.shape == (2, 300, 6)
    assert reference[..., 4].std() > 1e-3 and reference[..., 5].unique().numel() > 1  # varied scores, classes
    assert torch.equal(preds, reference)


@torch.no_grad()
def test_train_outputs_equal_ultralytics_and_one_to_one_sees_detached_features() -> None:
    """Train mode (batch statistics): both branches' raw maps are Ultralytics' distances and class logits, bit for
    bit; a loss on the one-to-one maps alone leaves the backbone and the neck without gradients."""
    theirs = _ultralytics_model("n").train()
    ours = from_ultralytics(theirs).train()
    images = torch.rand(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    reference = theirs(images)
    raw = ours(images)
    assert set(raw) == {"one2many", "one2one"}
    for branch in ("one2many", "one2one"):
        flat = torch.cat([level.flatten(2) for level in raw[branch]], dim=2)  # [B, 4 + C, A]
        assert torch.equal(flat[:, :4], reference[branch]["boxes"]), branch
        assert torch.equal(flat[:, 4:], reference[branch]["scores"]), branch
    with torch.enable_grad():
        ours.zero_grad()
        sum(level.sum() for level in ours(images)["one2one"]).backward()
    assert all(p.grad is None for p in [*ours.backbone.parameters(), *ours.neck.parameters()])
    assert all(p.grad is None for p in ours.head.box_branch.parameters())
    assert all(p.grad is not None for p in ours.head.one2one_cls_branch.parameters())


def _compare(ours: dict, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, box_tol: float = 1e-2,
             score_tol: float = 1e-4) -> None:  # fmt: skip
    """The same detections: equal counts and classes, and each reference detection its own counterpart of the same
    class, box within `box_tol` px, score within `score_tol`. Ties excepted from the box check: the two sides' scores
    differ by a few ulps, so detections scored within 1e-6 of another (anchors in the flat letterbox border score
    alike) or of the lowest kept score (the 300th row) may come in another order or swap at the cut."""
    assert len(ours["scores"]) == len(scores) > 0, (len(ours["scores"]), len(scores))
    assert sorted(ours["labels"].tolist()) == sorted(labels.long().tolist())
    tied = ((scores[:, None] - scores[None, :]).abs() <= 1e-6).sum(1) > 1  # [K]
    tied |= scores - scores.min() <= 1e-6
    assert int((~tied).sum()) >= 30
    free = torch.ones(len(scores), dtype=torch.bool)
    for box, score, label, skip in zip(boxes, scores, labels.long(), tied, strict=True):
        if skip:
            continue
        fits = free & (ours["labels"] == label) & ((ours["scores"] - score).abs() <= score_tol)
        fits &= (ours["boxes"] - box).abs().max(dim=1).values <= box_tol
        assert fits.any(), (box, score, label)
        free[fits.nonzero()[0, 0]] = False


@pytest.mark.parametrize("rect", [True, False])
@torch.no_grad()
def test_predict_equals_ultralytics_nms_free_predict(rect: bool) -> None:
    """Ultralytics' predict() with its NMS-free head (nms=False), conf 0.001, max_det 300, on its bundled photos, rect
    and square letterbox at 640, against `detect_image` on the imported detector (fused, as Ultralytics' is)."""
    from ultralytics import YOLO

    theirs = _ultralytics_model("n")
    ours = from_ultralytics(theirs).fuse()
    ours.head.fuse()
    wrapper = YOLO("yolo26n.yaml", task="detect", verbose=False)
    wrapper.model = copy.deepcopy(theirs)
    for photo in PHOTOS:
        ref = wrapper.predict(str(photo), conf=0.001, max_det=300, nms=False, rect=rect, device="cpu", verbose=False)
        ref = ref[0].boxes
        found = detect_image(ours, read_image_rgb(photo), 640, "cpu", conf=0.001, iou=0.7, max_det=300, rect=rect)
        assert len(found["scores"]) == 300  # conf 0.001 keeps every top-k row of these scores
        _compare(found, ref.xyxy, ref.conf, ref.cls)


def test_end_to_end_decode_on_hand_made_scores() -> None:
    """Top-k first over anchors by their best class, then over (anchor, class) pairs: one anchor may give two rows;
    an anchor whose best class is not among the K best gives none, even if its second class would be."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4], [8, 8, 9, 9]])  # [A=4, 4]
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.05], [0.6, 0.1, 0.7], [0.65, 0.0, 0.0]])  # [A, C=3]
    rows = EndToEndDecoder.top_k(torch.cat((boxes, scores), 1)[None], max_det=3)[0]  # [3, 6]
    # anchors by best class: 0 (0.9), 2 (0.7), 3 (0.65); pairs among them: 0.9 (0, 0), 0.8 (0, 1), 0.7 (2, 2)
    expected = torch.tensor([[0.0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 1], [1, 2, 3, 4, 0.7, 2]])
    assert torch.equal(rows, expected)
    head = Yolo26Head(3, (16, 32, 64), (8, 16, 32))
    found = head.postprocess(rows[None], conf=0.75, iou=0.0, max_det=5)[0]  # iou 0 would suppress overlaps: ignored
    assert torch.equal(found["scores"], torch.tensor([0.9, 0.8])) and found["labels"].tolist() == [0, 1]
    assert torch.equal(found["boxes"], boxes[[0, 0]]) and found["labels"].dtype == torch.int64
    assert head.postprocess(rows[None], conf=0.0, iou=0.7, max_det=1)[0]["scores"].tolist() == [pytest.approx(0.9)]


def test_yolo26_head_on_another_backbone_and_its_priors() -> None:
    """`model.head=yolo26` on any backbone (here YOLOv8's with the yolo26 neck); both branch pairs start at
    Ultralytics 8.4.190's priors (box 2.0, class log(5 / C / (640 / stride)^2))."""
    spec = DetectorSpec(3, PartSpec("cspdarknet_n"), PartSpec("yolo26", {"scale": "n"}), PartSpec("yolo26", {}))
    detector = build_detector(spec)
    head = detector.head
    for branch in (*head.box_branch, *head.one2one_box_branch):
        assert torch.equal(branch.pred.bias, torch.full((4,), 2.0))
    prior = torch.log(torch.tensor(5 / 3 / (640 / 32) ** 2))
    assert torch.allclose(head.one2one_cls_branch[2].pred.bias, prior.expand(3), rtol=0, atol=1e-7)
    preds = detector.eval()(torch.rand(1, 3, 64, 96))
    assert preds.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 6)  # fewer anchors than max_det: K = A


def test_from_ultralytics_names_the_family(caplog: pytest.LogCaptureFixture) -> None:
    yolo26 = tasks.DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    yolo11 = tasks.DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    v8 = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    assert ultralytics_family(yolo26.state_dict()) == "yolo26"
    assert ultralytics_family(yolo11.state_dict()) == "yolo11" and ultralytics_family(v8.state_dict()) == "yolov8"
    with caplog.at_level(logging.INFO, logger="plugdet"):
        ours = from_ultralytics(yolo26)
    assert any(r.getMessage().startswith("loaded Ultralytics YOLO26n (3 classes)") for r in caplog.records)
    assert isinstance(ours.head, Yolo26Head) and ours.head.num_classes == 3


@pytest.mark.parametrize("scale", ["n", "m"])
def test_key_round_trip_over_every_key(scale: str) -> None:
    with torch.device("meta"):
        theirs = tasks.parse_model(copy.deepcopy(tasks.yaml_model_load(f"yolo26{scale}.yaml")), ch=3, verbose=False)[0]
        ours = build_detector(_spec(scale)).state_dict()
    theirs = {f"model.{k}": v for k, v in theirs.state_dict().items()}  # a DetectionModel's keys
    c3k = uses_c3k_everywhere(theirs)
    assert c3k is (scale == "m")
    assert all(our_key_to_yolo26(yolo26_key_to_ours(k, c3k)) == k for k in theirs)
    assert {yolo26_key_to_ours(k, c3k) for k in theirs} == set(ours)
    assert {our_key_to_yolo26(k) for k in ours} == set(theirs)
    assert (
        yolo26_key_to_ours("model.22.m.0.1.attn.qkv.conv.weight")
        == "neck.bottom_up_p5.blocks.0.psa.attention.qkv.conv.weight"
    )


def test_fused_ultralytics_model_is_a_user_error() -> None:
    fused = tasks.DetectionModel("yolo26n.yaml", nc=2, verbose=False)
    fused.end2end = True
    fused.fuse(verbose=False)
    with pytest.raises(UserError, match="not a YOLO26n detection layout"):
        from_ultralytics(fused)


@torch.no_grad()
def test_round_trip_to_ultralytics_state_dict() -> None:
    torch.manual_seed(3)
    ours = randomize_bn(build_detector(_spec("n", num_classes=7)), seed=4).eval()
    theirs = tasks.DetectionModel("yolo26n.yaml", nc=7, verbose=False)
    theirs.load_state_dict(to_ultralytics_state_dict(ours), strict=True)
    theirs.end2end = True
    images = torch.rand(2, 3, 64, 96)
    # within float32 rounding, not bit for bit: on an AMD EPYC (AVX512, 2026-12-05) one score of 252 differed in its
    # last bit (1.2e-10), as the same model's output does between 1 and 2 threads there (oneDNN's kernels)
    torch.testing.assert_close(ours(images), theirs.eval()(images)[0], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def ultralytics_e2e() -> tuple[dict, object, EndToEndLoss]:
    """Ultralytics' train-mode outputs of yolo26n (80 classes) on a batch of 4, its E2ELoss (epochs 5), and the
    criterion the yolo26 head family builds."""
    from ultralytics.utils.loss import E2ELoss

    model = _ultralytics_model("n", gain=3.0)
    criterion = build_criterion(from_ultralytics(model).head)
    model.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, epochs=5)  # what E2ELoss reads of the trainer's args
    model.train()
    with torch.no_grad():
        outputs = model(torch.rand(4, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0)))
    return outputs, E2ELoss(model), criterion


def _targets(counts: list[int], seed: int) -> torch.Tensor:
    """Rows (image_index, class_id, x1, y1, x2, y2) in pixels, sorted by image; boxes 3 to 90 pixels wide."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    size = torch.tensor(IMAGE_SIZE[::-1], dtype=torch.float32)  # (W, H)
    for image, count in enumerate(counts):
        centre = torch.rand(count, 2, generator=gen) * size
        extent = torch.rand(count, 2, generator=gen) * 87 + 3
        boxes = torch.minimum(torch.cat((centre - extent / 2, centre + extent / 2), 1).clamp(min=0), size.repeat(2))
        labels = torch.randint(0, 80, (count, 1), generator=gen).float()
        rows.append(torch.cat((torch.full((count, 1), float(image)), labels, boxes), 1))
    return torch.cat(rows)


def _as_levels(branch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Ultralytics' {"boxes" [B, 4, A], "scores" [B, C, A], "feats"} as our [B, 4 + C, H_l, W_l] level maps."""
    levels, start = [], 0
    for feat in branch["feats"]:
        height, width = feat.shape[2:]
        stop = start + height * width
        level = torch.cat((branch["boxes"][..., start:stop], branch["scores"][..., start:stop]), 1)  # [B, 4 + C, HW]
        levels.append(level.view(level.shape[0], -1, height, width))
        start = stop
    return levels


@pytest.mark.parametrize(("counts", "noise"), [([3, 0, 5, 1], 0.0), ([1, 12, 0, 2], 1.0), ([0, 0, 0, 0], 1.0)])
def test_loss_parts_equal_ultralytics_e2e_loss(ultralytics_e2e: tuple, counts: list[int], noise: float) -> None:
    """Both branches' box, cls and L1 parts, the weighted total and its gradients equal Ultralytics' `E2ELoss`
    within 1e-6 relative, on batches with an image without boxes, and on one without any box."""
    outputs, theirs, ours = ultralytics_e2e
    gen = torch.Generator().manual_seed(len(counts) + int(noise * 10))
    leaves = {
        branch: {key: (outputs[branch][key] + noise * torch.randn(outputs[branch][key].shape, generator=gen))
                 .requires_grad_() for key in ("boxes", "scores")} | {"feats": outputs[branch]["feats"]}
        for branch in ("one2many", "one2one")
    }  # fmt: skip
    targets = _targets(counts, seed=sum(counts))
    height, width = IMAGE_SIZE
    batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "img": torch.zeros(4, 3, height, width),
             "bboxes": xyxy2cxcywh(targets[:, 2:]) / torch.tensor([width, height, width, height])}  # fmt: skip
    their_total, their_parts = theirs(leaves, batch)
    raw = {branch: _as_levels(leaves[branch]) for branch in leaves}
    total, parts = ours(raw, targets)
    names = {"box": "box_loss", "cls": "cls_loss", "l1": "l1_loss"}
    assert set(parts) == set(names) and (parts["box"] > 0) == (sum(counts) > 0)
    for ours_key, their_key in names.items():  # the one-to-one branch's parts, which both log
        torch.testing.assert_close(parts[ours_key], their_parts[their_key], rtol=1e-6, atol=0, msg=ours_key)
    _, their_o2m = theirs.one2many.loss(leaves["one2many"], batch)
    _, o2m = ours.one2many(raw["one2many"], targets)
    for ours_key, their_key in names.items():
        torch.testing.assert_close(o2m[ours_key], their_o2m[their_key], rtol=1e-6, atol=0, msg=ours_key)
    torch.testing.assert_close(total, their_total.sum(), rtol=1e-6, atol=0)
    inputs = [leaves[b][k] for b in ("one2many", "one2one") for k in ("boxes", "scores")]
    for mine, reference in zip(torch.autograd.grad(total, inputs), torch.autograd.grad(their_total.sum(), inputs),
                               strict=True):  # fmt: skip
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)


def test_branch_weights_follow_ultralytics_schedule(ultralytics_e2e: tuple) -> None:
    """o2m 0.8 at the first epoch, 0.1 at the last, linear between; o2o = 1 - o2m; the same floats as `E2ELoss`
    after its per-epoch `update()` (epochs 5), and as a resumed `E2ELoss` (updates = epoch - 1, then update())."""
    _, theirs, ours = ultralytics_e2e
    theirs = copy.copy(theirs)
    theirs.updates, theirs.o2m, theirs.o2o = 0, 0.8, 1.0 - 0.8
    expected = [0.8, 0.625, 0.45000000000000007, 0.275, 0.1]
    for epoch in range(5):
        ours.set_epoch(epoch, 5)
        assert (ours.o2m, ours.o2o) == (theirs.o2m, theirs.o2o) == (expected[epoch], max(1.0 - expected[epoch], 0))
        theirs.update()
    assert o2m_weight(0, 1) == 0.8 and o2m_weight(7, 5) == 0.1  # one epoch: o2m throughout; past the end: final


@pytest.mark.parametrize("channels_last", [False, True])
def test_musgd_groups_and_steps_equal_ultralytics(channels_last: bool) -> None:
    """Ultralytics' MuSGD (its trainer's groups: Muon on every 2-D / 4-D weight, class branches at 3x the lr, muon
    0.2 / sgd 1.0) and ours from `build_musgd_param_groups` on the imported model: the same groups, and the same
    parameters after each of three steps on the same gradients, bit for bit (NCHW and channels_last weights)."""
    from ultralytics.engine.trainer import BaseTrainer

    theirs = _ultralytics_model("n", num_classes=3).train()
    ours = from_ultralytics(theirs).train()
    if channels_last:
        theirs, ours = theirs.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
    their_params = dict(theirs.named_parameters())
    pairs = [(p, their_params[our_key_to_yolo26(name)]) for name, p in ours.named_parameters()]
    their_opt = BaseTrainer.build_optimizer(SimpleNamespace(args=SimpleNamespace()), theirs, name="MuSGD", lr=0.01,
                                            momentum=0.9, decay=5e-4)  # fmt: skip
    class_branches = [p for name, p in ours.head.named_parameters() if "cls_branch" in name]
    our_opt = build_optimizer("musgd", build_musgd_param_groups(ours, 5e-4, class_branches), 0.01, 0.9)
    assert isinstance(our_opt, MuSGD) and (our_opt.muon, our_opt.sgd) == (their_opt.muon, their_opt.sgd) == (0.2, 1.0)
    theirs_of = {id(mine): other for mine, other in pairs}
    for mine, other in zip(our_opt.param_groups, their_opt.param_groups, strict=True):
        assert {id(theirs_of[id(p)]) for p in mine["params"]} == {id(p) for p in other["params"]}
        for key in ("lr", "weight_decay", "momentum", "nesterov"):
            assert mine[key] == other[key], (mine["name"], key)
        assert mine["use_muon"] == other.get("use_muon", False) and (mine["name"] == "bias") == (
            other["param_group"] == "bias"
        )
    assert sum(len(g["params"]) for g in our_opt.param_groups if g["use_muon"]) == 126
    before = [mine.detach().clone() for mine, _ in pairs]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for mine, other in pairs:
            grad = (torch.randn(mine.shape, generator=gen) * 0.1).contiguous(
                memory_format=torch.channels_last if channels_last and mine.ndim == 4 else torch.contiguous_format
            )
            mine.grad, other.grad = grad, grad.clone(memory_format=torch.preserve_format)
        their_opt.step()
        our_opt.step()
        assert all(torch.equal(mine, other) for mine, other in pairs)
    assert all(not torch.equal(mine, start) for (mine, _), start in zip(pairs, before, strict=True))  # all moved


@pytest.mark.slow
def test_train_det_trains_yolo26_and_tells_the_loss_the_epoch(
    synth_cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tools/train_det.py with model.head=yolo26 (csp26_n + yolo26 neck by default): the engine calls the criterion's
    `set_epoch` at each epoch start, the logged parts are the yolo26 loss's, and the run evaluates NMS-free."""
    import csv

    seen: list[tuple[int, int, float]] = []
    original = EndToEndLoss.set_epoch

    def record(self: EndToEndLoss, epoch: int, epochs: int) -> None:
        original(self, epoch, epochs)
        seen.append((epoch, epochs, self.o2m))

    monkeypatch.setattr(EndToEndLoss, "set_epoch", record)
    argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=2", "train.batch_size=4",
            "train.workers=0", "train.close_mosaic=0", "model.backbone_weights=null", "model.head=yolo26",
            f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert run_tool(load_tool("train_det").main, argv) == 0
    assert seen == [(0, 2, 0.8), (1, 2, 0.1)]
    with open(tmp_path / "run" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {"train/box", "train/cls", "train/l1"} <= set(rows[0]) and "train/dfl" not in rows[0]
    checkpoint = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert checkpoint["arch"]["backbone"]["name"] == "csp26_n" and checkpoint["arch"]["head"]["name"] == "yolo26"


def test_train_optimizer_musgd_builds_ultralytics_groups_and_the_warmup_keeps_their_scales() -> None:
    """`train.optimizer=musgd` through train_det's builder: eight groups, the head's class branches at 3x the lr,
    and the schedule's warmup multiplies each group's lr by its scale."""
    from detect.config import DetConfig, load_config
    from detect.models import build_yolo
    from detect.train.builders import build_det_optimizer, build_schedule

    cfg = load_config(DetConfig, None, ["train.optimizer=musgd", "model.head=yolo26", "train.lr=0.01"])
    model = build_yolo("n", 3, family="yolo26")
    optimizer = build_det_optimizer(cfg, model)
    assert len(optimizer.param_groups) == 8 and type(optimizer).__name__ == "MuSGD"
    cls_ids = {id(p) for name, p in model.head.named_parameters() if "cls_branch" in name}
    for group in optimizer.param_groups:
        boosted = {id(p) for p in group["params"]} <= cls_ids and len(group["params"]) > 0
        assert group["lr_scale"] == (3.0 if boosted else 1.0) or not group["params"]
    build_schedule(cfg, iters_per_epoch=10).apply(optimizer, epoch=5, iteration=10_000)  # after the warmup
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(
            group["lr_scale"] * optimizer.param_groups[-1]["lr"] / optimizer.param_groups[-1]["lr_scale"], rel=1e-12
        )


EXPORT_RECTANGLES = ((96, 64), (160, 224))  # 126 anchors (fewer than max_det: K = 126 in the graph), then 735


@pytest.fixture(scope="module")
def imported_n() -> Detector:
    """An imported yolo26n (3 classes, spread scores): the detector the export tests run, eval mode."""
    return from_ultralytics(_ultralytics_model("n", num_classes=3)).eval()


def _export_images(shape: tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, *shape, generator=torch.Generator().manual_seed(shape[0] * 7 + shape[1]))


@torch.no_grad()
def test_torchscript_export_is_the_eager_end_to_end_decode_to_the_bit(imported_n: Detector, tmp_path: Path) -> None:
    """The trace has the top-k decode in it, with anchors and K from the maps' sizes: traced at 128x160, it equals the
    eager [B, K, 6] on other rectangles, one with fewer anchors (126) than max_det."""
    path = export_model(imported_n, {"class_names": ["a", "b", "c"]}, tmp_path / "m.torchscript", "torchscript",
                        img_size=IMAGE_SIZE)  # fmt: skip
    traced = torch.jit.load(str(path))
    for shape, rows in zip(EXPORT_RECTANGLES, (126, 300), strict=True):
        images = _export_images(shape)
        eager = imported_n(images)
        assert eager.shape == (2, rows, 6)
        assert torch.equal(traced(images), eager)


@torch.no_grad()
def test_onnx_export_has_the_top_k_decode_and_no_nms_and_predict_gives_the_pt_detections(tmp_path: Path) -> None:
    """Dynamic and fixed ONNX files of an imported yolo26n (fused) end in TopK, with no NonMaxSuppression node, and
    `detect_image` (predict's, the API's and val_det's path: `OnnxDetector.detect` reads the rows as end-to-end, no NMS)
    gives the .pt's detections on the bundled photos at conf 0.001, max_det 300: the dynamic file (exported at 320)
    on the 640 stride rectangles, the fixed 640 file on the square letterbox. Boxes within 1e-3 px and scores within
    1e-6 (`_compare`, ties excepted; measured at most 3.1e-5 px and 1.8e-7: onnxruntime's convolutions round
    differently from torch's). The OpenVINO model made from the dynamic file gives them too. `--nms` is refused."""
    import onnx

    ours = from_ultralytics(_ultralytics_model("n")).fuse()
    ours.head.fuse()
    checkpoint = {"class_names": [str(c) for c in range(80)]}
    dynamic = export_model(ours, checkpoint, tmp_path / "d.onnx", img_size=320)
    fixed = export_model(ours, checkpoint, tmp_path / "f.onnx", img_size=640, dynamic=False)
    for path in (dynamic, fixed):
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert "TopK" in ops and "NonMaxSuppression" not in ops
    openvino = export_model(ours, checkpoint, tmp_path / "ov", "openvino", img_size=320)  # from the dynamic ONNX
    runners = ((OnnxDetector(dynamic), True), (OnnxDetector(fixed), False), (OpenVinoDetector(openvino), True))
    for runner, rect in runners:
        assert runner.meta["end_to_end"] is True and (runner.fixed_shape is None) == rect
        for photo in PHOTOS:
            image = read_image_rgb(photo)
            found = detect_image(runner, image, 640, "cpu", conf=0.001, iou=0.7, max_det=300, rect=rect)
            ref = detect_image(ours, image, 640, "cpu", conf=0.001, iou=0.7, max_det=300, rect=rect)
            assert len(ref["scores"]) == 300
            _compare(found, ref["boxes"], ref["scores"], ref["labels"], box_tol=1e-3, score_tol=1e-6)
    with pytest.raises(UserError, match="NMS-free"):
        export_model(ours, checkpoint, tmp_path / "n.onnx", img_size=320, nms={"conf": 0.25, "iou": 0.7, "max_det": 1})


# 12 train images, batch 4: 3 steps per epoch; call 5 is the middle of epoch 2 (gradients pending in last.pt).
@pytest.mark.train
def test_yolo26_musgd_ctrl_c_mid_epoch_then_resume_is_bit_identical(
    synth_cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_end_to_end.py's Ctrl-C-and-resume check on a yolo26 + MuSGD run: interrupted mid-epoch 2 and
    resumed, the model, the EMA, MuSGD's state and the evaluation equal the uninterrupted 2-epoch run's to the bit."""
    import detect.train.detection as run

    train_det = load_tool("train_det")
    argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=2", "train.batch_size=4",
            "train.workers=0", "train.close_mosaic=1", "eval.interval=1", "model.backbone_weights=null",
            "model.head=yolo26", "train.optimizer=musgd"]  # fmt: skip
    assert run_tool(train_det.main, [*argv, f"output_dir={tmp_path / 'straight'}"]) == 0
    build = run.build_det_criterion
    interrupting = lambda cfg, model: InterruptingLoss(build(cfg, model), 5)  # noqa: E731
    monkeypatch.setattr(run, "build_det_criterion", interrupting)
    assert run_tool(train_det.main, [*argv, f"output_dir={tmp_path / 'run'}"]) == 130
    state = load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    assert (state["epoch"], state["batch"]) == (1, 2) and state["gradients"]
    monkeypatch.setattr(run, "build_det_criterion", build)
    assert run_tool(train_det.main, [f"train.resume={tmp_path / 'run' / 'last.pt'}"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "run" / "last.pt")
    for a, b in ((straight["model"], resumed["model"]),
                 (straight["train_state"]["ema"]["state_dict"], resumed["train_state"]["ema"]["state_dict"]),
                 (straight["train_state"]["model"], resumed["train_state"]["model"])):  # fmt: skip
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]), key
    a, b = straight["train_state"]["optimizer"], resumed["train_state"]["optimizer"]  # MuSGD's state dict
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and a["state"]
    for index, buffers in a["state"].items():
        assert buffers.keys() == b["state"][index].keys()
        assert all(torch.equal(value, b["state"][index][key]) for key, value in buffers.items()), index
    assert straight["metrics"]["coco_stats"] == resumed["metrics"]["coco_stats"]


def test_families_sweep_lists_a_yolo26_cell_beside_the_nms_heads(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/sweep/families.yaml runs yolo26 (its neck and end-to-end head, the yolov8 recipe) on the same backbone
    as the NMS heads: `tools/sweep.py --list` (which resolves every cell's config first) lists the five cells."""
    path = Path(__file__).parents[1] / "configs" / "sweep" / "families.yaml"
    assert run_tool(load_tool("sweep").main, [str(path), "--list"]) == 0
    cells = [line.split()[4:9:2] for line in capsys.readouterr().out.splitlines() if "cspdarknet_n /" in line]
    assert cells == [["cspdarknet_n", head, "pretrained"] for head in
                     ("yolov8", "yolo26", "retinanet", "fcos", "faster_rcnn")]  # fmt: skip
