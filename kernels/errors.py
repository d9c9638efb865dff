"""Errors of backend selection."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here; the message says what to do."""
