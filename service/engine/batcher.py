"""The generic dynamic batcher that both model stages use.

Requests arrive one item at a time on the asyncio side; the device is fastest when it sees many
items at once. `DynamicBatcher` sits between the two: callers `submit` items and await a future,
one worker thread (the only thread that calls the batch function, hence the only one touching the
device for that stage) takes up to `max_batch_size` items, waiting at most `max_queue_delay_ms`
counted from the oldest queued item. Items keep queueing while a batch runs, so the next batch is
already collected when the worker comes back (pipelining).

Fairness: every item carries a key (by default, the `submit_many` call it came in, i.e. one
request). A batch takes the keys' items in turns (the oldest key first), and at most
`max_items_per_key` of one key, so a request of many costly items does not hold the queue ahead
of a small one that arrives after it: the small one waits for at most one batch. Items may carry
a cost (e.g. pixels); the measured drain rate is then per unit of cost.

It knows nothing of HTTP, torch or faces: items are any objects and the batch function any
callable `list[T] -> list[R | BaseException]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("fermam.batcher")

# After the drain deadline, how long `close` still waits for the worker to leave a running batch.
# The thread is a daemon, so giving up only means not waiting for it.
JOIN_GRACE_S = 1.0


class BatcherError(Exception):
    """Base of the errors the batcher itself raises (as opposed to the batch function's)."""


class QueueFull(BatcherError):
    """The bounded queue has no room; the caller should retry after `retry_after_s`."""

    def __init__(self, stage: str, retry_after_s: float) -> None:
        super().__init__(f"{stage} queue is full")
        self.stage = stage
        self.retry_after_s = retry_after_s


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before its batch ran, so it was never computed."""


class ShuttingDown(BatcherError):
    """The batcher no longer accepts work, or stopped before it reached this item."""


class WorkerError(BatcherError):
    """The worker failed outside the batch function (e.g. in an observer) while holding this item."""


class BatchObserver(Protocol):
    """Hooks for metrics; the batcher calls them from its worker thread (or `submit` for depth)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch_done(self, size: int, queue_waits_s: Sequence[float], compute_s: float) -> None: ...

    def skipped(self, reason: str, count: int) -> None: ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, size: int, queue_waits_s: Sequence[float], compute_s: float) -> None:
        pass

    def skipped(self, reason: str, count: int) -> None:
        pass


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's answer together with where its time went (for response headers)."""

    value: R
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    deadline: float | None
    key: object = None  # the fairness group (one request)
    cost: float = 1.0
    # Set from the event loop when the caller's future is cancelled (client went away).
    cancelled: bool = field(default=False)


async def gather_or_cancel(awaitables: Sequence[Awaitable[R]]) -> list[R]:
    """`asyncio.gather`, except that the first error also cancels the others.

    Plain `gather` raises the first error but leaves the siblings running, so the rest of a
    failed request would still occupy the batchers; cancelled batcher items are skipped instead.
    """
    futures = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def _deliver(future: asyncio.Future, value: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class DynamicBatcher(Generic[T, R]):
    """Collects items into batches and runs them on one dedicated worker thread."""

    def __init__(
        self,
        batch_fn: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        name: str,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
        more_expected: Callable[[], bool] | None = None,
        max_items_per_key: int | None = None,
        thread_init: Callable[[], object] | None = None,
    ) -> None:
        """`more_expected`, when given, says whether items are on their way to this stage now
        (called from the worker thread): while it says no, a batch that is not full runs at once
        instead of waiting `max_queue_delay_ms` for items that are not coming. Without it, the
        batcher always waits (the classic dynamic batcher). `max_items_per_key` caps one key's
        items in a batch (None: only `max_batch_size` does). `thread_init` runs on the worker
        thread before it takes work (per-thread state such as a detector), and `start` waits for it."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_items_per_key is not None and max_items_per_key < 1:
            raise ValueError("max_items_per_key must be >= 1")
        if max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must be >= 0")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_items_per_key = max_items_per_key or max_batch_size
        self._batch_fn = batch_fn
        self._thread_init = thread_init
        self._more_expected = more_expected
        self._observer: BatchObserver = observer or _NullObserver()
        self._queue: deque[_Entry[T]] = deque()
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._running_batch = 0
        self._thread: threading.Thread | None = None
        # Exponential moving average of batch compute time, to suggest a Retry-After.
        self._avg_batch_s = 0.0
        # ... and of compute time per unit of item cost (per item when items carry none): the
        # stage's measured drain rate, for admission control.
        self._avg_item_s = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread; submit is refused before this."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"batcher {self.name!r} already started")
            self._accepting = True
            self._stopping = False
            initialised = threading.Event()
            self._thread = threading.Thread(
                target=self._worker, args=(initialised,), name=f"batcher-{self.name}", daemon=True
            )
            self._thread.start()
        initialised.wait()

    def stop_accepting(self) -> None:
        """Refuse new items from now on; queued ones still run."""
        with self._cond:
            self._accepting = False

    def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let queued items finish within the timeout, fail the rest, join the worker.

        Returns within `drain_timeout_s + JOIN_GRACE_S`: a batch still running then is left to its
        (daemon) thread. Blocking; call it from a thread (or `await aclose()`), never from the
        event loop directly.
        """
        deadline = time.monotonic() + drain_timeout_s
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            while (self._queue or self._running_batch) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            leftovers = list(self._queue)
            self._queue.clear()
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        for entry in leftovers:
            self._resolve(entry, None, ShuttingDown(f"{self.name}: stopped before this item ran"))
        if leftovers:
            self._observer.skipped("shutdown", len(leftovers))
        self._observer.queue_depth(0)
        if thread is not None:
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + JOIN_GRACE_S)
        with self._cond:
            self._thread = None

    async def aclose(self, drain_timeout_s: float = 30.0) -> None:
        """`close` without blocking the event loop (results still get delivered while draining)."""
        await asyncio.to_thread(self.close, drain_timeout_s)

    # -- asyncio front ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """The worker thread is running: without it, queued items would never be answered."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    @property
    def item_seconds(self) -> float:
        """Measured compute seconds per unit of item cost, i.e. per item when items carry no cost
        (moving average; 0 before the first batch)."""
        return self._avg_item_s

    @property
    def backlog(self) -> int:
        """Items queued or in the running batch: what a new item waits behind."""
        return len(self._queue) + self._running_batch

    @property
    def retry_after_s(self) -> float:
        """A rough time for the current queue to drain, at least one second."""
        batches = math.ceil((len(self._queue) + 1) / self.max_batch_size)
        return max(1.0, batches * (self._avg_batch_s + self.max_queue_delay_s))

    def submit(self, item: T, deadline: float | None = None) -> asyncio.Future[Batched[R]]:
        """Queue one item; the returned future resolves to its `Batched` result or its error.

        `deadline` is a `time.monotonic()` instant after which the item is not worth computing.
        Raises `QueueFull` or `ShuttingDown` immediately instead of queueing.
        """
        return self.submit_many([item], deadline)[0]

    def submit_many(
        self,
        items: Sequence[T],
        deadline: float | None = None,
        *,
        key: object = None,
        costs: Sequence[float] | None = None,
    ) -> list[asyncio.Future[Batched[R]]]:
        """Queue several items all-or-nothing, so a request is never half admitted.

        `key` groups items for fairness (default: this call); `costs`, one per item, weigh them
        for the measured drain rate (default: 1 each)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        group = object() if key is None else key
        weights = [1.0] * len(items) if costs is None else [float(c) for c in costs]
        if len(weights) != len(items):
            raise ValueError(f"{len(weights)} costs for {len(items)} items")
        entries = [
            _Entry(item, loop.create_future(), loop, now, deadline, group, cost)
            for item, cost in zip(items, weights, strict=True)
        ]
        with self._cond:
            if not self._accepting:
                raise ShuttingDown(f"{self.name} is not accepting work")
            if len(self._queue) + len(entries) > self.max_queue_size:
                raise QueueFull(self.name, self.retry_after_s)
            self._queue.extend(entries)
            depth = len(self._queue)
            self._cond.notify_all()
        self._observer.queue_depth(depth)
        for entry in entries:
            entry.future.add_done_callback(lambda fut, e=entry: self._on_done(fut, e))
        return [entry.future for entry in entries]

    @staticmethod
    def _on_done(future: asyncio.Future, entry: _Entry) -> None:
        if future.cancelled():
            entry.cancelled = True

    # -- worker thread ---------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[_Entry[T]], int] | None:
        """Block until a batch is due (full, or the oldest item waited long enough); None to exit.

        Returns the batch and the queue depth left behind.
        """
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                due = self._queue[0].enqueued_at + self.max_queue_delay_s
                remaining = due - time.monotonic()
                # Waiting only pays when more items can arrive within the delay.
                idle_upstream = self._more_expected is not None and not self._more_expected()
                chosen = self._fair_pick()
                if (
                    len(chosen) >= self.max_batch_size
                    or remaining <= 0
                    or idle_upstream
                    or not self._accepting
                ):
                    taken = set(chosen)
                    batch = [self._queue[k] for k in chosen]
                    self._queue = deque(e for k, e in enumerate(self._queue) if k not in taken)
                    self._running_batch = len(batch)
                    return batch, len(self._queue)
                self._cond.wait(timeout=remaining)

    def _fair_pick(self) -> list[int]:
        """Queue positions of the next batch: the keys' items in turns, oldest key first, at most
        `max_items_per_key` of each, at most `max_batch_size` in all (call with the lock held)."""
        by_key: dict[object, list[int]] = {}
        for position, entry in enumerate(self._queue):
            by_key.setdefault(entry.key, []).append(position)
        lanes = [positions[: self.max_items_per_key] for positions in by_key.values()]
        chosen: list[int] = []
        for turn in range(self.max_items_per_key):
            for lane in lanes:
                if turn < len(lane):
                    chosen.append(lane[turn])
                    if len(chosen) == self.max_batch_size:
                        return chosen
        return chosen

    def _worker(self, initialised: threading.Event) -> None:
        try:
            if self._thread_init is not None:
                try:
                    self._thread_init()
                except Exception:  # noqa: BLE001 - a cold thread is slower, not broken
                    log.exception("%s: worker thread initialisation failed", self.name)
        finally:
            initialised.set()
        try:
            while True:
                taken = self._take_batch()
                if taken is None:
                    return
                batch, depth = taken
                try:
                    self._observer.queue_depth(depth)
                    self._run(batch)
                except BaseException as error:  # noqa: BLE001 - the worker must outlive any batch
                    # Without this, one observer bug would kill the thread and leave every caller
                    # of this and later batches waiting forever.
                    log.exception("%s: batch of %d failed outside the batch function", self.name, len(batch))
                    self._fail(batch, error)
                finally:
                    with self._cond:
                        self._running_batch = 0
                        self._cond.notify_all()
                # Drop the finished batch before waiting for the next: these names would otherwise
                # keep its items (a detect batch of 6000-px photos: hundreds of MB) alive while idle.
                del batch, taken
        finally:
            self._abandon_queue()

    def _fail(self, batch: list[_Entry[T]], error: BaseException) -> None:
        """Answer every entry of the batch not answered yet (`_deliver` skips resolved futures)."""
        if not isinstance(error, Exception):
            # KeyboardInterrupt & co. must not be raised inside the event loop by an awaiting caller.
            wrapped = WorkerError(f"{self.name}: worker interrupted by {type(error).__name__}")
            wrapped.__cause__ = error
            error = wrapped
        for entry in batch:
            self._resolve(entry, None, error)

    def _abandon_queue(self) -> None:
        """On worker exit, refuse new work and fail what is queued (empty after a normal close)."""
        with self._cond:
            self._accepting = False
            leftovers = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if leftovers:
            log.error("%s: worker stopped with %d item(s) queued", self.name, len(leftovers))
            self._fail(leftovers, WorkerError(f"{self.name}: the worker stopped before this item ran"))

    def _run(self, batch: list[_Entry[T]]) -> None:
        started = time.monotonic()
        live: list[_Entry[T]] = []
        expired = cancelled = 0
        for entry in batch:
            if entry.cancelled or entry.future.cancelled():
                cancelled += 1
            elif entry.deadline is not None and started >= entry.deadline:
                expired += 1
                self._resolve(entry, None, DeadlineExceeded(f"{self.name}: deadline passed while queued"))
            else:
                live.append(entry)
        if cancelled:
            self._observer.skipped("cancelled", cancelled)
        if expired:
            self._observer.skipped("deadline", expired)
        if not live:
            return

        outcomes = self._call(live)
        compute_s = time.monotonic() - started
        self._avg_batch_s = compute_s if self._avg_batch_s == 0 else 0.8 * self._avg_batch_s + 0.2 * compute_s
        item_s = compute_s / max(1e-9, sum(entry.cost for entry in live))
        self._avg_item_s = item_s if self._avg_item_s == 0 else 0.8 * self._avg_item_s + 0.2 * item_s
        self._observer.batch_done(len(live), [started - e.enqueued_at for e in live], compute_s)
        for entry, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._resolve(entry, None, outcome)
            else:
                self._resolve(
                    entry, Batched(outcome, started - entry.enqueued_at, compute_s, len(live)), None
                )

    def _call(self, live: list[_Entry[T]]) -> list[R | BaseException]:
        """Run the batch; if it raises as a whole, rerun items one by one to find the culprit."""
        items = [entry.item for entry in live]
        try:
            outcomes = list(self._batch_fn(items))
            if len(outcomes) != len(items):
                raise RuntimeError(
                    f"{self.name}: batch function returned {len(outcomes)} results for {len(items)} items"
                )
            return outcomes
        except Exception as batch_error:  # noqa: BLE001 - isolate, then report per item
            if len(items) == 1:
                return [batch_error]
        singles: list[R | BaseException] = []
        for item in items:
            try:
                (outcome,) = self._batch_fn([item])
                singles.append(outcome)
            except Exception as item_error:  # noqa: BLE001
                singles.append(item_error)
        return singles

    @staticmethod
    def _resolve(entry: _Entry, value: object, error: BaseException | None) -> None:
        # The event loop may already be closed if its owner went away; nobody is waiting then.
        with contextlib.suppress(RuntimeError):
            entry.loop.call_soon_threadsafe(_deliver, entry.future, value, error)
