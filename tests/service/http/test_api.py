"""The HTTP API in-process (FastAPI TestClient) with a real engine: shapes, errors, auth, metrics."""

from __future__ import annotations

import base64
import hashlib
import math

import pytest
from fastapi.testclient import TestClient
from http_bodies import GROUP, LARGE, NO_FACE, TEST_MAX_IMAGE_BYTES, photo, png_claiming

from service.http.app import create_app

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(engine_factory):
    engine = engine_factory(
        api_keys=[API_KEY],
        max_image_bytes=TEST_MAX_IMAGE_BYTES,
        max_image_pixels=4_000_000,
        max_files=3,
        detect_max_queue_delay_ms=2,
        classify_max_queue_delay_ms=2,
    )
    with TestClient(create_app(engine.settings, engine), headers=AUTH) as client:
        yield client


def post_files(client: TestClient, *files: tuple[str, bytes], data: dict | None = None, **kwargs):
    parts = [("files", (name, content, "application/octet-stream")) for name, content in files]
    return client.post("/v1/expressions", files=parts, data=data or {}, **kwargs)


def assert_error(response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    assert "Traceback" not in response.text


def test_health_routes(client) -> None:
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_multipart_group_and_empty_photos(client) -> None:
    response = post_files(
        client, ("group.jpg", photo(GROUP)), ("grass.jpg", photo(NO_FACE)), data={"top_k": "2"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    classes = body["model"]["classes"]
    group, grass = body["images"]
    assert [group["index"], group["width"], group["height"]] == [0, 500, 375]
    assert len(group["faces"]) == 3 and grass["faces"] == []
    for face in group["faces"]:
        assert set(face["box"]) == {"x", "y", "width", "height", "score"}
        assert len(face["landmarks"]) == 68 and all(len(p) == 2 for p in face["landmarks"])
        assert set(face["scores"]) == set(classes)
        assert math.isclose(sum(face["scores"].values()), 1.0, abs_tol=1e-5)
        assert face["expression"] == max(face["scores"], key=face["scores"].get)
        assert [t["label"] for t in face["top"]][0] == face["expression"] and len(face["top"]) == 2
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(response.headers[header]) >= 0
    assert body["timings"]["total_ms"] >= body["timings"]["classify_ms"] > 0


def test_json_base64_gives_the_same_faces_as_multipart(client) -> None:
    data_url = "data:image/jpeg;base64," + base64.b64encode(photo(GROUP)).decode()
    as_json = client.post("/v1/expressions", json={"images": [data_url], "return_landmarks": False})
    as_form = post_files(client, ("g.jpg", photo(GROUP)), data={"return_landmarks": "false"})
    assert as_json.status_code == as_form.status_code == 200
    json_faces, form_faces = as_json.json()["images"][0]["faces"], as_form.json()["images"][0]["faces"]
    assert [f["box"] for f in json_faces] == [f["box"] for f in form_faces]
    for a, b in zip(json_faces, form_faces, strict=True):
        assert a["landmarks"] is None
        for label, p in a["scores"].items():
            assert p == pytest.approx(b["scores"][label], abs=1e-4)


@pytest.mark.parametrize(
    ("name", "request_kwargs", "status", "code"),
    [
        ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "empty_body"),
        ("no content type", {"content": b"hello"}, 415, "unsupported_media_type"),
        ("not an image", {"files": [("files", ("a.txt", b"plain text", "text/plain"))]}, 415, "not_an_image"),
        ("truncated jpeg", {"files": [("files", ("t.jpg", photo(GROUP)[:3000], "image/jpeg"))]}, 415, None),
        (
            "oversized upload",
            {"files": [("files", ("big.jpg", photo(LARGE), "image/jpeg"))]},
            413,
            "too_large",
        ),
        (
            "pixel bomb",
            {"files": [("files", ("bomb.png", png_claiming(60_000, 60_000), "image/png"))]},
            413,
            None,
        ),
        (
            "unknown form field",
            {"files": [("files", ("g.jpg", b"x", "image/jpeg"))], "data": {"colour": "1"}},
            422,
            None,
        ),
        ("unknown json field", {"json": {"images": ["aGk="], "mode": "fast"}}, 422, "invalid_request"),
        (
            "bad option value",
            {"files": [("files", ("g.jpg", b"x", "image/jpeg"))], "data": {"top_k": "0"}},
            422,
            None,
        ),
        ("invalid base64", {"json": {"images": ["***"]}}, 422, "invalid_request"),
        ("no images", {"json": {"images": []}}, 422, "invalid_request"),
        ("multipart without files", {"files": {"detect": (None, "true")}}, 422, "invalid_request"),
        ("too many files", {"files": [("files", ("g.jpg", b"x", "image/jpeg"))] * 4}, 413, "too_many_files"),
        ("unknown query parameter", {"json": {"images": ["aGk="]}, "params": {"x": "1"}}, 422, None),
        (
            "bad deadline header",
            {"json": {"images": ["aGk="]}, "headers": {"x-request-timeout-ms": "soon"}},
            422,
            None,
        ),
    ],
)
def test_bad_input_gets_the_right_4xx(client, name, request_kwargs, status, code) -> None:
    assert_error(client.post("/v1/expressions", **request_kwargs), status, code)


def test_the_service_keeps_serving_after_bad_input(client) -> None:
    assert_error(post_files(client, ("bomb.png", png_claiming(60_000, 60_000))), 413)
    assert_error(post_files(client, ("junk.jpg", b"\xff\xd8\xff" + b"\0" * 100)), 415)
    response = post_files(client, ("grass.jpg", photo(NO_FACE)))
    assert response.status_code == 200 and response.json()["images"][0]["faces"] == []


def test_api_keys_are_required_on_v1_but_not_on_health(client) -> None:
    bare = {"Authorization": ""}
    assert_error(client.get("/v1/models", headers=bare), 401, "unauthorized")
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong-key-123"}), 401)
    assert client.get("/v1/models", headers={"Authorization": "", "X-API-Key": API_KEY}).status_code == 200
    assert client.get("/livez", headers=bare).status_code == 200


def test_models_route_describes_the_loaded_weights(client, weights_path) -> None:
    (card,) = client.get("/v1/models").json()["models"]
    assert card["sha256"] == hashlib.sha256(weights_path.read_bytes()).hexdigest()
    assert card["input"]["input_size"] == 112 and card["parameters"] > 1_000_000
    assert len(card["classes"]) == 8 and card["face_backend"] == "dlib"


def test_a_deadline_too_short_gives_504(client) -> None:
    response = post_files(client, ("g.jpg", photo(GROUP)), headers={"x-request-timeout-ms": "1"})
    assert_error(response, 504, "deadline_exceeded")


def test_metrics_expose_stages_requests_and_rejections(client) -> None:
    post_files(client, ("grass.jpg", photo(NO_FACE)))
    text = client.get("/metrics").text
    for needle in (
        'fermam_batch_size_bucket{le="1.0",stage="detect"}',
        'fermam_queue_wait_seconds_count{stage="detect"}',
        'fermam_batch_compute_seconds_count{stage="classify"}',
        'fermam_request_duration_seconds_count{route="/v1/expressions",status="200"}',
        'fermam_rejections_total{reason="bad_image"}',
        'fermam_queue_depth{stage="classify"}',
        "fermam_requests_in_flight",
        "fermam_faces_per_image_bucket",
        "fermam_model_info{",
    ):
        assert needle in text, needle


def test_openapi_documents_both_request_bodies(client) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/expressions"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert client.get("/docs").status_code == 200


def test_draining_turns_readiness_off_and_refuses_new_work(client) -> None:
    state = client.app.state.service
    state.begin_drain()
    try:
        assert_error(client.get("/readyz"), 503, "not_ready")
        assert_error(post_files(client, ("grass.jpg", photo(NO_FACE))), 503, "not_ready")
    finally:
        state.draining = False
    assert client.get("/readyz").status_code == 200


def test_a_full_queue_gives_429_with_retry_after(engine_factory) -> None:
    engine = engine_factory(max_queue_size=1)
    with TestClient(create_app(engine.settings, engine)) as client:
        response = post_files(client, ("a.jpg", photo(NO_FACE)), ("b.jpg", photo(NO_FACE)))
        assert_error(response, 429, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert post_files(client, ("a.jpg", photo(NO_FACE))).status_code == 200
