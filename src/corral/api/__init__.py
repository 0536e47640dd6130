"""The REST API (FastAPI): routers, authentication, problem documents, audit log."""

from corral.api.app import create_app

__all__ = ["create_app"]
