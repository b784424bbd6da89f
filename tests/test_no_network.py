"""No network at run time (DESIGN §1): the four tools run on the tiny mini-CUB with every socket call refused and
recorded, and nothing tries to connect; a DETR head (transformers) trains and predicts there too.

A `sitecustomize.py` on PYTHONPATH (imported by Python at start-up, before any plugdet or third-party code) replaces
`socket.socket.connect` / `connect_ex`, `socket.create_connection` and `socket.getaddrinfo` with functions that log
the attempt and raise. Local IPC (AF_UNIX sockets) stays allowed. The tools run in-process, one after the other, in
that one subprocess (a torch import per tool would cost more than the runs); the environment is the user's, without
the NO_ALBUMENTATIONS_UPDATE / YOLO_OFFLINE switches the test suite sets, so a library's own "check for updates"
would show up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = """
import os
import socket

_LOG = os.environ["PLUGDET_NETWORK_LOG"]


def _refuse(what, *args):
    with open(_LOG, "a") as log:
        log.write(f"{what} {args!r}\\n")
    raise OSError(f"network disabled by tests/test_no_network.py: {what} {args!r}")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address)
    _refuse("connect", address)


def connect_ex(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect_ex(self, address)
    _refuse("connect_ex", address)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.create_connection = lambda *args, **kwargs: _refuse("create_connection", *args)
socket.getaddrinfo = lambda *args, **kwargs: _refuse("getaddrinfo", *args)
"""

DRIVER = """
import importlib.util, socket, sys
from pathlib import Path

import sitecustomize  # the guard is in place (imported by Python at start-up)
assert socket.getaddrinfo.__module__ == "sitecustomize"
from detect.cli import run_tool

repo, root, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])


def main_of(name):
    spec = importlib.util.spec_from_file_location(name, repo / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


image = next((Path(root) / "CUB_200_2011" / "images").rglob("*.jpg"))
runs = [
    ("train_cls", [f"data.root={root}", "data.img_size=32", "data.resize_size=36", "train.epochs=1",
                   "train.batch_size=8", "train.workers=0", f"output_dir={out / 'cls'}"]),
    ("train_det", [f"data.root={root}", "data.img_size=64", "train.epochs=1", "train.batch_size=4",
                   "train.workers=0", f"model.backbone_weights={out / 'cls' / 'backbone.pt'}",
                   f"output_dir={out / 'det'}"]),
    ("val_det", ["--weights", str(out / "det" / "best.pt"), "--out", str(out / "val")]),
    ("predict", ["--weights", str(out / "det" / "best.pt"), "--source", str(image), "--out", str(out / "pred")]),
    # a DETR head: transformers builds its model from a config, with no hub access (issue 19)
    ("train_det", [f"data.root={root}", "data.img_size=64", "train.epochs=1", "train.batch_size=4",
                   "train.workers=0", "model.backbone_weights=null", "model.head=rtdetr",
                   "model.head_kwargs.num_queries=30", "model.head_kwargs.decoder_layers=2",
                   f"output_dir={out / 'detr'}"]),
    ("predict", ["--weights", str(out / "detr" / "best.pt"), "--source", str(image), "--out", str(out / "pred_detr")]),
]
for name, argv in runs:
    print("RESULT", name, run_tool(main_of(name), argv), flush=True)
try:  # the guard works: a real attempt is refused and logged
    socket.create_connection(("pypi.org", 443), timeout=1)
except OSError:
    print("RESULT probe refused", flush=True)
"""


@pytest.mark.train
def test_tools_never_touch_the_network(synth_cub_root: Path, tmp_path: Path) -> None:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NO_ALBUMENTATIONS_UPDATE", "YOLO_OFFLINE")}
    env.update(PYTHONPATH=os.pathsep.join([str(guard), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PLUGDET_NETWORK_LOG=str(log))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(REPO), str(synth_cub_root), str(tmp_path / "runs")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    expected = [["train_cls", "0"], ["train_det", "0"], ["val_det", "0"], ["predict", "0"], ["train_det", "0"],
                ["predict", "0"], ["probe", "refused"]]  # fmt: skip
    assert results == expected, result.stdout[-2000:] + result.stderr[-3000:]
    attempts = log.read_text().splitlines()
    assert attempts == ["create_connection (('pypi.org', 443),)"], attempts  # only the test's own probe
