"""Corral: one open console over every machine a data center runs."""

__version__ = "0.1.0"
