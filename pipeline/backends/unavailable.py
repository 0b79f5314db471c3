"""The backend of a machine without the GPU stack: every job explains what is missing."""

from __future__ import annotations

from pipeline.errors import BackendUnavailable


class UnavailableBackend:
    """Stands in for the LightX2V backend when its module cannot be imported, so that the app still
    starts (UI, history, VRAM panel, doctor) and Generate explains what is missing."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def _error(self):
        return BackendUnavailable(
            f"The {self.name} backend cannot run here: {self.reason}. Generating needs an NVIDIA GPU "
            f"with CUDA and the GPU packages: run ./run.sh on such a machine (it installs them), "
            f"and 'python app.py doctor' explains what is missing. '--backend fake' runs the UI "
            f"without a GPU.")

    def check_available(self) -> None:
        raise self._error()

    def load_key(self, memory):
        raise self._error()

    def load(self, key, on_phase):
        raise self._error()

    def tiny_vae(self) -> str | None:
        return None

    def describe(self) -> dict:
        return {"backend": self.name, "unavailable": self.reason}
