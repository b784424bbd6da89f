"""Detection training and evaluation as plain functions (STYLE 8): one epoch of YOLOv8 training, one evaluation.

`train_one_epoch` follows YOLOv8's step: warmup of lr / momentum / accumulation per iteration (`optim.warmup_*`),
gradients accumulated up to the nominal batch size, gradient-norm clipping, an optimizer step, an EMA update. Every
step runs with Ctrl-C / SIGTERM deferred (`cli.deferred_interrupts`), so an interrupted run always stops between two
consistent steps; `StepState` tells where, and a resume skips exactly the batches already folded into an
optimizer step.

`evaluate` runs the model over a loader, postprocesses (conf 0.001, IoU 0.7, max_det 300 for validation), maps boxes
back to original-image pixels and scores them with pycocotools (`detect.eval.coco_evaluate`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from backbones.errors import UserError
from backbones.freeze import keep_frozen_bn_eval
from detect.classify import TrainingInterrupted
from detect.cli import deferred_interrupts
from detect.distributed import all_reduce_sum, get_world_size, is_main_process, unwrap
from detect.eval import coco_evaluate, predictions_to_coco
from detect.optim import ModelEMA, set_group_values, warmup_accumulate, warmup_values, yolo_lr_factor
from detect.postprocess import postprocess


@dataclass(frozen=True)
class Schedule:
    """YOLOv8's per-iteration lr, momentum and accumulation, from plain numbers.

    The epoch's lr is lr * yolo_lr_factor(epoch); during the first `warmup_iters` iterations the bias group's lr
    falls from `warmup_bias_lr`, the others rise from 0, momentum rises from `warmup_momentum`, and gradient
    accumulation ramps from 1 batch to nominal_batch_size / batch_size.
    """

    lr: float
    lrf: float
    epochs: int
    scheduler: str
    momentum: float
    warmup_iters: int
    warmup_bias_lr: float
    warmup_momentum: float
    batch_size: int
    nominal_batch_size: int

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int) -> int:
        """Set every group's lr / momentum for a global iteration; returns the batches to accumulate."""
        target = self.lr * yolo_lr_factor(epoch, self.epochs, self.lrf, self.scheduler)
        names = [group.get("name", "") for group in optimizer.param_groups]
        values = warmup_values(
            iteration, self.warmup_iters, names, target, self.momentum, self.warmup_bias_lr, self.warmup_momentum
        )
        set_group_values(optimizer, values)
        return warmup_accumulate(iteration, self.warmup_iters, self.nominal_batch_size, self.batch_size)


@dataclass
class StepState:
    """Where training stands: the global iteration of the last optimizer step (-1 before the first)."""

    last_step: int = -1


def autocast(device: torch.device, amp: bool, bf16: bool) -> contextlib.AbstractContextManager:
    """Mixed precision: CUDA fp16 (or bf16) when `amp`, CPU bf16 when `bf16`; otherwise full fp32."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)
    if device.type == "cpu" and bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] from the loader (any memory layout) -> float [B, 3, H, W] in [0, 1] on the device, in
    channels_last memory or NCHW-contiguous (a conv given channels_last input answers in channels_last)."""
    images = images.to(device, non_blocking=True).float().div_(255.0)  # keeps the loader's layout
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _check_finite(total: torch.Tensor, parts: Mapping[str, torch.Tensor], epoch: int, batch: int, step: int) -> None:
    """A non-finite loss stops training before it reaches the weights (DESIGN §8); names the part and the step."""
    if torch.isfinite(total):
        return
    bad = [name for name, value in parts.items() if not torch.isfinite(value)] or ["total"]
    raise UserError(
        f"non-finite loss ({', '.join(f'{name}={float(parts.get(name, total))}' for name in bad)}) at epoch "
        f"{epoch + 1}, batch {batch + 1} (iteration {step}): stopped before the weights changed; last.pt keeps the "
        "last good epoch (try a lower train.lr, or train.amp=false)"
    )


def pending_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients accumulated since the last optimizer step (empty right after a step), by parameter name."""
    return {name: p.grad.detach().cpu().clone() for name, p in unwrap(model).named_parameters() if p.grad is not None}


def restore_gradients(model: nn.Module, gradients: Mapping[str, torch.Tensor]) -> None:
    """Put `pending_gradients` back, so a resumed run continues the interrupted accumulation exactly."""
    params = dict(unwrap(model).named_parameters())
    for name, grad in gradients.items():
        params[name].grad = grad.to(params[name].device, params[name].dtype).clone()


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
    where: str = "",
) -> None:
    """Unscale, clip the gradient norm, step (skipped by the scaler on fp16 overflow), zero the gradients.

    Without a scaler, a non-finite gradient norm (a finite loss can still overflow in backward) is a UserError
    raised before the step, so the weights stay finite; `where` names the position for that message.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
        if scaler is None and not torch.isfinite(norm):
            raise UserError(f"non-finite gradient norm ({float(norm)}) {where}: stopped before the weights changed; "
                            "last.pt keeps the last good epoch (try a lower train.lr)")  # fmt: skip
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: nn.Module,
    criterion: Any,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA | None,
    schedule: Schedule,
    state: StepState,
    epoch: int,
    device: torch.device,
    start_batch: int = 0,
    amp: bool = False,
    bf16: bool = False,
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 10.0,
    start_sums: list[float] | None = None,
) -> dict[str, float]:
    """One epoch of detection training.

    Args:
        model: the detector (possibly DDP-wrapped), train-mode output = per-level maps.
        criterion: `DetectionLoss`; its total is (box + cls + dfl) x batch size, as YOLOv8's.
        loader: yields (images uint8 [B,3,S,S], targets [N,6], metas); its sampler already skips `start_batch`.
        optimizer, ema, schedule: see `Schedule`; `state.last_step` is updated in place.
        epoch: 0-based epoch; start_batch: batches of this epoch already done (resume).
        device, amp, bf16, channels_last, scaler, grad_clip: precision and step options.
        start_sums: [box, cls, dfl, batches] summed over the `start_batch` batches done before an interruption, so
            a resumed epoch reports the same means as an uninterrupted one.

    Returns:
        Mean "box", "cls", "dfl" over the epoch's batches (per batch, averaged over processes), "img_per_s" and the
        last lr of each group (`lr/pg0`, ...).

    Raises:
        TrainingInterrupted: Ctrl-C / SIGTERM, between two steps, with the batches of this epoch done (the resume
            point) and their loss sums; gradients not yet stepped stay on the parameters (`pending_gradients`).
    """
    model.train()
    keep_frozen_bn_eval(model)
    iters_per_epoch = start_batch + len(loader)
    world = get_world_size()
    before = torch.tensor(start_sums if start_sums is not None else [0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    history: list[torch.Tensor] = []  # [3] loss parts of each batch of this call
    images_seen, t0 = 0, time.perf_counter()
    bar = tqdm(
        loader,
        total=iters_per_epoch,
        initial=start_batch,
        disable=not is_main_process(),
        desc=f"epoch {epoch + 1}/{schedule.epochs}",
        leave=False,
    )
    completed = start_batch  # batches of this epoch whose step (forward, backward, maybe optimizer) is done
    try:
        for batch_index, (images, targets, _) in enumerate(bar, start=start_batch):
            iteration = epoch * iters_per_epoch + batch_index
            accumulate = schedule.apply(optimizer, epoch, iteration)
            last_in_epoch = batch_index == iters_per_epoch - 1
            with deferred_interrupts():  # Ctrl-C / SIGTERM wait for the step to finish: state stays consistent
                inputs = to_input(images, device, channels_last)
                targets = targets.to(device)
                with autocast(device, amp, bf16):
                    outputs = model(inputs)
                total, parts = criterion([o.float() for o in outputs], targets)
                _check_finite(total, parts, epoch, batch_index, iteration)
                loss = total * world  # DDP averages gradients over processes; YOLOv8's loss is a per-process sum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                # An epoch ends with a step, so an epoch-boundary checkpoint holds no half-accumulated gradient.
                if iteration - state.last_step >= accumulate or last_in_epoch:
                    where = f"at epoch {epoch + 1}, batch {batch_index + 1} (iteration {iteration})"
                    _optimizer_step(model, optimizer, scaler, grad_clip, where)
                    if ema is not None:
                        ema.update(model)
                    state.last_step = iteration
                history.append(torch.stack([parts["box"], parts["cls"], parts["dfl"]]).detach().double().cpu())
                completed = batch_index + 1
            images_seen += images.shape[0]
            mean = (before[:3] + sum(history)) / (before[3] + len(history))
            rate = images_seen * world / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(box=f"{mean[0]:.3f}", cls=f"{mean[1]:.3f}", dfl=f"{mean[2]:.3f}",
                            inst=int(targets.shape[0]), img_s=f"{rate:.1f}")  # fmt: skip
    except KeyboardInterrupt:
        # Gradients accumulated since the last optimizer step travel in last.pt (`pending_gradients`).
        sums = before + torch.cat((sum(history, torch.zeros(3, dtype=torch.float64)), torch.tensor([len(history)])))
        raise TrainingInterrupted(epoch, completed, sums.tolist()) from None
    finally:
        bar.close()
    sums = before + torch.cat((sum(history, torch.zeros(3, dtype=torch.float64)), torch.tensor([len(history)])))
    all_reduce_sum(sums)
    means = (sums[:3] / sums[3].clamp(min=1)).tolist()
    result = {
        "box": means[0],
        "cls": means[1],
        "dfl": means[2],
        "img_per_s": images_seen * world / max(time.perf_counter() - t0, 1e-9),
    }
    for k, group in enumerate(optimizer.param_groups):
        result[f"lr/pg{k}"] = group["lr"]
    return result


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    conf: float,
    iou: float,
    max_det: int,
    multi_label: bool = True,
    bf16: bool = False,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]], list[dict[str, torch.Tensor]]]]:
    """Run an eval-mode model over a loader: yields (images uint8, metas, detections in original-image pixels)."""
    model.eval()
    for images, _, metas in loader:
        inputs = to_input(images, device, channels_last)
        with autocast(device, amp=False, bf16=bf16):
            preds = model(inputs)  # [B, A, 4 + C]
        results = postprocess(preds.float(), conf, iou, max_det, multi_label=multi_label, metas=metas)
        yield images, metas, [{k: v.cpu() for k, v in r.items()} for r in results]


def evaluate(
    model: nn.Module,
    loader: Any,
    gt: str | Mapping[str, Any],
    category_ids: Sequence[int],
    device: torch.device,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    backend: str = "pycocotools",
    bf16: bool = False,
    channels_last: bool = False,
    keep_images: int = 0,
    coco_max_dets: int = 100,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[Any, ...]]]:
    """COCO evaluation of a model on a validation loader.

    Args:
        model: the detector (eval-mode output `[B, A, 4 + C]`).
        loader: validation loader (letterboxed, metas with ratio / pad / orig_size / image_id).
        gt: ground-truth COCO json (path or dict) built from the same data set.
        category_ids: contiguous label -> the data set's category id.
        device, conf, iou, max_det: postprocess settings (validation: 0.001, 0.7, 300, multi-label).
        backend: "pycocotools" or "faster".
        bf16, channels_last: inference options.
        keep_images: keep this many (image index, detections) pairs for pictures.
        coco_max_dets: COCO's last detection cap per image, maxDets (1, 10, coco_max_dets): 100 is COCO's
            definition; 300 scores every box postprocess keeps (`max_det`), as Ultralytics' own mAP does.

    Returns:
        (metrics from `coco_evaluate` plus "time_per_image_ms", COCO-format predictions, kept pairs).
    """
    predictions: list[dict[str, Any]] = []
    kept: list[tuple[Any, ...]] = []
    start, count = time.perf_counter(), 0
    for _, metas, results in predict_batches(model, loader, device, conf, iou, max_det, True, bf16, channels_last):
        image_ids = [int(meta["image_id"]) for meta in metas]
        predictions += predictions_to_coco(results, image_ids, list(category_ids))
        for meta, result in zip(metas, results, strict=True):
            if len(kept) < keep_images:
                kept.append((meta["index"], result))
        count += len(metas)
    elapsed = time.perf_counter() - start
    metrics = coco_evaluate(gt, predictions, backend=backend, max_dets=(1, 10, coco_max_dets))
    metrics["time_per_image_ms"] = 1000.0 * elapsed / max(count, 1)
    return metrics, predictions, kept


def nan_to_zero(value: float) -> float:
    """COCO returns -1 or NaN where a metric is undefined; curves and best-model choice read 0 instead."""
    return 0.0 if value is None or (isinstance(value, float) and (math.isnan(value) or value < 0)) else float(value)
