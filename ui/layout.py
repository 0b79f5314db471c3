"""The Gradio Blocks: components and event wiring only. Logic lives in ui/handlers.py."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

import gradio as gr
import pandas as pd

from pipeline.types import MAX_SEED
from ui import handlers as h

log = logging.getLogger(__name__)


# Passed to launch() by app.py (Gradio 6 takes CSS there, not in Blocks).
CSS = """
#vram-panel {font-variant-numeric: tabular-nums;}
#status {min-height: 2.5em;}
/* Previews are a few dozen latent pixels wide: scale them up to the box instead of a dot. */
#preview img {width: 100% !important; height: 100% !important; object-fit: contain;}
/* After a failed Generate the status line itself says what went wrong; Gradio would also lay its
   bare "Error" pill over it (its status tracker; if the names change, the pill just shows). */
#status [data-testid="status-tracker"]:has(> .error) {display: none !important;}
/* Gradio sizes gallery tiles as width / min(columns, items): one clip would fill the whole row.
   Fixed-size tiles in the clips' own landscape shape instead (these class names are Gradio's; if
   they change, the gallery just falls back to Gradio's layout). */
#history .grid-container {grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)) !important;
                          grid-auto-rows: auto !important; grid-template-rows: none !important;}
#history .thumbnail-item {aspect-ratio: 16 / 10; height: auto;}
#history .grid-wrap {min-height: 0 !important; max-height: 420px;}
/* The forecast table: headers and short cells whole (Gradio's tables break words anywhere), the
   long verdict wraps between words. */
#forecast th, #forecast td {word-break: normal !important; overflow-wrap: normal !important;}
#forecast th, #forecast td:last-child {white-space: nowrap;}
"""


def _timeline_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["seconds", "GiB in use", "phase"])


def build_ui(ctx: h.UiContext, *, extra_tabs: Callable[[], None] | None = None) -> gr.Blocks:
    preset_choices = [(p.label, name) for name, p in ctx.presets.items()]
    default_preset = "480x832x49" if "480x832x49" in ctx.presets else preset_choices[0][1]

    # A local app: no usage reports to Gradio's servers.
    with gr.Blocks(title="Wan T2V Studio", analytics_enabled=False) as demo:
        gr.Markdown("# Wan T2V Studio\nText to video with Wan2.1-T2V-14B (4-step distilled, INT8) "
                    "on your own GPU.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=3, max_lines=8, elem_id="prompt",
                                        placeholder="A man with short gray hair plays a red electric guitar.")
                    prompt_warning = gr.Markdown(h.prompt_hint(""), elem_id="prompt-hint")
                    with gr.Row():
                        # Wide enough for the longest label, "720×1280 · 81 frames (5 s)".
                        preset = gr.Dropdown(preset_choices, value=default_preset, label="Preset",
                                             elem_id="preset", scale=3, min_width=260)
                        seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED,
                                         label="Seed", elem_id="seed", scale=2, min_width=140)
                        random_seed = gr.Checkbox(value=False, label="Random seed", scale=1,
                                                  min_width=150, elem_id="random-seed")
                        count = gr.Number(value=1, precision=0, minimum=1, maximum=h.MAX_BATCH,
                                          label="Count", elem_id="count", scale=1, min_width=90,
                                          info=f"1–{h.MAX_BATCH} clips, consecutive seeds")
                    with gr.Accordion("Negative prompt", open=False):
                        negative = gr.Textbox(label="Negative prompt", lines=2)
                    draft = gr.Checkbox(value=False, label="Draft decode (tiny VAE: seconds; finish at "
                                        "full quality later from the history)", elem_id="draft",
                                        visible=ctx.service.tiny_vae_installed())
                    forecast = gr.Markdown(h.forecast_text(ctx), elem_id="forecast")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate",
                                             scale=3)
                        # Secondary: a red button as large as Generate reads as an alarm when idle.
                        cancel = gr.Button("Cancel", variant="secondary", elem_id="cancel", scale=1)
                    status = gr.Markdown(elem_id="status", label="Status")
                with gr.Column(scale=3):
                    # Updated after every denoising step: the model's current estimate of the clip.
                    preview = gr.Image(label="Preview", elem_id="preview", type="filepath",
                                       interactive=False, height=200, show_label=True)
                    video = gr.Video(label="Video", elem_id="video", autoplay=True)
                    record_view = gr.Code(label="Reproducibility record", language="json",
                                          visible=True, max_lines=18, elem_id="record-view")
            with gr.Row():
                with gr.Column(scale=2):
                    gr.Markdown("### GPU memory")
                    vram = gr.Markdown(h.panel_text(ctx), elem_id="vram-panel", label="VRAM")
                with gr.Column(scale=3):
                    plot = gr.LinePlot(_timeline_frame(h.last_timeline(ctx)), x="seconds",
                                       y="GiB in use", color="phase", title="VRAM during the last run",
                                       height=220, elem_id="vram-plot", label="VRAM timeline")
                    plot_note = gr.Markdown(h.timeline_note_text(ctx), elem_id="vram-plot-note")
            gr.Markdown("### History\nClick a clip to play it; *Restore settings* puts its settings "
                        "back in the form, *Run again* makes it again, *Finish at full quality* "
                        "decodes a draft's kept latents with the full VAE.")
            gallery = gr.Gallery(h.gallery_items(ctx.history, ctx.service.outputs), columns=6,
                                 height="auto", label="History", show_label=False,
                                 elem_id="history", allow_preview=False, object_fit="cover")
            with gr.Row():
                restore = gr.Button("Restore settings", elem_id="restore", scale=1)
                run_again = gr.Button("Run again", elem_id="run-again", scale=1)
                finish = gr.Button("Finish at full quality", elem_id="finish", scale=1)
                # The selected clip's id as a (hidden) component, so the API can name the clip.
                finish_id = gr.Number(value=None, precision=0, visible=False, label="entry_id")
                selected = gr.Markdown("Nothing selected.", elem_id="selected")
            selected_id = gr.State(None)
        if extra_tabs is not None:
            extra_tabs()

        generate_inputs = [prompt, preset, seed, random_seed, negative, count, draft]
        generate_outputs = [status, seed, video, record_view, gallery, plot, plot_note, preview]

        # The parameter names are the API's (gradio_client, /gradio_api/info). An async generator:
        # a click that waits in the lane holds no server thread, and gradio_client's Job.cancel()
        # (Gradio's /cancel route) reaches it as a task cancellation.
        async def on_generate(prompt_text, preset_name, seed_value, randomize_seed, negative_prompt,
                              count, draft_decode, request: gr.Request, progress=gr.Progress()):
            jobs = []
            try:
                batch = h.make_batch(ctx.presets, prompt=prompt_text, preset=preset_name,
                                     seed=seed_value, randomize_seed=randomize_seed,
                                     negative_prompt=negative_prompt, count=count, draft=draft_decode,
                                     draft_available=ctx.service.tiny_vae_installed())
                jobs = ctx.jobs.submit_all(batch, owner=request.session_hash)
                for number, job in enumerate(jobs, 1):
                    prefix = f"Clip {number} of {len(jobs)} (seed {job.request.seed}). " if len(jobs) > 1 else ""
                    last_preview = None
                    async for event in h.follow_job(ctx, job):
                        progress(h.progress_fraction(event), desc=h.describe_event(event))
                        update = {status: prefix + h.describe_event(event), seed: job.request.seed}
                        if event.preview is not None:
                            # Written off the event loop: an image encode per step.
                            path = await asyncio.to_thread(h.preview_file, ctx, job, event.preview)
                            if path is not None:
                                last_preview = update[preview] = path
                        yield update
                    if job.error is not None:
                        raise job.error
                    result = job.result
                    h.warn_if_fell_back(result)
                    rose = h.warn_if_peak_rose(result)
                    rows = h.timeline_rows(result.record.get("vram"))
                    # Off the event loop: the gallery reads SQLite and may decode a first frame.
                    items = await asyncio.to_thread(h.gallery_items, ctx.history, ctx.service.outputs)
                    yield {seed: job.request.seed, video: str(result.video_path),
                           status: prefix + h.result_summary(result.record) + (
                               "\n\n⚠️ " + h.fallback_summary(result) if result.fell_back else "") + (
                               "\n\n⚠️ " + rose if rose else ""),
                           record_view: json.dumps(result.record, indent=2, default=str),
                           gallery: items,
                           plot: _timeline_frame(rows), plot_note: h.timeline_note(True, rows),
                           # The API's answer is the last message: it carries the last preview too.
                           preview: last_preview if last_preview is not None else gr.skip()}
            except asyncio.CancelledError:
                # Gradio's /cancel (gradio_client's Job.cancel()): the batch's jobs go too. A closed
                # tab does not come here (its generator is closed, not cancelled): its jobs finish.
                for job in jobs:
                    ctx.jobs.cancel(job.id)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped in the one place, h.as_alert
                for job in jobs:  # the rest of a batch does not run after a failure
                    ctx.jobs.cancel(job.id)
                alert = h.as_alert(exc)
                # The alert box fades; the status line keeps saying what happened. The previous
                # video and its record stay: only the status line is an output here.
                yield {status: h.failure_status(exc, alert)}
                raise alert from None

        # preprocess=False: the raw values go to h.make_batch, which checks every one with a
        # clear message. Gradio's own preprocessing would turn a number sent as the prompt into
        # text and answer a non-numeric seed with a bare TypeError.
        # concurrency_limit=None: every click goes straight to the one GPU lane (JobQueue), which
        # owns the order, the positions, the cap and Cancel; a Gradio lane in front of it would
        # be a second queue that Cancel cannot see into.
        # Progress (and Gradio's error state) shows on the status line only: the video, its record,
        # the history and the plot stay usable during a run and stay in place after a failure.
        generate.click(on_generate, generate_inputs, generate_outputs, concurrency_limit=None,
                       api_name="generate", preprocess=False, show_progress_on=[status])

        def on_cancel(request: gr.Request):
            withdrawn, running = ctx.jobs.cancel_owner(request.session_hash)
            if not withdrawn and not running:
                return "Nothing to cancel."
            parts = []
            if running:
                parts.append("Cancelling at the next step boundary…")
            if withdrawn:
                parts.append(f"Withdrawn: {withdrawn} waiting job{'s' if withdrawn != 1 else ''} "
                             f"left the queue before reaching the GPU.")
            return " ".join(parts)

        cancel.click(on_cancel, None, [status], queue=False, api_name="cancel")
        prompt.change(h.prompt_hint, [prompt], [prompt_warning], queue=False, api_visibility="private",
                      show_progress="hidden")

        def on_select(evt: gr.SelectData):
            # By the id in the caption, not the index: the gallery may be older than the history.
            entry = h.entry_for_gallery_selection(ctx.history, evt.value, evt.index)
            if entry is None:
                return None, "Nothing selected.", gr.skip(), gr.skip()
            text = f"#{entry.id}: “{entry.prompt[:80]}” · {entry.preset_used} ({entry.rung_used}) · seed {entry.seed}"
            record = h.read_record(entry.record_path) or {}
            return entry.id, text, entry.video_path, json.dumps(record, indent=2, default=str)

        gallery.select(on_select, None, [selected_id, selected, video, record_view], queue=False,
                       api_visibility="private")

        def on_restore(entry_id):
            entry = ctx.history.get(int(entry_id)) if entry_id is not None else None
            if entry is None:
                raise h.as_alert(h.InvalidRequest("Select a video in the history first."))
            record = h.read_record(entry.record_path) or {}
            # The status line speaks of the restored entry, not of whatever ran last.
            # A draft is restored as a draft where the tiny VAE is still installed.
            draft_again = bool(record.get("draft")) and ctx.service.tiny_vae_installed()
            return (entry.prompt, entry.preset_requested, entry.seed, False, entry.negative_prompt, 1,
                    draft_again, json.dumps(record, indent=2, default=str), h.restored_status(entry))

        restore_outputs = [prompt, preset, seed, random_seed, negative, count, draft, record_view, status]
        restore.click(on_restore, [selected_id], restore_outputs, queue=False,
                      api_name="restore_settings")
        # Run again: the selected entry's own settings (its seed, not a random one), then Generate.
        run_again.click(on_restore, [selected_id], restore_outputs, queue=False,
                        api_visibility="private").success(
            on_generate, generate_inputs, generate_outputs, concurrency_limit=None,
            preprocess=False, show_progress_on=[status], api_visibility="private")

        # entry_id: the history id of a finished clip (the API's parameter name). Decodes a kept
        # clip's latents with the full VAE in the one GPU lane (Cancel reaches it): a new clip.
        async def on_finish(entry_id, request: gr.Request, progress=gr.Progress()):
            job = None
            try:
                finish_request = h.finish_request(ctx.service, entry_id)
                job = ctx.jobs.submit(finish_request, owner=request.session_hash)
                prefix = f"Finishing #{finish_request.job_id} at full quality. "
                async for event in h.follow_job(ctx, job):
                    progress(h.progress_fraction(event), desc=h.describe_event(event))
                    yield {status: prefix + h.describe_event(event)}
                if job.error is not None:
                    raise job.error
            except asyncio.CancelledError:
                if job is not None:
                    ctx.jobs.cancel(job.id)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped in the one place, h.as_alert
                alert = h.as_alert(exc)
                # As after Generate: the last video stays, the status line says what happened.
                yield {status: h.failure_status(exc, alert)}
                raise alert from None
            result = job.result
            rows = h.timeline_rows(result.record.get("vram"))
            items = await asyncio.to_thread(h.gallery_items, ctx.history, ctx.service.outputs)
            yield {video: str(result.video_path), status: h.result_summary(result.record),
                   record_view: json.dumps(result.record, indent=2, default=str), gallery: items,
                   plot: _timeline_frame(rows), plot_note: h.timeline_note(True, rows)}

        selected_id.change(lambda value: value, [selected_id], [finish_id], queue=False,
                           api_visibility="private")
        finish.click(on_finish, [finish_id], [status, video, record_view, gallery, plot, plot_note],
                     concurrency_limit=None, api_name="finish", show_progress_on=[status])

        # Initial values are fixed when the UI is built: a tab opened later (or reopened after a
        # job finished without it) reads the current history here.
        def on_load():
            return (h.gallery_items(ctx.history, ctx.service.outputs),
                    _timeline_frame(h.last_timeline(ctx)))

        demo.load(on_load, None, [gallery, plot], queue=False, api_name="history")
        demo.load(lambda: h.timeline_note_text(ctx), None, [plot_note], queue=False,
                  api_visibility="private")

        timer = gr.Timer(1.0)
        timer.tick(lambda: (h.panel_text(ctx), h.forecast_text(ctx)), None, [vram, forecast],
                   queue=False, show_progress="hidden", api_visibility="private")
    return demo
