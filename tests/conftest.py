"""Shared test set-up: offline environment variables, a tiny synthetic mini-CUB, and runs and weights built on it.

The environment variables are set at import time, before any test module imports albumentations, Ultralytics or
matplotlib, so that nothing reaches the network and no settings land in the home folder. Plain helpers (the tool
loader, BatchNorm randomising, ...) are in tests/helpers.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not pass or fail by luck); a run with
# HYPOTHESIS_PROFILE=explore draws new ones each time, to look for new failures (add them as @example).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_TMP = Path(tempfile.gettempdir())
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = str(_TMP / "plugdet-yolo-config")
os.environ["MPLCONFIGDIR"] = str(_TMP / "plugdet-mpl-config")
# train.precision=auto (the default) is bf16 on a CPU with native bf16 and fp32 on others: tests pin fp32, so the
# numbers they compare do not depend on which CPU the machine has; tests/test_precision.py unsets it to test auto.
os.environ["PLUGDET_AUTO_PRECISION"] = "fp32"

SYNTH_SPECIES = 4
SYNTH_PER_SPECIES = 6  # 3 train + 3 test per species
SYNTH_WIDTH = (96, 128)
SYNTH_HEIGHT = (72, 96)


@pytest.fixture(scope="session")
def synth_cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding a tiny synthetic `CUB_200_2011/` (4 species x 6 images of 96-128 x 72-96 px, seed 0).

    The folder is the data root the configs expect (`data.root=<it>`); `find_cub_root` accepts it. 12 train and
    12 test images; treat it as read-only, it is shared by the whole session.
    """
    from detect.data.synth import make_synth_cub

    out = tmp_path_factory.mktemp("synth_cub")
    make_synth_cub(
        out,
        num_species=SYNTH_SPECIES,
        images_per_species=SYNTH_PER_SPECIES,
        seed=0,
        width_range=SYNTH_WIDTH,
        height_range=SYNTH_HEIGHT,
    )
    return out


@pytest.fixture(scope="session")
def trained_det_run(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one tiny train_det run (YOLOv8n from scratch, bird labels, 64 px, 1 epoch of 3 steps,
    Mosaic on), shared by the session: for tests that only read a trained run's files. Treat it as read-only."""
    from helpers import load_tool

    from detect.cli import run_tool

    run = tmp_path_factory.mktemp("trained_det") / "run"
    argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=1", "train.batch_size=4",
            "train.workers=0", "train.close_mosaic=0", "model.backbone_weights=null", f"output_dir={run}"]  # fmt: skip
    assert run_tool(load_tool("train_det").main, argv) == 0
    return run


@pytest.fixture(scope="session")
def untrained_det_weights(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of an untrained 1-class YOLOv8n in train_det's format, reading `synth_cub_root` at 64 px (tests of
    input handling need weights, not training). Read-only."""
    from helpers import save_untrained_detector

    return save_untrained_detector(tmp_path_factory.mktemp("untrained_det") / "best.pt", synth_cub_root)


@pytest.fixture
def interrupt_cls_after(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """`with interrupt_cls_after(k):` simulates Ctrl-C arriving during classification training step k (held back by
    `deferred_interrupts` until that step completes, as a real signal is)."""
    import detect.train.classify

    @contextlib.contextmanager
    def interrupt_after(steps: int) -> Iterator[None]:
        real, count = detect.train.classify.deferred_interrupts, {"n": 0}

        @contextlib.contextmanager
        def counting() -> Iterator[None]:
            with real():
                yield
            count["n"] += 1
            if count["n"] == steps:
                raise KeyboardInterrupt

        monkeypatch.setattr(detect.train.classify, "deferred_interrupts", counting)
        try:
            yield
        finally:
            monkeypatch.setattr(detect.train.classify, "deferred_interrupts", real)

    return interrupt_after


@pytest.fixture(scope="session")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An Ultralytics YOLOv8n (80 classes, from the yaml, seeded random init, spread) saved as its trainer saves
    (fp16), and its import through tools/import_ultralytics.py."""
    import copy

    import torch
    from helpers import load_tool, randomize_bn
    from ultralytics.nn import tasks

    from detect.cli import run_tool

    torch.manual_seed(0)
    theirs = randomize_bn(tasks.DetectionModel("yolov8n.yaml", nc=80, verbose=False), seed=1).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for seq in theirs.model[-1].cv3:  # scores that depend on the image
            seq[-1].weight.mul_(30.0)
            seq[-1].bias.normal_(-5.0, 0.5, generator=gen)
        for seq in theirs.model[-1].cv2:
            seq[-1].weight.mul_(5.0)
    theirs.names = {i: f"class{i}" for i in range(80)}
    folder = tmp_path_factory.mktemp("ultralytics")
    source, out = folder / "yolov8n_random.pt", folder / "imported.pt"
    torch.save({"model": copy.deepcopy(theirs).half(), "ema": None, "train_args": {"imgsz": 640}}, source)
    assert run_tool(load_tool("import_ultralytics").main, [str(source), "--out", str(out)]) == 0
    return {"source": source, "imported": out}
