"""The tiny end-to-end run: train_cls -> train_det (from that backbone) -> val_det -> predict, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import InterruptingLoss, assert_same_evaluation, load_tool

import detect.train.detection
from backbones.checkpoint import load_checkpoint
from detect.cli import run_tool


@pytest.fixture(scope="module")
def chain(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs the whole chain once; the tests below check what each step left. The detector's backbone weights as
    train_det built them (before its first step) are kept in `initial_backbone.pt`."""
    out = tmp_path_factory.mktemp("e2e")
    root = str(synth_cub_root)
    cls_argv = [f"data.root={root}", "data.img_size=64", "data.resize_size=72", "train.epochs=1", "train.batch_size=8",
                "train.workers=0", f"output_dir={out / 'cls'}"]  # fmt: skip
    assert run_tool(load_tool("train_cls").main, cls_argv) == 0
    det_argv = [f"data.root={root}", "data.img_size=128", "train.epochs=2", "train.batch_size=4", "train.workers=0",
                "train.close_mosaic=1", "eval.interval=1", f"model.backbone_weights={out / 'cls' / 'backbone.pt'}",
                f"output_dir={out / 'det'}"]  # fmt: skip
    build, initial = detect.train.detection.build_det_model, {}

    def recording_build(*args, **kwargs):  # the built detector's backbone, before training changes it
        model = build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.backbone.state_dict().items()})
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(detect.train.detection, "build_det_model", recording_build)
        assert run_tool(load_tool("train_det").main, det_argv) == 0
    torch.save(initial, out / "initial_backbone.pt")
    weights = out / "det" / "best.pt"
    assert run_tool(load_tool("val_det").main, ["--weights", str(weights), "--out", str(out / "val")]) == 0
    images = str(synth_cub_root / "CUB_200_2011" / "images" / "*" / "*.jpg")
    predict_argv = ["--weights", str(weights), "--source", images, "--out", str(out / "pred"), "--conf", "0.001"]
    assert run_tool(load_tool("predict").main, predict_argv) == 0
    return {"cls": out / "cls", "det": out / "det", "val": out / "val", "pred": out / "pred", "data": synth_cub_root,
            "initial": out / "initial_backbone.pt"}  # fmt: skip


@pytest.mark.train
def test_cls_run_leaves_every_artefact(chain: dict[str, Path]) -> None:
    names = {"config.yaml", "results.csv", "curves.png", "confusion_matrix.png", "last.pt", "best.pt", "backbone.pt"}
    assert names <= {p.name for p in chain["cls"].iterdir()}


@pytest.mark.train
def test_det_run_leaves_every_artefact_and_transfers_the_backbone(chain: dict[str, Path]) -> None:
    run = chain["det"]
    names = {"config.yaml", "val_gt.json", "results.csv", "curves.png", "last.pt", "best.pt", "val_predictions.jpg",
             "pr_curve.png"}  # fmt: skip
    assert names <= {p.name for p in run.iterdir()}
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs
    last = load_checkpoint(run / "last.pt")
    assert last["kind"] == "plugdet-detector" and last["train_state"]["epoch"] == 2
    assert "train_state" not in load_checkpoint(run / "best.pt")
    # The detector started from the classification backbone: before training, every tensor was backbone.pt's.
    backbone = load_checkpoint(chain["cls"] / "backbone.pt")["state_dict"]
    assert set(backbone) == {k.removeprefix("backbone.") for k in last["model"] if k.startswith("backbone.")}
    initial = torch.load(chain["initial"], weights_only=True)
    assert initial.keys() == backbone.keys()
    for key, value in backbone.items():
        assert torch.equal(initial[key], value), key
    trained = [k for k in backbone if k.endswith(".weight") and not torch.equal(last["model"][f"backbone.{k}"],
                                                                                  backbone[k])]  # fmt: skip
    assert trained, "two epochs left every backbone weight as backbone.pt had it"


@pytest.mark.train
def test_val_det_writes_coco_results_with_the_data_sets_ids(chain: dict[str, Path]) -> None:
    """val_det on best.pt gives the evaluation train_det stored in it: the same EMA weights on the same rect batches."""
    metrics = json.loads((chain["val"] / "metrics.json").read_text())
    assert_same_evaluation(metrics, load_checkpoint(chain["det"] / "best.pt")["metrics"])
    predictions = json.loads((chain["val"] / "predictions.json").read_text())
    gt = json.loads((chain["val"] / "gt.json").read_text())
    image_ids = {image["id"] for image in gt["images"]}
    test_ids = {
        int(line.split()[0])
        for line in (chain["data"] / "CUB_200_2011" / "train_test_split.txt").read_text().splitlines()
        if line.split()[1] == "0"
    }
    assert image_ids == test_ids
    assert predictions and {p["image_id"] for p in predictions} <= image_ids
    assert {p["category_id"] for p in predictions} == {1}  # bird labels: category 1
    assert all(len(p["bbox"]) == 4 and p["bbox"][2] >= 0 and p["bbox"][3] >= 0 for p in predictions)


@pytest.mark.train
def test_val_det_passes_coco_max_dets_to_the_evaluation(chain: dict[str, Path], tmp_path: Path) -> None:
    """eval.coco_max_dets=300 reaches the evaluation (maxDets (1, 10, 300), AR300); the default is COCO's 100."""
    weights = chain["det"] / "best.pt"
    argv = ["--weights", str(weights), "--out", str(tmp_path / "val300"), "eval.coco_max_dets=300"]
    assert run_tool(load_tool("val_det").main, argv) == 0
    cap100 = json.loads((chain["val"] / "metrics.json").read_text())
    cap300 = json.loads((tmp_path / "val300" / "metrics.json").read_text())
    assert cap100["max_dets"] == [1, 10, 100] and "AR100" in cap100
    assert cap300["max_dets"] == [1, 10, 300] and "AR300" in cap300 and "AR100" not in cap300
    predictions = json.loads((chain["val"] / "predictions.json").read_text())
    per_image = max(sum(p["image_id"] == i for p in predictions) for i in {p["image_id"] for p in predictions})
    assert per_image <= 100  # this tiny model keeps few boxes, so both caps score the same boxes: same 12 numbers
    assert cap300["coco_stats"] == cap100["coco_stats"]  # (what the cap drops: tests/test_eval.py)


@pytest.mark.train
def test_predict_draws_every_image_and_lists_boxes_in_original_pixels(chain: dict[str, Path]) -> None:
    sources = sorted((chain["data"] / "CUB_200_2011" / "images").glob("*/*.jpg"))
    drawn = [p for p in chain["pred"].iterdir() if p.suffix == ".jpg"]
    assert len(drawn) == len(sources)
    entries = json.loads((chain["pred"] / "predictions.json").read_text())
    assert len(entries) == len(sources)
    from detect.data.source import read_image_size

    for entry in entries[:5]:
        h, w = read_image_size(entry["file"])
        for det in entry["detections"]:
            x1, y1, x2, y2 = det["box_xyxy"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert det["class"] == "bird"


# 12 train images, batch 4: 3 steps per epoch. Call 3 is epoch 1's last step, call 5 the middle of epoch 2.
@pytest.mark.parametrize("interrupt_at_call", [3, 5], ids=["end-of-epoch", "mid-epoch"])
@pytest.mark.train
def test_ctrl_c_then_resume_is_bit_identical(
    chain: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_at_call: int
) -> None:
    """Ctrl-C during epoch 2 saves last.pt; resuming from it ends bit-identical to the uninterrupted 2-epoch run."""
    root = str(chain["data"])
    argv = [f"data.root={root}", "data.img_size=128", "train.epochs=2", "train.batch_size=4", "train.workers=0",
            "train.close_mosaic=1", "eval.interval=1", f"model.backbone_weights={chain['cls'] / 'backbone.pt'}",
            f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    train_det, run = load_tool("train_det"), detect.train.detection
    build = run.build_det_criterion
    monkeypatch.setattr(
        run, "build_det_criterion", lambda cfg, model: InterruptingLoss(build(cfg, model), interrupt_at_call)
    )
    assert run_tool(train_det.main, argv) == 130
    state = load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    # Mid-epoch, batch 1 of epoch 2 only accumulated gradients (no optimizer step yet): they travel in last.pt.
    assert (state["epoch"], state["batch"]) == ((0, 3) if interrupt_at_call == 3 else (1, 2))
    assert bool(state["gradients"]) == (interrupt_at_call == 5)  # an epoch ends with a step: nothing pending
    monkeypatch.setattr(run, "build_det_criterion", build)
    assert run_tool(train_det.main, [f"train.resume={tmp_path / 'run' / 'last.pt'}"]) == 0
    resumed = load_checkpoint(tmp_path / "run" / "last.pt")
    straight = load_checkpoint(chain["det"] / "last.pt")
    for part in ("model", "ema"):
        a = straight["model"] if part == "model" else straight["train_state"]["ema"]["state_dict"]
        b = resumed["model"] if part == "model" else resumed["train_state"]["ema"]["state_dict"]
        for key, value in a.items():
            assert torch.equal(value, b[key]), f"{part}.{key}"
    for key, value in straight["train_state"]["model"].items():
        assert torch.equal(value, resumed["train_state"]["model"][key]), key
    assert straight["metrics"]["coco_stats"] == resumed["metrics"]["coco_stats"]
    rows = (tmp_path / "run" / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3
