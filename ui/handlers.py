"""Thin adapters between widgets and the pipeline, written as plain functions.

Widget values become a `GenerationRequest` here, by name; results become widget values here; and
`as_alert` is the one place where pipeline errors become Gradio alerts.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from pipeline.errors import (BackendUnavailable, GenerationCancelled, InvalidRequest, ModelLoadError,
                             NoGPUError, OutOfVRAM, OutputError, StudioError, WeightsError)
from pipeline.gpu import GpuMonitor
from pipeline.history import History, HistoryEntry
from pipeline.jobs import Job, JobQueue
from pipeline.outputs import OutputStore
from pipeline.service import VideoService
from pipeline.types import (MAX_SEED, TEXT_ENCODER_MAX_TOKENS, FinishRequest, GenerationRequest,
                            GenerationResult, Phase, Preview, PreviewKind, ProgressEvent,
                            prompt_token_estimate)
from presets import PresetBook
from ui.memory_panel import format_forecasts, format_memory, timeline_rows

log = logging.getLogger(__name__)


@dataclass
class UiContext:
    """Everything the UI needs, built by the composition root (app.py)."""

    service: VideoService
    jobs: JobQueue
    presets: PresetBook
    monitor: GpuMonitor
    history: History
    waiting: "WaitingClicks" = field(default_factory=lambda: WaitingClicks())


class WaitingClicks:
    """Generate clicks still waiting in Gradio's queue, per browser session.

    Such a click is not a job yet, so the lane cannot cancel it; Cancel withdraws it here instead,
    and the handler drops it when its turn comes, before anything reaches the GPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._withdrawn: dict[str, bool] = {}

    def mark(self, session: str) -> None:
        with self._lock:
            self._withdrawn[session] = False

    def withdraw(self, session: str) -> bool:
        with self._lock:
            if session not in self._withdrawn:
                return False
            self._withdrawn[session] = True
            return True

    def take(self, session: str) -> bool:
        """The click's turn has come: True when it was withdrawn meanwhile."""
        with self._lock:
            return self._withdrawn.pop(session, False)


# Titles for the alert box, in words rather than class names.
_TITLES: tuple[tuple[type[StudioError], str], ...] = (
    (InvalidRequest, "Check your input"),
    (NoGPUError, "No NVIDIA GPU"),
    (BackendUnavailable, "Generation is not available"),
    (WeightsError, "Model weights"),
    (ModelLoadError, "Loading the model failed"),
    (OutOfVRAM, "Out of GPU memory"),
    (OutputError, "Saving the video failed"),
)


def as_alert(exc: BaseException) -> Exception:
    """The one mapping from pipeline errors to what the user sees.

    Expected errors are logged as one line: a traceback in the terminal for a typo in a seed, or
    for a machine without a GPU, would read like a crash."""
    if isinstance(exc, GenerationCancelled):
        log.info("job cancelled: %s", exc)
        return gr.Error(str(exc) or "Cancelled.", title="Cancelled", print_exception=False)
    if isinstance(exc, StudioError):
        title = next((t for cls, t in _TITLES if isinstance(exc, cls)), "Generation failed")
        log.log(logging.INFO if isinstance(exc, InvalidRequest) else logging.WARNING,
                "%s: %s", title, exc)
        return gr.Error(str(exc), title=title, print_exception=False)
    log.error("unexpected error reached the UI", exc_info=exc)
    return gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}). The details are in the "
                    f"terminal log.", title="Unexpected error", print_exception=False)


def warn_if_fell_back(result: GenerationResult) -> None:
    """A run that stepped down the OOM ladder says so: what failed and what ran instead."""
    if result.fell_back:
        gr.Warning(result.fallback_summary(), duration=None, title="Ran a smaller setting")


def failure_status(exc: BaseException, alert: Exception) -> str:
    """The status line after a failed or cancelled job (the alert box fades, this stays)."""
    # Plain text marks: colour emoji are missing from many Linux fonts and show as boxes.
    if isinstance(exc, GenerationCancelled):
        return f"**Cancelled.** {getattr(alert, 'message', exc)}"
    return f"✖ **{getattr(alert, 'title', 'Error')}.** {getattr(alert, 'message', exc)}"


def parse_seed(seed: Any, randomize: bool) -> int:
    if randomize:
        return secrets.randbelow(MAX_SEED + 1)
    if seed is None or seed == "":
        raise InvalidRequest("Enter a seed, or tick 'Random seed'.")
    # bool is an int in Python; `true` as a seed is a caller's mistake, not seed 1.
    if isinstance(seed, bool) or not isinstance(seed, (int, float, str)):
        raise InvalidRequest(f"The seed must be a whole number, got {seed!r}.")
    try:
        value = float(seed)
    except (TypeError, ValueError):
        raise InvalidRequest(f"The seed must be a whole number, got {seed!r}.") from None
    if not value.is_integer():  # also NaN and infinity
        raise InvalidRequest(f"The seed must be a whole number, got {seed!r}.")
    if not 0 <= value <= MAX_SEED:
        raise InvalidRequest(f"The seed must be between 0 and {MAX_SEED}, got {seed!r}.")
    return int(value)


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"The {what} must be text, got {type(value).__name__} {value!r:.40}.")
    return value


def make_request(*, prompt: Any, preset: Any, seed: Any, randomize_seed: Any,
                 negative_prompt: Any = "", draft: Any = False) -> GenerationRequest:
    """Check raw widget or API values and build the request. Generate runs with Gradio's own
    preprocessing off, so this is the one place its inputs are checked, with our messages."""
    if randomize_seed is None:
        randomize_seed = False
    if not isinstance(randomize_seed, bool):
        raise InvalidRequest(f"'Random seed' must be true or false, got {randomize_seed!r:.40}.")
    if not isinstance(preset, str) or not preset:
        raise InvalidRequest("No preset was chosen." if preset in (None, "") else
                             f"The preset must be a preset name, got {preset!r:.40}.")
    # Whether the preset exists is the service's check (VideoService.validate), made on submit.
    return GenerationRequest(prompt=_text(prompt, "prompt"), preset=preset,
                             seed=parse_seed(seed, randomize_seed),
                             negative_prompt=_text(negative_prompt, "negative prompt"),
                             draft=False if draft is None else draft)


def prompt_hint(prompt: Any) -> str:
    if not isinstance(prompt, str):
        return ""
    tokens = prompt_token_estimate(prompt)
    if tokens > TEXT_ENCODER_MAX_TOKENS:
        return (f"⚠️ About {tokens} tokens: the text encoder reads only the first "
                f"{TEXT_ENCODER_MAX_TOKENS}; the rest is ignored.")
    return ""


def describe_event(event: ProgressEvent) -> str:
    if event.phase is Phase.DENOISING and event.total:
        seen = f" · {preview_label(event.preview)}" if event.preview is not None else ""
        return f"Denoising: step {event.step} / {event.total}{seen}"
    return event.message or event.phase.value.capitalize() + "…"


def _listed_entries(history: History, limit: int) -> list[HistoryEntry]:
    """Finished jobs whose video is still on disk, newest first: what the gallery shows."""
    return [e for e in history.recent(limit) if e.video_path and Path(e.video_path).exists()]


def gallery_items(history: History, outputs: OutputStore | None = None,
                  limit: int = 24) -> list[tuple[str, str]]:
    """(picture, caption) per finished clip, newest first. The picture is the clip's first frame when
    `outputs` can make one: a grid of stills loads at once, where two dozen videos would not."""
    items = []
    for entry in _listed_entries(history, limit):
        thumb = outputs.thumbnail(Path(entry.video_path)) if outputs is not None else None
        items.append((str(thumb or entry.video_path),
                      f"#{entry.id} · {entry.preset_used} · seed {entry.seed}{draft_mark(entry)}"))
    return items


def entry_for_gallery_index(history: History, index: int | None, limit: int = 24) -> HistoryEntry | None:
    entries = _listed_entries(history, limit)
    if index is None or not 0 <= index < len(entries):
        return None
    return entries[index]


_CAPTION_ID = re.compile(r"#(\d+) ·")


def entry_for_gallery_selection(history: History, value: Any, index: int | None) -> HistoryEntry | None:
    """The history entry a gallery click chose, by the '#<id> ·' its caption starts with."""
    caption = value.get("caption") if isinstance(value, dict) else None
    match = _CAPTION_ID.match(caption or "")
    if match:
        return history.get(int(match.group(1)))
    return entry_for_gallery_index(history, index)


def load_record(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def result_summary(record: dict[str, Any]) -> str:
    """One paragraph on a finished run; says so when the prompt was cut by the text encoder."""
    timings = record.get("timings_s", {})
    vram = record.get("vram", {})
    peak = vram.get("peak_torch_reserved_gib") or vram.get("peak_used_gib")
    parts = [f"Done: **{record['preset_used']}** on '{record['rung_used']}' settings, "
             f"seed {record['seed']}, {timings.get('total', 0):.1f} s"]
    if peak is not None:
        parts.append(f"peak {peak:.2f} GiB")
    parts.append("weights loaded for this job" if record.get("weights_loaded_this_job")
                 else "model was already resident (no reload)")
    text = ", ".join(parts) + "."
    notes = run_notes(record)
    if notes:
        text += "\n\n" + notes
    if record.get("prompt_truncated"):
        text += (f"\n\n⚠️ The prompt is longer than the text encoder's {TEXT_ENCODER_MAX_TOKENS} "
                 f"tokens: only its beginning was used.")
    return text


def run_generation(ctx: UiContext, request: GenerationRequest) -> Iterator[tuple[Job, ProgressEvent | None]]:
    """Submit to the GPU lane and follow the job; the caller turns events into widget updates."""
    job = ctx.jobs.submit(request)
    # The lane's own count: jobs of closed tabs still run, and Gradio's queue does not see them.
    ahead = ctx.jobs.ahead_of(job)
    yield job, ProgressEvent(Phase.QUEUED, message=(
        f"Queued: {ahead} job{'s' if ahead != 1 else ''} ahead of yours on the GPU…" if ahead
        else "Starting…"))
    for event in job.follow():
        yield job, event


def panel_text(ctx: UiContext) -> str:
    last = ctx.history.recent(1)
    return format_memory(ctx.monitor.read(), last[0].peak_gib if last else None)


def forecast_text(ctx: UiContext) -> str:
    labels = {name: p.label for name, p in ctx.presets.items()}
    return format_forecasts(ctx.service.forecasts(), labels)


def last_timeline(ctx: UiContext) -> list[dict[str, Any]]:
    last = ctx.history.recent(1)
    record = load_record(last[0].record_path) if last else None
    return timeline_rows(record.get("vram") if record else None)


# -- previews, draft decode, finish at full quality ----------------------------------------------

_PREVIEW_WORDS = {PreviewKind.LINEAR: "quick colour preview", PreviewKind.TINY_VAE: "tiny-VAE preview"}


def preview_label(preview: Preview) -> str:
    return f"preview after step {preview.step} of {preview.total} ({_PREVIEW_WORDS[preview.kind]})"


def preview_file(ctx: UiContext, job: Job, preview: Preview) -> str | None:
    """The preview as a small animated picture in the outputs' hidden previews folder (written
    here, on the UI side, so the GPU lane never waits for an image encoder)."""
    path = ctx.service.outputs.write_preview(f"job{job.id}-step{preview.step}", preview.frames, preview.fps)
    return str(path) if path is not None else None


def draft_mark(entry: HistoryEntry) -> str:
    """' · draft' for a clip decoded with the tiny VAE (the gallery caption says so)."""
    record = load_record(entry.record_path) or {}
    return " · draft" if record.get("draft") else ""


def run_notes(record: dict[str, Any]) -> str:
    """What the result summary adds about draft decodes, finishes and weight reloads."""
    notes = []
    if record.get("draft"):
        notes.append("**Draft** (tiny VAE): select it in the history and click *Finish at full "
                     "quality* to decode the same latents with the full VAE — no step runs again.")
    if record.get("finished_from_job"):
        notes.append(f"Decoded at full quality from the kept latents of #{record['finished_from_job']} "
                     f"(no denoising step ran).")
    for load in record.get("loads") or []:
        reason = str(load.get("reason", ""))
        if reason.startswith("reloading"):  # a switch of build within this click
            notes.append(f"The weights were loaded again: {reason}.")
    return "\n\n".join(notes)


def finish_request(entry_id: Any) -> FinishRequest:
    if entry_id is None:
        raise InvalidRequest("Select a clip in the history first.")
    if isinstance(entry_id, bool) or not isinstance(entry_id, (int, float, str)):
        raise InvalidRequest(f"Choose a clip in the history to finish, got {entry_id!r:.40}.")
    try:
        value = int(entry_id)
    except ValueError:
        raise InvalidRequest(f"Choose a clip in the history to finish, got {entry_id!r:.40}.") from None
    return FinishRequest(job_id=value)


def run_finish(ctx: UiContext, request: FinishRequest) -> Iterator[tuple[Job, ProgressEvent | None]]:
    """Submit a finish (decode kept latents with the full VAE) to the GPU lane and follow it."""
    job = ctx.jobs.submit(request)
    ahead = ctx.jobs.ahead_of(job)
    yield job, ProgressEvent(Phase.QUEUED, message=(
        f"Queued: {ahead} job{'s' if ahead != 1 else ''} ahead of yours on the GPU…" if ahead
        else f"Finishing #{request.job_id} at full quality…"))
    for event in job.follow():
        yield job, event
