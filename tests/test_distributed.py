"""`torchrun --nproc_per_node=2` on CPU (gloo) for train_cls and train_det (DESIGN §7).

Checked: both ranks finish; only rank 0 writes; the ranks' training shards are disjoint and are exactly
`DistributedEpochSampler`'s; each rank's loader batch is `train.batch_size / 2` (train.batch_size is the global batch,
as the tools' docstrings and the README say); the trained parameters are identical on both ranks and equal to the
weights rank 0 saved.

How, without a debug hook in the tools: torchrun runs a small driver (written by the test) that loads the tool as a
module, wraps three names of its run (`prepare_model`, the loader builder, and `DistributedEpochSampler.__iter__`) to
remember the model, the loaders and the indices each rank draws, records every path the process opens for writing
or renames into place, runs the tool's `main` through `run_tool` exactly as `python tools/X.py` does, and saves
what it saw to `<dump>/rank<R>.pt`. The tools are unchanged.

BatchNorm buffers are not compared across ranks: DDP broadcasts rank 0's buffers before each forward, and each rank
then updates them from its own shard, so they legitimately differ after the last step; rank 0's are the saved ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backbones.checkpoint import load_checkpoint
from detect.train.seeding import DistributedEpochSampler

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import builtins, importlib.util, os, sys
from pathlib import Path

import torch

from detect.cli import run_tool
from detect.train.seeding import DistributedEpochSampler

repo, name, dump = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
argv = sys.argv[4:]
rank = int(os.environ["RANK"])
spec = importlib.util.spec_from_file_location(name, repo / "tools" / f"{name}.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
seen = {"model": None, "batch_sizes": [], "draws": [], "writes": []}
import detect.train.classification, detect.train.detection
run_module = detect.train.detection if name == "train_det" else detect.train.classification

real_prepare = run_module.prepare_model
def prepare_model(model, info, sync_bn=False):
    seen["model"] = model
    return real_prepare(model, info, sync_bn)
run_module.prepare_model = prepare_model

loaders_name = "build_det_loaders" if name == "train_det" else "build_cls_loaders"
real_loaders = getattr(run_module, loaders_name)
def build_loaders(*args, **kwargs):
    train_loader, sampler, val_loader = real_loaders(*args, **kwargs)
    seen["batch_sizes"].append(train_loader.batch_size)
    return train_loader, sampler, val_loader
setattr(run_module, loaders_name, build_loaders)

real_iter = DistributedEpochSampler.__iter__
def sampler_iter(self):
    items = list(real_iter(self))
    seen["draws"].append({"shuffle": self.shuffle, "items": [list(i) if isinstance(i, tuple) else i for i in items]})
    return iter(items)
DistributedEpochSampler.__iter__ = sampler_iter

real_open, real_replace = builtins.open, os.replace
def recording_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
        seen["writes"].append(os.fspath(file))
    return real_open(file, mode, *args, **kwargs)
def recording_replace(src, dst, *args, **kwargs):
    seen["writes"].append(os.fspath(dst))
    return real_replace(src, dst, *args, **kwargs)
builtins.open, os.replace = recording_open, recording_replace

code = run_tool(tool.main, argv)
builtins.open, os.replace = real_open, real_replace
params = {k: v.detach().cpu().clone() for k, v in seen.pop("model").named_parameters()}
torch.save({"code": code, "params": params, **seen}, dump / f"rank{rank}.pt")
sys.exit(code)
"""

CASES = {  # case -> (tool, overrides); faster_rcnn: a two-stage torchvision family (targets in its forward, mean loss)
    "train_det": ("train_det", ["data.img_size=64", "train.epochs=2", "train.batch_size=4", "train.close_mosaic=1",
                                "eval.interval=2", "model.backbone_weights=null", "train.ema=false"]),
    "train_cls": ("train_cls", ["data.img_size=32", "data.resize_size=36", "train.epochs=2", "train.batch_size=4"]),
    "faster_rcnn": ("train_det", ["data.img_size=64", "train.epochs=2", "train.batch_size=4", "train.mosaic=0",
                                  "eval.interval=2", "model.backbone_weights=null", "train.ema=false",
                                  "model.head=faster_rcnn", "model.neck_kwargs.out_channels=32",
                                  "model.head_kwargs.representation_size=64"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def torchrun(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tools under `torchrun --standalone --nproc_per_node=2`, run at the same time; {tool: work folder}."""
    work = tmp_path_factory.mktemp("ddp")
    driver = work / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, folders = {}, {}
    for name, (tool, extra) in CASES.items():
        folder = work / name
        (folder / "dump").mkdir(parents=True)
        argv = [f"data.root={synth_cub_root}", "train.workers=0", "train.device=cpu", *extra,
                f"output_dir={folder / 'run'}"]  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(driver), str(REPO), tool, str(folder / "dump"), *argv]  # fmt: skip
        procs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        folders[name] = folder
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{out[-2000:]}\n{err[-4000:]}"
    return folders


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.train
def test_two_processes_train_on_disjoint_shards_to_identical_weights(torchrun: dict[str, Path], name: str) -> None:
    folder = torchrun[name]
    ranks = [torch.load(folder / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [0, 0]
    # train.batch_size=4 is global: 2 images per process and step
    assert [r["batch_sizes"] for r in ranks] == [[2], [2]]
    # disjoint shards, exactly the sampler's, covering the epoch (12 images: 6 per rank)
    for epoch in range(2):
        shards = []
        for rank, record in enumerate(ranks):
            draws = [d["items"] for d in record["draws"] if d["shuffle"]]
            assert len(draws) == 2, draws  # one draw per epoch
            expected = DistributedEpochSampler(12, 2, rank, 0, True, 2, True)
            expected.set_epoch(epoch)
            assert draws[epoch] == [list(item) for item in expected]
            shards.append({index for index, _ in draws[epoch]})
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 12
    # identical trained parameters on both ranks, and they are what rank 0 saved
    params0, params1 = ranks[0]["params"], ranks[1]["params"]
    assert params0.keys() == params1.keys()
    for key in params0:
        assert torch.equal(params0[key], params1[key]), key
    last = load_checkpoint(folder / "run" / "last.pt")
    saved = last["model"] if name == "train_cls" else last["train_state"]["model"]
    for key, value in params0.items():
        assert torch.equal(saved[key], value), key
    # only rank 0 wrote, and only inside its run directory
    assert ranks[1]["writes"] == []
    run = folder / "run"
    assert ranks[0]["writes"] and all(Path(p).resolve().is_relative_to(run) for p in ranks[0]["writes"])
