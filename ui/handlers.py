"""Thin adapters between widgets and the pipeline, written as plain functions.

Widget values become a `GenerationRequest` here, by name; results become widget values here; and
`as_alert` is the one place where pipeline errors become Gradio alerts.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from pipeline.errors import GenerationCancelled, InvalidRequest, StudioError
from pipeline.gpu import GpuMonitor
from pipeline.history import History, HistoryEntry
from pipeline.jobs import Job, JobQueue
from pipeline.service import VideoService
from pipeline.types import (MAX_SEED, TEXT_ENCODER_MAX_TOKENS, GenerationRequest, Phase,
                            ProgressEvent, prompt_token_estimate)
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


def as_alert(exc: BaseException) -> Exception:
    """The one mapping from pipeline errors to what the user sees."""
    if isinstance(exc, GenerationCancelled):
        return gr.Error(f"Cancelled. {exc}", title="Cancelled")
    if isinstance(exc, InvalidRequest):
        return gr.Error(str(exc), title="Check your input")
    if isinstance(exc, StudioError):
        return gr.Error(str(exc), title=type(exc).__name__)
    log.error("unexpected error reached the UI", exc_info=exc)
    return gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}). The details are in the "
                    f"terminal log.", title="Unexpected error")


def parse_seed(seed: Any, randomize: bool) -> int:
    if randomize:
        return secrets.randbelow(MAX_SEED + 1)
    if seed is None or seed == "":
        raise InvalidRequest("Enter a seed, or tick 'Random seed'.")
    try:
        value = float(seed)
    except (TypeError, ValueError):
        raise InvalidRequest(f"The seed must be a whole number, got {seed!r}.") from None
    if not value.is_integer():
        raise InvalidRequest(f"The seed must be a whole number, got {seed!r}.")
    return int(value)


def make_request(*, prompt: Any, preset: Any, seed: Any, randomize_seed: bool,
                 negative_prompt: Any = "") -> GenerationRequest:
    return GenerationRequest(prompt=prompt if isinstance(prompt, str) else "",
                             preset=preset if isinstance(preset, str) else "",
                             seed=parse_seed(seed, bool(randomize_seed)),
                             negative_prompt=negative_prompt if isinstance(negative_prompt, str) else "")


def prompt_hint(prompt: str) -> str:
    tokens = prompt_token_estimate(prompt or "")
    if tokens > TEXT_ENCODER_MAX_TOKENS:
        return (f"⚠️ About {tokens} tokens: the text encoder reads only the first "
                f"{TEXT_ENCODER_MAX_TOKENS}; the rest is ignored.")
    return ""


def describe_event(event: ProgressEvent) -> str:
    if event.phase is Phase.DENOISING and event.total:
        return f"Denoising: step {event.step} / {event.total}"
    return event.message or event.phase.value.capitalize() + "…"


def gallery_items(history: History, limit: int = 24) -> list[tuple[str, str]]:
    items = []
    for entry in history.recent(limit):
        if entry.video_path and Path(entry.video_path).exists():
            items.append((entry.video_path, f"#{entry.id} · {entry.preset_used} · seed {entry.seed}"))
    return items


def entry_for_gallery_index(history: History, index: int | None, limit: int = 24) -> HistoryEntry | None:
    entries = [e for e in history.recent(limit) if e.video_path and Path(e.video_path).exists()]
    if index is None or not 0 <= index < len(entries):
        return None
    return entries[index]


def load_record(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def result_summary(record: dict[str, Any]) -> str:
    timings = record.get("timings_s", {})
    vram = record.get("vram", {})
    peak = vram.get("peak_torch_reserved_gib") or vram.get("peak_used_gib")
    parts = [f"Done: **{record['preset_used']}** on '{record['rung_used']}' settings, "
             f"seed {record['seed']}, {timings.get('total', 0):.1f} s"]
    if peak is not None:
        parts.append(f"peak {peak:.2f} GiB")
    parts.append("weights loaded for this job" if record.get("weights_loaded_this_job")
                 else "model was already resident (no reload)")
    return ", ".join(parts) + "."


def run_generation(ctx: UiContext, request: GenerationRequest) -> Iterator[tuple[Job, ProgressEvent | None]]:
    """Submit to the GPU lane and follow the job; the caller turns events into widget updates."""
    job = ctx.jobs.submit(request)
    yield job, ProgressEvent(Phase.QUEUED, message=f"Queued (job #{job.id})")
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
