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


def test_train_det_refuses_the_key_before_any_work(synth_cub_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from tests.helpers import load_tool

    argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=1", "train.workers=0",
            "model.backbone_weights=null", f"output_dir={tmp_path / 'run'}", "model.head_kwargs.regmax=8"]  # fmt: skip
    assert run_tool(load_tool("train_det").main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.head_kwargs of head 'yolov8' has no setting 'regmax': it takes reg_max"]
    assert not (tmp_path / "run").exists()
