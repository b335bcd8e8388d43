"""The FastAPI application: lifespan (engine start/stop), middlewares, routes, error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine.pipeline import Engine
from service.http.body import BodyGuard
from service.http.demo import install_demo_page
from service.http.deps import ServiceState
from service.http.docs import install_offline_docs
from service.http.errors import install_error_handlers
from service.http.media import WebSocketTransport
from service.http.media import router as media_router
from service.http.memory import MemoryTrimmer
from service.http.openapi import tighten_openapi
from service.http.routes import router
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("fermam.http")


def route_label(scope: Scope) -> str:
    """The route template a request matched, as a metric label: one value per route or mount.

    FastAPI's router records no route in the scope for a mount (the demo page's and Swagger's
    static files), only the mounted app as `endpoint`; such requests are labelled by the mount's
    template (`/static/demo/{path}`, as OpenTelemetry's `http.route` names them), never by the file.
    """
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        for route in getattr(scope.get("app"), "routes", ()):
            if isinstance(route, Mount) and route.app is endpoint:
                return route.path_format
    return "unmatched"


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
            label = route_label(scope)
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


def _in_daemon_thread(factory: Callable[[], Engine]) -> asyncio.Future[Engine]:
    """Run `factory` on a daemon thread: a shutdown while the models load need not wait for it
    (asyncio.to_thread's pool is joined when the event loop closes)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Engine] = loop.create_future()

    def settle(outcome: Engine | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def run() -> None:
        try:
            outcome: Engine | BaseException = factory()
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            outcome = error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="fermam-load", daemon=True).start()
    return future


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. Without `engine`, the models load in the background after the listener
    opens, so probes get `/livez` 200 and `/readyz` 503 while loading (as Kubernetes expects)
    instead of a closed port; a failed load is logged and handed to `on_load_failure`.

    Readiness turns true only once the engine is loaded and warmed up; on shutdown in-flight work
    and the engine drain within one `settings.drain_timeout_s`, counted from when draining began.
    """
    metrics = engine.metrics if engine is not None else ServiceMetrics()
    state = ServiceState(settings, metrics)

    async def load() -> None:
        try:
            loaded = await _in_daemon_thread(lambda: Engine(settings, metrics=metrics))
            await loaded.start()
        except Exception as error:  # noqa: BLE001 - any failure to load is reported the same way
            log.error("cannot load the models: %s", error)
            if on_load_failure is not None:
                on_load_failure(error)
            return
        state.engine = loaded
        log.info("models loaded: ready")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading: asyncio.Task[None] | None = None
        if engine is not None:
            await engine.start()
            state.engine = engine
        else:
            loading = asyncio.create_task(load(), name="fermam-load")
        trimmer = MemoryTrimmer(settings.memory_trim_interval_s, lambda: state.completed)
        trimmer.start()
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await trimmer.stop()
            # After SIGTERM the deadline is already set (commands/serve.py): these steps get what is left.
            state.begin_drain()
            await state.wait_idle(state.drain_remaining_s())
            if state.engine is not None:
                await state.engine.stop(state.drain_remaining_s())

    app = FastAPI(
        title="fermam-service",
        summary="Faces, 68 landmarks and facial expressions (FERMam) for uploaded photos.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served offline by install_offline_docs, as settings.docs_access says
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = state
    install_error_handlers(app)
    install_offline_docs(app, settings.docs_access)
    install_demo_page(app)
    app.include_router(router)
    app.include_router(media_router)
    tighten_openapi(app, settings)
    app.add_middleware(BodyGuard, settings=settings, state=state)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(WebSocketTransport)
    return app
