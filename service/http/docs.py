"""OpenAPI pages served with no CDN: Swagger UI (/docs) and ReDoc (/redoc) from installed assets.

FastAPI's default pages load their JavaScript and CSS from a public CDN, so they are blank on an
offline host. This is FastAPI's "self-hosting JavaScript and CSS for docs" recipe, with the assets
from the `fastapi-offline` package (Swagger UI 5, which renders OpenAPI 3.1, and ReDoc).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from service.http.deps import require_api_key

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/static/docs"
# No validator badge: Swagger UI would send the schema's URL to validator.swagger.io.
SWAGGER_PARAMETERS = {"validatorUrl": None}


OPENAPI_URL = "/openapi.json"


def install_offline_docs(app: FastAPI, access: str = "public") -> None:
    """Add /docs, /redoc, /openapi.json and their assets to an app created with docs_url=None,
    redoc_url=None, openapi_url=None; `access` is the `docs_access` setting (public, api_key, off).
    """
    if access == "off":
        return
    dependencies = [Depends(require_api_key)] if access == "api_key" else []
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    openapi_url = OPENAPI_URL
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=dependencies)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=redirect_url,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
