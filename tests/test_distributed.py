"""`torchrun --nproc_per_node=2` on CPU (gloo) for train_cls and train_det (DESIGN §7).

Checked: both ranks finish; only rank 0 writes; the ranks' training shards are disjoint and are exactly
`DistributedEpochSampler`'s; each rank's loader batch is `train.batch_size / 2` (train.batch_size is the global batch,
as the tools' docstrings and the README say); the trained parameters are identical on both ranks and equal to the
weights rank 0 saved. For YOLO26 with MuSGD (`yolo26_musgd`) also: each rank's loss used the epoch's o2m / o2o
weights at every step, and MuSGD's buffers are identical on both ranks and saved by rank 0.

How, without a debug hook in the tools: torchrun runs a small driver (written by the test) that loads the tool as a
module, wraps names of its run (`prepare_model`, the loader builder, `DistributedEpochSampler.__iter__`, and for
train_det the optimizer and criterion builders) to remember the model, the loaders, the indices each rank draws, the
optimizer and a `set_epoch` loss's weights at each call, records every path the process opens for writing or renames
into place, runs the tool's `main` through `run_tool` exactly as `python tools/X.py` does, and saves what it saw to
`<dump>/rank<R>.pt`. The tools are unchanged.

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

if name == "train_det":  # the optimizer, and the branch weights a loss with `set_epoch` (YOLO26's) holds at each call
    real_optimizer, real_criterion = run_module.build_det_optimizer, run_module.build_det_criterion
    def build_optimizer(*args, **kwargs):
        seen["optimizer"] = real_optimizer(*args, **kwargs)
        return seen["optimizer"]
    class RecordingCriterion:
        def __init__(self, inner):
            self.inner = inner
        def __getattr__(self, attr):  # set_epoch and the rest reach the real criterion
            return getattr(self.inner, attr)
        def __call__(self, *args, **kwargs):
            seen["loss_weights"].append((self.inner.o2m, self.inner.o2o))
            return self.inner(*args, **kwargs)
    def build_criterion(*args, **kwargs):
        criterion = real_criterion(*args, **kwargs)
        if not hasattr(criterion, "set_epoch"):
            return criterion
        seen["loss_weights"] = []
        return RecordingCriterion(criterion)
    run_module.build_det_optimizer, run_module.build_det_criterion = build_optimizer, build_criterion

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
if "optimizer" in seen:
    optimizer = seen.pop("optimizer")
    seen["optimizer"] = {"type": type(optimizer).__name__, "state": optimizer.state_dict()}
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
    # yolo26: csp26_n + yolo26 neck + the end-to-end head, its o2m / o2o loss (set_epoch) and MuSGD
    "yolo26_musgd": ("train_det", ["data.img_size=64", "train.epochs=2", "train.batch_size=4", "train.close_mosaic=1",
                                   "eval.interval=2", "model.backbone_weights=null", "train.ema=false",
                                   "model.head=yolo26", "train.optimizer=musgd"]),
    # dfine: transformers' D-FINE (tiny) on cspdarknet_n: targets and denoising in its forward, AdamW with the lower
    # backbone lr, gradient clipping; every trainable parameter gets a gradient, so DDP needs no unused-parameter scan
    "dfine": ("train_det", ["data.img_size=64", "train.epochs=2", "train.batch_size=4", "train.mosaic=0",
                            "eval.interval=2", "model.backbone_weights=null", "train.ema=false", "model.head=dfine",
                            "train.optimizer=adamw", "train.lr=1e-4", "train.backbone_lr_scale=0.5",
                            "train.grad_clip=0.1", *[f"model.head_kwargs.{k}={v}" for k, v in
                            {"encoder_hidden_dim": 64, "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                             "decoder_layers": 2, "num_queries": 30, "num_denoising": 20, "hidden_expansion": 0.34,
                             "depth_mult": 0.5}.items()]]),
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


@pytest.mark.train
def test_yolo26_musgd_ranks_share_the_epoch_weights_and_the_optimizer_state(torchrun: dict[str, Path]) -> None:
    """YOLO26 + MuSGD under DDP, beyond the identical parameters checked above (which DDP's gradient all-reduce gives
    even when the ranks' losses differ): every rank's loss used the epoch's o2m / o2o weights at every step (the
    engine's `set_epoch` reached each rank's criterion before the epoch's first step), and MuSGD's state (Muon and
    SGD momentum buffers) is the same on both ranks and is what rank 0 saved, so a resumed run continues them."""
    from detect.losses.yolo26 import o2m_weight

    folder = torchrun["yolo26_musgd"]
    ranks = [torch.load(folder / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # 12 images, 2 per rank and step: 3 steps per epoch on each rank, epoch 0 at o2m 0.8 and epoch 1 at 0.1
    expected = [(o2m_weight(epoch, 2), 1.0 - o2m_weight(epoch, 2)) for epoch in (0, 1) for _ in range(3)]
    assert [o2m for o2m, _ in expected] == pytest.approx([0.8] * 3 + [0.1] * 3, abs=1e-12)
    for record in ranks:
        assert len(record["loss_weights"]) == len(expected)
        for seen, wanted in zip(record["loss_weights"], expected, strict=True):
            assert seen == pytest.approx(wanted, abs=1e-12)
    states = [record["optimizer"] for record in ranks]
    assert [s["type"] for s in states] == ["MuSGD", "MuSGD"]
    saved = load_checkpoint(folder / "run" / "last.pt")["train_state"]["optimizer"]
    for state in (states[1]["state"], saved):
        assert state["param_groups"] == states[0]["state"]["param_groups"]
    kinds = {name for buffers in states[0]["state"]["state"].values() for name in buffers}
    assert kinds == {"muon_buffer", "momentum_buffer"}  # the Muon step ran, beside the SGD one
    for index, buffers in states[0]["state"]["state"].items():
        for state in (states[1]["state"], saved):
            assert state["state"][index].keys() == buffers.keys(), index
            assert all(torch.equal(value, state["state"][index][key]) for key, value in buffers.items()), index
