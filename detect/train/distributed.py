"""Devices and torchrun: process-group set-up, rank-0 helpers, SyncBN, DDP wrapping and metric all-reduce (DESIGN §7).

Under `torchrun --nproc_per_node=N tools/train_*.py ...` the environment holds RANK, LOCAL_RANK and WORLD_SIZE;
`init_distributed` joins the group (gloo on CPU, NCCL on CUDA). Without them everything here degrades to the single
process case, so training code calls the same functions either way. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from backbones.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its rank among `world_size`, its `local_rank` on the node, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA if present else CPU; `cuda` without a GPU is a UserError; `cpu` -> CPU.

    Args:
        name: "auto", "cpu", "cuda" or "cuda:K".
        local_rank: the GPU index used for "auto"/"cuda" under torchrun.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={name} but CUDA is not available here: use train.device=cpu or auto")
        return torch.device(name) if ":" in name else torch.device("cuda", local_rank)
    raise UserError(f"unknown device {name!r}: choose auto, cpu or cuda")


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA), else a single process.

    Args:
        device_name: as for `select_device`.

    Returns:
        This process's `DistInfo`; on CUDA the current device is set to LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes, in place, and return it (single process: unchanged)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s Python object on every process (e.g. the run directory chosen by rank 0)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def prepare_model(model: nn.Module, info: DistInfo, sync_bn: bool = False) -> nn.Module:
    """Move to the device; under torchrun optionally convert BatchNorm to SyncBatchNorm and wrap in DDP.

    Args:
        model: the model (already holding its final requires_grad flags).
        info: from `init_distributed`.
        sync_bn: SyncBatchNorm across processes (only when distributed on CUDA; a warning on CPU).

    Returns:
        The model to train: the module itself, or a DistributedDataParallel wrapper (see `unwrap`).
    """
    model = model.to(info.device)
    if not info.distributed:
        return model
    if sync_bn and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn and info.is_main:
        print("warning: sync_bn needs CUDA (no CPU SyncBatchNorm); keeping per-process BatchNorm", file=sys.stderr)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
