"""The Gradio Blocks: components and event wiring only. Logic lives in ui/handlers.py."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import gradio as gr
import pandas as pd

from pipeline.types import MAX_SEED
from ui import handlers as h

log = logging.getLogger(__name__)

# Every event that can touch the GPU shares this queue with one worker.
GPU_QUEUE = "gpu"

# Passed to launch() by app.py (Gradio 6 takes CSS there, not in Blocks).
CSS = """
#vram-panel {font-variant-numeric: tabular-nums;}
#status {min-height: 2.5em;}
/* Previews are a few dozen latent pixels wide: scale them up to the box instead of a dot. */
#preview img {width: 100% !important; height: 100% !important; object-fit: contain;}
/* Gradio sizes gallery tiles as width / min(columns, items): one clip would fill the whole row.
   Fixed-size tiles in the clips' own landscape shape instead (these class names are Gradio's; if
   they change, the gallery just falls back to Gradio's layout). */
#history .grid-container {grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)) !important;
                          grid-auto-rows: auto !important; grid-template-rows: none !important;}
#history .thumbnail-item {aspect-ratio: 16 / 10; height: auto;}
#history .grid-wrap {min-height: 0 !important; max-height: 420px;}
"""


def _timeline_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["seconds", "GiB in use", "phase"])


def build_ui(ctx: h.UiContext, *, extra_tabs: Callable[[], None] | None = None) -> gr.Blocks:
    preset_choices = [(p.label, name) for name, p in ctx.presets.items()]
    default_preset = "480x832x49" if "480x832x49" in ctx.presets else preset_choices[0][1]

    # A local app: no usage reports to Gradio's servers.
    with gr.Blocks(title="Wan T2V Studio", analytics_enabled=False) as demo:
        job_id = gr.State(None)
        gr.Markdown("# Wan T2V Studio\nText to video with Wan2.1-T2V-14B (4-step distilled, INT8) "
                    "on your own GPU.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=3, max_lines=8, elem_id="prompt",
                                        placeholder="A man with short gray hair plays a red electric guitar.")
                    prompt_warning = gr.Markdown()
                    with gr.Row():
                        # Wide enough for the longest label, "720×1280 · 81 frames (5 s)".
                        preset = gr.Dropdown(preset_choices, value=default_preset, label="Preset",
                                             elem_id="preset", scale=3, min_width=260)
                        seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED,
                                         label="Seed", elem_id="seed", scale=2, min_width=140)
                        random_seed = gr.Checkbox(value=False, label="Random seed", scale=1,
                                                  min_width=150, elem_id="random-seed")
                    with gr.Accordion("Negative prompt", open=False):
                        negative = gr.Textbox(label="Negative prompt", lines=2)
                    draft = gr.Checkbox(value=False, label="Draft decode (tiny VAE: seconds; finish at "
                                        "full quality later from the history)", elem_id="draft",
                                        visible=bool(ctx.service.cache.backend.tiny_vae()))
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
                                          visible=True, max_lines=18)
            with gr.Row():
                with gr.Column(scale=2):
                    gr.Markdown("### GPU memory")
                    vram = gr.Markdown(h.panel_text(ctx), elem_id="vram-panel", label="VRAM")
                with gr.Column(scale=3):
                    plot = gr.LinePlot(_timeline_frame(h.last_timeline(ctx)), x="seconds",
                                       y="GiB in use", color="phase", title="VRAM during the last run",
                                       height=220, elem_id="vram-plot", label="VRAM timeline")
            gr.Markdown("### History\nClick a clip to play it; *Re-run selected* restores its settings.")
            gallery = gr.Gallery(h.gallery_items(ctx.history, ctx.service.outputs), columns=6,
                                 height="auto", label="History", show_label=False,
                                 elem_id="history", allow_preview=False, object_fit="cover")
            with gr.Row():
                rerun = gr.Button("Re-run selected (restore its settings)", elem_id="rerun",
                                  scale=1)
                finish = gr.Button("Finish at full quality", elem_id="finish", scale=1)
                # The selected clip's id as a (hidden) component, so the API can name the clip.
                finish_id = gr.Number(value=None, precision=0, visible=False, label="entry_id")
                selected = gr.Markdown("Nothing selected.", elem_id="selected")
            selected_id = gr.State(None)
        if extra_tabs is not None:
            extra_tabs()

        # The parameter names are the API's (gradio_client, /gradio_api/info).
        def on_generate(prompt_text, preset_name, seed_value, randomize_seed, negative_prompt,
                        draft_decode, request: gr.Request, progress=gr.Progress()):
            last_preview = None
            try:
                if ctx.waiting.take(request.session_hash):
                    raise h.GenerationCancelled("Withdrawn from the queue before it reached the GPU.")
                request = h.make_request(prompt=prompt_text, preset=preset_name, seed=seed_value,
                                         randomize_seed=randomize_seed,
                                         negative_prompt=negative_prompt, draft=draft_decode)
                for job, event in h.run_generation(ctx, request):
                    if event is None:
                        continue
                    progress(event.fraction, desc=h.describe_event(event))
                    update = {job_id: job.id, status: h.describe_event(event), seed: request.seed}
                    if event.preview is not None:
                        path = h.preview_file(ctx, job, event.preview)
                        if path is not None:
                            last_preview = update[preview] = path
                    yield update
                if job.error is not None:
                    raise job.error
            except Exception as exc:  # noqa: BLE001 - mapped in the one place, h.as_alert
                alert = h.as_alert(exc)
                # The alert box fades; the status line keeps saying what happened.
                yield {job_id: None, status: h.failure_status(exc, alert)}
                raise alert from None
            result = job.result
            h.warn_if_fell_back(result)
            yield {job_id: None, seed: request.seed, video: str(result.video_path),
                   status: h.result_summary(result.record) + (
                       "\n\n⚠️ " + result.fallback_summary() if result.fell_back else ""),
                   record_view: json.dumps(result.record, indent=2, default=str),
                   gallery: h.gallery_items(ctx.history, ctx.service.outputs),
                   plot: _timeline_frame(h.timeline_rows(result.record.get("vram"))),
                   preview: last_preview if last_preview is not None else gr.skip()}

        # preprocess=False: the raw values go to h.make_request, which checks every one with a
        # clear message. Gradio's own preprocessing would turn a number sent as the prompt into
        # text and answer a non-numeric seed with a bare TypeError.
        # Progress shows on the video only: the history and the plot stay usable during a run.
        def note_click(request: gr.Request) -> None:
            # Noted at once (no queue), so Cancel can withdraw the click while it waits.
            ctx.waiting.mark(request.session_hash)

        generate.click(note_click, None, None, queue=False, api_visibility="private").then(
            on_generate, [prompt, preset, seed, random_seed, negative, draft],
            [job_id, status, seed, video, record_view, gallery, plot, preview],
            concurrency_limit=1, concurrency_id=GPU_QUEUE, api_name="generate",
            preprocess=False, show_progress_on=[video])

        def on_cancel(current_job, request: gr.Request):
            if current_job is not None and ctx.jobs.cancel(int(current_job)):
                return "Cancelling at the next step boundary…"
            if ctx.waiting.withdraw(request.session_hash):
                return "Withdrawn: your request leaves the queue before it reaches the GPU."
            return "Nothing to cancel."

        cancel.click(on_cancel, [job_id], [status], queue=False, api_name="cancel")
        prompt.change(h.prompt_hint, [prompt], [prompt_warning], queue=False, api_visibility="private")

        def on_select(evt: gr.SelectData):
            # By the id in the caption, not the index: the gallery may be older than the history.
            entry = h.entry_for_gallery_selection(ctx.history, evt.value, evt.index)
            if entry is None:
                return None, "Nothing selected.", gr.skip(), gr.skip()
            text = f"#{entry.id}: “{entry.prompt[:80]}” · {entry.preset_used} ({entry.rung_used}) · seed {entry.seed}"
            record = h.load_record(entry.record_path) or {}
            return entry.id, text, entry.video_path, json.dumps(record, indent=2, default=str)

        gallery.select(on_select, None, [selected_id, selected, video, record_view], queue=False,
                       api_visibility="private")

        def on_rerun(entry_id):
            entry = ctx.history.get(int(entry_id)) if entry_id is not None else None
            if entry is None:
                raise h.as_alert(h.InvalidRequest("Select a video in the history first."))
            record = h.load_record(entry.record_path) or {}
            return (entry.prompt, entry.preset_requested, entry.seed, False, entry.negative_prompt,
                    json.dumps(record, indent=2, default=str))

        rerun.click(on_rerun, [selected_id], [prompt, preset, seed, random_seed, negative, record_view],
                    queue=False, api_name="restore_settings")

        def on_finish(entry_id, progress=gr.Progress()):
            # entry_id: the history id of a finished clip (the API's parameter name).
            # Decodes a kept clip's latents with the full VAE on the GPU lane: a new clip.
            try:
                request = h.finish_request(entry_id)
                for job, event in h.run_finish(ctx, request):
                    if event is None:
                        continue
                    progress(event.fraction, desc=h.describe_event(event))
                    yield {job_id: job.id, status: h.describe_event(event)}
                if job.error is not None:
                    raise job.error
            except Exception as exc:  # noqa: BLE001 - mapped in the one place, h.as_alert
                alert = h.as_alert(exc)
                yield {job_id: None, status: h.failure_status(exc, alert)}
                raise alert from None
            result = job.result
            yield {job_id: None, video: str(result.video_path),
                   status: h.result_summary(result.record),
                   record_view: json.dumps(result.record, indent=2, default=str),
                   gallery: h.gallery_items(ctx.history, ctx.service.outputs)}

        selected_id.change(lambda value: value, [selected_id], [finish_id], queue=False,
                           api_visibility="private")
        finish.click(on_finish, [finish_id], [job_id, status, video, record_view, gallery],
                     concurrency_limit=1, concurrency_id=GPU_QUEUE, api_name="finish",
                     show_progress_on=[video])

        # Initial values are fixed when the UI is built: a tab opened later (or reopened after a
        # job finished without it) reads the current history here.
        def on_load():
            return (h.gallery_items(ctx.history, ctx.service.outputs),
                    _timeline_frame(h.last_timeline(ctx)))

        demo.load(on_load, None, [gallery, plot], queue=False, api_name="history")

        timer = gr.Timer(1.0)
        timer.tick(lambda: (h.panel_text(ctx), h.forecast_text(ctx)), None, [vram, forecast],
                   queue=False, show_progress="hidden", api_visibility="private")
    return demo
