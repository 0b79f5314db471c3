"""Gradio UI. Imports gradio and pipeline/, never torch or lightx2v."""

from ui.handlers import UiContext
from ui.layout import build_ui

__all__ = ["UiContext", "build_ui"]
