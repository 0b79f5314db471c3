"""Wiring for several GPUs: one `VideoService` per worker group, each with its own cache (whose
models live in the workers), its own GPU readings and its own measurements, sharing the presets,
the outputs folder and the history. The composition root (app.py) calls this; so do the tests and
the bench."""

from __future__ import annotations

from typing import Any

from pipeline.cache import PipelineCache
from pipeline.store.history import History
from pipeline.store.outputs import OutputStore
from pipeline.service import VideoService
from pipeline.workers import protocol as p
from pipeline.workers.child import build_backend
from pipeline.workers.group import GroupMonitor, RemoteBackend, WorkerGroup, build_groups
from presets import PresetBook


def multi_gpu_services(*, mode: str, gpus: tuple[int, ...], backend_spec: p.BackendSpec, presets: PresetBook,
                       outputs: OutputStore, history: History, nvml: Any = None, start: bool = True,
                       group_kwargs: dict[str, Any] | None = None,
                       **service_kwargs: Any) -> tuple[list[VideoService], list[WorkerGroup]]:
    """The services of `mode` ("lanes": one per GPU; "seq": one over all of `gpus`) and their
    worker groups, started unless `start` is False. `service_kwargs` go to every VideoService
    (vram_cap_gib, preview, command_line)."""
    groups = build_groups(mode, gpus, backend_spec, **(group_kwargs or {}))
    services = []
    for group in groups:
        backend = RemoteBackend(group, build_backend(backend_spec, 0))
        services.append(VideoService(presets=presets, cache=PipelineCache(backend), outputs=outputs,
                                     history=history, monitor=GroupMonitor(group, nvml=nvml),
                                     placement=group.placement, **service_kwargs))
        if start:
            group.start()
    return services, groups
