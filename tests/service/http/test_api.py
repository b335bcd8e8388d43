"""The HTTP API in-process (FastAPI TestClient) with a real engine: shapes, errors, auth, metrics."""

from __future__ import annotations

import base64
import hashlib
import logging
import math

import pytest
from fastapi.testclient import TestClient
from http_bodies import GROUP, LARGE, NO_FACE, TEST_MAX_IMAGE_BYTES, photo, png_claiming
from prometheus_client.parser import text_string_to_metric_families

from service.http.app import create_app
from service.http.demo import STATIC_URL as DEMO_ASSETS
from service.http.docs import ASSETS_URL as DOCS_ASSETS

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


MULTIPART_PART = (
    b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="g.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
)


@pytest.mark.parametrize(
    ("name", "content_type", "body"),
    [
        ("no boundary", "multipart/form-data", MULTIPART_PART + b"\xff\xd8\r\n--b0undary--\r\n"),
        (
            "wrong boundary",
            "multipart/form-data; boundary=other",
            MULTIPART_PART + b"\xff\xd8\r\n--b0undary--\r\n",
        ),
        (
            "part without a name",
            "multipart/form-data; boundary=b0undary",
            MULTIPART_PART.replace(b' name="files";', b"") + b"x\r\n--b0undary--\r\n",
        ),
        (
            "too many fields",
            "multipart/form-data; boundary=b0undary",
            b"".join(
                b'--b0undary\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i
                for i in range(101)
            )
            + b"--b0undary--\r\n",
        ),
    ],
)
def test_a_malformed_multipart_body_gets_400_and_the_service_keeps_serving(
    client, name, content_type, body
) -> None:
    response = client.post("/v1/expressions", content=body, headers={"content-type": content_type})
    assert_error(response, 400, "invalid_request")
    assert "malformed multipart" in response.json()["error"]["message"]
    assert post_files(client, ("grass.jpg", photo(NO_FACE))).status_code == 200


def test_mime_wrapped_base64_is_accepted(client) -> None:
    wrapped = base64.encodebytes(photo(GROUP)).decode()  # a line break every 76 characters
    assert "\n" in wrapped
    as_mime = client.post("/v1/expressions", json={"images": [wrapped]})
    plain = client.post("/v1/expressions", json={"images": [base64.b64encode(photo(GROUP)).decode()]})
    assert as_mime.status_code == plain.status_code == 200, as_mime.text
    boxes = [[f["box"] for f in r.json()["images"][0]["faces"]] for r in (as_mime, plain)]
    assert boxes[0] == boxes[1] and len(boxes[0]) == 3


def test_a_client_that_disconnects_mid_upload_is_counted_as_cancelled(client) -> None:
    """The body read ends with http.disconnect: a cancelled request, not a 500."""
    metrics = client.app.state.service.metrics
    messages = [
        {"type": "http.request", "body": MULTIPART_PART + photo(GROUP)[:2000], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/expressions",
        "raw_path": b"/v1/expressions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"multipart/form-data; boundary=b0undary"),
            (b"authorization", AUTH["Authorization"].encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    cancelled = {"reason": "cancelled"}
    before = metrics.registry.get_sample_value("fermam_rejections_total", cancelled)
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert metrics.registry.get_sample_value("fermam_rejections_total", cancelled) == before + 1
    assert client.app.state.service.in_flight == 0


def test_size_refusals_count_once_as_too_large(client) -> None:
    metrics = client.app.state.service.metrics
    too_large = {"reason": "too_large"}
    before = metrics.registry.get_sample_value("fermam_rejections_total", too_large) or 0.0
    assert_error(post_files(client, ("big.jpg", photo(LARGE))), 413, "too_large")  # the per-image limit
    body = b"{" + b" " * client.app.state.service.settings.max_request_bytes + b"}"
    response = client.post("/v1/expressions", content=body, headers={"content-type": "application/json"})
    assert_error(response, 413, "too_large")  # the whole body, refused on its Content-Length
    assert metrics.registry.get_sample_value("fermam_rejections_total", too_large) == before + 2


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


def test_models_metadata_shows_no_paths_and_no_host(client) -> None:
    (card,) = client.get("/v1/models").json()["models"]
    assert card["metadata"], "the checkpoint's public metadata should still be there"
    for key, value in card["metadata"].items():
        assert "trained_on" not in key and "host" not in key
        assert "/" not in str(value) and "\\" not in str(value), (key, value)


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


def requests_by_route(client: TestClient) -> dict[tuple[str, str], float]:
    """`fermam_requests_total` as /metrics shows it, by (route, status)."""
    return {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == "fermam_requests_total"
    }


def test_static_files_are_counted_by_their_mount_not_as_unmatched(client) -> None:
    before = requests_by_route(client)
    assert client.get(f"{DEMO_ASSETS}/demo.js").status_code == 200
    assert client.get(f"{DOCS_ASSETS}/swagger-ui-bundle.js").status_code == 200
    assert client.get(f"{DEMO_ASSETS}/missing.js").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    after = requests_by_route(client)
    grown = {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key)}
    grown.pop(("/metrics", "200"))  # the first read of /metrics
    assert grown == {
        (f"{DEMO_ASSETS}/{{path}}", "200"): 1,
        (f"{DOCS_ASSETS}/{{path}}", "200"): 1,
        (f"{DEMO_ASSETS}/{{path}}", "404"): 1,
        ("unmatched", "404"): 1,
    }


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "says"),
    [
        ("GET", "/v1/nothing", 404, "not_found", "nothing is served at /v1/nothing"),
        ("GET", f"{DEMO_ASSETS}/missing.js", 404, "not_found", f"{DEMO_ASSETS}/missing.js"),
        (
            "GET",
            "/v1/expressions",
            405,
            "method_not_allowed",
            "GET is not allowed on /v1/expressions; use POST",
        ),
        ("DELETE", "/livez", 405, "method_not_allowed", "use GET"),
        ("POST", f"{DEMO_ASSETS}/demo.js", 405, "method_not_allowed", "use GET, HEAD"),
    ],
)
def test_unknown_paths_and_wrong_methods_get_json_errors_that_say_what_to_use(
    client, method, path, status, code, says
) -> None:
    response = client.request(method, path)
    assert_error(response, status, code)
    assert says in response.json()["error"]["message"]
    if status == 405:
        assert response.headers["allow"]


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
        state.draining, state.drain_deadline = False, None
        state.drain_started.clear()
    assert client.get("/readyz").status_code == 200


def test_a_full_queue_gives_429_with_retry_after(engine_factory) -> None:
    engine = engine_factory(max_queue_size=1)
    with TestClient(create_app(engine.settings, engine)) as client:
        response = post_files(client, ("a.jpg", photo(NO_FACE)), ("b.jpg", photo(NO_FACE)))
        assert_error(response, 429, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert post_files(client, ("a.jpg", photo(NO_FACE))).status_code == 200


def test_a_bug_gives_a_logged_500_and_a_dead_stage_worker_turns_readiness_off(engine_factory, caplog) -> None:
    engine = engine_factory()
    app = create_app(engine.settings, engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        # A bug stand-in: the decode pool gone while the engine still says ready.
        engine._pool.shutdown()
        with caplog.at_level(logging.ERROR, logger="fermam.http"):
            response = post_files(client, ("grass.jpg", photo(NO_FACE)))
        assert_error(response, 500, "internal")
        (record,) = [r for r in caplog.records if r.name == "fermam.http"]
        assert "/v1/expressions" in record.getMessage() and record.exc_info is not None
        # A stage whose worker thread has exited can answer nothing: readiness off, new work 503.
        engine._classify.close(drain_timeout_s=0)
        assert_error(client.get("/readyz"), 503, "not_ready")
        assert_error(post_files(client, ("grass.jpg", photo(NO_FACE))), 503, "not_ready")


@pytest.mark.parametrize("value", ["0", "1", "yes", "off", ""])
def test_form_booleans_are_the_words_true_or_false(client, value: str) -> None:
    response = post_files(client, ("grass.jpg", photo(NO_FACE)), data={"return_landmarks": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    ok = post_files(client, ("grass.jpg", photo(NO_FACE)), data={"return_landmarks": "False"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("value", ["+0", "0_0", " 0", "0.0", "00", "1e1", "0x1", "-"])
def test_form_integers_are_written_as_json_integers(client, value: str) -> None:
    """Pydantic's lax parsing took all of these as integers, which the schema does not allow
    (schemathesis ST201 on min_face_size=0)."""
    response = post_files(client, ("grass.jpg", photo(NO_FACE)), data={"min_face_size": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    for good in ("0", "40"):
        ok = post_files(client, ("grass.jpg", photo(NO_FACE)), data={"min_face_size": good})
        assert ok.status_code == 200, ok.text
