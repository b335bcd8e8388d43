"""Multipart text fields read by the OpenAPI document's grammar, not by pydantic's lax coercion.

A form field is always text. Validated as it is, pydantic's lax mode turns `+0`, `0_0`, ` 0`,
`0.0` and `00` into the integer 0 and `yes`/`1` into true, none of which the document allows
(schemathesis ST201: schema-violating requests accepted). So each field is first read as the JSON
scalar its annotation declares (the text of an integer, a number, or true/false), and the model
is then validated strictly: what the schema refuses, the server refuses, and clients cannot come
to rely on anything looser.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from service.http.errors import ApiError

Model = TypeVar("Model", bound=BaseModel)

# JSON's grammar for integers and numbers (RFC 8259, section 6).
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _scalar_type(annotation: Any) -> Any:
    """`int | None` -> int: the type a present field's text must spell."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def _read(name: str, text: str, kind: Any) -> Any:
    if kind is bool:
        if text.lower() not in {"true", "false"}:
            raise ApiError(422, "invalid_request", f"{name}: must be true or false, got {text!r}")
        return text.lower() == "true"
    if kind is int:
        if not _INTEGER.fullmatch(text):
            raise ApiError(422, "invalid_request", f"{name}: must be an integer, got {text!r}")
        return int(text)
    if kind is float:
        if not _NUMBER.fullmatch(text):
            raise ApiError(422, "invalid_request", f"{name}: must be a number, got {text!r}")
        return float(text)
    return text


def form_properties(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON-schema properties as a multipart form can carry them.

    A form field is text or absent, never null, so `float | None = None` is advertised as a
    number that may be left out, not as `anyOf [number, null]`: schemathesis sent `null` for
    /v1/videos' `smoothing_tau_ms` because the document allowed it, and got the 422 the grammar
    above gives (a JSON body can say null; a form cannot).
    """
    properties = {}
    for name, prop in model.model_json_schema()["properties"].items():
        options = [option for option in prop.get("anyOf", ()) if option.get("type") != "null"]
        if "anyOf" in prop and len(options) == 1:
            prop = {key: value for key, value in prop.items() if key != "anyOf"} | options[0]
            if prop.get("default", 0) is None:
                del prop["default"]
        properties[name] = prop
    return properties


def validate_form(fields: dict[str, str], model: type[Model]) -> Model:
    """The model from form text fields, each read by its declared type; 422 otherwise."""
    values = {}
    for name, text in fields.items():
        info = model.model_fields.get(name)
        values[name] = text if info is None else _read(name, text, _scalar_type(info.annotation))
    try:
        return model.model_validate(values, strict=True)
    except ValidationError as error:
        raise invalid_request(error) from None


def invalid_request(error: ValidationError) -> ApiError:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return ApiError(422, "invalid_request", "; ".join(parts))
