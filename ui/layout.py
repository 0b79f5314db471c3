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

_CSS = """
#vram-panel {font-variant-numeric: tabular-nums;}
#status {min-height: 2.5em;}
"""


def _timeline_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["seconds", "GiB in use", "phase"])


def build_ui(ctx: h.UiContext, *, extra_tabs: Callable[[], None] | None = None) -> gr.Blocks:
    preset_choices = [(p.label, name) for name, p in ctx.presets.items()]
    default_preset = "480x832x49" if "480x832x49" in ctx.presets else preset_choices[0][1]

    with gr.Blocks(title="Wan T2V Studio") as demo:
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
                        preset = gr.Dropdown(preset_choices, value=default_preset, label="Preset",
                                             elem_id="preset")
                        seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED,
                                         label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed")
                    with gr.Accordion("Negative prompt", open=False):
                        negative = gr.Textbox(label="Negative prompt", lines=2)
                    forecast = gr.Markdown(h.forecast_text(ctx), elem_id="forecast")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    status = gr.Markdown(elem_id="status")
                with gr.Column(scale=3):
                    video = gr.Video(label="Video", elem_id="video", autoplay=True)
                    record_view = gr.Code(label="Reproducibility record", language="json",
                                          visible=True, max_lines=18)
            with gr.Row():
                with gr.Column(scale=2):
                    vram = gr.Markdown(h.panel_text(ctx), elem_id="vram-panel", label="VRAM")
                with gr.Column(scale=3):
                    plot = gr.LinePlot(_timeline_frame(h.last_timeline(ctx)), x="seconds",
                                       y="GiB in use", color="phase", title="VRAM during the last run",
                                       height=220, elem_id="vram-plot")
            gr.Markdown("### History")
            gallery = gr.Gallery(h.gallery_items(ctx.history), columns=4, height=300,
                                 label="History", elem_id="history", allow_preview=True)
            with gr.Row():
                rerun = gr.Button("Re-run selected (restore its settings)", elem_id="rerun")
                selected = gr.Markdown()
            selected_index = gr.State(None)
        if extra_tabs is not None:
            extra_tabs()

        def on_generate(prompt_v, preset_v, seed_v, random_v, negative_v, progress=gr.Progress()):
            try:
                request = h.make_request(prompt=prompt_v, preset=preset_v, seed=seed_v,
                                         randomize_seed=random_v, negative_prompt=negative_v)
                for job, event in h.run_generation(ctx, request):
                    if event is None:
                        continue
                    progress(event.fraction, desc=h.describe_event(event))
                    yield {job_id: job.id, status: h.describe_event(event), seed: request.seed}
            except Exception as exc:  # noqa: BLE001 - mapped in the one place, h.as_alert
                raise h.as_alert(exc) from None
            if job.error is not None:
                raise h.as_alert(job.error)
            result = job.result
            if result.fell_back:
                gr.Warning(result.fallback_summary(), duration=None, title="Ran a smaller setting")
            yield {job_id: None, video: str(result.video_path),
                   status: h.result_summary(result.record) + (
                       "\n\n⚠️ " + result.fallback_summary() if result.fell_back else ""),
                   record_view: json.dumps(result.record, indent=2, default=str),
                   gallery: h.gallery_items(ctx.history),
                   plot: _timeline_frame(h.timeline_rows(result.record.get("vram")))}

        generate.click(on_generate, [prompt, preset, seed, random_seed, negative],
                       [job_id, status, seed, video, record_view, gallery, plot],
                       concurrency_limit=1, concurrency_id=GPU_QUEUE, api_name="generate")

        def on_cancel(current_job):
            if current_job is not None and ctx.jobs.cancel(int(current_job)):
                return "Cancelling at the next step boundary…"
            return "Nothing to cancel."

        cancel.click(on_cancel, [job_id], [status], queue=False, api_name="cancel")
        prompt.change(h.prompt_hint, [prompt], [prompt_warning], queue=False, api_visibility="private")

        def on_select(evt: gr.SelectData):
            entry = h.entry_for_gallery_index(ctx.history, evt.index)
            text = "" if entry is None else (f"#{entry.id}: “{entry.prompt[:80]}” · {entry.preset_used} "
                                             f"({entry.rung_used}) · seed {entry.seed}")
            return evt.index, text

        gallery.select(on_select, None, [selected_index, selected], queue=False, api_visibility="private")

        def on_rerun(index):
            entry = h.entry_for_gallery_index(ctx.history, index)
            if entry is None:
                raise h.as_alert(h.InvalidRequest("Select a video in the history first."))
            record = h.load_record(entry.record_path) or {}
            return (entry.prompt, entry.preset_requested, entry.seed, False, entry.negative_prompt,
                    json.dumps(record, indent=2, default=str))

        rerun.click(on_rerun, [selected_index], [prompt, preset, seed, random_seed, negative, record_view],
                    queue=False, api_name="restore_settings")

        timer = gr.Timer(1.0)
        timer.tick(lambda: (h.panel_text(ctx), h.forecast_text(ctx)), None, [vram, forecast],
                   queue=False, show_progress="hidden", api_visibility="private")
    return demo
