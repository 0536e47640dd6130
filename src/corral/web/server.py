"""The whole server: the REST API plus the web console, in one ASGI app."""

from __future__ import annotations

from fastapi import FastAPI

from corral.api import create_app
from corral.config import Settings
from corral.web import pages


def build_app(settings: Settings) -> FastAPI:
    app = create_app(settings)
    pages.install(app)
    return app
