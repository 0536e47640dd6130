"""The store: intent (hosts, images, machines, jobs) in SQLite or PostgreSQL."""

from corral.store.repository import Store

__all__ = ["Store"]
