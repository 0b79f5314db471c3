"""Domain errors. Messages are written for the person at the keyboard: they say what happened and
what to do. `ui/handlers.py` is the one place that turns them into Gradio alerts."""

from __future__ import annotations

from typing import Any


class StudioError(Exception):
    """Base class: anything the user should see as a clear message rather than a traceback."""


class InvalidRequest(StudioError):
    """The request was rejected before it reached the GPU."""


class NoGPUError(StudioError):
    """The real backend needs an NVIDIA GPU with CUDA and there is none."""


class BackendUnavailable(StudioError):
    """The backend's software (LightX2V, torch with CUDA, ...) is not installed or not importable."""


class ModelLoadError(StudioError):
    """Loading the weights failed; the previously loaded settings were loaded again if possible."""


class WeightsError(StudioError):
    """Weights are missing, incomplete or corrupt, or could not be downloaded."""


class GenerationCancelled(StudioError):
    """The user pressed Cancel; the run stopped at a step boundary."""


class LaneFull(StudioError):
    """Too many jobs are already waiting for the GPU."""


class AppStopped(StudioError):
    """The app was stopped (Ctrl+C, shutdown) while the job waited or ran."""


class OutputError(StudioError):
    """The video or its record could not be written (disk full, folder not writable)."""


class OutputsInUse(StudioError):
    """Another running app already writes to this outputs folder."""


class LatentsError(StudioError):
    """A job's kept latents are missing or unreadable, so it cannot be finished at full quality."""


class OutOfVRAM(StudioError):
    """Every rung of the fallback ladder ran out of GPU memory."""

    def __init__(self, message: str, attempts: tuple[Any, ...]):
        # attempts: the pipeline.types.Attempt of every rung tried. Not imported here: errors sit
        # below types (types raises InvalidRequest), and the house has no import loops.
        super().__init__(message)
        self.attempts = attempts


class WorkerDied(StudioError):
    """A GPU worker process ended while it ran a job (killed, driver reset, crash); it was restarted."""
