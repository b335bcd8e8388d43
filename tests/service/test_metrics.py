"""Rejections count requests; batcher skips count items, in a family of their own."""

from __future__ import annotations

from service.metrics import REJECTION_REASONS, ServiceMetrics


def sample(metrics: ServiceMetrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_items_a_batcher_skips_are_not_counted_as_rejected_requests() -> None:
    metrics = ServiceMetrics()
    detect = metrics.stage("detect")
    detect.skipped("cancelled", 3)
    detect.skipped("deadline", 2)
    metrics.stage("classify").skipped("cancelled", 5)
    for reason in REJECTION_REASONS:
        assert sample(metrics, "fermam_rejections_total", {"reason": reason}) == 0
    skipped = "fermam_batch_items_skipped_total"
    assert sample(metrics, skipped, {"stage": "detect", "reason": "cancelled"}) == 3
    assert sample(metrics, skipped, {"stage": "detect", "reason": "deadline"}) == 2
    assert sample(metrics, skipped, {"stage": "classify", "reason": "cancelled"}) == 5
    # Every stage's skip reasons are exposed from the start, at zero.
    assert sample(metrics, skipped, {"stage": "classify", "reason": "shutdown"}) == 0

    metrics.reject("cancelled")
    assert sample(metrics, "fermam_rejections_total", {"reason": "cancelled"}) == 1
