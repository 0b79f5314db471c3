"""Thin adapters between widgets and the pipeline, written as plain functions.

Widget values become a `GenerationRequest` here, by name; results become widget values here; and
`as_alert` is the one place where pipeline errors become Gradio alerts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr

from pipeline.errors import (AppStopped, BackendUnavailable, GenerationCancelled, InvalidRequest, LaneFull,
                             LatentsError, ModelLoadError, NoGPUError, OutOfVRAM, OutputError, OutputsInUse,
                             StudioError, WeightsError, WorkerDied)
from pipeline.machine.gpu import GpuMonitor
from pipeline.store.history import History, HistoryEntry
from pipeline.jobs import Job, JobQueue
from pipeline.store.outputs import OutputStore, read_record
from pipeline.service import VideoService
from pipeline.types import (LEAN_DECODE_SUFFIX, MAX_PROMPT_CHARS, MAX_SEED, TEXT_ENCODER_MAX_TOKENS,
                            FinishRequest, GenerationRequest, GenerationResult, Phase, Preview,
                            PreviewKind, ProgressEvent, prompt_token_estimate)
from presets import PresetBook
from ui.memory_panel import format_forecasts, format_memory, timeline_note, timeline_rows

log = logging.getLogger(__name__)


@dataclass
class UiContext:
    """Everything the UI needs, built by the composition root (app.py)."""

    service: VideoService
    jobs: JobQueue
    presets: PresetBook
    monitor: GpuMonitor
    history: History
    # Several GPUs (--gpus): one service per worker group (a GPU lane, or one sequence-parallel
    # group); empty on the one-GPU path.
    lanes: list[VideoService] = field(default_factory=list)


# Titles for the alert box, in words rather than class names: each says which kind of trouble it
# is (input, GPU, memory, disk, ...), so no alert is a bare "Error".
_TITLES: tuple[tuple[type[StudioError], str], ...] = (
    (InvalidRequest, "Check your input"),
    (NoGPUError, "No NVIDIA GPU"),
    (BackendUnavailable, "Generation is not available"),
    (WeightsError, "Model weights"),
    (ModelLoadError, "Loading the model failed"),
    (OutOfVRAM, "Out of GPU memory"),
    (OutputError, "Saving the video failed"),
    (LaneFull, "Queue full"),
    (OutputsInUse, "Outputs folder in use"),
    (LatentsError, "The clip's kept latents"),
    (AppStopped, "The app was stopped"),
    (WorkerDied, "A GPU worker stopped"),
)


def alert_title(exc: StudioError) -> str:
    return next((t for cls, t in _TITLES if isinstance(exc, cls)), "Generation failed")


def _alert(title: str, body: str) -> Exception:
    # Gradio's toast heads every raised error "Error" and leaves `title` out (6.31), so the title
    # also leads the message: the toast says which kind of trouble it is. API clients get both.
    return gr.Error(f"{title}: {body}", title=title, print_exception=False)


def as_alert(exc: BaseException) -> Exception:
    """The one mapping from pipeline errors to what the user sees.

    Expected errors are logged as one line: a traceback in the terminal for a typo in a seed, or
    for a machine without a GPU, would read like a crash."""
    if isinstance(exc, GenerationCancelled):
        log.info("job cancelled: %s", exc)
        return _alert("Cancelled", str(exc) or "Cancelled.")
    if isinstance(exc, StudioError):
        title = alert_title(exc)
        log.log(logging.INFO if isinstance(exc, InvalidRequest) else logging.WARNING,
                "%s: %s", title, exc)
        return _alert(title, str(exc))
    log.error("unexpected error reached the UI", exc_info=exc)
    return _alert("Unexpected error", f"{type(exc).__name__}: {exc}. The details are in the "
                                      f"terminal log.")


def warn_if_fell_back(result: GenerationResult) -> None:
    """A run that stepped down the OOM ladder says so: what failed and what ran instead."""
    if result.fell_back:
        gr.Warning(fallback_summary(result), duration=None, title="Ran a smaller setting")


def peak_rise_summary(record: dict[str, Any]) -> str | None:
    """What the first run after a software update says when its GPU memory peak rose beyond the
    planner's headroom (the record's `peak_rose_since_software_changed`), or None."""
    rise = record.get("peak_rose_since_software_changed")
    if not rise:
        return None
    return (f"{rise['preset']} · {rise['rung']} peaked at {rise['after_gib']:.1f} GiB of GPU memory, "
            f"{rise['after_gib'] - rise['before_gib']:.1f} GiB more than before the software changed "
            f"(before: {rise['before_software']}; now: {rise['after_software']}). The next runs plan with the "
            f"new peak; if a larger preset now runs out of memory, this update is the likely cause.")


def warn_if_peak_rose(result: GenerationResult) -> str | None:
    """A memory regression after an update is said once, on the run that found it; returns what
    was said (for the status line), or None."""
    text = peak_rise_summary(result.record)
    if text is not None:
        gr.Warning(text, duration=None, title="GPU memory peak rose after an update")
    return text


def failure_status(exc: BaseException, alert: Exception) -> str:
    """The status line after a failed or cancelled job (the alert box fades, this stays)."""
    title = getattr(alert, "title", "Generation failed")
    body = str(getattr(alert, "message", exc)).removeprefix(f"{title}: ")
    # Plain text marks: colour emoji are missing from many Linux fonts and show as boxes.
    if isinstance(exc, GenerationCancelled):
        return f"**Cancelled.** {body}"
    return f"✖ **{title}.** {body}"


def parse_seed(seed: Any, randomize: bool) -> int:
    """A widget or API seed value as an int; its range is GenerationRequest's check."""
    if randomize:
        return secrets.randbelow(MAX_SEED + 1)
    if seed is None or seed == "":
        raise InvalidRequest("Enter a seed, or tick 'Random seed'.")
    return _whole_number(seed, f"The seed must be a whole number, got {seed!r:.40}.")


def make_request(presets: PresetBook, *, prompt: Any, preset: Any, seed: Any, randomize_seed: Any,
                 negative_prompt: Any = "", draft: Any = False,
                 draft_available: bool = False) -> GenerationRequest:
    """The border: raw widget or API values become a checked GenerationRequest for a preset in the
    book. Generate runs with Gradio's own preprocessing off, so this is where its inputs are turned
    into Python values; GenerationRequest checks each field, once. `draft_available`: whether the
    tiny VAE that 'Draft decode' needs is installed."""
    if randomize_seed is None:
        randomize_seed = False
    if not isinstance(randomize_seed, bool):
        raise InvalidRequest(f"'Random seed' must be true or false, got {randomize_seed!r:.40}.")
    request = GenerationRequest(prompt="" if prompt is None else prompt, preset=preset,
                                seed=parse_seed(seed, randomize_seed),
                                negative_prompt="" if negative_prompt is None else negative_prompt,
                                draft=False if draft is None else draft)
    if request.preset not in presets:
        raise InvalidRequest(f"Unknown preset {request.preset[:60]!r}; choose one of "
                             f"{', '.join(presets)}.")
    if request.draft and not draft_available:
        raise InvalidRequest("'Draft decode' needs the tiny VAE (taew2_1.pth), which is not "
                             "installed. Download it from the System tab, or untick 'Draft decode'.")
    return request


MAX_BATCH = 16


def _whole_number(value: Any, error: str) -> int:
    """A widget or API value that must be a whole number (a number, or text of one), else
    InvalidRequest(error). bool is refused: `true` is a caller's mistake, not 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(error)
    if isinstance(value, int):
        return value  # exactly, even past float's 2**53
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(error) from None
    if not number.is_integer():  # also NaN and infinity
        raise InvalidRequest(error)
    return int(number)


def parse_count(count: Any) -> int:
    """How many clips one click makes (1 when the field is left empty)."""
    if count is None or count == "":
        return 1
    error = f"Count must be a whole number from 1 to {MAX_BATCH}, got {count!r:.40}."
    value = _whole_number(count, error)
    if not 1 <= value <= MAX_BATCH:
        raise InvalidRequest(error)
    return value


def make_batch(presets: PresetBook, *, count: Any = 1, **values: Any) -> list[GenerationRequest]:
    """`count` requests for one click: the same settings with consecutive seeds (wrapping past the
    largest seed), so each clip can be made again on its own from its record."""
    first = make_request(presets, **values)
    return [first] + [replace(first, seed=(first.seed + i) % (MAX_SEED + 1))
                      for i in range(1, parse_count(count))]


def prompt_hint(prompt: Any) -> str:
    """The live line under the prompt: characters against the limit Generate enforces, and a
    warning when the text encoder will cut the prompt."""
    if not isinstance(prompt, str) or not prompt:
        return f"0 / {MAX_PROMPT_CHARS:,} characters"
    chars = f"{len(prompt):,} / {MAX_PROMPT_CHARS:,} characters"
    if len(prompt) > MAX_PROMPT_CHARS:
        return (f"⚠️ **{chars}**: Generate refuses prompts over {MAX_PROMPT_CHARS:,} characters; "
                f"shorten it by {len(prompt) - MAX_PROMPT_CHARS:,}.")
    tokens = prompt_token_estimate(prompt)
    if tokens > TEXT_ENCODER_MAX_TOKENS:
        return (f"⚠️ {chars}, about {tokens} tokens: the text encoder reads only the first "
                f"{TEXT_ENCODER_MAX_TOKENS}; the rest is ignored.")
    return chars


def progress_fraction(event: ProgressEvent) -> float:
    """Overall progress 0..1, weighting the phases roughly by their share of a 480p run."""
    weights = {Phase.QUEUED: 0.0, Phase.LOADING: 0.0, Phase.TEXT_ENCODING: 0.02,
               Phase.DENOISING: 0.05, Phase.DECODING: 0.85, Phase.ENCODING: 0.95,
               Phase.DONE: 1.0}
    base = weights[event.phase]
    if event.phase is Phase.DENOISING and event.total:
        return base + 0.78 * event.step / event.total
    return base


def fallback_summary(result: GenerationResult) -> str:
    """One sentence: what failed and what ran instead; empty when nothing failed."""
    failed = [a for a in result.attempts if a.outcome != "ok"]
    if not failed:
        return ""
    tried = "; ".join(a.shortfall() for a in failed)
    ok = result.attempts[-1]
    if ok.rung.endswith(LEAN_DECODE_SUFFIX) and ok.preset == failed[-1].preset:
        return (f"{tried}. The denoising steps had finished, so only the decode ran again, "
                f"on the leanest VAE settings (tiled, offloaded): same clip, no steps re-run.")
    return f"{tried}. Ran {ok.preset} on the '{ok.rung}' memory settings instead."


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


def queued_message(ahead: int) -> str:
    return (f"Queued: {ahead} job{'s' if ahead != 1 else ''} ahead of yours on the GPU…" if ahead
            else "Starting…")


async def follow_job(ctx: UiContext, job: Job, poll_s: float = 0.1):
    """Progress of one job in the lane, as an async iterator: it holds no thread while the job waits
    (a hundred waiting clicks must not use up the server's worker threads). While the job waits,
    its place in the queue is reported each time it changes."""
    last_ahead = None
    while True:
        events, ended = job.pending_events()
        for event in events:
            yield event
        if ended:
            return
        if not job.started:
            # The lane's own count: jobs of closed tabs still run and count here.
            ahead = ctx.jobs.ahead_of(job)
            if ahead != last_ahead:
                last_ahead = ahead
                yield ProgressEvent(Phase.QUEUED, message=queued_message(ahead))
        await asyncio.sleep(poll_s)


def restored_status(entry: HistoryEntry) -> str:
    return (f"Settings of #{entry.id} restored ({entry.preset_requested}, seed {entry.seed}). "
            f"Press **Generate** to run them again.")


def panel_text(ctx: UiContext) -> str:
    last = ctx.history.recent(1)
    peak = last[0].peak_gib if last else None
    backend = ctx.service.cache.backend.name
    if not ctx.lanes:
        return format_memory(ctx.monitor.read(), peak, backend=backend)
    # One panel per GPU, each read by its own index (a lane's or a sequence-parallel group's card).
    panels = []
    for lane in ctx.lanes:
        per_gpu = getattr(lane.monitor, "per_gpu", None)
        for index, snapshot in (per_gpu() if per_gpu is not None else [(None, lane.monitor.read())]):
            panels.append(f"**GPU {index}** · " + format_memory(snapshot, None, backend=backend))
    return "\n\n".join(panels) + ("" if peak is None else f"\n\nPeak of last run: **{peak:.2f} GiB** (per GPU)")


def forecast_text(ctx: UiContext) -> str:
    labels = {name: p.label for name, p in ctx.presets.items()}
    if len(ctx.lanes) <= 1:
        text = format_forecasts(ctx.service.forecasts(), labels)
        placement = ctx.service.placement() if ctx.service.placement is not None else None
        if placement and placement.get("mode") == "seq":
            gpus = ",".join(map(str, placement["gpu_indices"]))
            text = (f"Each clip runs over GPUs {gpus} (sequence parallel); the figures are per GPU, "
                    f"for the card with the least memory free.\n\n{text}")
        return text
    # Lanes: each GPU's own forecast; a job goes to a free GPU whose memory fits it.
    parts = []
    for lane in ctx.lanes:
        placement = lane.placement() if lane.placement is not None else {}
        parts.append(f"**GPU {','.join(map(str, placement.get('gpu_indices', [])))}**\n\n"
                     + format_forecasts(lane.forecasts(), labels))
    return "A job runs on a free GPU whose memory fits it.\n\n" + "\n\n".join(parts)


def timeline_note_text(ctx: UiContext) -> str:
    return timeline_note(bool(ctx.history.recent(1)), last_timeline(ctx))


def last_timeline(ctx: UiContext) -> list[dict[str, Any]]:
    last = ctx.history.recent(1)
    record = read_record(last[0].record_path) if last else None
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
    record = read_record(entry.record_path) or {}
    return " · draft" if record.get("draft") else ""


def run_notes(record: dict[str, Any]) -> str:
    """What the result summary adds about draft decodes, finishes and weight reloads."""
    notes = []
    gpus = record.get("gpus")
    if isinstance(gpus, dict) and gpus.get("gpu_indices"):
        where = ",".join(map(str, gpus["gpu_indices"]))
        notes.append(f"Ran over GPUs {where} (sequence parallel)." if gpus.get("mode") == "seq"
                     else f"Ran on GPU {where}.")
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


def finish_request(service: VideoService, entry_id: Any) -> FinishRequest:
    """The border for *Finish at full quality*: the history id of a clip whose latents were kept,
    checked once here (it exists, is finished, its record, preset and latents are there)."""
    if entry_id is None or entry_id == "":
        raise InvalidRequest("Select a clip in the history first.")
    request = FinishRequest(job_id=_whole_number(
        entry_id, f"Choose a clip in the history to finish, got {entry_id!r:.40}."))
    service.check_finish(request)
    return request

