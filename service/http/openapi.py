"""The OpenAPI document as strict as the server: the limits that come from settings are put in.

Schemathesis found the document looser than the server (no minLength on base64 images, no
minItems / maxItems on `files` and `images`, no maximum on `max_faces`), so a client generated
from it could send what the server must refuse. The limits are filled in from the settings when
the document is first built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.http.body import json_string_limit

# The shortest base64 text of a file that can be an image at all (a minimal 1x1 GIF is 26 bytes).
MIN_BASE64_IMAGE = 16


def tighten_openapi(app: FastAPI, settings: Any) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        operation = spec["paths"]["/v1/expressions"]["post"]
        content = operation["requestBody"]["content"]
        files = content["multipart/form-data"]["schema"]["properties"]["files"]
        files.update(minItems=1, maxItems=settings.max_files)
        files["items"]["maxLength"] = settings.max_image_bytes
        json_schema = content["application/json"]["schema"]
        images = json_schema["properties"]["images"]
        images.update(minItems=1, maxItems=settings.max_files)
        images["items"].update(
            minLength=MIN_BASE64_IMAGE, maxLength=json_string_limit(settings.max_image_bytes)
        )
        for schema in (content["multipart/form-data"]["schema"], json_schema):
            _cap(schema["properties"]["max_faces"], settings.max_faces)
        video = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["multipart/form-data"]
        video["schema"]["properties"]["fps"]["maximum"] = settings.video_max_fps
        _cap(video["schema"]["properties"]["max_faces"], settings.max_faces)
        state = getattr(app.state, "service", None)
        if state is not None and state.engine is not None:
            classes = len(state.engine.class_names)
            for schema in (content["multipart/form-data"]["schema"], json_schema):
                _cap(schema["properties"]["top_k"], classes)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _cap(prop: dict[str, Any], maximum: int) -> None:
    """Add `maximum` to an integer property, also inside its anyOf (for `int | None`)."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum
