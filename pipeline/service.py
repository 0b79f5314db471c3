"""The generation service: one request in, one saved clip out, with the OOM ladder as a policy.

`VideoService.generate` plans the ladder (planner.py), then tries rungs in order. An attempt that
runs out of GPU memory is recorded and recovered from *after* leaving the `except` block (the
traceback's frames would otherwise keep the failed run's tensors alive), then the next rung runs.
When only the VAE decode ran out of memory, the kept latents are decoded again with tiling instead
of re-running the steps. Every rung tried is in the result, the record and the history.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from pipeline.machine import gpu, hostmem
from pipeline.backend import DecodeOutOfMemory, LoadedModel, LoadKey, RunHooks
from pipeline.cache import PipelineCache
from pipeline.errors import GenerationCancelled, InvalidRequest, OutOfVRAM, StudioError
from pipeline.store.history import History, HistoryEntry
from pipeline.store.outputs import OutputStore
from pipeline.store.records import job_record, software_fingerprint
from pipeline.planner import HEADROOM_GIB, Planner, PresetForecast, Rung, replan
from pipeline.types import (HOST_OOM, LEAN_DECODE_SUFFIX, Attempt, FinishRequest, GenerationRequest,
                            GenerationResult, Phase, Preview, PreviewKind, ProgressEvent, RunSpec)
from presets import DECODE_SETTINGS, PresetBook, dit_settings, lean_decode

log = logging.getLogger(__name__)

EventSink = Callable[[ProgressEvent], None]

PREVIEW_MODES = ("auto", "linear", "tiny-vae", "off")


@dataclass
class _PhaseClock:
    """Wall time per phase and per denoising step for one job."""

    sink: EventSink
    sampler: gpu.VramSampler | None = None

    def __post_init__(self) -> None:
        self.current: Phase | None = None
        self.started = time.perf_counter()
        self.phase_started = self.started
        self.seconds: dict[str, float] = {}
        self.step_seconds: list[float] = []
        self._last_step = self.started
        # Bytes this process read from storage per step (the low-RAM rung streams the DiT from
        # disk); None entries where /proc/self/io cannot be read.
        self.step_read_bytes: list[int | None] = []
        self._io_last = hostmem.read_io()

    def phase(self, phase: Phase, message: str = "") -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current.value] = self.seconds.get(self.current.value, 0.0) + (
                now - self.phase_started)
        self.current, self.phase_started = phase, now
        if phase is Phase.DENOISING:
            self._last_step = now
            self._io_last = hostmem.read_io()
        if self.sampler is not None:
            self.sampler.phase = phase.value
        self.sink(ProgressEvent(phase, message=message))

    def step(self, index: int, total: int) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last_step)
        self._last_step = now
        io = hostmem.read_io()
        self.step_read_bytes.append(None if io is None or self._io_last is None
                                    else io["read_bytes"] - self._io_last["read_bytes"])
        self._io_last = io
        self.sink(ProgressEvent(Phase.DENOISING, step=index, total=total))

    def snapshot(self, include_current: bool = True) -> dict[str, Any]:
        """Seconds per phase and per step so far, plus the total."""
        now = time.perf_counter()
        out: dict[str, Any] = {k: round(v, 3) for k, v in self.seconds.items()}
        if include_current and self.current is not None and self.current is not Phase.DONE:
            out[self.current.value] = round(out.get(self.current.value, 0.0) + now - self.phase_started, 3)
        out["steps"] = [round(s, 3) for s in self.step_seconds]
        out["step_read_bytes"] = list(self.step_read_bytes)
        out["total"] = round(now - self.started, 3)
        return out

    def finish(self) -> dict[str, Any]:
        self.phase(Phase.DONE)
        return self.snapshot()


@dataclass
class _Outcome:
    frames: np.ndarray | None = None
    failure: Attempt | None = None
    latents: Any = None  # the final latents: kept when only the decode failed, or the ones a decode decoded
    memory: dict[str, Any] | None = None  # settings applied, when they differ from the rung's
    label: str | None = None  # rung name as recorded, when it differs from the rung's


@dataclass
class _Kept:
    """What a run handed over besides its frames: the final latents and the previews' kinds/costs."""

    latents: Any = None
    previews: list[tuple[PreviewKind, float | None]] = field(default_factory=list)


class _Loads:
    """The weight loads of one click, and the one-reload rule's state: the key in use, the keys
    left (never gone back to), and whether the one reload beyond the first load is still free."""

    def __init__(self, cache: PipelineCache):
        self.cache = cache
        self.before = cache.loads
        self.records: list[dict[str, Any]] = []
        self.current: LoadKey | None = None  # the key of this click's latest attempt
        self.left: set[LoadKey] = set()
        self.switches = 0

    @property
    def reload_allowed(self) -> bool:
        return self.switches == 0

    def switching(self, key: LoadKey) -> bool:
        return self.current is not None and key != self.current

    def reason(self, key: LoadKey, attempts: list[Attempt], free_gib: float | None, rung: Rung) -> str:
        """Why `key` needs a load, in words; empty when the loaded model serves it."""
        if self.cache.is_loaded and self.cache.key == key:
            return ""
        if not self.switching(key):
            return "first load" if self.cache.key is None else "these settings need another build"
        before, after = dict(self.current.build_settings), dict(key.build_settings)
        changed = ", ".join(f"{k}={v}" for k, v in after.items() if before.get(k) != v) or "the same settings"
        failed = next((a for a in reversed(attempts) if a.outcome != "ok"), None)
        why = failed.shortfall() if failed else "the last rung failed"
        free = f", about {free_gib:.1f} GiB is really free" if free_gib is not None else ""
        return (f"reloading the weights with {changed} for {rung.preset.name}/{rung.memory.name} "
                f"({why}{free})")

    def track(self, key: LoadKey, reason: str, work: Callable[[], "_Outcome"]) -> "_Outcome":
        loads, started = self.cache.loads, time.perf_counter()
        try:
            return work()
        finally:
            if self.cache.loads > loads:
                self.records.append({"settings": dict(key.build_settings), "reason": reason or "load",
                                     "seconds": _round(self.cache.last_load_seconds),
                                     "at_s": _round(time.perf_counter() - started)})
            if self.current is not None and key != self.current:
                self.left.add(self.current)
                self.switches += 1
            self.current = key


def _min_known(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _finish_decodes(rung: Rung, source: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The decodes a finish tries, in order, as (rung label, memory settings): first the VAE
    settings the source clip was really decoded with (its record's memory_settings: after a decode
    OOM those are the leanest, not its rung's, and tiling changes the frames), then the leanest."""
    memory = rung.memory.settings()
    recorded = source.get("memory_settings")
    if isinstance(recorded, dict):
        memory.update({k: recorded[k] for k in DECODE_SETTINGS if k in recorded})
    lean = lean_decode(rung.memory.settings())
    name = f"{rung.memory.name}+finish"
    if memory == lean:
        return [(f"{name}{LEAN_DECODE_SUFFIX}", lean)]
    return [(name, memory), (f"{name}{LEAN_DECODE_SUFFIX}", lean)]


class VideoService:
    def __init__(self, *, presets: PresetBook, cache: PipelineCache, outputs: OutputStore,
                 history: History, monitor: gpu.GpuMonitor, planner: Planner | None = None,
                 vram_cap_gib: float | None = None, preview: str = "auto",
                 command_line: list[str] | None = None,
                 ram_reader: Callable[[], float | None] | None = None,
                 placement: Callable[[], dict[str, Any]] | None = None):
        """`preview`: one of PREVIEW_MODES, the picture sent after every denoising step.
        `command_line`: how the app was started, as the records state it (no password).
        `ram_reader`: GiB of system RAM a run may use. Default: the backend's own reading when it
        has one (the fake backend reports a configured figure), else free RAM plus what this process
        already holds (`hostmem`).
        `placement`: where the GPU work runs, for the record (the GPU worker group: mode, GPU
        indices, each card's peak); None on the one-GPU path in this process."""
        if preview not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {PREVIEW_MODES}, got {preview!r}")
        self.preview = preview
        self.command_line = list(command_line or sys.argv[:1])
        self.ram_reader = (ram_reader or getattr(cache.backend, "available_ram_gib", None)
                           or _ram_available_gib)
        # Whether another job is already waiting for the GPU (the job queue sets it): the low-RAM
        # rung then keeps its text encoder for that prompt instead of releasing and reloading it.
        self.prompt_waiting: Callable[[], bool] = lambda: False
        self.presets = presets
        self.cache = cache
        self.outputs = outputs
        self.history = history
        self.monitor = monitor
        self.planner = planner or Planner(presets)
        self.vram_cap_gib = vram_cap_gib
        self.placement = placement

    # -- planning, for the UI before Generate -------------------------------------------------
    def available_gib(self) -> tuple[str | None, float | None]:
        snap = self.monitor.read()
        if snap is None:
            return None, None
        available = snap.available_gib
        if self.vram_cap_gib is not None:
            available = min(available, self.vram_cap_gib)
        return snap.gpu_name, available

    def forecasts(self) -> list[PresetForecast]:
        gpu_name, available = self.available_gib()
        measured = self.history.measured_peaks(gpu_name)
        # Times of runs without a GPU reading (the fake backend) fill in where the GPU has none.
        seconds = {**self.history.measured_seconds(self._no_gpu_key()), **self.history.measured_seconds(gpu_name)}
        ram = self.ram_reader()
        return [self.planner.forecast(name, available, measured, seconds, ram_gib=ram) for name in self.presets]

    # -- the job ------------------------------------------------------------------------------
    def tiny_vae_installed(self) -> bool:
        """Whether the tiny VAE is there: 'Draft decode' needs it (checked at the border)."""
        return bool(self.cache.backend.tiny_vae())

    def generate(self, request: GenerationRequest, on_event: EventSink = lambda e: None,
                 should_stop: Callable[[], bool] = lambda: False) -> GenerationResult:
        """Run a request checked at the border (GenerationRequest, a preset from the book)."""
        self.cache.backend.check_available()
        job_id = self.history.start_job(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                        seed=request.seed, preset=request.preset)
        attempts: list[Attempt] = []
        return self._tracked(job_id, attempts,
                             lambda: self._run(job_id, request, on_event, should_stop, attempts))

    def finish(self, request: FinishRequest, on_event: EventSink = lambda e: None,
               should_stop: Callable[[], bool] = lambda: False) -> GenerationResult:
        """Decode the latents a finished job kept with the full VAE: a new clip and history entry,
        no denoising step. The source clip stays as it is."""
        entry, record = self.check_finish(request)
        self.cache.backend.check_available()
        # Read before a history row exists: a missing or damaged file is a clear error, no job.
        latents = self.outputs.load_latents(entry.video_path, entry.id)
        job_id = self.history.start_job(prompt=entry.prompt, negative_prompt=entry.negative_prompt,
                                        seed=entry.seed, preset=entry.preset_requested)
        attempts: list[Attempt] = []
        return self._tracked(job_id, attempts, lambda: self._finish(
            job_id, entry, record, latents, on_event, should_stop, attempts))

    def _tracked(self, job_id: int, attempts: list[Attempt],
                 work: Callable[[], GenerationResult]) -> GenerationResult:
        status, error = "failed", "unknown error"
        try:
            result = work()
            status = "done"
            return result
        except GenerationCancelled as exc:
            status, error = "cancelled", str(exc)
            raise
        except StudioError as exc:
            error = str(exc)
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("job %d failed", job_id)
            raise
        finally:
            if status != "done":
                self.history.fail_job(job_id, status=status, error=error,
                                      attempts=[asdict(a) for a in attempts])

    def _spec(self, request: GenerationRequest, rung: Rung) -> RunSpec:
        p = rung.preset
        memory = rung.memory.settings()
        if memory.get("release_text_encoder") and self.prompt_waiting():
            memory["release_text_encoder"] = False  # per call: the next prompt reuses it
        return RunSpec(preset=p.name, rung=rung.memory.name, prompt=request.prompt,
                       negative_prompt=request.negative_prompt, seed=request.seed, height=p.height,
                       width=p.width, frames=p.frames, steps=p.steps, shift=p.shift,
                       guidance=p.guidance, memory=memory,
                       preview=self._preview_kind(), draft=request.draft)

    def _preview_kind(self) -> PreviewKind | None:
        if self.preview == "off":
            return None
        if self.preview == "linear":
            return PreviewKind.LINEAR
        # "auto" and "tiny-vae": the tiny VAE where it is installed, else the linear factors.
        return PreviewKind.TINY_VAE if self.cache.backend.tiny_vae() else PreviewKind.LINEAR

    def _hooks(self, clock: "_PhaseClock", should_stop: Callable[[], bool], kept: "_Kept") -> RunHooks:
        def on_preview(preview: Preview) -> None:
            kept.previews.append((preview.kind, preview.cost_ms))
            clock.sink(ProgressEvent(Phase.DENOISING, step=preview.step, total=preview.total,
                                     preview=preview))

        def on_latents(latents: Any) -> None:
            kept.latents = latents

        return RunHooks(on_phase=clock.phase, on_step=clock.step, should_stop=should_stop,
                        on_preview=on_preview, on_latents=on_latents)

    def _run(self, job_id: int, request: GenerationRequest, on_event: EventSink,
             should_stop: Callable[[], bool], attempts: list[Attempt]) -> GenerationResult:
        gpu_name, available = self.available_gib()
        measured = self.history.measured_peaks(gpu_name)
        ram = self.ram_reader()
        ladder = self.planner.ladder(request.preset, measured)
        queue = self.planner.plan(request.preset, available, measured, ram_gib=ram)
        failures: list[tuple[Rung, bool]] = []  # (rung, ran out of host memory)
        loads = _Loads(self.cache)
        tried: set[tuple[str, str]] = set()
        free_bound = available  # the best knowledge of what this process can really use
        ram_bound = ram  # likewise for system RAM
        # DiT settings (per preset) whose latents could not be decoded even on the leanest VAE
        # settings: a later rung that differs only in VAE settings would fail the same way.
        undecodable: set[tuple[str, tuple]] = set()
        kept = _Kept()
        with gpu.VramSampler(self.monitor) as sampler:
            clock = _PhaseClock(on_event, sampler)
            hooks = self._hooks(clock, should_stop, kept)
            success: _Outcome | None = None
            chosen: Rung | None = None
            while queue:
                rung = queue.pop(0)
                if should_stop():
                    raise GenerationCancelled("Cancelled before the run started.")
                key = self._key(rung)
                reason = loads.reason(key, attempts, free_bound, rung)
                if attempts:
                    clock.phase(Phase.LOADING, f"Retrying on {rung.preset.name}/{rung.memory.name}"
                                + (f": {reason}" if reason and loads.switching(key) else ""))
                kept.latents = None  # only the latents of the attempt that succeeds are kept
                outcome = loads.track(key, reason, lambda: self._attempt(request, rung, key, hooks))
                tried.add((rung.preset.name, rung.memory.name))
                if outcome.failure is not None:
                    attempts.append(outcome.failure)
                    # It needs more GPU memory than was available: remembered as a lower bound, the next
                    # click with as much free starts below it (a host failure says nothing about that).
                    if outcome.failure.outcome != HOST_OOM and gpu_name and available is not None:
                        self._measure(gpu_name, rung, round(available + 0.05, 3), None)
                if outcome.failure is not None and outcome.latents is not None:
                    # The steps finished and only the decode ran out of memory: decode the kept
                    # latents again on the leanest VAE settings instead of re-running the steps.
                    lean = lean_decode(rung.memory.settings())
                    if lean != rung.memory.settings():
                        outcome = self._decode_only(request, rung, lean, hooks, outcome.latents,
                                                    f"{rung.memory.name}{LEAN_DECODE_SUFFIX}", key,
                                                    draft=request.draft)
                        if outcome.failure is not None:
                            attempts.append(outcome.failure)
                    if outcome.failure is not None:
                        undecodable.add((rung.preset.name, dit_settings(lean)))
                if outcome.failure is None:
                    success, chosen = outcome, rung
                    attempts.append(Attempt(rung.preset.name, outcome.label or rung.memory.name, "ok",
                                            peak_gib=_round(self.monitor.torch.peak_reserved_gib())))
                    break
                host = outcome.failure.outcome == HOST_OOM
                failures.append((rung, host))
                log.warning("%s on %s/%s (%s); re-planning", outcome.failure.outcome, rung.preset.name,
                            rung.memory.name, outcome.failure.phase)
                # What is really free now, after the failed run's memory went back: the device's
                # reading, and what a GPU OOM itself proved (its peak plus the allocation that
                # failed; a host failure's GPU peak bounds nothing); system RAM read again too.
                reading = self.available_gib()[1]
                learnt = None if host else gpu.oom_bound_gib(outcome.failure.peak_gib, outcome.failure.detail)
                free_bound = _min_known(free_bound, reading, learnt)
                ram_bound = _min_known(ram_bound, self.ram_reader())
                queue = replan(ladder, rung, tried, free_bound, self._key, loads.current,
                               loads.left, loads.reload_allowed, ram_gib=ram_bound,
                               skip=lambda r: self.planner.skip_after(r, failures) or (
                                   r.preset.name, dit_settings(r.memory.settings())) in undecodable)
                log.info("re-planned with %s GiB GPU memory and %s GiB RAM really free: %s",
                         _round(free_bound), _round(ram_bound), [r.label for r in queue] or "nothing left")
            if success is None or chosen is None:
                raise OutOfVRAM(self._exhausted_message(request.preset, attempts), tuple(attempts))
            peak = self.monitor.torch.peak_reserved_gib()
            clock.phase(Phase.ENCODING)
        host_memory = {"available_at_start_gib": _round(ram), "predicted_must_hold_gib": chosen.predicted_host_gib,
                       **sampler.timeline.host.as_record()}
        measured = success.label is None and not request.draft
        software, regression = (self._peak_rise(gpu_name, chosen, peak) if measured and gpu_name and peak is not None
                                else (None, None))
        result, timings = self._save(job_id, request, chosen, success, attempts, peak=peak, clock=clock,
                                     sampler=sampler, loads=loads, kept=kept, gpu_name=gpu_name,
                                     available=available, host_memory=host_memory,
                                     **({"peak_rose_since_software_changed": regression} if regression else {}))
        if measured:
            # The time estimate excludes the one-off weight load and counts only clean runs (a
            # draft decode is quicker and leaner than the clip's full decode). Without a GPU peak
            # (the fake backend) only the time is kept, under the backend's name.
            seconds = timings["total"] - timings.get(Phase.LOADING.value, 0.0)
            seconds = seconds if len(attempts) == 1 else None
            if gpu_name and peak is not None:
                self._measure(gpu_name, chosen, peak, seconds, software)
            else:
                self._measure(self._no_gpu_key(), chosen, None, seconds)
        return result

    def _save(self, job_id: int, request: GenerationRequest, rung: Rung, outcome: _Outcome,
              attempts: list[Attempt], *, peak: float | None, clock: _PhaseClock, sampler: gpu.VramSampler,
              loads: _Loads, kept: _Kept, gpu_name: str | None, available: float | None,
              host_memory: dict[str, Any] | None, **source: Any) -> tuple[GenerationResult, dict[str, Any]]:
        """Write the clip, its record (`source`: what a finish carries over from its source clip)
        and latents (those a decode decoded, else those the run handed over), and finish the job in
        the history. Returns the result and the timings."""
        latents = outcome.latents if outcome.latents is not None else kept.latents
        label = outcome.label or rung.memory.name
        # The sampler has stopped: the timeline covers the GPU work, and the record can carry it.
        record = job_record(
            job_id=job_id, request=request, preset=rung.preset, rung_label=label,
            memory=outcome.memory or rung.memory.settings(), attempts=attempts,
            frames_shape=outcome.frames.shape, model=self.cache.backend.describe(),
            weights_loaded=self.cache.loads > loads.before, load_seconds=self.cache.last_load_seconds,
            vram={"gpu": gpu_name, "available_at_start_gib": _round(available), "cap_gib": self.vram_cap_gib,
                  "predicted_peak_gib": rung.predicted_gib, **sampler.timeline.as_record()},
            host_memory=host_memory, argv=self.command_line,
            placement=self.placement() if self.placement is not None else None,
            tiny_vae=self.cache.backend.tiny_vae(), previews=kept.previews, loads=loads.records,
            timings=clock.snapshot(include_current=False))
        record.update(source)
        stem = self.outputs.new_stem(job_id, rung.preset.name, request.seed)
        video, sidecar = self.outputs.save(stem, outcome.frames, rung.preset.fps, record, latents=latents)
        # What the user is shown is exactly what was saved (the sidecar adds the mp4 encode time).
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        timings = clock.finish()
        self.history.finish_job(job_id, preset_used=rung.preset.name, rung_used=label,
                                video_path=video, record_path=sidecar, peak_gib=_round(peak),
                                seconds=timings["total"], attempts=[asdict(a) for a in attempts])
        return GenerationResult(video_path=video, record_path=sidecar, record=record,
                                attempts=tuple(attempts)), timings

    def _key(self, rung: Rung) -> LoadKey:
        return self.cache.backend.load_key(rung.memory.settings())

    # -- finish at full quality ----------------------------------------------------------------
    def check_finish(self, request: FinishRequest) -> tuple[HistoryEntry, dict[str, Any]]:
        """The clip to finish and its record. The border calls it to refuse a clip that cannot be
        finished before it takes a place in the lane; `finish` reads the same state again."""
        entry = self.history.get(request.job_id)
        if entry is None or entry.status != "done" or not entry.video_path:
            raise InvalidRequest(f"There is no finished clip #{request.job_id} to finish.")
        record = self.outputs.finishable_record(entry.id, entry.video_path, entry.record_path)
        if record.get("preset_used") not in self.presets:
            raise InvalidRequest(f"Clip #{entry.id} was made with the preset "
                                 f"{str(record.get('preset_used'))[:60]!r}, which no longer exists.")
        return entry, record

    def _finish(self, job_id: int, entry: HistoryEntry, source: dict[str, Any], latents: Any,
                on_event: EventSink, should_stop: Callable[[], bool],
                attempts: list[Attempt]) -> GenerationResult:
        request = GenerationRequest(prompt=entry.prompt, preset=source["preset_used"], seed=entry.seed,
                                    negative_prompt=entry.negative_prompt)
        gpu_name, available = self.available_gib()
        measured = self.history.measured_peaks(gpu_name)
        # The source clip's own rung and the VAE settings its decode really used first (a decode
        # OOM moves a clip to the leanest ones): the same settings decode the same latents into the
        # same frames (tiling changes the frames). The preset's plan otherwise; never a smaller
        # preset (the latents fix the size).
        own = [r for r in self.planner.ladder(request.preset, measured)
               if r.preset.name == request.preset]
        source_rung = str(source.get("rung_used") or "").split("+")[0]
        rung = next((r for r in own if r.memory.name == source_rung), None)
        # The clip's recorded VAE settings go with its own rung only.
        decodes_from = source if rung is not None else {}
        if rung is None:
            rung = next((r for r in self.planner.plan(request.preset, available, measured,
                                                      ram_gib=self.ram_reader())
                         if r.preset.name == request.preset), own[-1])
        decodes = _finish_decodes(rung, decodes_from)
        loads = _Loads(self.cache)
        kept = _Kept()
        with gpu.VramSampler(self.monitor) as sampler:
            clock = _PhaseClock(on_event, sampler)
            hooks = self._hooks(clock, should_stop, kept)
            # Any loaded model decodes: keep it instead of loading the weights for its key.
            key = self.cache.key if self.cache.is_loaded else self._key(rung)
            outcome = _Outcome(failure=None)
            for label, memory in decodes:
                if should_stop():
                    raise GenerationCancelled("Cancelled before the decode started.")
                if attempts:
                    clock.phase(Phase.LOADING, "Retrying the decode on the leanest VAE settings")
                outcome = loads.track(key, loads.reason(key, attempts, available, rung),
                                      lambda: self._decode_only(request, rung, memory, hooks, latents,
                                                                label, key, draft=False, reset_peak=True))
                if outcome.failure is None:
                    attempts.append(Attempt(rung.preset.name, label, "ok",
                                            peak_gib=_round(self.monitor.torch.peak_reserved_gib())))
                    break
                attempts.append(outcome.failure)
            else:
                raise OutOfVRAM(f"Out of GPU memory decoding clip #{entry.id} at full quality, even on "
                                f"the leanest VAE settings. Close other programs that use the GPU and "
                                f"try again; the draft clip is untouched.", tuple(attempts))
            peak = self.monitor.torch.peak_reserved_gib()
            clock.phase(Phase.ENCODING)
        result, _ = self._save(job_id, request, rung, outcome, attempts, peak=peak, clock=clock,
                               sampler=sampler, loads=loads, kept=kept, gpu_name=gpu_name, available=available,
                               host_memory=None, finished_from_job=entry.id,
                               **{k: source[k] for k in ("preset_requested", "prompt_truncated") if k in source})
        return result

    def _no_gpu_key(self) -> str:
        """What the times of runs without a GPU reading are kept under, in place of a GPU name."""
        return f"no GPU reading ({self.cache.backend.name} backend)"

    def _measure(self, gpu_name: str, rung: Rung, peak_gib: float | None, seconds: float | None,
                 software: str | None = None) -> None:
        # A measurement improves the next prediction; failing to store one must not fail the job.
        try:
            self.history.record_measurement(gpu_name, rung.preset.name, rung.memory.name, peak_gib, seconds,
                                            software)
        except Exception:  # noqa: BLE001
            log.warning("could not store the measured peak for %s/%s", rung.preset.name,
                        rung.memory.name, exc_info=True)

    def _peak_rise(self, gpu_name: str, rung: Rung, peak_gib: float) -> tuple[str | None, dict[str, Any] | None]:
        """The software this run measured with, and the peak's rise since the software changed."""
        # Telling of a memory regression must not fail (or lose) the clip it was found in.
        try:
            software = software_fingerprint(self.cache.backend.describe(), (self.monitor.facts() or {}).get("driver"))
            return software, self.history.peak_rise(gpu_name, rung.preset.name, rung.memory.name, peak_gib,
                                                    software, HEADROOM_GIB)
        except Exception:  # noqa: BLE001
            log.warning("could not compare the peak of %s with earlier runs", rung.label, exc_info=True)
            return None, None

    def _attempt(self, request: GenerationRequest, rung: Rung, key: LoadKey, hooks: RunHooks) -> _Outcome:
        spec = self._spec(request, rung)
        self.monitor.torch.reset_peak()

        def run(model: LoadedModel) -> _Outcome:
            if hooks.should_stop():
                raise GenerationCancelled("Cancelled while the model loaded; nothing ran.")
            return _Outcome(frames=model.generate(spec, hooks))

        return self._guarded(rung, rung.memory.name, key, hooks, run)

    def _decode_only(self, request: GenerationRequest, rung: Rung, memory: dict[str, Any],
                     hooks: RunHooks, latents: Any, label: str, key: LoadKey, draft: bool,
                     reset_peak: bool = False) -> _Outcome:
        spec = replace(self._spec(request, rung), memory=memory, draft=draft, preview=None)
        if reset_peak:
            self.monitor.torch.reset_peak()  # a finish is its own job; a retry's peak includes its steps
        return self._guarded(rung, label, key, hooks, lambda model: _Outcome(
            frames=model.decode(latents, spec, hooks), latents=latents, memory=memory, label=label),
            decode_only=True)

    def _guarded(self, rung: Rung, label: str, key: LoadKey, hooks: RunHooks,
                 work: Callable[[LoadedModel], _Outcome], decode_only: bool = False) -> _Outcome:
        """`work` on the model for `key`. Running out of memory becomes the failed attempt (the
        final latents kept when only the decode ran out); any other error is raised. `decode_only`:
        whatever ran out, it is recorded as the decode's GPU memory."""
        model: LoadedModel | None = None
        outcome = _Outcome()
        error: BaseException | None = None
        try:
            model = self.cache.get(key, hooks.on_phase)
            return work(model)
        except BaseException as exc:
            peak = _round(self.monitor.torch.peak_reserved_gib())
            if isinstance(exc, DecodeOutOfMemory):
                outcome.latents = exc.latents
                outcome.failure = Attempt(rung.preset.name, label, "out of memory", Phase.DECODING.value,
                                          exc.cause, peak)
            elif gpu.is_oom(exc):
                host = hostmem.is_host_oom(exc) and not decode_only
                phase = Phase.DECODING.value if decode_only else _current_phase(hooks) or (
                    Phase.LOADING if model is None else Phase.TEXT_ENCODING).value
                outcome.failure = Attempt(rung.preset.name, label, HOST_OOM if host else "out of memory",
                                          phase, _short(exc), peak)
            else:
                error = gpu.drop_frame_locals(exc)
        # Recovery runs here, outside the except block, once the failed run's frames are gone.
        self._recover(model)
        if error is not None:
            raise error
        return outcome

    def _recover(self, model: LoadedModel | None) -> None:
        if model is not None:
            try:
                model.recover()
            except Exception:  # noqa: BLE001 - a model that cannot recover is dropped instead
                log.exception("recover() failed; releasing the model")
                self.cache.release()
        gpu.free_gpu_memory()

    def _exhausted_message(self, preset: str, attempts: list[Attempt]) -> str:
        tried = ", ".join(f"{a.preset}/{a.rung}" for a in attempts)
        if any(a.outcome == HOST_OOM for a in attempts):
            return (f"Out of memory on every fallback for {preset} (tried {tried}); the system RAM ran "
                    f"out{' and so did GPU memory' if any(a.outcome == 'out of memory' for a in attempts) else ''}. "
                    f"Close large programs (browsers, other AI apps) to free RAM, close programs that "
                    f"use the GPU, or pick a smaller preset; the low-RAM settings need about "
                    f"{self._low_ram_need(preset)} of RAM.")
        return (f"Out of GPU memory on every fallback for {preset} (tried {tried}). Close other "
                f"programs that use the GPU (browsers with hardware acceleration, games), or pick "
                f"a smaller preset.")

    def _low_ram_need(self, preset: str) -> str:
        needs = [r.predicted_host_gib for r in self.planner.ladder(preset) if r.predicted_host_gib is not None]
        return f"{min(needs):.0f} GiB" if needs else "10 GiB"


def _ram_available_gib() -> float | None:
    return hostmem.available_for_process_gib(hostmem.read_system(), hostmem.read_process())


def _current_phase(hooks: RunHooks) -> str | None:
    clock = getattr(hooks.on_phase, "__self__", None)
    current = getattr(clock, "current", None)
    return current.value if isinstance(current, Phase) else None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
