"""Plugins outside the packages: the README's plugin file is tests/plugins/my_parts.py, and every tool runs parts
registered there and in tests/plugins/more_parts.py (a neck, a head, a backbone, a loss) without editing plugdet."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_evaluation, load_tool

from backbones.checkpoint import load_checkpoint
from detect.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
PLUGINS = "[tests.plugins.my_parts,tests.plugins.more_parts]"


def test_the_readme_shows_the_tested_plugin_file_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n# tests/plugins/my_parts\.py\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no ```python block starting with '# tests/plugins/my_parts.py'"
    assert blocks[0] == (REPO / "tests" / "plugins" / "my_parts.py").read_text()


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """A tool in a fresh process from the repository root (the plugins are imported only by name)."""
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def plugin_chain(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train_cls pretrains the plugin backbone; train_det trains it under the plugin neck, head and loss; val_det and
    predict, in fresh processes, rebuild the model from the checkpoint (whose config names the plugins)."""
    out, root = tmp_path_factory.mktemp("plugins"), str(synth_cub_root)
    cls_argv = [f"imports={PLUGINS}", "model.backbone=plain_toy", f"data.root={root}", "data.img_size=64",
                "data.resize_size=72", "train.epochs=1", "train.batch_size=8", "train.workers=0",
                f"output_dir={out / 'cls'}"]  # fmt: skip
    assert run_tool(load_tool("train_cls").main, cls_argv) == 0
    det_argv = [f"imports={PLUGINS}", "model.backbone=plain_toy", "model.neck=lite_fpn", "model.neck_kwargs.width=32",
                "model.head=slim_yolo", "loss.name=box_cls_only", f"model.backbone_weights={out / 'cls/backbone.pt'}",
                f"data.root={root}", "data.img_size=96", "train.epochs=2", "train.batch_size=4", "train.workers=0",
                "train.close_mosaic=1", f"output_dir={out / 'det'}"]  # fmt: skip
    assert run_tool(load_tool("train_det").main, det_argv) == 0
    val = _tool("val_det", "--weights", str(out / "det" / "best.pt"), "--out", str(out / "val"), f"imports={PLUGINS}")
    assert val.returncode == 0, val.stderr
    images = str(synth_cub_root / "CUB_200_2011" / "images" / "*" / "*_0000.jpg")
    pred = _tool("predict", "--weights", str(out / "det" / "best.pt"), "--source", images, "--out", str(out / "pred"),
                 "--imports", *PLUGINS.strip("[]").split(","))  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    return {"det": out / "det", "val": out / "val", "pred": out / "pred"}


@pytest.mark.train
def test_train_det_trains_the_plugin_parts_and_logs_their_loss_parts(plugin_chain: dict[str, Path]) -> None:
    last = load_checkpoint(plugin_chain["det"] / "last.pt")
    arch = last["arch"]
    assert (arch["backbone"]["name"], arch["neck"]["name"], arch["head"]["name"]) == (
        "plain_toy", "lite_fpn", "slim_yolo",
    )  # fmt: skip
    assert arch["neck"]["kwargs"] == {"width": 32} and last["config"]["imports"] == PLUGINS.strip("[]").split(",")
    assert any(key.startswith("head.box_branch.0.conv.") for key in last["model"])  # the slim branch's own layout
    with open(plugin_chain["det"] / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "train/box" in rows[0] and "train/cls" in rows[0] and "train/dfl" not in rows[0]
    assert all(float(row["train/box"]) > 0 and float(row["train/cls"]) > 0 for row in rows)


@pytest.mark.train
def test_val_det_and_predict_rebuild_the_plugin_model_from_the_checkpoint(plugin_chain: dict[str, Path]) -> None:
    """val_det, in a fresh process, rebuilds the plugin model and gets the evaluation train_det stored in best.pt."""
    metrics = json.loads((plugin_chain["val"] / "metrics.json").read_text())
    assert_same_evaluation(metrics, load_checkpoint(plugin_chain["det"] / "best.pt")["metrics"])
    drawn = [p for p in plugin_chain["pred"].iterdir() if p.suffix == ".jpg"]
    assert len(drawn) == 4  # one *_0000.jpg per species
    assert len(json.loads((plugin_chain["pred"] / "predictions.json").read_text())) == 4


@pytest.mark.parametrize("plugin, expected", [
    ("no_such_plugin_module", "cannot import plugin 'no_such_plugin_module' (config key `imports`): "
                              "ModuleNotFoundError: No module named 'no_such_plugin_module'"),
    ("BROKEN", "cannot import plugin 'BROKEN' (config key `imports`): RuntimeError: my plugin is broken"),
])  # fmt: skip
def test_a_plugin_that_fails_to_import_is_one_line_exit_2(
    plugin: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('my plugin is broken')\n")
    name = str(broken) if plugin == "BROKEN" else plugin
    for tool in ("train_det", "train_cls"):
        assert run_tool(load_tool(tool).main, [f"imports=[{name}]", f"output_dir={tmp_path / tool}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {expected.replace('BROKEN', name)}"]
        assert not (tmp_path / tool).exists()
