"""System tab: the setup doctor as a table with fixes, and one-click weights download with live progress.

Called by the composition root inside `with gr.Tab("System"):`. It receives callables rather than building
anything itself, so it never touches torch, LightX2V or the network directly.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr

from install import (APPROX_TOTAL_BYTES, DoctorReport, DownloadPhase, DownloadProgress, Status, format_bytes,
                     format_eta, format_rate)
from pipeline.errors import StudioError

TABLE_HEADERS = ["Check", "Status", "What we found", "What to do"]
_STATUS_LABEL = {Status.OK: "✓ ok", Status.INFO: "ℹ info", Status.WARN: "⚠ warning", Status.FAIL: "✗ fix this"}
_BAR_CELLS = 24


def report_rows(report: DoctorReport) -> list[list[str]]:
    return [[f.name, _STATUS_LABEL[f.status], f.detail, f.fix] for f in report.findings]


def report_html(report: DoctorReport) -> str:
    """The whole table as HTML: every row visible at once (a Dataframe scrolls inside a fixed-height box and
    hid half the checks), the text escaped and shown as written."""
    cell = 'style="padding:6px 8px;vertical-align:top;text-align:left;border-top:1px solid ' \
           'var(--border-color-primary)"'
    widths = ("14%", "10%", "40%", "36%")
    head = "".join(f'<th {cell} width="{w}">{h}</th>' for h, w in zip(TABLE_HEADERS, widths, strict=True))
    body = "".join("<tr>" + "".join(f"<td {cell}>{html.escape(text)}</td>" for text in row) + "</tr>"
                   for row in report_rows(report))
    return (f'<table class="doctor-table" style="width:100%;border-collapse:collapse">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def report_headline(report: DoctorReport) -> str:
    icon = {Status.FAIL: "✗", Status.WARN: "⚠"}.get(report.worst, "✓")
    return f"{icon} **{report.headline()}**"


def progress_markdown(p: DownloadProgress) -> str:
    """Text for the progress area: a bar, bytes, rate and time left while downloading; the outcome after."""
    if p.phase is DownloadPhase.DONE:
        return f"✓ **Weights ready.** {p.message}"
    if p.phase is DownloadPhase.CANCELLED:
        return f"⏸️ **Download stopped.** {p.message}"
    if p.phase is DownloadPhase.FAILED:
        return "✗ **Download failed.**\n\n" + p.message.replace("\n", "  \n")
    if p.phase is not DownloadPhase.DOWNLOADING:
        return f"⏳ {p.phase.value.capitalize()}… {'`' + p.message + '`' if p.message else ''}"
    filled = round(p.fraction * _BAR_CELLS)
    bar = "█" * filled + "░" * (_BAR_CELLS - filled)
    return (f"⬇️ **Downloading** `{p.file}` (file {p.file_index} of {p.file_count})\n\n"
            f"`{bar}` **{p.fraction:.0%}** — {format_bytes(p.bytes_done)} of {format_bytes(p.bytes_total)} · "
            f"{format_rate(p.rate_bps)} · {format_eta(p.eta_s)} left")


def kernels_markdown(choices: list[dict[str, Any]]) -> str:
    """The attention kernels this GPU measured (pipeline.backends.kernels summaries), one row a shape."""
    if not choices:
        return ("No attention kernel measured on this GPU yet. The first run of each video size times the "
                "available kernels (a few seconds, once) and keeps the fastest one that is no less accurate "
                "than LightX2V's own; the choice shows here and in every clip's record.")
    rows = ["| video tokens × heads × dim | chosen | LightX2V's kernel | chosen ms | LightX2V's ms |",
            "|---|---|---|---|---|"]
    for c in choices:
        trials = c.get("trials", {})
        ms = lambda name: trials.get(name, {}).get("ms")  # noqa: E731
        shown = lambda value: "—" if value is None else f"{value:g}"  # noqa: E731
        rows.append(f"| {c.get('shape', '?')} | {c.get('backend', '?')} | {c.get('baseline', '?')} | "
                    f"{shown(ms(c.get('backend')))} | {shown(ms(c.get('baseline')))} |")
    return "\n".join(rows)


def build_system_tab(*, doctor: Callable[[], DoctorReport], weights_dir: Path,
                     start_download: Callable[..., Iterator[DownloadProgress]],
                     kernels: Callable[[], list[dict[str, Any]]] = list) -> None:
    """Lay out the System tab in the current Blocks context.

    `doctor()` runs the checks (on page load and on Re-check). `start_download()` is called with no arguments
    and must yield `DownloadProgress` items ending with a DONE, FAILED or CANCELLED one, as
    `install.iter_download` does; closing it must stop the download.
    """
    gr.Markdown("### Setup check")
    headline = gr.Markdown("⏳ Checking this machine…")
    table = gr.HTML("", elem_id="doctor-table")
    recheck = gr.Button("Re-check", variant="secondary", size="sm")

    gr.Markdown("### Attention kernel on this GPU")
    kernel_table = gr.Markdown(kernels_markdown([]), elem_id="kernel-table")

    gr.Markdown("### Model weights")
    gr.Markdown(f"Folder: {html.escape(str(weights_dir))} — about {format_bytes(APPROX_TOTAL_BYTES)} (INT8 DiT, "
                "UMT5 INT8 text encoder, VAE, tokenizer). The download resumes where it stopped if it is interrupted.")
    with gr.Row():
        download = gr.Button("Download weights", variant="primary")
        stop = gr.Button("Stop download", variant="secondary", visible=False)  # only while a download runs
    progress = gr.Markdown("")

    def check() -> tuple[str, str]:
        report = doctor()
        return report_headline(report), report_html(report)

    def check_all() -> tuple[str, str, str]:
        return (*check(), kernels_markdown(kernels()))

    def run_download() -> Iterator[tuple[Any, ...]]:
        running = (gr.update(visible=False), gr.update(visible=True))  # (download, stop)
        try:
            with closing(start_download()) as events:
                for event in events:
                    yield progress_markdown(event), gr.skip(), gr.skip(), *running
        except StudioError as exc:
            yield f"✗ **Download failed.**\n\n{exc}", gr.skip(), gr.skip(), *running
        # The weights (and the disk) changed: refresh the checks so the table matches.
        yield gr.skip(), *check(), gr.update(visible=True), gr.update(visible=False)

    # triggers=None runs on page load, so the table is filled when the tab is first shown.
    gr.on(triggers=None, fn=check_all, outputs=[headline, table, kernel_table], api_visibility="private",
          show_progress="minimal")
    recheck.click(check_all, outputs=[headline, table, kernel_table], api_visibility="private",
                  show_progress="minimal")
    download_event = download.click(run_download, outputs=[progress, headline, table, download, stop],
                                    api_visibility="private",
                                    show_progress="hidden", concurrency_limit=1, concurrency_id="weights-download")
    # Cancelling closes the generator; `closing` passes that on to the download, which keeps its partial file.
    stop.click(lambda: (gr.update(visible=True), gr.update(visible=False)), outputs=[download, stop],
               cancels=[download_event], api_visibility="private")
