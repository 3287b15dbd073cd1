"""The Textual app of `launch` and `watch`. Imports no torch, stable-baselines3 or
transformers: everything heavy runs in the workers."""

from sa2va_tui.app.main import Sa2vaApp, run_app
from sa2va_tui.app.source import AppSource

__all__ = ["AppSource", "Sa2vaApp", "run_app"]
