"""The one owner of the loaded model.

At most one `LoadedModel` is alive at a time (a 12 GB card cannot hold two). `get(key)` reuses it
when the key matches and otherwise releases it and loads the new one. If that load fails, the old
model is loaded again (rollback) so that the app keeps working with the settings that worked, and
the failure is raised as `ModelLoadError`.
"""

from __future__ import annotations

import logging
import time
import threading
from typing import Callable

from pipeline.machine import gpu, hostmem
from pipeline.backend import Backend, LoadedModel, LoadKey
from pipeline.errors import ModelLoadError, StudioError
from pipeline.types import Phase

log = logging.getLogger(__name__)


class PipelineCache:
    def __init__(self, backend: Backend, *, rollback: bool = True):
        """`rollback`: after a failed load, load the previous settings again. Off in a rank of a
        sequence-parallel group, where a build is collective: one rank rebuilding alone would wait
        for the others forever (pipeline/workers/child.py agrees on every load instead)."""
        self.backend = backend
        self.rollback = rollback
        self._lock = threading.RLock()
        self._model: LoadedModel | None = None
        self._key: LoadKey | None = None
        self.loads = 0  # how many times weights were loaded; tests and the UI read it
        self.last_load_seconds: float | None = None

    @property
    def key(self) -> LoadKey | None:
        return self._key

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def get(self, key: LoadKey, on_phase: Callable[[Phase], None] = lambda p: None) -> LoadedModel:
        with self._lock:
            if self._model is not None and self._key == key:
                return self._model
            previous = self._key
            self.release()
            try:
                model = self._load(key, on_phase)
            except Exception as exc:  # noqa: BLE001 - any load failure triggers the rollback
                message = str(exc) if isinstance(exc, StudioError) else f"{type(exc).__name__}: {exc}"
                if hostmem.is_host_oom(exc):
                    # The ladder reads the words: a load that ran out of RAM steps down like an OOM.
                    message = f"out of host memory ({message})"
                log.exception("loading %s failed", key)
            else:
                self._model, self._key = model, key
                return model
            # Rollback happens outside the except block so the failed load's frames are gone;
            # whatever that load left on the GPU or in pinned memory is collected first.
            gpu.free_gpu_memory()
            if previous is not None and self.rollback:
                try:
                    self._model, self._key = self._load(previous, on_phase), previous
                    log.warning("rolled back to the previously loaded settings %s", previous)
                except Exception:  # noqa: BLE001
                    log.exception("rollback to %s failed too; nothing is loaded", previous)
            raise ModelLoadError(f"Loading the model failed: {message}")

    def _load(self, key: LoadKey, on_phase: Callable[[Phase], None]) -> LoadedModel:
        started = time.perf_counter()
        model = self.backend.load(key, on_phase)
        self.loads += 1
        self.last_load_seconds = time.perf_counter() - started
        log.info("loaded %s in %.1f s (load #%d)", key, self.last_load_seconds, self.loads)
        return model

    def release(self) -> None:
        with self._lock:
            if self._model is not None:
                model, self._model, self._key = self._model, None, None
                model.release()
