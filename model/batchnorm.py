"""Recompute batch-norm statistics for the weights a network has now.

An exponential moving average of the weights (what `fermam train` validates and ships) also
averages the BN running statistics, but the statistics of averaged weights are not the average of
the statistics: after a short run whose weights moved a lot, they disagree. One forward pass over
training faces re-measures them (the SWA recipe). `torch.optim.swa_utils.update_bn` does this for
every BN layer and relies on `model.train()`; FERMam keeps its frozen landmark branch in eval mode,
so update_bn would reset that branch's statistics and never refill them. Here frozen layers (no
trainable affine parameters) keep theirs, and only the BN layers themselves switch mode, so
dropout stays off while the statistics are gathered.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def trainable_batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """BN layers whose affine parameters train (frozen branches are left out)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, _BatchNorm)
        and module.track_running_stats
        and any(p.requires_grad for p in module.parameters(recurse=False))
    ]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Replace the running mean/var of the trainable BN layers with their average over the
    batches of `inputs` (BN's cumulative average, momentum None). Returns the number of samples seen; the
    model is left in eval mode."""
    layers = trainable_batch_norms(model)
    momenta = {layer: layer.momentum for layer in layers}
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    seen = 0
    try:
        for x in inputs:
            model(x)
            seen += x.shape[0]
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("no inputs to recalibrate batch norm on")
    return seen
