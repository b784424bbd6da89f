"""Export (`detect.interop.export`) runs the head's own decode: a dynamic-shape ONNX file, the OpenVINO model made from
it and a TorchScript trace, made at one size, give the eager detector's decoded outputs on other, rectangular sizes;
NMS in the graph keeps working; exports are dynamic by default, and a fixed-size file says at load what it changes; a
head family without a traceable decode is refused in one line."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones.errors import UserError
from detect.interop.export import export_model
from detect.interop.openvino import OpenVinoDetector
from detect.interop.runners import OnnxDetector
from detect.models import build_yolo
from detect.models.detector import Detector
from detect.models.heads.base import DetectionHead
from detect.postprocess import postprocess

CHECKPOINT = {"class_names": ["a", "b", "c"]}
EXPORT_SIZE = (96, 160)
RECTANGLES = ((128, 64), (64, 192))  # other sizes than the export size, both orientations


def _images(shape: tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, *shape, generator=torch.Generator().manual_seed(shape[0] + shape[1]))


@pytest.fixture(scope="module")
def detector() -> Detector:
    """A YOLOv8n with 3 classes whose outputs depend on the image: BatchNorm statistics measured on one batch (at
    init they would normalise every map to about a constant) and class biases 0, so that
    scores near 0.8 differ by more than 1e-4 and no NMS decision rests on a tie."""
    torch.manual_seed(0)
    model = build_yolo("n", 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches seen
        model.train()(_images(EXPORT_SIZE, batch=4))
        for cls in model.head.cls_branch:
            cls.pred.bias.zero_()
    return model.eval()


@torch.no_grad()
def test_torchscript_trace_equals_the_eager_decode_on_other_rectangles(detector: Detector, tmp_path: Path) -> None:
    """The trace runs the same kernels as eager mode, so the outputs are equal to the bit; anchors come from the maps'
    sizes in the graph (a frozen anchor table would give the wrong A or the wrong boxes)."""
    path = export_model(detector, CHECKPOINT, tmp_path / "m.torchscript", fmt="torchscript", img_size=EXPORT_SIZE)
    traced = torch.jit.load(str(path))
    for shape in RECTANGLES:
        images = _images(shape)
        eager = detector(images)  # [B, A, 4 + C]
        assert eager.shape == (2, sum((shape[0] // s) * (shape[1] // s) for s in (8, 16, 32)), 7)
        assert torch.equal(traced(images), eager)


class _Decode(nn.Module):
    """The head's decode alone, on the three raw maps: what the ONNX file computes after the convolutions."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor) -> torch.Tensor:
        return self.head.decode([p3, p4, p5])  # [B, A, 4 + C]


@torch.no_grad()
def test_the_decode_graph_equals_the_eager_decode_on_a_rectangle(detector: Detector) -> None:
    """The head's decode traced into ONNX (dynamic sizes, traced on 96x160 maps' worth) agrees with the eager decode
    on the raw maps of a 128x64 input to 1e-5 (of the side for boxes): anchors, DFL and scores come from the graph."""
    ort = pytest.importorskip("onnxruntime")
    head, names = detector.head, ["p3", "p4", "p5"]
    example = detector.head(detector.neck(detector.backbone(_images(EXPORT_SIZE, batch=1))))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter
        torch.onnx.export(_Decode(head), tuple(example), buffer, input_names=names, output_names=["preds"],
                          dynamic_axes={name: {0: "batch", 2: "h", 3: "w"} for name in names}, opset_version=17,
                          dynamo=False)  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    raw = detector.head(detector.neck(detector.backbone(_images(RECTANGLES[0]))))  # [2, 67, 16, 8], ...
    got = torch.from_numpy(session.run(None, {name: r.numpy() for name, r in zip(names, raw, strict=True)})[0])
    eager = head.decode(raw)  # [2, 168, 7]
    assert got.shape == eager.shape == (2, 168, 7)
    # a corner near 0 is a difference of two numbers near the image side: its error is an ulp of those (1.5e-5 px)
    torch.testing.assert_close(got[..., :4], eager[..., :4], rtol=1e-5, atol=1e-5 * max(RECTANGLES[0]))
    torch.testing.assert_close(got[..., 4:], eager[..., 4:], rtol=1e-5, atol=1e-7)


def _out(folder: Path, name: str, fmt: str) -> Path:
    """Where an export goes: `name.onnx`, or the OpenVINO folder `name/` (holding `name.xml` + `name.bin`)."""
    return folder / (f"{name}.onnx" if fmt == "onnx" else name)


def _runner(fmt: str, path: Path) -> OnnxDetector | OpenVinoDetector:
    """The runner of an exported file: onnxruntime for .onnx, OpenVINO (f32 precision hint) for an IR folder."""
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino")
    return OnnxDetector(path) if fmt == "onnx" else OpenVinoDetector(path)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@torch.no_grad()
def test_dynamic_file_equals_the_eager_detector_on_other_rectangles(detector: Detector, tmp_path: Path,
                                                                    fmt: str) -> None:  # fmt: skip
    """The whole file: onnxruntime's and OpenVINO's convolutions round differently from torch's, through some 60
    layers, so scores and box corners agree to 1e-4 of their value (measured: 3e-5); the decode alone agrees to 1e-5
    (test above). The export is dynamic without being asked."""
    pytest.importorskip("onnx")
    runner = _runner(fmt, export_model(detector, CHECKPOINT, _out(tmp_path, "m", fmt), fmt, img_size=EXPORT_SIZE))
    assert runner.fixed_shape is None and runner.fixed_batch is None
    if fmt == "onnx":  # onnxruntime's threads sleep between runs (they took the cores from val_det's postprocess)
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for shape in RECTANGLES:
        images = _images(shape)
        got, eager = runner(images), detector(images)
        assert got.shape == eager.shape
        torch.testing.assert_close(got[..., :4], eager[..., :4], rtol=1e-4, atol=1e-5 * max(shape))
        torch.testing.assert_close(got[..., 4:], eager[..., 4:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@torch.no_grad()
def test_nms_in_the_graph_equals_the_eager_detections(detector: Detector, tmp_path: Path, fmt: str) -> None:
    """The exported NMS (dynamic file, rectangular input) keeps, per image, the detections `postprocess` gives on the
    eager decode: same labels, scores and boxes as in the test above."""
    settings = {"conf": 0.5, "iou": 0.7, "max_det": 5}
    path = export_model(detector, CHECKPOINT, _out(tmp_path, "nms", fmt), fmt, img_size=EXPORT_SIZE, nms=settings)
    images = _images(RECTANGLES[0])
    rows = _runner(fmt, path)(images)  # [K, 7] (image, x1, y1, x2, y2, score, label), by decreasing score
    expected = postprocess(detector(images), settings["conf"], settings["iou"], settings["max_det"])
    assert rows.shape == (10, 7)
    for image, reference in enumerate(expected):
        mine = rows[rows[:, 0] == image]
        assert mine[:, 6].long().tolist() == reference["labels"].tolist()
        torch.testing.assert_close(mine[:, 5], reference["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine[:, 1:5], reference["boxes"], rtol=1e-4, atol=1e-5 * max(RECTANGLES[0]))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_fixed_size_file_says_what_it_changes_in_one_line_at_load(detector: Detector, tmp_path: Path, fmt: str,
                                                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """`dynamic=False` (tools/export.py --fixed): batch 1 at the export size, and one stderr line at each load saying
    that images are letterboxed to that size instead of the .pt's smallest rectangle; a dynamic file says nothing."""
    pytest.importorskip("onnx")
    path = export_model(detector, CHECKPOINT, _out(tmp_path, "fixed", fmt), fmt, img_size=EXPORT_SIZE, dynamic=False)
    capsys.readouterr()
    runner = _runner(fmt, path)
    assert runner.fixed_shape == EXPORT_SIZE and runner.fixed_batch == 1
    shown = runner.path if fmt == "onnx" else path / "fixed.xml"
    assert capsys.readouterr().err == (
        f"note: {shown} takes a fixed 96x160 input: images are letterboxed to 96x160, not to the smallest rectangle "
        "as the .pt does, so boxes and scores differ slightly from the .pt's (export without --fixed for the .pt's "
        "results)\n"
    )
    _runner(fmt, export_model(detector, CHECKPOINT, _out(tmp_path, "dynamic", fmt), fmt, img_size=EXPORT_SIZE))
    assert capsys.readouterr().err == ""


class _NoDecodeHead(DetectionHead):
    """A family whose decode is Python per image (not traceable): export must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes, self.strides = 1, (32,)
        self.score = nn.Conv2d(4, 1, 1)

    def forward(self, features: list[torch.Tensor], image_size: tuple[int, int], targets=None) -> torch.Tensor:
        return self.score(features[-1])

    def decode(self, raw: torch.Tensor, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        return [{"scores": r.flatten().sigmoid()} for r in raw]


class _Stem(nn.Module):
    strides, out_channels = (32,), (4,)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 32, stride=32)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(images)]


def test_a_head_without_a_traceable_decode_is_refused_in_one_line(tmp_path: Path) -> None:
    detector = Detector(_Stem(), nn.Identity(), _NoDecodeHead())
    with pytest.raises(UserError) as info:
        export_model(detector, {"class_names": ["a"]}, tmp_path / "m.onnx", img_size=64)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("export: the _NoDecodeHead head is not exportable by plugdet yet (no traceable decode)")
    assert not (tmp_path / "m.onnx").exists()
