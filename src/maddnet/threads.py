"""One thread setting for torch's and numba's thread pools."""

from __future__ import annotations

import numba
import torch

from .amm._lut_kernel import launch_threads


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch (intra-op) and in the numba kernels.

    numba's pool cannot grow beyond ``NUMBA_NUM_THREADS`` (the cores at start-up), so its
    share is capped there. Setting only torch's count leaves numba's kernels on all cores,
    which oversubscribes a machine that runs several jobs.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    launch_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
