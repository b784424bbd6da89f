"""A checkpoint is data: no tool and no API call imports a module because a checkpoint's config names it.

The attack: a best.pt whose saved config lists `imports: [<a file of the attacker's>]`, shared beside that file.
predict, val_det and `load()` each refuse it in one line naming the module and how to allow it (exit 2 for the
tools), and the module's code never runs; named by the user, the same file predicts normally.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones.errors import UserError
from detect.checkpoints import detector_checkpoint, refuse_unnamed_plugins
from detect.config import config_to_dict, load_config
from detect.config.schema import DetConfig
from detect.models import DetectorSpec, PartSpec, build_detector

REPO = Path(__file__).resolve().parents[1]
PLUGIN = """from pathlib import Path
Path({marker!r}).write_text("the checkpoint's plugin ran")
"""


@pytest.fixture
def crafted(tmp_path: Path, synth_cub_root: Path) -> dict[str, Path]:
    """A detector checkpoint (untrained cspdarknet_n + YOLOv8, 1 class) whose config names `evil_parts.py`."""
    marker = tmp_path / "the_plugin_ran"
    plugin = tmp_path / "evil_parts.py"
    plugin.write_text(PLUGIN.format(marker=str(marker)))
    torch.manual_seed(0)
    spec = DetectorSpec(1, PartSpec("cspdarknet_n", {}), PartSpec("yolov8", {"scale": "n"}), PartSpec("yolov8", {}))
    config = config_to_dict(load_config(DetConfig, None, [f"data.root={synth_cub_root}", "data.img_size=64"]))
    config["imports"] = [str(plugin)]
    weights = tmp_path / "best.pt"
    torch.save(detector_checkpoint(build_detector(spec).eval(), spec.to_arch(), ["bird"], [1], config, {}, 1), weights)
    return {"weights": weights, "plugin": plugin, "marker": marker, "images": synth_cub_root / "CUB_200_2011"}


def _tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)  # fmt: skip


def _refusal(stderr: str, plugin: Path, how: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"plugin modules {plugin}, which you did not name" in lines[0] and how in lines[0], lines[0]


@pytest.mark.slow
def test_predict_and_val_det_refuse_a_checkpoints_plugins_and_run_them_when_named(crafted: dict[str, Path]) -> None:
    images = str(next(crafted["images"].glob("images/*/*.jpg")))
    out = crafted["weights"].parent
    pred = _tool("predict", "--weights", str(crafted["weights"]), "--source", images, "--out", str(out / "p"),
                 cwd=out)  # fmt: skip
    assert pred.returncode == 2
    _refusal(pred.stderr, crafted["plugin"], f"--imports {crafted['plugin']}")
    val = _tool("val_det", "--weights", str(crafted["weights"]), "--out", str(out / "v"), cwd=out)
    assert val.returncode == 2
    _refusal(val.stderr, crafted["plugin"], f"imports=[{crafted['plugin']}]")
    assert not crafted["marker"].exists() and not (out / "p").exists() and not (out / "v").exists()
    named = _tool("predict", "--weights", str(crafted["weights"]), "--source", images, "--out", str(out / "p"),
                  "--imports", str(crafted["plugin"]), cwd=out)  # fmt: skip
    assert named.returncode == 0, named.stderr
    assert crafted["marker"].read_text() == "the checkpoint's plugin ran"  # the user's choice: it ran
    assert (out / "p" / "predictions.json").is_file()


def test_load_refuses_a_checkpoints_plugins_and_names_how_to_allow_them(crafted: dict[str, Path]) -> None:
    from detect.api import load

    with pytest.raises(UserError) as refused:
        load(crafted["weights"], device="cpu")
    assert f"plugin modules {crafted['plugin']}, which you did not name" in str(refused.value)
    assert f"load(weights, imports=[{crafted['plugin']}])" in str(refused.value)
    assert not crafted["marker"].exists()


def test_consent_compares_modules_by_name_and_files_by_the_module_they_become() -> None:
    checkpoint = {"config": {"imports": ["pkg.parts", "/elsewhere/my_parts.py"]}}
    refuse_unnamed_plugins(checkpoint, ["pkg.parts", "plugins/my_parts.py"], "w.pt", "imports=[MODULE]")  # both named
    with pytest.raises(UserError, match=r"plugin modules pkg\.parts, which you did not name"):
        refuse_unnamed_plugins(checkpoint, ["plugins/my_parts.py"], "w.pt", "imports=[MODULE]")
    with pytest.raises(UserError, match=r"--imports pkg\.parts /elsewhere/my_parts\.py\)$"):
        refuse_unnamed_plugins(checkpoint, [], "w.pt", "--imports MODULE")
    refuse_unnamed_plugins({"config": {}}, [], "w.pt", "imports=[MODULE]")  # a checkpoint without plugins needs none
