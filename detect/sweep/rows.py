"""The rows of the sweep's report, shared by `detect.sweep.report` (which computes them) and `detect.sweep.plots`
(which draws them): a mean with its spread over seeds (`Stat`), and one backbone x head x init (`GroupRow`)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None for a single value) of `n` values."""

    mean: float
    sd: float | None
    n: int

    def show(self, signed: bool = False) -> str:
        """`0.512 ± 0.010`, `+0.048 ± 0.006`, or just the mean for one value."""
        mean = f"{self.mean:+.3f}" if signed else f"{self.mean:.3f}"
        return mean + (f" ± {self.sd:.3f}" if self.sd is not None else "")


def mean_sd(values: Sequence[float]) -> Stat | None:
    """The `Stat` of `values`; None when there are none."""
    values = [float(v) for v in values]
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class GroupRow:
    """One backbone x head x init of the sweep over its seeds (what a line of sweep.md shows)."""

    backbone: str
    head: str
    init: str
    seeds_done: int
    seeds_total: int
    ap: Stat | None
    ap50: Stat | None
    gain: Stat | None  # AP minus the scratch cells' AP, paired by seed (None for scratch or without pairs)
    cls_top1: float | None
    cost: Mapping[str, Any] | None
    train_img_per_s: float | None = None  # mean over seeds of each cell's median epoch throughput
