"""Run the inter-layer passes (:func:`~maddnet.nn.fuse.fuse`, then
:func:`~maddnet.nn.prune.prune_unread`) as one step, for the CLI and scripts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fuse import fuse
from .plan import conversion_plan
from .prune import prune_unread


def apply_passes(
    model: nn.Module,
    example: torch.Tensor,
    fuse_layers: bool = True,
    prune: bool = True,
    bn_after: bool = False,
    approximate: bool = False,
) -> dict[str, Any]:
    """Fold, then prune ``model`` (in place, eval mode); returns the passes' reports.

    Folding first lets pruning skip the columns of tree levels whose compares folding made
    constant. ``example``: an input batch (shapes, see :func:`maddnet.nn.graph.trace`);
    ``bn_after``, ``approximate``: as in :func:`~maddnet.nn.fuse.fuse` (off: every fold
    is exact).
    Raises :class:`maddnet.nn.graph.GraphError` if fx cannot trace the model.
    """
    model.eval()
    if fuse_layers:
        fuse(model, example=example, approximate=approximate, bn_after=bn_after)
    if prune:
        prune_unread(model, example)
    wanted = {"fuse"} if fuse_layers else set()
    wanted |= {"prune_unread"} if prune else set()
    return {r["pass"]: r["report"] for r in conversion_plan(model)["passes"] if r["pass"] in wanted}
