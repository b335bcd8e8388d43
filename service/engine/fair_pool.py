"""A thread pool that takes its jobs in turns by key, not first come first served.

The engine decodes and aligns every request's images on a few threads. In first-come order, a
request of four 6300x6300 PNGs (2.4 s of decoding each on a loaded 2-core CPU) queued its four
decodes ahead of a one-face photo that arrived a moment later, which then waited for all of
them. Here each job carries a key (one request) and a free thread takes the next job of the key
after the one it served last, and one key runs at most `max_per_key` jobs at once (the engine
leaves one thread free of any one request), so a small request's jobs find a thread at once or
after one job of each other request, whatever their number of jobs. The price: a lone request of
many images decodes on fewer threads than the pool has.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class FairThreadPool:
    """`submit(key, fn, *args)` -> `concurrent.futures.Future`; keys served in turns."""

    def __init__(
        self, max_workers: int, *, max_per_key: int | None = None, thread_name_prefix: str = "fair-pool"
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_per_key = max(1, min(max_per_key or max_workers, max_workers))
        self._running: dict[object, int] = {}
        # Keys with jobs waiting, in the order they will be served; a served key goes to the back.
        self._lanes: OrderedDict[object, deque[tuple[Future, Callable[..., Any], tuple]]] = OrderedDict()
        self._cond = threading.Condition()
        self._shutdown = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{thread_name_prefix}_{k}", daemon=True)
            for k in range(max_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, key: object, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            self._lanes.setdefault(key, deque()).append((future, fn, args))
            self._cond.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As `ThreadPoolExecutor.shutdown`: no new jobs; queued ones run unless cancelled."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for lane in self._lanes.values():
                    for future, _, _ in lane:
                        future.cancel()
                self._lanes.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _next(self) -> tuple[object, Future, Callable[..., Any], tuple] | None:
        with self._cond:
            while True:
                ready = [key for key in self._lanes if self._running.get(key, 0) < self.max_per_key]
                if ready:
                    break
                if self._shutdown and not self._lanes:
                    return None
                self._cond.wait()
            key = ready[0]
            lane = self._lanes.pop(key)
            future, fn, args = lane.popleft()
            if lane:
                self._lanes[key] = lane  # back of the line
            self._running[key] = self._running.get(key, 0) + 1
            return key, future, fn, args

    def _done(self, key: object) -> None:
        with self._cond:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            key, future, fn, args = job
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args)
                    except BaseException as error:  # noqa: BLE001 - delivered to the caller
                        future.set_exception(error)
                    else:
                        future.set_result(result)
            finally:
                self._done(key)
            del job, future, fn, args  # keep nothing of the last job while idle
