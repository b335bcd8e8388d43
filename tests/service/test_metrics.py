"""Rejections count requests; batcher skips count items, in a family of their own."""

from __future__ import annotations

import re
from pathlib import Path

from service.engine.decode import ImageDecodeError
from service.engine.detect_stage import CropTooSmall
from service.metrics import REJECTION_REASONS, ServiceMetrics

REPO = Path(__file__).resolve().parents[2]


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


def _subclasses(kind: type) -> set[type]:
    return {kind} | {sub for child in kind.__subclasses__() for sub in _subclasses(child)}


def emitted_rejection_reasons() -> set[str]:
    """Every reason the service passes to `ServiceMetrics.reject`: the literals in its source, and
    the `code` of each decode error (the engine counts `reject(error.cause.code)`)."""
    literal = re.compile(r"\breject\(\"(\w+)\"\)")
    sources = [path.read_text() for path in (REPO / "service").rglob("*.py")]
    found = {reason for source in sources for reason in literal.findall(source)}
    assert CropTooSmall in _subclasses(ImageDecodeError)
    return found | {error.code for error in _subclasses(ImageDecodeError)}


def test_every_rejection_reason_the_code_emits_is_exposed_and_documented() -> None:
    emitted = emitted_rejection_reasons()
    assert emitted == set(REJECTION_REASONS)  # each one at zero from the start, none unregistered
    readme = (REPO / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `fermam_rejections_total`")]
    assert set(re.findall(r"`(\w+)`", row.split("|")[3])) - {"reason"} == emitted
    deployment = (REPO / "docs" / "deployment.md").read_text()
    (listed,) = re.findall(r"rejections by reason \(([^)]*)\)", deployment)
    assert set(re.findall(r"`(\w+)`", listed)) == emitted
