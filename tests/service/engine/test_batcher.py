"""The generic batcher on its own, with plain functions: no torch, no faces, no HTTP."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections.abc import Sequence

import pytest

from service.engine.batcher import (
    Batched,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
    ShuttingDown,
    WorkerError,
    gather_or_cancel,
)


class RecordingObserver:
    """Collects what the batcher reports, as the metrics module would."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.skips: dict[str, int] = {}
        self.depths: list[int] = []

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def batch_done(self, size: int, queue_waits_s: Sequence[float], compute_s: float) -> None:
        self.batch_sizes.append(size)

    def skipped(self, reason: str, count: int) -> None:
        self.skips[reason] = self.skips.get(reason, 0) + count


def make(fn, **kwargs) -> tuple[DynamicBatcher, RecordingObserver]:
    observer = RecordingObserver()
    options = {"max_batch_size": 4, "max_queue_delay_ms": 20, "max_queue_size": 64} | kwargs
    batcher = DynamicBatcher(fn, name="test", observer=observer, **options)
    batcher.start()
    return batcher, observer


def double_all(items: list[int]) -> list[int]:
    return [2 * item for item in items]


def test_results_come_back_in_order_and_carry_timings() -> None:
    async def main() -> list[Batched[int]]:
        batcher, _ = make(double_all)
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in range(10))))
        finally:
            await batcher.aclose()

    results = asyncio.run(main())
    assert [r.value for r in results] == [2 * i for i in range(10)]
    assert all(r.queue_s >= 0 and r.compute_s >= 0 and 1 <= r.batch_size <= 4 for r in results)


def test_batches_never_exceed_max_batch_size() -> None:
    async def main() -> RecordingObserver:
        batcher, observer = make(double_all, max_batch_size=3, max_queue_delay_ms=50)
        try:
            await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        finally:
            await batcher.aclose()
        return observer

    observer = asyncio.run(main())
    assert sum(observer.batch_sizes) == 10
    assert max(observer.batch_sizes) == 3
    # Ten items submitted at once fill batches rather than running one by one.
    assert len(observer.batch_sizes) == 4


def seconds_for_a_lone_item(**options) -> float:
    """Submit one item to a fresh batcher (batch size 8) and time its answer."""

    async def main() -> float:
        batcher, _ = make(double_all, max_batch_size=8, **options)
        try:
            started = time.monotonic()
            await batcher.submit(1)
            return time.monotonic() - started
        finally:
            await batcher.aclose()

    return asyncio.run(main())


def test_a_lone_item_waits_about_the_queue_delay_then_runs() -> None:
    elapsed = seconds_for_a_lone_item(max_queue_delay_ms=150)
    assert 0.14 <= elapsed < 1.0


def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    async def main() -> float:
        batcher, _ = make(double_all, max_batch_size=4, max_queue_delay_ms=5_000)
        try:
            started = time.monotonic()
            await asyncio.gather(*(batcher.submit(i) for i in range(4)))
            return time.monotonic() - started
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) < 1.0


def test_a_lone_item_runs_at_once_when_nothing_more_is_on_its_way() -> None:
    elapsed = seconds_for_a_lone_item(max_queue_delay_ms=5_000, more_expected=lambda: False)
    assert elapsed < 1.0  # not the 5 s delay


def test_the_batch_waits_for_items_on_their_way_and_then_runs_with_them() -> None:
    on_the_way = {"count": 1}

    async def main() -> list[int]:
        batcher, observer = make(
            double_all,
            max_batch_size=8,
            max_queue_delay_ms=5_000,
            more_expected=lambda: on_the_way["count"] > 0,
        )
        try:
            first = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.2)  # the worker waits: one more item is announced
            assert not first.done()
            on_the_way["count"] = 0  # as the pipeline does: the count drops, then the item is queued
            second = batcher.submit(2)
            await asyncio.gather(first, second)
            return observer.batch_sizes
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) == [2]


def test_next_batch_is_collected_while_the_current_one_runs() -> None:
    release = threading.Event()
    first_running = threading.Event()
    sizes: list[int] = []

    def blocking(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 1:
            first_running.set()
            release.wait(5)
        return items

    async def main() -> None:
        batcher, _ = make(blocking, max_batch_size=4, max_queue_delay_ms=0)
        try:
            first = batcher.submit(0)
            await asyncio.to_thread(first_running.wait, 5)
            # The worker is busy: these queue up and must leave together as the next batch.
            rest = [batcher.submit(i) for i in range(1, 5)]
            await asyncio.sleep(0.05)
            assert batcher.queue_depth == 4
            release.set()
            await asyncio.gather(first, *rest)
        finally:
            await batcher.aclose()

    asyncio.run(main())
    assert sizes == [1, 4]


def test_one_bad_item_fails_only_itself() -> None:
    calls: list[list[int]] = []

    def picky(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("13 is unlucky")
        return items

    async def main() -> list:
        batcher, _ = make(picky, max_batch_size=8, max_queue_delay_ms=30)
        try:
            return await asyncio.gather(
                *(batcher.submit(i) for i in (11, 12, 13, 14)), return_exceptions=True
            )
        finally:
            await batcher.aclose()

    outcomes = asyncio.run(main())
    assert [o.value for o in outcomes if isinstance(o, Batched)] == [11, 12, 14]
    assert isinstance(outcomes[2], ValueError)
    assert calls[0] == [11, 12, 13, 14]  # tried as a batch first, then item by item


def test_per_item_exceptions_returned_by_the_batch_function_reach_only_their_item() -> None:
    def mixed(items: list[int]) -> list[int | BaseException]:
        return [KeyError(i) if i % 2 else i for i in items]

    async def main() -> list:
        batcher, _ = make(mixed)
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        finally:
            await batcher.aclose()

    outcomes = asyncio.run(main())
    assert [type(o).__name__ for o in outcomes] == ["Batched", "KeyError", "Batched", "KeyError"]


def held_while_item_zero_runs(release: threading.Event, seen: list[int], holding: threading.Event):
    """A batch function that records what it computes and holds the worker on item 0 until released.

    `holding` is set once the worker holds item 0, so a test waits for that instead of guessing
    how long a loaded machine takes to schedule the worker thread.
    """

    def slow(items: list[int]) -> list[int]:
        seen.extend(items)
        if items[0] == 0:
            holding.set()
            release.wait(5)
        return items

    return slow


def test_items_past_their_deadline_are_skipped_and_counted() -> None:
    release, holding = threading.Event(), threading.Event()
    seen: list[int] = []
    slow = held_while_item_zero_runs(release, seen, holding)

    async def main() -> tuple[list, RecordingObserver]:
        batcher, observer = make(slow, max_batch_size=1, max_queue_delay_ms=0)
        try:
            blocker = batcher.submit(0)
            await asyncio.to_thread(holding.wait, 5)
            late = batcher.submit(1, deadline=time.monotonic() + 0.05)
            fine = batcher.submit(2, deadline=time.monotonic() + 30)
            await asyncio.sleep(0.15)
            release.set()
            return await asyncio.gather(blocker, late, fine, return_exceptions=True), observer
        finally:
            await batcher.aclose()

    outcomes, observer = asyncio.run(main())
    assert isinstance(outcomes[1], DeadlineExceeded)
    assert outcomes[2].value == 2
    assert 1 not in seen
    assert observer.skips == {"deadline": 1}


def test_cancelled_items_are_never_computed() -> None:
    release, holding = threading.Event(), threading.Event()
    seen: list[int] = []
    slow = held_while_item_zero_runs(release, seen, holding)

    async def main() -> RecordingObserver:
        batcher, observer = make(slow, max_batch_size=1, max_queue_delay_ms=0)
        try:
            blocker = batcher.submit(0)
            await asyncio.to_thread(holding.wait, 5)
            gone = batcher.submit(1)
            kept = batcher.submit(2)
            gone.cancel()
            await asyncio.sleep(0.01)
            release.set()
            await blocker
            assert (await kept).value == 2
        finally:
            await batcher.aclose()
        return observer

    observer = asyncio.run(main())
    assert seen == [0, 2]
    assert observer.skips == {"cancelled": 1}


def test_the_queue_is_bounded_and_admission_is_all_or_nothing() -> None:
    release, holding = threading.Event(), threading.Event()
    slow = held_while_item_zero_runs(release, [], holding)

    async def main() -> None:
        batcher, _ = make(slow, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=3)
        try:
            running = batcher.submit(0)
            await asyncio.to_thread(holding.wait, 5)  # the worker holds item 0; the queue is empty
            queued = batcher.submit_many([1, 2])
            with pytest.raises(QueueFull) as excinfo:
                batcher.submit_many([3, 4])
            assert excinfo.value.retry_after_s >= 1
            assert batcher.queue_depth == 2  # nothing of the refused request was queued
            queued.append(batcher.submit(3))
            with pytest.raises(QueueFull):
                batcher.submit(4)
            release.set()
            assert [r.value for r in await asyncio.gather(running, *queued)] == [0, 1, 2, 3]
        finally:
            await batcher.aclose()

    asyncio.run(main())


def test_close_drains_queued_work_and_then_refuses() -> None:
    def slowish(items: list[int]) -> list[int]:
        time.sleep(0.02)
        return items

    async def main() -> None:
        batcher, _ = make(slowish, max_batch_size=2, max_queue_delay_ms=0)
        futures = [batcher.submit(i) for i in range(6)]
        await batcher.aclose(drain_timeout_s=10)
        assert [r.value for r in await asyncio.gather(*futures)] == list(range(6))
        with pytest.raises(ShuttingDown):
            batcher.submit(99)

    asyncio.run(main())


def test_close_fails_what_it_could_not_drain_in_time() -> None:
    release, holding = threading.Event(), threading.Event()
    stuck = held_while_item_zero_runs(release, [], holding)

    async def main() -> list:
        batcher, observer = make(stuck, max_batch_size=1, max_queue_delay_ms=0)
        futures = [batcher.submit(i) for i in range(3)]
        await asyncio.to_thread(holding.wait, 5)
        closing = asyncio.create_task(batcher.aclose(drain_timeout_s=0.1))
        await asyncio.sleep(0.3)
        release.set()
        await closing
        assert observer.skips == {"shutdown": 2}
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert outcomes[0].value == 0
    assert all(isinstance(o, ShuttingDown) for o in outcomes[1:])


def test_every_item_gets_exactly_one_answer_under_concurrent_load() -> None:
    rng = random.Random(7)

    def noisy(items: list[int]) -> list[int | BaseException]:
        time.sleep(rng.random() * 0.003)
        if 500 in items:
            raise RuntimeError("poisoned batch")
        return [ValueError(i) if i % 97 == 0 else i * 3 for i in items]

    async def client(batcher: DynamicBatcher, ids: list[int]) -> list[tuple[int, object]]:
        answers = []
        for i in ids:
            await asyncio.sleep(rng.random() * 0.002)
            deadline = time.monotonic() + (0.0005 if i % 50 == 1 else 30)
            try:
                answers.append((i, (await batcher.submit(i, deadline=deadline)).value))
            except (ValueError, RuntimeError, DeadlineExceeded) as error:
                answers.append((i, error))
        return answers

    async def main() -> tuple[list[tuple[int, object]], RecordingObserver]:
        batcher, observer = make(noisy, max_batch_size=16, max_queue_delay_ms=2, max_queue_size=10_000)
        try:
            chunks = [list(range(start, 2000, 20)) for start in range(20)]
            results = await asyncio.gather(*(client(batcher, chunk) for chunk in chunks))
        finally:
            await batcher.aclose()
        return [answer for chunk in results for answer in chunk], observer

    answers, observer = asyncio.run(main())
    assert sorted(i for i, _ in answers) == list(range(2000))
    by_id = dict(answers)
    assert isinstance(by_id[500], RuntimeError)
    assert isinstance(by_id[97], ValueError)
    for i, answer in by_id.items():
        if not isinstance(answer, Exception):
            assert answer == i * 3
    computed = sum(observer.batch_sizes)
    assert computed + observer.skips.get("deadline", 0) == 2000


class ObserverFailingOnce(RecordingObserver):
    """An observer with a bug that shows once (metrics code is not the batch function)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def batch_done(self, size: int, queue_waits_s: Sequence[float], compute_s: float) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("observer bug")
        super().batch_done(size, queue_waits_s, compute_s)


def test_an_error_outside_the_batch_function_fails_that_batch_and_the_worker_carries_on() -> None:
    observer = ObserverFailingOnce()

    async def main() -> tuple[list, Batched[int], bool]:
        batcher = DynamicBatcher(
            double_all,
            name="test",
            observer=observer,
            max_batch_size=4,
            max_queue_delay_ms=20,
            max_queue_size=64,
        )
        batcher.start()
        try:
            first = await asyncio.wait_for(
                asyncio.gather(*batcher.submit_many([1, 2, 3, 4]), return_exceptions=True), 5
            )
            second = await asyncio.wait_for(batcher.submit(5), 5)
            return first, second, batcher.healthy
        finally:
            await batcher.aclose()

    first, second, healthy = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and str(o) == "observer bug" for o in first)
    assert second.value == 10
    assert healthy and observer.batch_sizes == [1]


def test_a_base_exception_in_the_batch_function_reaches_its_callers_as_an_error() -> None:
    def interrupted(items: list[int]) -> list[int]:
        if 13 in items:
            raise KeyboardInterrupt
        return items

    async def main() -> tuple[list, int]:
        batcher, _ = make(interrupted, max_batch_size=2, max_queue_delay_ms=0)
        try:
            failed = await asyncio.wait_for(
                asyncio.gather(*batcher.submit_many([13]), return_exceptions=True), 5
            )
            after = await asyncio.wait_for(batcher.submit(7), 5)
            return failed, after.value
        finally:
            await batcher.aclose()

    failed, after = asyncio.run(main())
    assert isinstance(failed[0], WorkerError) and isinstance(failed[0].__cause__, KeyboardInterrupt)
    assert after == 7


def test_healthy_reports_whether_the_worker_runs() -> None:
    batcher = DynamicBatcher(
        double_all, name="test", max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1
    )
    assert not batcher.healthy
    batcher.start()
    assert batcher.healthy
    batcher.close(drain_timeout_s=1)
    assert not batcher.healthy


def test_gather_or_cancel_cancels_the_rest_of_a_failed_request() -> None:
    release = threading.Event()
    seen: list[int] = []

    def first_fails(items: list[int]) -> list[int]:
        seen.extend(items)
        if items == [0]:
            raise ValueError("bad first item")
        release.wait(5)  # if the worker takes item 1, it holds it until the failure reached the caller
        return items

    async def main() -> tuple[list[asyncio.Future], RecordingObserver]:
        batcher, observer = make(first_fails, max_batch_size=1, max_queue_delay_ms=0)
        futures = batcher.submit_many([0, 1, 2])
        try:
            with pytest.raises(ValueError, match="bad first item"):
                await asyncio.wait_for(gather_or_cancel(futures), 5)
        finally:
            release.set()
            await batcher.aclose()
        return futures, observer

    futures, observer = asyncio.run(main())
    assert futures[1].cancelled() and futures[2].cancelled()
    # The worker thread may or may not take item 1 before the cancellation reaches it (a loaded
    # machine decides), but item 2 queues behind item 1's release, so it is always dropped, and
    # every item is either computed once or counted as skipped.
    assert seen in ([0], [0, 1])
    assert observer.skips == {"cancelled": 3 - len(seen)}


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(double_all, name="x", max_batch_size=0, max_queue_delay_ms=1, max_queue_size=1)
    with pytest.raises(ValueError):
        DynamicBatcher(double_all, name="x", max_batch_size=1, max_queue_delay_ms=-1, max_queue_size=1)


def test_the_idle_worker_keeps_nothing_of_its_last_batch() -> None:
    """Items (a photo's pixels) are freed once answered, not when the next batch comes."""

    class Item:
        pass

    async def main() -> bool:
        batcher, _ = make(lambda items: [0 for _ in items], max_queue_delay_ms=0)
        try:
            item = Item()
            ref = weakref.ref(item)
            await batcher.submit(item)
            del item
            for _ in range(100):  # the worker drops its names right after answering
                if ref() is None:
                    break
                await asyncio.sleep(0.01)
            return ref() is None  # while the worker is alive and idle, before aclose
        finally:
            await batcher.aclose()

    assert asyncio.run(main())


def test_requests_take_turns_and_one_key_fills_at_most_its_share_of_a_batch() -> None:
    release = threading.Event()
    first_running = threading.Event()
    batches: list[list[str]] = []

    def blocking(items: list[str]) -> list[str]:
        batches.append(list(items))
        if len(batches) == 1:
            first_running.set()
            release.wait(5)
        return items

    async def main() -> None:
        batcher, _ = make(blocking, max_batch_size=4, max_queue_delay_ms=0, max_items_per_key=2)
        try:
            first = batcher.submit("warm")
            await asyncio.to_thread(first_running.wait, 5)
            # A bulky request queues five items, then a small one arrives behind them.
            bulky = batcher.submit_many([f"big{k}" for k in range(5)])
            small = batcher.submit_many(["small"])
            release.set()
            await asyncio.gather(first, *bulky, *small)
        finally:
            await batcher.aclose()

    asyncio.run(main())
    # The small item goes in the very next batch, second in line (not after all five big ones).
    assert batches == [["warm"], ["big0", "small", "big1"], ["big2", "big3"], ["big4"]]


def test_the_drain_rate_is_per_unit_of_cost_when_items_carry_one() -> None:
    def slow(items: list[int]) -> list[int]:
        time.sleep(0.01 * sum(items))  # compute proportional to the items' sizes
        return items

    async def main() -> float:
        batcher, _ = make(slow, max_batch_size=8, max_queue_delay_ms=0)
        try:
            await asyncio.gather(*batcher.submit_many([10, 30], costs=[10, 30]))
            return batcher.item_seconds
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) == pytest.approx(0.01, rel=0.5)
