"""The DETR families (RT-DETRv2 `rtdetr`, D-FINE `dfine`) as plugdet heads: number-for-number equality with
transformers' own models, any backbone under them, the tools, and transformers staying an optional import.

The reference is transformers' `RTDetrV2ForObjectDetection` / `DFineForObjectDetection` itself, built by
transformers from the same config with a small ResNet backbone config of plugdet's channels, whose backbone model is
then plugdet's backbone (a copy), answering transformers' backbone call with its maps: transformers' own forward from
`pixel_values` (its ConvEncoder, masks, projections, encoder, decoder, denoising, loss) and its own image processor's
post-processing, with the plugdet head's weights. Equal means equal: every loss part, the total, and every detection's
box, score and label, with zero tolerance (the denoising draws are the same: torch is seeded before each forward).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_same_evaluation, load_tool, randomize_bn
from torch import nn

from backbones.checkpoint import load_checkpoint
from backbones.errors import UserError
from detect.cli import run_tool
from detect.losses import build_criterion
from detect.losses.registry import check_loss_settings
from detect.models import Detector, DetectorSpec, PartSpec, build_detector
from detect.models.registry import default_neck

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("rtdetr", "dfine")
SIZE = 96
NUM_CLASSES = 3
# small configs (a few hundred thousand parameters), everything else the families' defaults (denoising included)
TINY = {"encoder_hidden_dim": 64, "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "decoder_layers": 2,
        "num_queries": 30, "num_denoising": 20}  # fmt: skip
TINY_ARGS = {"rtdetr": TINY, "dfine": {**TINY, "hidden_expansion": 0.34, "depth_mult": 0.5}}


def plugdet_detector(family: str, backbone: str = "cspdarknet_n", seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    spec = DetectorSpec(NUM_CLASSES, PartSpec(backbone), PartSpec("identity"), PartSpec(family, TINY_ARGS[family]))
    return build_detector(spec)


@torch.no_grad()
def perturbed(detector: Detector) -> Detector:
    """Every trainable head weight moved off its initialisation (transformers zero-initialises the box heads, which
    would leave D-FINE's distillation part at exactly 0) and BatchNorm statistics far from the identity."""
    generator = torch.Generator().manual_seed(3)
    for param in detector.head.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return randomize_bn(detector, generator=generator)


class PlugdetBackboneAsTransformers(nn.Module):
    """plugdet's backbone where transformers' backbone model sits (`RTDetrV2ConvEncoder.model`): images in,
    `.feature_maps` out, as a transformers `BackboneOutput`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = copy.deepcopy(backbone)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(feature_maps=tuple(self.body(pixel_values)))


def transformers_model(detector: Detector) -> nn.Module:
    """transformers' own model of the head's family and config, its backbone plugdet's, its weights the head's."""
    from transformers import DFineForObjectDetection, RTDetrResNetConfig, RTDetrV2ForObjectDetection

    config = copy.deepcopy(detector.head.net.config)
    channels = list(detector.backbone.out_channels)  # a ResNet whose stages 2-4 have plugdet's channels
    config.backbone_config = RTDetrResNetConfig(layer_type="basic", embedding_size=8, depths=[1, 1, 1, 1],
                                                hidden_sizes=[8, *channels], out_indices=[2, 3, 4])  # fmt: skip
    model_class = RTDetrV2ForObjectDetection if detector.head.family == "rtdetr" else DFineForObjectDetection
    model = model_class(config)
    assert model.model.backbone.intermediate_channel_sizes == channels
    model.model.backbone.model = PlugdetBackboneAsTransformers(detector.backbone)
    missing, unexpected = model.load_state_dict(detector.head.net.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("model.backbone.model.body.") for key in missing)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images and four boxes (rows image_index, class_id, x1, y1, x2, y2); image 1 has a box of every class."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1, 10.0, 12.0, 70.0, 90.0], [1, 0, 5.0, 40.0, 60.0, 95.0],
                            [1, 2, 64.0, 8.0, 95.0, 50.0], [1, 1, 30.0, 30.0, 41.0, 45.0]])  # fmt: skip
    return images, targets


def transformers_labels(targets: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The targets as transformers' docs describe its labels: class ids, boxes (cx, cy, w, h) / image side."""
    labels = []
    for i in range(2):
        rows = targets[targets[:, 0] == i]
        x1, y1, x2, y2 = rows[:, 2:6].unbind(1)
        boxes = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=1) / SIZE
        labels.append({"class_labels": rows[:, 1].long(), "boxes": boxes})
    return labels


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_parts_equal_transformers(family: str) -> None:
    detector = perturbed(plugdet_detector(family)).train()
    reference = transformers_model(detector).train()
    images, targets = batch()
    torch.manual_seed(7)  # the denoising queries' label and box noise: the same draws on both sides
    expected = reference(pixel_values=images, labels=transformers_labels(targets))
    torch.manual_seed(7)
    raw = detector(images, targets)
    total, parts = build_criterion(detector.head)(raw, targets)
    assert list(raw.loss_dict) == list(expected.loss_dict) and len(expected.loss_dict) >= 15
    for name, value in raw.loss_dict.items():
        torch.testing.assert_close(value, expected.loss_dict[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(total, expected.loss, rtol=0, atol=0)
    kinds = ["vfl", "bbox", "giou"] + (["fgl", "ddf"] if family == "dfine" else [])
    assert list(parts) == kinds
    for kind in kinds:
        mine = [v for k, v in expected.loss_dict.items() if k == f"loss_{kind}" or k.startswith(f"loss_{kind}_")]
        torch.testing.assert_close(parts[kind], torch.stack(mine).sum(), rtol=0, atol=0, msg=kind)
    assert all(float(value.detach()) > 0 for value in parts.values())  # D-FINE's FGL and DDF parts too


@pytest.mark.parametrize("family", FAMILIES)
def test_detections_equal_transformers(family: str) -> None:
    from transformers import RTDetrImageProcessor

    detector = perturbed(plugdet_detector(family)).eval()
    reference = transformers_model(detector).eval()
    images, _ = batch()
    with torch.no_grad():
        outputs = reference(pixel_values=images)
    expected = RTDetrImageProcessor().post_process_object_detection(outputs, threshold=0.01,
                                                                     target_sizes=[(SIZE, SIZE)] * 2)  # fmt: skip
    found = detector.detect(images, conf=0.01, iou=0.7, max_det=300)
    for ours, theirs in zip(found, expected, strict=True):
        assert 0 < len(ours["boxes"]) <= TINY["num_queries"]
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=0)
        torch.testing.assert_close(ours["labels"], theirs["labels"], rtol=0, atol=0)
        assert bool((ours["scores"][:-1] >= ours["scores"][1:]).all())
    decoded = detector(images)  # every (query, class) pair transformers selects, in input pixels
    assert decoded.shape == (2, TINY["num_queries"], 6)
    assert len(detector.detect(images, conf=0.0, iou=0.7, max_det=7)[0]["boxes"]) == 7


def test_head_kwargs_reach_the_family_config_and_bad_ones_are_one_line() -> None:
    detector = plugdet_detector("dfine")
    config = detector.head.net.config
    assert (config.num_queries, config.decoder_layers, config.d_model, config.num_denoising) == (30, 2, 64, 20)
    assert (config.num_labels, config.encoder_in_channels, config.feat_strides) == (3, [64, 128, 256], [8, 16, 32])
    assert (config.decoder_in_channels, config.encode_proj_layers, config.hidden_expansion) == ([64] * 3, [2], 0.34)
    assert len(detector.head.net.model.decoder.layers) == 2
    projections = [(p[0].in_channels, p[0].out_channels) for p in detector.head.net.model.encoder_input_proj]
    assert projections == [(64, 64), (128, 64), (256, 64)]  # transformers' own 1x1 conv + BN, on plugdet's channels
    assert default_neck("rtdetr") == default_neck("dfine") == ("identity", {})
    bad = [({"num_querys": 5}, r"head_kwargs.num_querys is not a field of transformers' DFineConfig .*num_queries"),
           ({"num_labels": 5}, "model.head_kwargs.num_labels: plugdet sets it for the dfine head"),
           ({"anchor_image_size": [64, 64]}, "anchor_image_size does not apply to the dfine head: anchors follow"),
           ({"d_model": "wide"}, "model.head_kwargs of head 'dfine': .*d_model.* expected int"),
           ({"decoder_layers": 1}, "DFineForObjectDetection cannot be built from them")]  # fmt: skip
    for kwargs, message in bad:
        spec = DetectorSpec(1, PartSpec("cspdarknet_n"), PartSpec("identity"), PartSpec("dfine", kwargs))
        with pytest.raises(UserError, match=message):
            build_detector(spec)
    with pytest.raises(UserError, match=r"loss.box=7.0 is not read by loss 'detr' \(of head 'dfine'\)"):
        check_loss_settings("detr", {"box": 7.0}, {}, {}, "dfine")  # the YOLO gains do not apply
    with pytest.raises(UserError, match=r"num_queries=30 .* a 32x32 input has 21: use a larger data.img_size"):
        detector.eval()(torch.zeros(1, 3, 32, 32))


BACKBONES = ("cspdarknet_n", "resnet18", "tv:mobilenet_v3_small", "timm:regnetx_002")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_any_backbone_trains_under_the_head(family: str, backbone: str) -> None:
    """Built on each kind of backbone (plugdet's, torchvision's, timm's), one training step gives every trainable
    parameter a gradient (the backbone's included; none left unused, so DDP needs no find_unused_parameters)."""
    detector = plugdet_detector(family, backbone).train()
    images, targets = batch()
    total, _ = build_criterion(detector.head)(detector(images, targets), targets)
    total.backward()
    missing = [name for name, p in detector.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    first = next(p for p in detector.backbone.parameters() if p.requires_grad)  # the stem's first weight
    assert float(first.grad.abs().sum()) > 0  # (timm zero-initialises residual BN scales: not every grad is > 0)


def test_ema_averages_a_tied_weight_once() -> None:
    """transformers ties the model's class and box heads to the decoder's (one tensor under two state-dict keys): the
    EMA must average it once per step, as every other weight."""
    from detect.train.optim import ModelEMA

    detector = plugdet_detector("rtdetr")
    net = detector.head.net
    assert net.class_embed[0].weight is net.model.decoder.class_embed[0].weight
    ema = ModelEMA(detector, decay=0.5, tau=1e-9)  # d = 0.5 from the first update
    before = ema.ema.head.net.class_embed[0].weight.clone()
    with torch.no_grad():
        net.class_embed[0].weight.add_(1.0)
    ema.update(detector)
    expected = 0.5 * before + 0.5 * net.class_embed[0].weight
    torch.testing.assert_close(ema.ema.head.net.model.decoder.class_embed[0].weight, expected, rtol=0, atol=1e-6)


def test_backbone_lr_scale_splits_the_groups() -> None:
    from detect.train.optim import build_param_groups, scale_backbone_lr

    detector = plugdet_detector("rtdetr")
    groups = scale_backbone_lr(build_param_groups(detector, 1e-4), detector.backbone, 0.1)
    assert [(g["name"], g["lr_scale"]) for g in groups] == [("decay", 0.1), ("decay", 1.0), ("norm", 0.1),
                                                            ("norm", 1.0), ("bias", 0.1), ("bias", 1.0)]  # fmt: skip
    backbone = {id(p) for p in detector.backbone.parameters()}
    assert all(id(p) in backbone for g in groups[::2] for p in g["params"])
    assert not any(id(p) in backbone for g in groups[1::2] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(detector.parameters()))


def test_export_refuses_in_one_line(tmp_path: Path) -> None:
    from detect.interop.export import export_model

    detector = plugdet_detector("rtdetr").eval()
    with pytest.raises(UserError, match=r"DetrFamily head is not exportable .*per-size Python caches.*YOLO families"):
        export_model(detector, {"class_names": ["a", "b", "c"]}, tmp_path / "m.onnx", img_size=96)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.subprocess
def test_plugdet_never_imports_transformers_and_the_head_says_how_to_install(synth_cub_root: Path) -> None:
    """`import detect, detect.api` leaves transformers out; without it, train_det with model.head=rtdetr is one line
    with the pip hint and exit code 2."""
    script = textwrap.dedent(f"""
        import sys
        import detect, detect.api
        print("IMPORTED", "transformers" in sys.modules)
        sys.modules["transformers"] = None  # as if the extra were not installed
        from helpers import load_tool
        from detect.cli import run_tool
        argv = ["data.root={synth_cub_root}", "data.img_size=64", "train.workers=0", "model.backbone_weights=null",
                "model.head=rtdetr", "output_dir={synth_cub_root.parent / "never"}"]
        print("RESULT", run_tool(load_tool("train_det").main, argv))
    """)
    env = {"PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, **env})  # fmt: skip
    assert done.stdout.splitlines() == ["IMPORTED False", "RESULT 2"], done.stdout + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the rtdetr head needs transformers and scipy (transformers is missing): "
                      "pip install -e '.[detr]'"], done.stderr[-2000:]  # fmt: skip


@pytest.mark.train
@pytest.mark.parametrize("family", FAMILIES)
def test_tools_train_resume_validate_predict_and_the_api(
    family: str, synth_cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The family's CPU config, shrunk (64 px, tiny model, 2 epochs of 3 steps): train_det, a Ctrl-C mid-epoch 2 and
    its resume equal to the uninterrupted run to the bit (model, EMA, AdamW state, evaluation; the denoising draws
    follow the saved torch RNG), val_det's metrics equal to the checkpoint's, predict and `detect.api.load().predict`
    giving the same detections."""
    from helpers import InterruptingLoss

    import detect.train.detection as run
    from detect.api import load

    train_det = load_tool("train_det")
    tiny = [f"model.head_kwargs.{key}={value}" for key, value in TINY.items()]
    argv = [str(REPO / "configs" / "det" / f"{family}.yaml"), f"data.root={synth_cub_root}", "data.img_size=64",
            "data.cache=false", "train.epochs=2", "train.batch_size=4", "train.nominal_batch_size=4",
            "train.workers=0", "eval.interval=1", "model.backbone_weights=null", *tiny]  # fmt: skip
    assert run_tool(train_det.main, [*argv, f"output_dir={tmp_path / 'straight'}"]) == 0
    build = run.build_det_criterion
    monkeypatch.setattr(run, "build_det_criterion", lambda cfg, model: InterruptingLoss(build(cfg, model), 5))
    assert run_tool(train_det.main, [*argv, f"output_dir={tmp_path / 'run'}"]) == 130
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["batch"] == 2
    monkeypatch.setattr(run, "build_det_criterion", build)
    assert run_tool(train_det.main, [f"train.resume={tmp_path / 'run' / 'last.pt'}"]) == 0
    straight, resumed = (
        load_checkpoint(tmp_path / "straight" / "last.pt"),
        load_checkpoint(tmp_path / "run" / "last.pt"),
    )
    ema = (straight["train_state"]["ema"]["state_dict"], resumed["train_state"]["ema"]["state_dict"])
    for a, b in ((straight["model"], resumed["model"]), ema):
        assert a.keys() == b.keys()
        assert all(torch.equal(value, b[key]) for key, value in a.items())
    a, b = straight["train_state"]["optimizer"]["state"], resumed["train_state"]["optimizer"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(v, b[i][k]) for i in a for k, v in a[i].items())
    assert straight["metrics"]["coco_stats"] == resumed["metrics"]["coco_stats"]
    header = (tmp_path / "straight" / "results.csv").read_text().splitlines()[0]
    assert all(part in header for part in ("vfl", "bbox", "giou"))

    weights = str(tmp_path / "straight" / "best.pt")
    assert run_tool(load_tool("val_det").main, ["--weights", weights, "--out", str(tmp_path / "val")]) == 0
    assert_same_evaluation(
        json.loads((tmp_path / "val" / "metrics.json").read_text()), load_checkpoint(weights)["metrics"]
    )
    image = sorted((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))[0]
    argv = ["--weights", weights, "--source", str(image), "--out", str(tmp_path / "pred"), "--conf", "0.0"]
    assert run_tool(load_tool("predict").main, argv) == 0
    [entry] = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    [result] = load(weights, device="cpu").predict(str(image), conf=0.0)
    assert len(entry["detections"]) == len(result.boxes) == TINY["num_queries"]  # every query scores above 0
    boxes = torch.tensor([d["box_xyxy"] for d in entry["detections"]])
    torch.testing.assert_close(boxes, result.boxes.float(), rtol=0, atol=0.006)  # the json rounds to 0.01 px
