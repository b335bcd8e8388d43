"""`DrainingServer` in-process with a real app and engine: one deadline bounds the whole shutdown."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import uvicorn

from service.commands.serve import DrainingServer
from service.http.app import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_shutdown_after_sigterm_takes_one_drain_timeout_not_one_per_step(engine_factory) -> None:
    """A request that never finishes must not make the drain, uvicorn, the lifespan and the
    batchers each wait a full drain timeout in turn."""
    drain_s = 2.0
    engine = engine_factory(drain_timeout_s=drain_s)
    app = create_app(engine.settings, engine)
    state = app.state.service
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", timeout_graceful_shutdown=int(drain_s)
    )
    server = DrainingServer(config, state, drain_s)

    async def main() -> float:
        serving = asyncio.create_task(server.serve())
        started = time.monotonic()
        while not server._server.started:
            assert time.monotonic() - started < 60 and not serving.done(), "server did not start"
            await asyncio.sleep(0.05)
        state.work_started()  # in flight until the end: the drain can only time out
        signalled = time.monotonic()
        server._server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        await asyncio.wait_for(serving, 30)
        return time.monotonic() - signalled

    elapsed = asyncio.run(main())
    assert state.draining and not engine.ready
    # The drain waited its full timeout once; everything after it only had what was left.
    assert drain_s - 0.1 <= elapsed < drain_s + 1.5
