"""No setting is dropped in silence (DESIGN §8): every `model.*_kwargs`, `loss.*`, `loss.kwargs.*` and `assign.*` key
either reaches something that uses it or is one line naming the key and what the chosen part accepts, exit 2, before
any work and with no run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from backbones.errors import UserError
from detect.cli import run_tool
from detect.models import DetectorSpec, PartSpec, build_detector

YOLO = (PartSpec("cspdarknet_n", {}), PartSpec("yolov8", {"scale": "n"}), PartSpec("yolov8", {}))


@pytest.mark.parametrize(
    "backbone, neck, head, said",
    [
        (PartSpec("cspdarknet_n", {"foo": 1}), YOLO[1], YOLO[2],
         "model.backbone_kwargs of backbone 'cspdarknet_n' has no setting 'foo': it takes weights"),
        (YOLO[0], PartSpec("yolov8", {"scale": "n", "widht": 2}), YOLO[2],
         "model.neck_kwargs of neck 'yolov8' has no setting 'widht': it takes scale"),
        (YOLO[0], YOLO[1], PartSpec("yolov8", {"regmax": 8}),
         "model.head_kwargs of head 'yolov8' has no setting 'regmax': it takes reg_max"),
        (PartSpec("tv:resnet18", {"foo": 1}), YOLO[1], YOLO[2],
         "model.backbone_kwargs of backbone 'tv:resnet18' has no setting 'foo' (ResNet.__init__() got an "
         "unexpected keyword argument 'foo')"),
        (PartSpec("resnet18", {}), PartSpec("fpn", {}), PartSpec("retinanet", {"foo": 1}),
         "model.head_kwargs of head 'retinanet' has no setting 'foo' (RetinaNetFamily.__init__() got an "
         "unexpected keyword argument 'foo')"),
    ],
)  # fmt: skip
def test_a_part_keyword_nobody_takes_is_one_line(backbone: PartSpec, neck: PartSpec, head: PartSpec, said: str) -> None:
    import detect.losses  # noqa: F401  (the heads' families register their losses)

    with pytest.raises(UserError) as error:
        build_detector(DetectorSpec(1, backbone, neck, head))
    assert str(error.value) == said


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["model.head_kwargs.regmax=8"],
         "model.head_kwargs of head 'yolov8' has no setting 'regmax': it takes reg_max"),
        (["loss.kwargs.tpok=3"],
         "loss.kwargs.tpok=3 is not read by loss 'yolo' (of head 'yolov8'): it takes loss.box, loss.cls, loss.dfl, "
         "loss.iou"),
        (["loss.box=9", "model.head=retinanet"],
         "loss.box=9.0 is not read by loss 'torchvision' (of head 'retinanet'): it takes no loss.* settings"),
        (["assign.topk=5", "model.head=fcos"],
         "assign.topk=5 is not read by loss 'torchvision' (of head 'fcos'): it takes no assign.* settings"),
    ],
)  # fmt: skip
def test_train_det_refuses_the_key_before_any_work(overrides: list[str], said: str, synth_cub_root: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from tests.helpers import load_tool

    argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=1", "train.workers=0",
            "model.backbone_weights=null", f"output_dir={tmp_path / 'run'}", *overrides]  # fmt: skip
    assert run_tool(load_tool("train_det").main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {said}"]
    assert not (tmp_path / "run").exists()


def test_a_yolo_setting_changed_from_its_default_reaches_the_loss() -> None:
    """The check compares with the defaults: a changed YOLO gain or assigner number is read, not refused."""
    from detect.losses.registry import check_loss_settings

    check_loss_settings("yolo", {"box": 9.0}, {"cls": 1.0}, {"topk": 13}, "yolov8")
    check_loss_settings("box_cls_only", {"anything": 1}, {"x": 2}, {"y": 3}, "slim_yolo")  # undeclared: not checked
