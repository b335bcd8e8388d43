"""`fermam serve`: validate settings, load the engine, serve HTTP, drain on SIGTERM.

Every `Settings` field is a flag here (`--detect-max-batch-size 16`), generated from the model so
flags and environment variables never drift apart. Bad settings exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.settings import Settings

log = logging.getLogger("fermam.serve")

# Once the drain deadline has passed, uvicorn still gets this long to flush finished responses.
FLUSH_S = 1.0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fermam serve",
        description="Run the expression service. Every flag is also an environment variable "
        "FERMAM_<NAME> (e.g. --max-queue-size and FERMAM_MAX_QUEUE_SIZE); flags win.",
    )
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin in (typing.Union, types.UnionType) and len(args) == 1:
            annotation, origin = args[0], typing.get_origin(args[0])
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": field.description or ""}
        if origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation is bool:
            kwargs["type"] = _bool
            kwargs["metavar"] = "{true,false}"
        elif annotation in (int, float):
            kwargs["type"] = annotation
        elif origin is list:
            kwargs["metavar"] = "A,B,..."
        default = field.get_default(call_default_factory=True)
        if default not in (None, []):
            kwargs["help"] += f" [default: {default}]"
        kwargs["help"] += f" (env FERMAM_{name.upper()})"
        parser.add_argument(_flag(name), dest=name, **kwargs)
    return parser


def load_settings(argv: list[str]) -> Settings:
    """Flags override environment variables; raises ValidationError with every problem."""
    namespace = build_parser().parse_args(argv)
    return Settings(**vars(namespace))


def _one_line(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()))
        message = item.get("msg", "invalid").removeprefix("Value error, ")
        problems.append(f"{_flag(where) if where else 'settings'}: {message}" if where else message)
    return "; ".join(problems)


def port_unavailable(host: str, port: int) -> str | None:
    """Why (host, port) cannot be bound now, or None. Binds as uvicorn will (SO_REUSEADDR, so a
    port in TIME_WAIT is free) and lets go at once; a port taken in between still fails later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot resolve the host ({error.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.strerror or str(error)
    return None


def main(argv: list[str]) -> int:
    try:
        settings = load_settings(argv)
    except ValidationError as error:
        print(f"fermam serve: invalid settings: {_one_line(error)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not Path(settings.weights).is_file():
        print(
            f"fermam serve: invalid settings: --weights: no such file {settings.weights} "
            "(train one with `fermam train` or set FERMAM_WEIGHTS)",
            file=sys.stderr,
        )
        return 2
    # Loading the models takes seconds: find out first whether the port can be had at all.
    refused = port_unavailable(settings.host, settings.port)
    if refused:
        print(f"fermam serve: cannot listen on {settings.host}:{settings.port}: {refused}", file=sys.stderr)
        return 2
    # Heavy imports only once the settings are known to be good.
    import uvicorn

    from model.device import resolve_device
    from service.http.app import create_app
    from service.http.edge import edge_protocol

    try:
        resolve_device(settings.device)
    except (RuntimeError, ValueError) as error:
        print(f"fermam serve: invalid settings: --device: {error}", file=sys.stderr)
        return 2
    load_errors: list[BaseException] = []
    server: DrainingServer | None = None

    def stop_after_failed_load(error: BaseException) -> None:
        load_errors.append(error)
        if server is not None:
            server.exit_now()

    # The listener opens first and the models load behind it: /livez 200 and /readyz 503 meanwhile.
    app = create_app(settings, on_load_failure=stop_after_failed_load)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        # The connection edge (header limits and timeout, the connection cap): service/http/edge.py.
        http=edge_protocol(
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout_s=settings.header_timeout_s,
            max_connections=settings.max_connections,
        ),
        access_log=settings.log_level == "debug",
    )
    server = DrainingServer(
        config, app.state.service, settings.drain_timeout_s, grace_s=settings.shutdown_grace_s
    )
    asyncio.run(server.serve())
    if load_errors:
        print(f"fermam serve: cannot load the models: {load_errors[0]}", file=sys.stderr)
        return 1
    return 0


class DrainingServer:
    """uvicorn's server with a drain phase: on the first SIGTERM/SIGINT readiness turns false and
    new work gets 503 while the listener stays open (load balancers notice via /readyz); once
    in-flight requests finish and at least `grace_s` has passed since the signal, or the drain
    timeout passes, uvicorn shuts down. A second signal exits at once.

    One deadline, fixed at the signal, bounds everything that follows (this drain, uvicorn's
    graceful shutdown, the app's lifespan and both batchers): about `drain_timeout_s` plus a few
    seconds of grace, which is what the pod's termination grace period must allow.
    """

    def __init__(self, config: Any, state: Any, drain_timeout_s: float, *, grace_s: float = 0.0) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
                outer._on_signal(sig)

        self._server = _Server(config)
        self._state = state
        self._drain_timeout_s = drain_timeout_s
        self._grace_s = min(grace_s, drain_timeout_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._grace_until = 0.0

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._server.serve()

    def exit_now(self) -> None:
        """Stop serving at once (nothing to drain: the models never loaded)."""
        self._server.should_exit = True

    def _on_signal(self, sig: int) -> None:
        # Runs in the signal handler: only hand the work to the event loop.
        if self._loop is None:
            self._server.should_exit = True
            self._server.force_exit = True
            return
        if self._draining:
            # The operator insists: leave now. Forcing uvicorn out instead would leave the app's
            # lifespan waiting, and the event loop's teardown would log its cancellation as a
            # traceback; nothing the drain could still finish is worth more than an exit at once.
            log.warning("received %s again: exiting without finishing the drain", signal.Signals(sig).name)
            logging.shutdown()
            os._exit(128 + sig)
        self._draining = True
        now = time.monotonic()
        deadline = now + self._drain_timeout_s
        self._grace_until = now + self._grace_s
        log.info("received %s: draining for up to %.0f s", signal.Signals(sig).name, self._drain_timeout_s)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(deadline)))

    async def _drain(self, deadline: float) -> None:
        self._state.begin_drain(deadline)
        finished = await self._state.wait_idle(self._state.drain_remaining_s())
        if not finished:
            log.warning("drain timeout: %d request(s) still in flight", self._state.in_flight)
        else:
            # The listener stays open (new work 503, /readyz false) for the grace period, so
            # clients and load balancers see "draining" instead of "connection refused".
            await asyncio.sleep(
                max(0.0, min(self._grace_until, self._state.drain_deadline) - time.monotonic())
            )
        # uvicorn reads this when it shuts down: wait for open connections only for what is left.
        self._server.config.timeout_graceful_shutdown = max(FLUSH_S, self._state.drain_remaining_s())
        self._server.should_exit = True
