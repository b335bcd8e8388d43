"""Every error the API returns is mapped here, in one place, to a status and a JSON body.

Body: `{"error": {"code": "...", "message": "..."}}`. Client mistakes get 4xx with a message that
says what to change; only our own bugs become 500, and those never leak a traceback.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.admission import Overloaded
from service.engine.batcher import DeadlineExceeded, QueueFull
from service.engine.decode import ImageTooLarge
from service.engine.detect_stage import CropTooSmall
from service.engine.pipeline import ImageRejected, InvalidRequest, NotReady
from service.engine.video import VideoRejected

log = logging.getLogger("fermam.http")


class ApiError(Exception):
    """An error raised by the HTTP layer itself, already carrying its status and code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# What the engine raises for a request it will not or cannot serve; anything else is a bug (500).
EXPECTED_ENGINE_ERRORS: tuple[type[Exception], ...] = (
    ImageRejected,
    InvalidRequest,
    QueueFull,
    DeadlineExceeded,
    NotReady,
    VideoRejected,
)

_VIDEO_STATUS = {"not_a_video": 415, "too_large": 413, "too_long": 413, "invalid_request": 422}


def to_api_error(error: BaseException) -> ApiError:
    """Translate an engine or batcher exception into the API's vocabulary."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ImageRejected):
        # The decoder raises only ImageTooLarge or NotAnImage.
        if isinstance(error.cause, ImageTooLarge):
            return ApiError(413, "too_large", str(error))
        if isinstance(error.cause, CropTooSmall):
            return ApiError(422, "image_too_small", str(error))
        return ApiError(415, "not_an_image", str(error))
    if isinstance(error, VideoRejected):
        return ApiError(_VIDEO_STATUS.get(error.code, 422), error.code, str(error))
    if isinstance(error, InvalidRequest):
        return ApiError(422, "invalid_request", str(error))
    if isinstance(error, Overloaded):
        retry = str(max(1, math.ceil(error.retry_after_s)))
        return ApiError(
            429,
            "overloaded",
            f"the work queued ahead needs ~{error.estimate_s:.1f} s, beyond this request's deadline; "
            "retry later or elsewhere",
            {"Retry-After": retry},
        )
    if isinstance(error, QueueFull):
        retry = str(max(1, math.ceil(error.retry_after_s)))
        return ApiError(
            429, "queue_full", f"the {error.stage} queue is full; retry later", {"Retry-After": retry}
        )
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", "the request's deadline passed before it finished")
    if isinstance(error, NotReady):
        return ApiError(503, "not_ready", "the service is starting or shutting down; retry elsewhere")
    return ApiError(500, "internal", "internal error; it was logged")


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _routing_message(request: Request, error: StarletteHTTPException, headers: dict[str, str] | None) -> str:
    """The router's bare "Not Found" / "Method Not Allowed", said with the path and what to use."""
    detail = str(error.detail)
    if error.status_code not in (404, 405) or detail != HTTPStatus(error.status_code).phrase:
        return detail  # a message some route chose
    path = request.url.path
    path = path if len(path) <= 120 else path[:120] + "..."
    if error.status_code == 404:
        return f"nothing is served at {path}; the API's routes are listed at /docs"
    allowed = (headers or {}).get("Allow") or (headers or {}).get("allow")
    return f"{request.method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    async def _engine_error(request: Request, error: Exception) -> JSONResponse:
        api = to_api_error(error)
        return error_response(api.status, api.code, api.message, api.headers)

    # Handled here rather than by the catch-all below, which is reserved for bugs (logged, 500).
    for kind in EXPECTED_ENGINE_ERRORS:
        app.add_exception_handler(kind, _engine_error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_message(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        headers = getattr(error, "headers", None)
        return error_response(error.status_code, code, _routing_message(request, error, headers), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises the error after this response, so the server logs it too.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(500, "internal", "internal error; it was logged")
