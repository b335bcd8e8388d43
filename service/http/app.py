"""The FastAPI application: lifespan (engine start/stop), middlewares, routes, error mapping."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine.pipeline import Engine
from service.http.demo import install_demo_page
from service.http.deps import ServiceState
from service.http.docs import install_offline_docs
from service.http.errors import ApiError, error_response, install_error_handlers
from service.http.media import router as media_router
from service.http.routes import router
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("fermam.http")


class RequestMetrics:
    """Duration and count of every request by route template (bounded labels) and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            label = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request_duration.labels(label, str(status)).observe(time.perf_counter() - started)
            self.metrics.requests.labels(label, str(status)).inc()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Before the last byte leaves, so a client that reads /metrics next sees this request.
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            record()


class BodySizeLimit:
    """Refuse bodies above the limit before (Content-Length) or while (chunked) reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refused: Callable[[], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused  # counts what never reaches the route (refused by Content-Length)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.on_refused()
            response = error_response(
                413, "too_large", f"request body of {int(declared)} bytes exceeds {self.max_bytes}"
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, "too_large", f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. Without `engine`, the lifespan loads one from `settings` (blocking, in a thread).

    Readiness turns true only once the engine is loaded and warmed up; on shutdown in-flight work
    and the engine drain within one `settings.drain_timeout_s`, counted from when draining began.
    """
    metrics = engine.metrics if engine is not None else ServiceMetrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine = engine or await asyncio.to_thread(Engine, settings, metrics=metrics)
        await state.engine.start()
        try:
            yield
        finally:
            # After SIGTERM the deadline is already set (serve.py): these steps get what is left.
            state.begin_drain()
            await state.wait_idle(state.drain_remaining_s())
            await state.engine.stop(state.drain_remaining_s())

    app = FastAPI(
        title="fermam-service",
        summary="Faces, 68 landmarks and facial expressions (FERMam) for uploaded photos.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served offline by install_offline_docs
        redoc_url=None,
    )
    app.state.service = state
    install_error_handlers(app)
    install_offline_docs(app)
    install_demo_page(app)
    app.include_router(router)
    app.include_router(media_router)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes, on_refused=lambda: metrics.reject("too_large")
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
