"""The decode pool takes requests' jobs in turns, as the detect queue does."""

from __future__ import annotations

import threading

import pytest

from service.engine.fair_pool import FairThreadPool


def test_a_later_key_is_served_before_an_earlier_keys_backlog() -> None:
    pool = FairThreadPool(1)
    gate, running = threading.Event(), threading.Event()
    order: list[str] = []

    def block() -> None:
        running.set()
        gate.wait(5)

    try:
        blocker = pool.submit("other", block)
        running.wait(5)  # the only thread is busy
        bulky = [pool.submit("bulky", order.append, f"big{k}") for k in range(3)]
        small = pool.submit("small", order.append, "small")
        gate.set()
        for future in [blocker, *bulky, small]:
            future.result(5)
    finally:
        pool.shutdown()
    assert order == ["big0", "small", "big1", "big2"]


def test_errors_reach_the_caller_and_shutdown_refuses_new_jobs() -> None:
    pool = FairThreadPool(2)
    with pytest.raises(ZeroDivisionError):
        pool.submit("a", lambda: 1 / 0).result(5)
    assert pool.submit("a", sum, [1, 2]).result(5) == 3
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit("a", sum, [1])


def test_one_key_leaves_a_thread_for_the_others() -> None:
    pool = FairThreadPool(2, max_per_key=1)
    gate, running = threading.Event(), threading.Event()

    def block() -> None:
        running.set()
        gate.wait(5)

    try:
        bulky = [pool.submit("bulky", block) for _ in range(3)]
        running.wait(5)
        # The second thread is free although "bulky" has jobs waiting: the small job runs now.
        assert pool.submit("small", sum, [1, 2]).result(2) == 3
        assert not bulky[1].running() and not bulky[1].done()
        gate.set()
        for future in bulky:
            future.result(5)
    finally:
        pool.shutdown()
