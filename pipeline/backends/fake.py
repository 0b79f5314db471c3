"""A CPU stand-in for the LightX2V backend: the test double, and `--backend fake` for UI work.

It honours the whole backend contract (load keys, phases, steps, cancel, decode-only retry,
recover) and produces real frames, deterministic in the seed, at 1/`scale` of the preset's size so
that CPU tests stay fast. It can be told to raise CUDA's OOM error at chosen presets, rungs and
phases, or to fail loading, which is how the OOM ladder and the cache rollback are tested.
"""

from __future__ import annotations

import errno
import logging
import zlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.backend import DecodeOutOfMemory, LoadKey, RunHooks
from pipeline.errors import GenerationCancelled, NoGPUError, WeightsError
from pipeline.store.outputs import write_mp4
from pipeline.backends.latent_preview import latents_to_rgb, preview_fps
from pipeline.types import Phase, Preview, PreviewKind, RunSpec
from presets import build_settings

log = logging.getLogger(__name__)

FAKE_STEP_SECONDS_ENV = "WAN_STUDIO_FAKE_STEP_SECONDS"
FAKE_OOM_ENV = "WAN_STUDIO_FAKE_OOM"  # "preset:rung-or-*:phase[,...]", e.g. 720x1280x81:*:denoising
FAKE_FAULTS_ENV = "WAN_STUDIO_FAKE_FAULTS_DIR"  # a folder of switch files, see FaultSwitches
FAKE_TINY_VAE_ENV = "WAN_STUDIO_FAKE_TINY_VAE"  # "1": the fake has a tiny VAE (draft decodes)
# "load" (every load that keeps the DiT in RAM fails) and/or preset:rung:phase triples: host memory
# runs out there (pinned-memory failure at run time).
FAKE_HOST_OOM_ENV = "WAN_STUDIO_FAKE_HOST_OOM"
FAKE_RAM_ENV = "WAN_STUDIO_FAKE_RAM_GIB"  # the system RAM the fake machine reports to the planner



def simulated_oom(where: str) -> BaseException:
    """The error CUDA raises, when torch is installed (it is in tests); a look-alike otherwise."""
    message = f"CUDA out of memory. Tried to allocate 740.00 MiB (simulated in {where})"
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F811 - test environments have CPU torch
        except ImportError:
            return RuntimeError(message)
    return torch.cuda.OutOfMemoryError(message)


def simulated_host_oom(where: str, pinned: bool) -> BaseException:
    """What a host allocation failure looks like: torch's CPU allocator, or CUDA's pinned-host
    allocator, whose error carries no hint beyond the pinning call on the stack."""
    if not pinned:
        return RuntimeError(f"[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate "
                            f"memory: you tried to allocate 15032385536 bytes. Error code 12 (Cannot "
                            f"allocate memory) (simulated in {where})")

    def pin_memory_block() -> None:
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported "
                           "at some other API call.")

    try:
        pin_memory_block()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


@dataclass
class FakeBackend:
    name: str = "fake"
    scale: int = 8
    step_seconds: float = 0.0
    gpu_present: bool = True
    # (preset, rung or "*", phase) triples that raise OOM.
    oom_at: set[tuple[str, str, Phase]] = field(default_factory=set)
    fail_loads: set[LoadKey] = field(default_factory=set)
    weights_dir: str = "fake-weights"
    loads: list[LoadKey] = field(default_factory=list)
    generated: list[RunSpec] = field(default_factory=list)
    decoded: list[RunSpec] = field(default_factory=list)  # decode() calls (retries, finishes)
    on_step_hook: Callable[[RunSpec, int], None] | None = None
    on_load_hook: Callable[[LoadKey], None] | None = None  # runs in every load, before it can fail
    # Whether a tiny VAE "is installed": draft decodes and tiny-VAE previews need one.
    tiny_vae_installed: bool = False
    # Host memory: (preset, rung or "*", phase) triples that run out of (pinned) host memory, loads
    # that keep the DiT in RAM failing, and the RAM the planner is told about (None: no reading).
    host_oom_at: set[tuple[str, str, Phase]] = field(default_factory=set)
    host_oom_loads: bool = False
    ram_gib: float | None = None

    def available_ram_gib(self) -> float | None:
        """The planner's RAM reading for this backend (VideoService asks backends that have one)."""
        return self.ram_gib

    def check_available(self) -> None:
        if not self.gpu_present:
            raise NoGPUError("No NVIDIA GPU with CUDA was found. This app needs one to generate "
                             "video; the VRAM panel says what the driver reports.")

    def load_key(self, memory: dict[str, Any]) -> LoadKey:
        return LoadKey(self.name, self.weights_dir, tuple(sorted(build_settings(memory).items())))

    def load(self, key: LoadKey, on_phase: Callable[[Phase], None]) -> "FakeModel":
        on_phase(Phase.LOADING)
        if self.on_load_hook:
            self.on_load_hook(key)
        if key in self.fail_loads:
            raise RuntimeError(f"simulated load failure for {dict(key.build_settings)}")
        if self.host_oom_loads and not dict(key.build_settings).get("dit_from_disk"):
            raise simulated_host_oom(f"load {dict(key.build_settings)}", pinned=False)
        self.loads.append(key)
        return FakeModel(self, key)

    def tiny_vae(self) -> str | None:
        return "taew2_1.pth (fake)" if self.tiny_vae_installed else None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model_id": "fake (CPU test double)", "quant_scheme": "none",
                "attn_mode": "none"}

    def _maybe_oom(self, spec: RunSpec, phase: Phase) -> bool:
        return any(p == spec.preset and r in ("*", spec.rung) and ph is phase
                   for p, r, ph in self.oom_at)


class FakeModel:
    def __init__(self, backend: FakeBackend, key: LoadKey):
        self.backend = backend
        self.key = key
        self.released = False
        self.dirty = False  # set by a failed run, cleared by recover()
        self._lock = threading.Lock()

    def _check(self, spec: RunSpec, phase: Phase) -> None:
        if any(p == spec.preset and r in ("*", spec.rung) and ph is phase for p, r, ph in self.backend.host_oom_at):
            self.dirty = True
            raise simulated_host_oom(f"{spec.preset}/{spec.rung} {phase.value}", pinned=True)
        if self.backend._maybe_oom(spec, phase):
            self.dirty = True
            raise simulated_oom(f"{spec.preset}/{spec.rung} {phase.value}")

    def generate(self, spec: RunSpec, hooks: RunHooks) -> np.ndarray:
        assert not self.released, "generate() on a released model"
        assert not self.dirty, "generate() after a failure without recover()"
        self.backend.generated.append(spec)
        hooks.on_phase(Phase.TEXT_ENCODING)
        self._check(spec, Phase.TEXT_ENCODING)
        hooks.on_phase(Phase.DENOISING)
        latents = self._final_latents(spec)
        noise = np.random.default_rng(spec.seed + 1).standard_normal(latents.shape).astype(np.float32)
        for step in range(1, spec.steps + 1):
            if hooks.should_stop():
                self.dirty = True
                raise GenerationCancelled("Cancelled at a step boundary.")
            if self.backend.step_seconds:
                time.sleep(self.backend.step_seconds)
            self._check(spec, Phase.DENOISING)
            if self.backend.on_step_hook:
                self.backend.on_step_hook(spec, step)
            hooks.on_step(step, spec.steps)
            if spec.preview is not None:
                # Like the real model: the estimate of the clean latents sharpens step by step.
                weight = step / spec.steps
                hooks.on_preview(self._preview(spec, step, latents * weight + noise * (1 - weight)))
        hooks.on_latents(latents.copy())
        hooks.on_phase(Phase.DECODING)
        if self.backend._maybe_oom(spec, Phase.DECODING):
            self.dirty = True
            raise DecodeOutOfMemory(latents, f"simulated in {spec.preset}/{spec.rung}")
        return self._pixels(spec, latents)

    def _final_latents(self, spec: RunSpec) -> np.ndarray:
        # 16 channels, 4n+1 frames -> n+1 latent frames, 1/8 of the (reduced) size: the real layout.
        h, w = self._size(spec)
        return np.random.default_rng(spec.seed).standard_normal(
            (16, (spec.frames - 1) // 4 + 1, h // 8, w // 8)).astype(np.float32)

    def _preview(self, spec: RunSpec, step: int, x0: np.ndarray) -> Preview:
        started = time.perf_counter()
        kind = PreviewKind.LINEAR
        frames = latents_to_rgb(x0)
        if spec.preview is PreviewKind.TINY_VAE and self.backend.tiny_vae_installed:
            kind = PreviewKind.TINY_VAE
            frames = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # "decoded": twice the size
        return Preview(step=step, total=spec.steps, frames=frames, kind=kind,
                       fps=preview_fps(16, spec.frames, len(frames)),
                       cost_ms=round((time.perf_counter() - started) * 1000, 3))

    def decode(self, latents: Any, spec: RunSpec, hooks: RunHooks) -> np.ndarray:
        assert not self.dirty, "decode() after a failure without recover()"
        assert not self.released, "decode() on a released model"
        if not isinstance(latents, np.ndarray) or latents.ndim != 4 or latents.shape[0] != 16:
            raise ValueError(f"fake decode: expected latents [16, T, H, W], got {type(latents).__name__}")
        self.backend.decoded.append(spec)
        hooks.on_phase(Phase.DECODING)
        if self.backend._maybe_oom(spec, Phase.DECODING):
            self.dirty = True
            raise DecodeOutOfMemory(latents, f"simulated in {spec.preset}/{spec.rung} (decode only)")
        return self._pixels(spec, latents)

    def _size(self, spec: RunSpec) -> tuple[int, int]:
        def shrink(n: int) -> int:
            return max(16, (n // self.backend.scale) // 16 * 16)

        return shrink(spec.height), shrink(spec.width)

    def _pixels(self, spec: RunSpec, latents: np.ndarray) -> np.ndarray:
        h, w = self._size(spec)
        # The picture follows the latents (a decode of other latents gives another clip).
        rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(latents).tobytes()))
        base = rng.integers(0, 256, size=(1, h, w, 3), dtype=np.uint8)
        # A slow drift per frame keeps the clip visibly moving while staying deterministic.
        drift = (np.arange(spec.frames, dtype=np.uint16) * 3 % 256).reshape(-1, 1, 1, 1)
        frames = ((base.astype(np.uint16) + drift) % 256).astype(np.uint8)
        if spec.memory.get("vae_tiling") and not spec.draft:
            # As LightX2V's tiled decode, which blends overlapping tiles: the pixels along a seam
            # differ a few levels from the untiled decode of the same latents.
            frames[:, :, w // 2] ^= 4
        if spec.draft:
            if not self.backend.tiny_vae_installed:
                # As LightX2VModel: the border refuses drafts without one, so this is a setup fault.
                raise WeightsError("fake: a draft decode without a tiny VAE")
            frames &= 0xE0  # the tiny VAE's rougher picture: fewer levels
        return frames

    def recover(self) -> None:
        self.dirty = False

    def release(self) -> None:
        self.released = True


def parse_fake_oom(text: str | None, preset_names) -> set:
    """WAN_STUDIO_FAKE_OOM: comma-separated preset:rung:phase triples (rung may be '*'); phase is
    text_encoding, denoising or decoding. Test-only: makes the fake backend raise CUDA's OOM."""
    phases = {"text_encoding": Phase.TEXT_ENCODING, "denoising": Phase.DENOISING,
              "decoding": Phase.DECODING, "decode": Phase.DECODING}
    rules = set()
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        preset, _, rest = item.partition(":")
        rung, _, phase = rest.partition(":")
        if preset not in preset_names or not rung or phase.lower() not in phases:
            raise ValueError(f"{FAKE_OOM_ENV}: cannot read {item!r}; expected preset:rung:phase with "
                              f"preset one of {', '.join(preset_names)}, rung a name or '*', phase "
                              f"one of {', '.join(phases)}.")
        rules.add((preset, rung, phases[phase.lower()]))
    return rules


class FaultSwitches:
    """Test-only fault injection for the fake backend, switched on and off by files in a folder
    (WAN_STUDIO_FAKE_FAULTS_DIR) so that a test can change them while the app runs:

    disk-full     while present, writing the mp4 fails with ENOSPC after writing part of it
    slow-write    seconds to hold the finished mp4 under its temporary name before publishing it
                  (removing the file ends the wait early)
    slow-steps    seconds to add to every denoising step
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def seconds(self, name: str) -> float:
        try:
            return max(0.0, float((self.folder / name).read_text().strip() or 0))
        except (OSError, ValueError):
            return 0.0

    def writer(self, frames, fps, path, comment) -> None:
        if (self.folder / "disk-full").exists():
            path.write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_mp4(frames, fps, path, comment)
        deadline = time.monotonic() + self.seconds("slow-write")
        while time.monotonic() < deadline and (self.folder / "slow-write").exists():
            time.sleep(0.05)

    def on_step(self, spec, step) -> None:
        delay = self.seconds("slow-steps")
        if delay:
            time.sleep(delay)


def fake_backend_from_env(env: Mapping[str, str], preset_names: list[str]
                          ) -> tuple[FakeBackend, "FaultSwitches | None"]:
    """The fake backend as `--backend fake` runs it, with the test-only switches read from `env`.
    Raises ValueError for an unreadable switch."""
    host = [item.strip() for item in (env.get(FAKE_HOST_OOM_ENV) or "").split(",") if item.strip()]
    ram = env.get(FAKE_RAM_ENV)
    try:
        ram_gib = float(ram) if ram else None
    except ValueError:
        raise ValueError(f"{FAKE_RAM_ENV}: expected GiB as a number, got {ram!r}") from None
    backend = FakeBackend(step_seconds=float(env.get(FAKE_STEP_SECONDS_ENV) or "0.2"),
                          oom_at=parse_fake_oom(env.get(FAKE_OOM_ENV), preset_names),
                          tiny_vae_installed=env.get(FAKE_TINY_VAE_ENV) == "1",
                          host_oom_loads="load" in host,
                          host_oom_at=parse_fake_oom(",".join(i for i in host if i != "load"), preset_names),
                          ram_gib=ram_gib)
    if backend.host_oom_loads or backend.host_oom_at or ram_gib is not None:
        log.warning("TEST SWITCH %s/%s: fake host memory %s GiB, running out at %s", FAKE_HOST_OOM_ENV,
                    FAKE_RAM_ENV, ram_gib, host)
    if backend.oom_at:
        log.warning("TEST SWITCH %s: the fake backend will run out of memory at %s", FAKE_OOM_ENV,
                    sorted((p, r, ph.value) for p, r, ph in backend.oom_at))
    faults_dir = env.get(FAKE_FAULTS_ENV)
    switches = FaultSwitches(Path(faults_dir)) if faults_dir else None
    if switches is not None:
        log.warning("TEST SWITCH %s: fault injection from %s", FAKE_FAULTS_ENV, faults_dir)
        backend.on_step_hook = switches.on_step
    return backend, switches
