"""Loader worker set-up shared by training and validation loaders."""

from __future__ import annotations

import torch


def quiet_worker(worker_id: int) -> None:
    """A loader worker uses one torch thread: on a few cores, threads inside workers only compete.

    OpenCV's thread count is deliberately left alone: `cv2.setNumThreads` in a forked worker hangs for good when the
    parent process had already used OpenCV's thread pool (e.g. a second run in the same process, a notebook, a
    test), while OpenCV's own functions work in the fork either way.
    """
    torch.set_num_threads(1)
