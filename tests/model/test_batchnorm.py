"""BN recalibration: trainable layers get their inputs' statistics; frozen layers, dropout untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.batchnorm import recalibrate_batch_norm, trainable_batch_norms


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).requires_grad_(False)
    frozen[1].running_mean.fill_(0.25)
    frozen[1].running_var.fill_(2.0)
    return nn.Sequential(frozen, nn.Dropout(0.5), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.ReLU())


def test_trainable_layers_get_the_statistics_of_the_inputs() -> None:
    net = _net()
    inputs = [torch.randn(8, 3, 10, 10) for _ in range(3)]
    assert recalibrate_batch_norm(net, inputs) == 24
    with torch.no_grad():
        # What the recalibrated layer sees: eval-mode frozen branch, no dropout.
        features = [net[2](net[0].eval()(x)) for x in inputs]
    bn = net[3]
    # Equal batches: the mean of the batch means is the overall mean; the variance is the mean
    # of the batches' unbiased variances, as BN's cumulative average (and update_bn) keep it.
    torch.testing.assert_close(bn.running_mean, torch.cat(features).mean(dim=(0, 2, 3)))
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not net.training and not bn.training


def test_frozen_layers_keep_their_statistics() -> None:
    net = _net()
    assert trainable_batch_norms(net) == [net[3]]
    recalibrate_batch_norm(net, [torch.randn(4, 3, 10, 10)])
    assert torch.all(net[0][1].running_mean == 0.25) and torch.all(net[0][1].running_var == 2.0)


def test_no_inputs_is_an_error() -> None:
    with pytest.raises(ValueError, match="no inputs"):
        recalibrate_batch_norm(_net(), [])
