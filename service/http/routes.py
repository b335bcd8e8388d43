"""The routes: parse the request, call the engine, shape the response. No torch here."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from service.engine.pipeline import Engine, FaceResult, InferenceResult, RequestOptions
from service.http import schemas
from service.http.body import parse_multipart
from service.http.deps import ApiKey, EngineDep, ServiceState, StateDep
from service.http.errors import ApiError
from service.http.forms import form_properties, invalid_request, validate_form
from service.http.public import public_metadata

TIMEOUT_HEADER = "x-request-timeout-ms"
MULTIPART = "multipart/form-data"
JSON = "application/json"
# MIME-wrapped base64 (RFC 2045) breaks lines every 76 characters; b64decode(validate=True) would refuse.
_ASCII_WHITESPACE = dict.fromkeys(map(ord, " \t\n\r\x0b\x0c"))
_DIGITS = re.compile(r"[0-9]{1,9}")

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody, "description": text}
    for status, text in {
        400: "The multipart body is malformed (boundary, part headers, too many fields).",
        401: "Missing or invalid API key.",
        408: "The request body did not arrive in time (body_timeout_s, body_idle_timeout_s).",
        413: "An image exceeds the byte or pixel limit, or too many images.",
        415: "Not an image, or the body is neither multipart/form-data nor JSON.",
        422: "A field is invalid or unknown, or a detect=false image is too small to be a face.",
        429: "Overloaded (the work ahead would not finish before this request's deadline) or queue "
        "full; retry after the Retry-After header's seconds.",
        503: "Starting up or draining.",
        504: "The request's deadline passed.",
    }.items()
}

_REQUEST_BODY = {
    "required": True,
    "content": {
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    **form_properties(schemas.ExpressionOptions),
                },
            }
        },
        JSON: {"schema": schemas.ExpressionJSONRequest.model_json_schema()},
    },
}


@router.get("/livez", response_model=schemas.Health, tags=["health"])
async def livez() -> schemas.Health:
    """The process is up (it may still be loading or draining)."""
    return schemas.Health(status="alive")


@router.get("/readyz", response_model=schemas.Health, responses={503: _ERRORS[503]}, tags=["health"])
async def readyz(state: StateDep) -> schemas.Health:
    """Models loaded and warmed up, and not draining: send traffic here."""
    if not state.ready:
        reason = "draining" if state.draining else "starting"
        raise ApiError(503, "not_ready", f"not ready: {reason}")
    return schemas.Health(status="ready")


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus exposition."""
    body, content_type = state.metrics.exposition()
    return Response(body, media_type=content_type)


@router.get("/v1/models", response_model=schemas.ModelList, dependencies=[ApiKey], tags=["models"])
async def models(engine: EngineDep) -> schemas.ModelList:
    """The loaded model: classes, input contract, parameter count, checksum."""
    info = engine.info
    card = schemas.ModelCard(
        name=info.name,
        version=info.version,
        classes=list(info.class_names),
        input=schemas.InputContract(
            input_size=info.input_size, colour_mode=info.colour_mode, mean=list(info.mean), std=list(info.std)
        ),
        parameters=info.parameters,
        sha256=info.sha256,
        dtype=info.dtype,
        device=info.device,
        face_backend=info.face_backend,
        metadata=public_metadata(info.metadata),
    )
    return schemas.ModelList(models=[card])


@router.post(
    "/v1/expressions",
    response_model=schemas.ExpressionResponse,
    responses=_ERRORS,
    dependencies=[ApiKey],
    openapi_extra={"requestBody": _REQUEST_BODY},
    tags=["expressions"],
)
async def expressions(
    request: Request, response: Response, state: StateDep, engine: EngineDep
) -> schemas.ExpressionResponse:
    """Faces, 68 landmarks and expression probabilities for each image.

    Send `multipart/form-data` with one or more `files` (options as form fields), or JSON with
    base64 `images`. Header `X-Request-Timeout-Ms` sets a deadline (capped by the server).
    """
    if request.query_params:
        raise ApiError(422, "invalid_request", f"unknown query parameters: {', '.join(request.query_params)}")
    deadline = _deadline(request, state.settings.default_timeout_ms, state.settings.max_timeout_ms)
    state.work_started()
    try:
        images, options = await _read_request(request, state.settings)
        result = await _infer_unless_disconnected(request, engine, images, options, deadline, state)
    except ClientDisconnect:
        # Gone while we read its body; engine errors go to the handlers in errors.py.
        raise _client_gone(state) from None
    except ApiError as error:
        if error.status == 413:  # a size limit met while reading the body (decode limits count in the engine)
            state.metrics.reject("too_large")
        raise
    finally:
        state.work_finished()
    timings = result.timings
    response.headers["x-queue-time"] = f"{timings.queue_s * 1000:.2f}"
    response.headers["x-inference-time"] = f"{timings.inference_s * 1000:.2f}"
    response.headers["x-total-time"] = f"{timings.total_s * 1000:.2f}"
    return _to_response(engine, result)


def _client_gone(state: ServiceState) -> ApiError:
    """Count the request as cancelled; the 499 is for the logs, nobody is left to read it."""
    state.metrics.reject("cancelled")
    return ApiError(499, "client_closed_request", "the client disconnected")


def _deadline(request: Request, default_ms: int, max_ms: int) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    timeout_ms = default_ms
    if raw is not None:
        # Digits only: int() would also take "1_000", "+100" and " 100 ".
        if not _DIGITS.fullmatch(raw):
            raise ApiError(422, "invalid_request", f"{TIMEOUT_HEADER} must be an integer of milliseconds")
        timeout_ms = int(raw)
        if timeout_ms <= 0:
            raise ApiError(422, "invalid_request", f"{TIMEOUT_HEADER} must be positive")
    return time.monotonic() + min(timeout_ms, max_ms) / 1000.0


async def _read_request(request: Request, settings: Any) -> tuple[list[bytes], RequestOptions]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.headers.get("content-length") == "0":
        raise ApiError(
            422, "empty_body", "the request body is empty; send multipart 'files' or JSON 'images'"
        )
    if content_type == MULTIPART:
        return await _read_multipart(request, settings)
    if content_type == JSON or content_type.endswith("+json"):
        return await _read_json(request, settings)
    raise ApiError(
        415, "unsupported_media_type", f"send {MULTIPART} with 'files' or {JSON} with base64 'images'"
    )


def _options(model: schemas.ExpressionOptions) -> RequestOptions:
    return RequestOptions(
        detect=model.detect,
        max_faces=model.max_faces,
        min_face_size=model.min_face_size,
        return_landmarks=model.return_landmarks,
        top_k=model.top_k,
    )


async def _read_multipart(request: Request, settings: Any) -> tuple[list[bytes], RequestOptions]:
    # Sizes and the image count are checked while the body streams in (http/body.py).
    form = await parse_multipart(request, settings)
    try:
        files: list[bytes] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if key == "files":
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", "'files' must be file parts, not text fields")
                files.append(await _read_upload(value, settings.max_image_bytes, len(files)))
            elif isinstance(value, UploadFile):
                raise ApiError(422, "invalid_request", f"unknown file field {key!r}; send images as 'files'")
            elif key in fields:
                raise ApiError(422, "invalid_request", f"field {key!r} given twice")
            else:
                fields[key] = value
            if len(files) > settings.max_files:
                raise ApiError(413, "too_many_files", f"at most {settings.max_files} images per request")
    finally:
        await form.close()
    options = validate_form(fields, schemas.ExpressionOptions)
    if not files:
        raise ApiError(422, "invalid_request", "no images: add one or more 'files' parts")
    return files, _options(options)


async def _read_upload(upload: UploadFile, max_bytes: int, index: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise ApiError(413, "too_large", f"image {index}: {upload.size} bytes, the limit is {max_bytes}")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "too_large", f"image {index}: larger than the limit of {max_bytes} bytes")
    return data


async def _read_json(request: Request, settings: Any) -> tuple[list[bytes], RequestOptions]:
    body = await request.body()
    try:
        # Strict: JSON has real booleans and integers, so `"top_k": true` is not 1.
        parsed = schemas.ExpressionJSONRequest.model_validate_json(body, strict=True)
    except ValidationError as error:
        raise invalid_request(error) from None
    if len(parsed.images) > settings.max_files:
        raise ApiError(413, "too_many_files", f"at most {settings.max_files} images per request")
    images = []
    for index, text in enumerate(parsed.images):
        text = text.translate(_ASCII_WHITESPACE)
        if text.startswith("data:"):
            text = text.partition(",")[2]
        # base64 grows 4/3; refuse before decoding what cannot fit.
        if len(text) * 3 // 4 > settings.max_image_bytes + 3:
            raise ApiError(
                413, "too_large", f"image {index}: larger than the limit of {settings.max_image_bytes} bytes"
            )
        try:
            images.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_request", f"images.{index}: not valid base64") from None
    return images, _options(parsed)


async def _infer_unless_disconnected(
    request: Request,
    engine: Engine,
    images: list[bytes],
    options: RequestOptions,
    deadline: float,
    state: Any,
) -> InferenceResult:
    """Run the engine, but cancel (and drop queued items) if the client goes away first."""
    work = asyncio.ensure_future(engine.infer(images, options, deadline))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            raise _client_gone(state)
        return work.result()
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # The body is fully read by now, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def face_fields(face: FaceResult) -> dict[str, Any]:
    """The per-face fields every answer shares (photos, video timelines): box, landmarks, scores."""
    x, y, w, h = face.box
    return {
        "box": schemas.Box(x=x, y=y, width=w, height=h, score=face.score),
        "landmarks": None if face.landmarks is None else [(float(a), float(b)) for a, b in face.landmarks],
        "expression": face.expression,
        "scores": face.scores,
        "top": None if face.top is None else [schemas.LabelScore(label=k, score=v) for k, v in face.top],
    }


def _to_response(engine: Engine, result: InferenceResult) -> schemas.ExpressionResponse:
    info = engine.info
    t = result.timings
    images = []
    for image in result.images:
        faces = []
        for face in image.faces:
            faces.append(
                schemas.Face(
                    **face_fields(face),
                    pose=None if face.pose is None else schemas.Pose(**vars(face.pose)),
                    quality=None if face.quality is None else schemas.Quality(**vars(face.quality)),
                )
            )
        images.append(
            schemas.ImageFaces(
                index=image.index,
                width=image.width,
                height=image.height,
                faces=faces,
                faces_below_min_size=image.skipped_small,
                faces_over_max=image.skipped_over_max,
            )
        )
    return schemas.ExpressionResponse(
        model=schemas.ModelRef(name=info.name, version=info.version, classes=list(info.class_names)),
        images=images,
        timings=schemas.Timings(
            decode_ms=t.decode_s * 1000,
            detect_queue_ms=t.detect_queue_s * 1000,
            detect_ms=t.detect_s * 1000,
            align_ms=t.align_s * 1000,
            classify_queue_ms=t.classify_queue_s * 1000,
            classify_ms=t.classify_s * 1000,
            total_ms=t.total_s * 1000,
        ),
    )
