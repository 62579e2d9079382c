"""Celery worker health for Django: registry, heartbeats, failure detection, reclamation."""

__version__ = "0.1.0"
