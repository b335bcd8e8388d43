"""Shared state of the app and the `Annotated[..., Depends(...)]` aliases the routes use."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated

from fastapi import Depends, Request

from service.engine.pipeline import Engine
from service.http.errors import ApiError
from service.metrics import ServiceMetrics
from service.settings import Settings


class ServiceState:
    """What outlives a request: settings, the engine, metrics, and the drain bookkeeping."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.draining = False
        # Monotonic instant by which the whole shutdown must be over; set once, when draining starts.
        self.drain_deadline: float | None = None
        # Set when draining begins: body reads waiting on a stalled upload wake up (http/body.py).
        self.drain_started = asyncio.Event()
        self._in_flight = 0
        self.completed = 0  # requests finished, for the memory trimmer's "was there work?"
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return not self.draining and self.engine is not None and self.engine.ready

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def work_started(self) -> None:
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()

    def work_finished(self) -> None:
        self._in_flight -= 1
        self.completed += 1
        self.metrics.in_flight.dec()
        if self._in_flight == 0:
            self._idle.set()

    def begin_drain(self, deadline: float | None = None) -> None:
        """Readiness false and new work refused; in-flight requests carry on.

        The first call fixes the shutdown deadline (`deadline`, default `drain_timeout_s` from
        now); every later shutdown step gets only `drain_remaining_s()`, so the steps together
        never take more than one drain timeout.
        """
        self.draining = True
        self.drain_started.set()
        if self.drain_deadline is None:
            self.drain_deadline = (
                time.monotonic() + self.settings.drain_timeout_s if deadline is None else deadline
            )

    def drain_remaining_s(self) -> float:
        """Seconds left of the shutdown deadline (the full drain timeout before draining began)."""
        if self.drain_deadline is None:
            return self.settings.drain_timeout_s
        return max(0.0, self.drain_deadline - time.monotonic())

    async def wait_idle(self, timeout_s: float) -> bool:
        """True if every in-flight request finished within the timeout."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_engine(request: Request) -> Engine:
    """The one readiness gate of the API routes (starting, draining, or a stage's worker dead)."""
    state = get_state(request)
    if not state.ready or state.engine is None:
        raise ApiError(503, "not_ready", "the service is starting or draining; retry elsewhere")
    return state.engine


def require_api_key(request: Request) -> None:
    """Accept `Authorization: Bearer <key>` or `X-API-Key: <key>` when keys are configured."""
    keys = get_state(request).settings.api_keys
    if not keys:
        return
    offered = request.headers.get("x-api-key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if offered is None and scheme.lower() == "bearer":
        offered = token.strip()
    # Compare against every key in constant time, so timing says nothing about which matched.
    if offered is None or not any(hmac.compare_digest(offered.encode(), key.encode()) for key in keys):
        raise ApiError(401, "unauthorized", "missing or invalid API key", {"WWW-Authenticate": "Bearer"})


StateDep = Annotated[ServiceState, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ApiKey = Depends(require_api_key)
