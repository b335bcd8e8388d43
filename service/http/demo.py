"""The demo page at `/`: static HTML + JS shipped in the package, no build step, no CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static" / "demo"
STATIC_URL = "/static/demo"


def install_demo_page(app: FastAPI) -> None:
    """`GET /` serves the page; its script and style live under /static/demo."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="demo-assets")

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")
