"""FERMam and its blocks: shapes, gradients, scan-direction bookkeeping, eval determinism, and the
frozen landmark branch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import FERPLUS_CLASSES, RAFDB_CLASSES, FERMamConfig
from model.fermam import FERMam, PatchMerge
from model.mobilefacenet import MobileFaceNet
from model.scan import available_backends
from model.ssm import NUM_DIRECTIONS, SS2D, scan_orders


@pytest.fixture(scope="module", params=[FERPLUS_CLASSES, RAFDB_CLASSES], ids=["8-classes", "7-classes"])
def model(request) -> FERMam:
    torch.manual_seed(0)
    return FERMam(FERMamConfig(class_names=request.param)).eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_output_shapes(model: FERMam, batch: int):
    x = torch.randn(batch, 3, 112, 112)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        landmarks = model.landmark_branch(x)
        landmark_map = model.landmark_branch.forward_features(x)
    assert features.shape == (batch, 512)
    assert logits.shape == (batch, model.config.num_classes)
    assert landmark_map.shape == (batch, 512, 7, 7)
    assert landmarks.shape == (batch, 136)
    assert torch.isfinite(logits).all()


def test_eval_outputs_are_deterministic():
    torch.manual_seed(1)
    model = FERMam().eval()  # dropout off, BN on running statistics
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = FERMam().train()
    # IR units start with a zero BN gate on their residual branch (so everything behind it has an
    # exactly zero gradient at step 0); open the gates to test that the whole graph is connected.
    for unit in model.ir50.units:
        nn.init.ones_(unit.bn_out.weight)
    x = torch.randn(2, 3, 112, 112)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 5]))
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("landmark_branch.") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    # The 1x1 scale scans one position, so its decay A never acts: its gradient is exactly zero.
    inert = "fusion.scales.2.A_log"
    assert torch.count_nonzero(trainable[inert].grad) == 0
    zero_grad = [n for n, p in trainable.items() if n != inert and not p.grad.abs().sum() > 0]
    assert not zero_grad, zero_grad
    for scale in model.fusion.scales:  # ASFR's skip D is learned (the released code never trains it)
        assert scale.D.grad is not None and scale.D.grad.abs().sum() > 0


def test_frozen_landmark_branch_stays_in_eval_mode_while_the_rest_trains():
    model = FERMam(FERMamConfig(landmark_frozen=True))
    model.train()
    branch = model.landmark_branch
    assert not any(m.training for m in branch.modules())
    assert all(m.training for m in (model.ir50, model.conv_ssm, model.fusion, model.head))
    assert not any(p.requires_grad for p in branch.parameters())
    running_mean = branch.conv1.bn.running_mean.clone()
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    assert torch.equal(branch.conv1.bn.running_mean, running_mean)  # BN statistics untouched
    assert all(p.grad is None for p in branch.parameters())

    trainable = FERMam(FERMamConfig(landmark_frozen=False)).train()
    assert trainable.landmark_branch.training
    assert all(p.requires_grad for p in trainable.landmark_branch.parameters())


def _single_direction_ss2d(direction: int, height: int, width: int) -> SS2D:
    """An SS2D whose output comes from one scan direction only, with no spatial mixing elsewhere:
    the other directions get C = 0 and D = 0, and the depthwise conv is the identity."""
    torch.manual_seed(direction)
    ss2d = SS2D(d_model=6, d_state=4, expand=2, dt_rank=2).double()
    d_inner, rank, n = ss2d.d_inner, ss2d.dt_rank, ss2d.d_state
    with torch.no_grad():
        ss2d.conv2d.weight.zero_()
        ss2d.conv2d.weight[:, :, 1, 1] = 1.0
        ss2d.conv2d.bias.zero_()
        for k in range(NUM_DIRECTIONS):
            if k != direction:
                ss2d.x_proj_weight[k, rank + n :] = 0.0  # C rows
                ss2d.Ds[k * d_inner : (k + 1) * d_inner] = 0.0
    return ss2d


@pytest.mark.parametrize("direction", range(NUM_DIRECTIONS))
def test_ss2d_puts_every_direction_back_in_token_order(direction: int):
    """A scan is causal along its own order, so perturbing token p may change exactly the tokens at
    or after p in that order. If a reversed or transposed direction's output were summed without
    being put back in raster order, the changed set would not match."""
    height, width = 3, 4  # not square, so a transposition cannot pass for the identity
    ss2d = _single_direction_ss2d(direction, height, width)
    order = scan_orders(height, width, torch.device("cpu"))[direction]
    step_of_token = torch.argsort(order)  # raster token -> step at which this direction visits it
    x = torch.randn(1, height, width, 6, dtype=torch.float64)
    with torch.no_grad():
        base = ss2d(x)
        for token in (0, 5, height * width - 1):
            nudged = x.clone()
            nudged[0, token // width, token % width] += 1.0
            changed = (ss2d(nudged) - base).abs().amax(-1).flatten() > 0
            expected = step_of_token >= step_of_token[token]
            assert torch.equal(changed, expected), (direction, token)


def test_patch_merge_is_space_to_depth():
    """Each 7x7 token sees exactly its own 2x2 patch of the 14x14 map (the released code's view()
    would mix channel planes)."""
    merge = PatchMerge(3, 5)
    x = torch.randn(1, 3, 4, 6)
    base = merge(x)
    assert base.shape == (1, 2, 3, 5)
    nudged = x.clone()
    nudged[0, 2, 3, 4] += 1.0  # row 3, column 4 lies in patch (1, 2)
    changed = (merge(nudged) - base).abs().amax(-1)[0] > 0
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(changed, expected)


def test_channels_last_and_bf16_autocast_run():
    torch.manual_seed(0)
    model = FERMam().eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        assert torch.allclose(
            model_cl(x.to(memory_format=torch.channels_last)), reference, atol=1e-4, rtol=1e-4
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model_cl(x.to(memory_format=torch.channels_last))
    assert torch.isfinite(low).all()
    assert torch.allclose(low.float(), reference, atol=0.1 * reference.abs().max().item() + 0.05)


def test_landmark_branch_is_a_mobilefacenet():
    assert isinstance(FERMam().landmark_branch, MobileFaceNet)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or "mamba" not in available_backends(),
    reason="needs CUDA and mamba-ssm's compiled kernel",
)
def test_whole_network_agrees_across_scan_backends_on_gpu():
    from model import scan

    torch.manual_seed(0)
    model = FERMam().cuda().train()
    for unit in model.ir50.units:
        nn.init.ones_(unit.bn_out.weight)
    model.fusion.apply(lambda m: m.eval() if isinstance(m, nn.Dropout) else None)
    x = torch.randn(8, 3, 112, 112, device="cuda")
    results = {}
    try:
        for backend in ("torch", "mamba"):
            scan.set_scan_backend(backend)
            model.zero_grad()
            logits = model(x)
            logits.square().sum().backward()
            results[backend] = (
                logits.detach(),
                model.fusion.scales[0].D.grad.clone(),
                model.conv_ssm.ss2d.Ds.grad.clone(),
            )
    finally:
        scan.set_scan_backend(None)
    for a, b in zip(results["torch"], results["mamba"], strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * a.abs().max().item())
