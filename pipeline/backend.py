"""The contract every generation backend meets (the real LightX2V one and the CPU test double).

A `Backend` is cheap to construct and imports nothing heavy. `load(key)` builds a `LoadedModel`
(weights on the host / GPU); the `PipelineCache` owns that object. One `LoadedModel.generate` call
runs one preset at one memory rung: text encoding, the denoising steps and the VAE decode, and
returns uint8 frames [T, H, W, 3]. Writing the mp4 is the service's job, not the backend's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from pipeline.types import Phase, Preview, RunSpec


def _ignore(_value: Any) -> None:
    return None


@dataclass(frozen=True)
class LoadKey:
    """Exactly the settings that force a weight reload; everything else passes through per call."""

    backend: str
    weights_dir: str
    build_settings: tuple[tuple[str, Any], ...]  # sorted (name, value) pairs


@dataclass
class RunHooks:
    """How a backend reports progress and learns about cancel. Cancel is cooperative: a backend checks
    `should_stop()` at step boundaries and raises GenerationCancelled."""

    on_phase: Callable[[Phase], None]
    on_step: Callable[[int, int], None]
    should_stop: Callable[[], bool]
    # After each denoising step, when `RunSpec.preview` asks for one. Called on the GPU thread: it
    # must return at once (the service only queues the event).
    on_preview: Callable[[Preview], None] = _ignore
    # The final latents (host memory, as the decode receives them), once, before the decode: the
    # service keeps them beside the clip so it can be decoded again later ("finish").
    on_latents: Callable[[Any], None] = _ignore


class DecodeOutOfMemory(Exception):
    """The denoising steps finished but the VAE decode ran out of GPU memory.

    Carries the final latents (host memory) so the service can retry the decode alone on a leaner
    rung instead of throwing the steps away. `cause` is the OOM message, not the exception: holding
    the exception would keep its traceback's tensors alive.
    """

    def __init__(self, latents: Any, cause: str):
        super().__init__(f"VAE decode ran out of GPU memory: {cause}")
        self.latents = latents
        self.cause = cause


class LoadedModel(Protocol):
    def generate(self, spec: RunSpec, hooks: RunHooks) -> np.ndarray: ...

    def decode(self, latents: Any, spec: RunSpec, hooks: RunHooks) -> np.ndarray:
        """Decode kept latents with `spec.memory`'s VAE settings (the tiny VAE when `spec.draft`).
        Any loaded model can decode any latents of this model family: the DiT settings of its
        load key do not matter."""
        ...

    def recover(self) -> None:
        """Return to a clean state after any exception, so the next run honours its seed."""
        ...

    def release(self) -> None:
        """Drop every weight and free the GPU memory it held."""
        ...


class Backend(Protocol):
    name: str

    def check_available(self) -> None:
        """Raise NoGPUError / BackendUnavailable / WeightsError with a clear message if this backend
        cannot run on this machine. Cheap; called before every job."""
        ...

    def load_key(self, memory: dict[str, Any]) -> LoadKey:
        """The reload key for a rung's memory settings (only the build-time ones matter)."""
        ...

    def load(self, key: LoadKey, on_phase: Callable[[Phase], None]) -> LoadedModel: ...

    def tiny_vae(self) -> str | None:
        """The installed tiny VAE (a file name, for records), or None: draft decodes and tiny-VAE
        previews need it. Cheap: a file lookup."""
        ...

    def describe(self) -> dict[str, Any]:
        """Model id, library versions and kernels, for reproducibility records."""
        ...
