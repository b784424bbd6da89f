"""detect/config/loading.py: typed defaults, YAML, overrides, and one-line errors naming key, value and valid keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from backbones.errors import UserError
from detect.config import ClsConfig, DetConfig, config_to_dict, config_to_yaml, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides() -> None:
    cfg = load_config(ClsConfig, None, ["train.epochs=3", "train.milestones=[2,4]", "model.backbone_weights=w.pt"])
    assert cfg.train.epochs == 3 and list(cfg.train.milestones) == [2, 4]
    assert cfg.model.backbone_weights == "w.pt"
    assert cfg.data.root == "data/synth_cub" and cfg.model.backbone == "cspdarknet_n"
    assert cfg.train.lr == 0.002 and isinstance(cfg.train.lr, float)
    assert load_config(ClsConfig, None, ["train.lr=1"]).train.lr == 1.0  # int widened to float
    assert load_config(ClsConfig, None, ["train.threads=4", "train.threads=null"]).train.threads is None  # later wins
    with pytest.raises(ValidationError):  # the result stays typed
        cfg.train.epochs = "many"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  optimizer: adamw\ndata:\n  img_size: 96\n")
    cfg = load_config(ClsConfig, path, ["train.epochs=9"])
    assert (cfg.train.epochs, cfg.train.optimizer, cfg.data.img_size) == (9, "adamw", 96)
    assert config_to_dict(cfg)["train"]["epochs"] == 9
    assert OmegaConf.create(config_to_yaml(cfg)).train.optimizer == "adamw"


def test_base_from_checkpoint_dict() -> None:
    saved = config_to_dict(load_config(ClsConfig, None, ["train.epochs=5", "seed=3"]))
    cfg = load_config(ClsConfig, None, ["train.workers=0"], base=saved)
    assert (cfg.train.epochs, cfg.seed, cfg.train.workers) == (5, 3, 0)


def _error(*args: object, **kwargs: object) -> str:
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_key_value_and_valid_keys() -> None:
    message = _error(ClsConfig, None, ["train.epoch=5"])
    assert "'train.epoch'" in message and "5" in message
    assert "valid keys of 'train'" in message and "epochs" in message and "batch_size" in message
    message = _error(ClsConfig, None, ["colour=red"])
    assert "'colour'" in message and "valid top-level keys: imports, data, model, train, output_dir, seed" in message
    message = _error(DetConfig, None, ["eval.iou_thres=0.5"])
    assert "valid keys of 'eval'" in message and "max_det" in message


def test_wrong_type_names_key_value_and_valid_keys() -> None:
    message = _error(ClsConfig, None, ["train.epochs=ten"])
    assert "'train.epochs'" in message and "'ten'" in message and "train.epochs=ten" in message
    assert "valid keys of 'train'" in message
    assert "'train'" in _error(ClsConfig, None, ["train=3"])
    assert "'data.img_size'" in _error(ClsConfig, None, ["data.img_size=1.5"])


def test_choices_bounds_and_malformed_overrides() -> None:
    message = _error(ClsConfig, None, ["train.optimizer=adam"])
    assert "'train.optimizer'" in message and "must be one of adamw, sgd" in message
    assert "must be >= 1" in _error(ClsConfig, None, ["train.epochs=0"])
    assert "KEY=VALUE" in _error(ClsConfig, None, ["train.epochs"])
    assert "pycocotools, faster" in _error(DetConfig, None, ["eval.backend=fast"])


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  img_size: 64\ntrain:\n  epochs: 2\n  lrr: 0.1\n")
    message = _error(ClsConfig, path)
    assert f"{path}, line 5" in message and "'train.lrr'" in message and "valid keys of 'train'" in message
    path.write_text("train:\n  epochs: x\n")
    assert f"{path}, line 2" in _error(ClsConfig, path)
    path.write_text("train:\n  epochs: [3\n")
    assert "malformed YAML" in _error(ClsConfig, path)
    assert "not found" in _error(ClsConfig, tmp_path / "missing.yaml")


def test_det_schema_defaults() -> None:
    cfg = load_config(DetConfig)
    assert (cfg.data.format, cfg.data.labels, cfg.data.img_size) == ("cub", "bird", 256)
    assert cfg.model.scale == "n" and cfg.model.num_classes is None and cfg.model.backbone is None
    t = cfg.train
    assert (t.batch_size, t.nominal_batch_size, t.lr, t.lrf, t.optimizer) == (16, 64, 0.01, 0.01, "sgd")
    assert (t.momentum, t.weight_decay, t.warmup_epochs, t.warmup_bias_lr, t.warmup_momentum) == (
        0.937, 5e-4, 3.0, 0.1, 0.8,
    )  # fmt: skip
    assert (t.close_mosaic, t.mosaic, t.grad_clip) == (10, 1.0, 10.0)
    assert (cfg.model.neck, cfg.model.head, cfg.loss.name) == (None, "yolov8", None)  # neck None: the head's own
    assert (cfg.loss.box, cfg.loss.cls, cfg.loss.dfl, cfg.loss.iou) == (7.5, 0.5, 1.5, "ciou")
    a = cfg.assign
    assert (a.topk, a.alpha, a.beta, a.eps, a.iou, a.min_gt_side) == (10, 0.5, 6.0, 1e-9, "ciou", None)
    assert (cfg.eval.conf, cfg.eval.iou, cfg.eval.max_det, cfg.eval.backend) == (0.001, 0.7, 300, "pycocotools")


@pytest.mark.parametrize(
    "name", ["default.yaml", "resnet50_cub.yaml", "cspdarknet_n_cub.yaml", "csp11_n_cub.yaml", "csp26_n_cub.yaml"]
)
def test_shipped_cls_configs_load(name: str) -> None:
    cfg = load_config(ClsConfig, REPO / "configs" / "cls" / name)
    assert cfg.train.epochs >= 1


def test_default_yaml_is_the_schema_default() -> None:
    from_yaml = config_to_dict(load_config(ClsConfig, REPO / "configs" / "cls" / "default.yaml"))
    assert from_yaml == config_to_dict(load_config(ClsConfig))


@pytest.mark.parametrize("old, new", [("train.box", "loss.box"), ("train.cls", "loss.cls"), ("train.dfl", "loss.dfl")])
def test_moved_loss_gains_name_their_new_key(old: str, new: str) -> None:
    with pytest.raises(UserError, match=rf"config key '{old}' in override '{old}=1.0' is now '{new}': rename it"):
        load_config(DetConfig, None, [f"{old}=1.0"])


def test_a_saved_config_with_the_old_keys_is_mapped() -> None:
    """A checkpoint written before the loss section resumes: its train.box/cls/dfl land in loss.*."""
    old = config_to_dict(load_config(DetConfig))
    old["train"].update(box=3.0, cls=0.25, dfl=2.0)
    for key in ("loss", "assign", "imports"):
        old.pop(key)
    for key in ("neck", "head", "backbone_kwargs", "neck_kwargs", "head_kwargs"):
        old["model"].pop(key)
    cfg = load_config(DetConfig, None, [], base=old)
    assert (cfg.loss.box, cfg.loss.cls, cfg.loss.dfl) == (3.0, 0.25, 2.0)
    assert (cfg.model.neck, cfg.model.head) == (None, "yolov8")


def test_part_kwargs_sections_take_any_keys() -> None:
    cfg = load_config(DetConfig, None, ["model.head_kwargs.reg_max=8", "model.neck_kwargs={}", "loss.iou=giou"])
    assert cfg.model.head_kwargs == {"reg_max": 8} and cfg.loss.iou == "giou"
