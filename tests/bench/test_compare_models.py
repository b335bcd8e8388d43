"""bench/compare_models.py and the reference networks: counts near the published figures, output
shapes, the interleaved timing loop and the bf16 rule (no timings are asserted)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch import nn

from bench import compare_models
from bench.reference_nets.poster import Poster
from bench.reference_nets.posterv2 import PosterV2, window_merge, window_partition

# Published figures the counts are held to (POSTER V2 README; design/fermam.md's thop readings).
POSTERV2_PARAMS, POSTERV2_MACS = 43.7e6, 8.4e9
POSTER_PARAMS, POSTER_FLOPS = 71.8e6, 15.7e9
POSTER_THOP_USED_PARAMS, POSTER_THOP_MACS = 58.98e6, 7.90e9


def near(value: float, target: float, tolerance: float) -> bool:
    return abs(value / target - 1) <= tolerance


@pytest.fixture(scope="module")
def report() -> dict:
    """The --no-speed --json report (counts on the meta device: about a second a network)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert compare_models.main(["--no-speed", "--json"]) == 0
    return json.loads(out.getvalue())


def test_posterv2_counts_within_5_percent_of_its_readme(report: dict):
    row = report["posterv2"]
    # thop adds a module's parameters only when it runs: the published 43.7 M is the used count.
    assert near(row["params_used"], POSTERV2_PARAMS, 0.05)
    assert near(row["macs"], POSTERV2_MACS, 0.05)
    # The dead weights (IR-50's 12.85 M embedding layer and ViT leftovers) are carried, not run.
    assert 14.0e6 < row["params"] - row["params_used"] < 15.0e6


def test_poster_params_match_the_paper_and_its_flops_are_twice_our_macs(report: dict):
    row = report["poster"]
    assert near(row["params"], POSTER_PARAMS, 0.05)  # the paper's 71.8 M counts the dead weights
    assert near(row["params_used"], POSTER_THOP_USED_PARAMS, 0.02)
    assert near(row["macs"], POSTER_THOP_MACS, 0.03)
    # 15.7 G is two FLOPs per multiply-add; our MACs land within 1% of half of it.
    assert near(2 * row["macs"], POSTER_FLOPS, 0.01)


def test_fermam_counts_are_fermam_complexitys(report: dict):
    from model.complexity import REFERENCE_MACS, REFERENCE_PARAMS

    row = report["fermam"]
    assert near(row["params"], REFERENCE_PARAMS, 0.03) and near(row["macs"], REFERENCE_MACS, 0.03)
    assert sum(m["macs"] for m in row["modules"].values()) == row["macs"]


def test_attention_products_are_counted(report: dict):
    # Scaled-dot-product attention resolves into two bmm per call on the meta device: q.k and a.v.
    windows = sum(2 * (side * side) ** 2 * dim for side, dim in ((28, 64), (14, 128), (7, 256)))
    vit = 2 * 2 * 148**2 * 768
    assert report["posterv2"]["macs_attention"] == windows + vit
    # POSTER: two cross-attentions of 50 x 50 tokens per width (512, 256, 128), 8 pyramid blocks.
    assert report["poster"]["macs_attention"] == 8 * 2 * 2 * 50 * 50 * (512 + 256 + 128)


@pytest.mark.parametrize("network", [PosterV2, Poster], ids=["posterv2", "poster"])
def test_reference_networks_give_finite_logits_of_the_right_shape(network: type[nn.Module]):
    torch.manual_seed(0)
    model = network(num_classes=7).eval()
    with torch.inference_mode():
        logits = model(torch.randn(1, 3, 112, 112))
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    with torch.device("meta"):  # shapes alone: nothing is computed
        assert network(num_classes=8)(torch.zeros(4, 3, 112, 112)).shape == (4, 8)


def test_window_partition_and_merge_are_inverse():
    x = torch.randn(2, 8, 8, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 4, 16, 3)
    assert torch.equal(windows[1], x[0, :4, 4:].reshape(16, 3))  # second window: top right
    assert torch.equal(window_merge(windows, 4, 8, 8), x)


class Recorder(nn.Module):
    """Stands in for a network: logs its calls, returns zeros of the right shape."""

    def __init__(self, name: str, calls: list[str], classes: int) -> None:
        super().__init__()
        self.name, self.calls, self.classes = name, calls, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        return torch.zeros(x.shape[0], self.classes)


def test_speed_interleaves_the_networks_and_rotates_their_order():
    calls: list[str] = []
    models = {name: Recorder(name, calls, 7) for name in ("a", "b", "c")}
    rows = compare_models.speed(
        models,
        device="cpu",
        dtype="float32",
        batches=[2],
        rounds=3,
        warmup=1,
        num_classes=7,
        log=lambda _: None,
    )
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [(r["network"], r["batch"], r["rounds"]) for r in rows] == [("a", 2, 3), ("b", 2, 3), ("c", 2, 3)]


def test_speed_refuses_outputs_it_did_not_expect():
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="output"):
        compare_models.speed(
            {"a": Recorder("a", calls, 5)},
            device="cpu",
            dtype="float32",
            batches=[1],
            rounds=1,
            warmup=0,
            num_classes=7,
            log=lambda _: None,
        )
    with pytest.raises(RuntimeError, match="non-finite"):
        compare_models.check_output("a", torch.full((1, 7), float("nan")), 1, 7, "float32")
    with pytest.raises(RuntimeError, match="autocast"):
        compare_models.check_output("a", torch.zeros(1, 7), 1, 7, "bf16")


def test_cpu_bf16_is_left_out_with_a_reason_where_the_cpu_has_none(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(compare_models, "cpu_bf16_flags", lambda: [])
    dtypes, why = compare_models.dtypes_for("cpu")
    assert dtypes == ["float32"] and why is not None and "avx512_bf16" in why
    monkeypatch.setattr(compare_models, "cpu_bf16_flags", lambda: ["amx_bf16"])
    assert compare_models.dtypes_for("cpu") == (["float32", "bf16"], None)
