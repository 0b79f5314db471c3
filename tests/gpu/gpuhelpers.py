"""Helpers for the GPU tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CAP_GIB = float(os.environ.get("WAN_STUDIO_TEST_CAP_GIB", "11.0"))
PROMPT = "A man with short gray hair plays a red electric guitar."
FAST = {"offload_granularity": "block", "text_encoder": "offload", "vae_offload": False,
        "vae_tiling": False, "rope_chunk": 0, "clean_cuda_cache": False}


def mp4_writer():
    """The service's default writer needs an ffmpeg binary (imageio-ffmpeg's bundled one or the
    system's); where neither exists use its PyAV writer."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return None
    except (ImportError, RuntimeError):
        from pipeline.store.outputs import _write_mp4_pyav

        return _write_mp4_pyav


def make_service(ckpt: Path, root: Path, **backend_kwargs):
    from pipeline.cache import PipelineCache
    from pipeline.machine.gpu import GpuMonitor
    from pipeline.store.history import History
    from pipeline.backends.lightx2v import LightX2VBackend
    from pipeline.store.outputs import OutputStore
    from pipeline.service import VideoService
    from presets import load_presets

    backend = LightX2VBackend(ckpt, vram_cap_gib=CAP_GIB, **backend_kwargs)
    history = History(root / "outputs" / "history.sqlite3")
    # As app.py wires it: a kernel measured once per GPU and shape is reused by every later build,
    # so two builds of one service run the same attention kernel (and give the same frames).
    backend.use_kernel_store(history)
    return VideoService(presets=load_presets(), cache=PipelineCache(backend),
                        outputs=OutputStore(root / "outputs", writer=mp4_writer()),
                        history=history, monitor=GpuMonitor(), vram_cap_gib=CAP_GIB)


@dataclass
class Recorder:
    """RunHooks that remember what the backend reported. Cancel after step `stop_after_step`, or
    inside a step: at the `stop_at_check`-th cancel check once denoising started (the backend checks
    before every block)."""

    stop_after_step: int | None = None
    stop_at_check: int | None = None
    phases: list[Any] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)
    checks: int = 0
    latents: Any = None  # the final latents, as the decode received them

    def hooks(self):
        from pipeline.backend import RunHooks

        return RunHooks(on_phase=self.phases.append, on_step=lambda i, n: self.steps.append((i, n)),
                        should_stop=self.should_stop, on_latents=lambda x: setattr(self, "latents", x))

    def should_stop(self) -> bool:
        from pipeline.types import Phase

        if self.stop_at_check is not None and Phase.DENOISING in self.phases:
            self.checks += 1
            if self.checks >= self.stop_at_check:
                return True
        return self.stop_after_step is not None and any(i >= self.stop_after_step for i, _ in self.steps)


def spec(height=256, width=448, frames=9, seed=42, memory=None, prompt=PROMPT):
    from pipeline.types import RunSpec

    return RunSpec(preset=f"{height}x{width}x{frames}", rung="test", prompt=prompt, negative_prompt="",
                   seed=seed, height=height, width=width, frames=frames, steps=4, shift=5.0, guidance=1.0,
                   memory=dict(FAST, **(memory or {})))


def loaded_model(service, memory=None):
    backend = service.cache.backend
    return service.cache.get(backend.load_key(dict(FAST, **(memory or {}))))


def set_cap(torch, gib: float) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), 0)
