"""`--docs-access`: /docs, /redoc and /openapi.json public (the default, keys or not), behind the
API key, or off. The pages need no engine, so the app runs without loading the models."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings

KEY = "docs-key-0123456789"
PAGES = ("/docs", "/redoc", "/openapi.json")


def client(**settings) -> TestClient:
    return TestClient(create_app(Settings(api_keys=[KEY], device="cpu", **settings)))


def test_the_default_keeps_the_docs_public_even_with_keys() -> None:
    assert Settings().docs_access == "public"
    with_keys = client()
    for page in PAGES:
        assert with_keys.get(page).status_code == 200, page
    assert "/v1/expressions" in with_keys.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("header", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}])
def test_api_key_access_needs_a_key_for_every_page(header) -> None:
    protected = client(docs_access="api_key")
    for page in PAGES:
        refused = protected.get(page)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized", page
        assert protected.get(page, headers=header).status_code == 200, page


def test_off_serves_no_docs() -> None:
    off = client(docs_access="off")
    for page in PAGES:
        assert off.get(page).status_code == 404, page
    assert off.get("/livez").status_code == 200
