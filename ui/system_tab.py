"""System tab: the setup doctor as a table with fixes, and one-click weights download with live progress.

Called by the composition root inside `with gr.Tab("System"):`. It receives callables rather than building
anything itself, so it never touches torch, LightX2V or the network directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr

from install import (APPROX_TOTAL_BYTES, DoctorReport, DownloadPhase, DownloadProgress, Status, format_bytes, format_eta,
                     format_rate)
from pipeline.errors import StudioError

TABLE_HEADERS = ["Check", "Status", "What we found", "What to do"]
_STATUS_LABEL = {Status.OK: "✓ ok", Status.INFO: "ℹ info", Status.WARN: "⚠ warning", Status.FAIL: "✗ fix this"}
_BAR_CELLS = 24


def report_rows(report: DoctorReport) -> list[list[str]]:
    return [[f.name, _STATUS_LABEL[f.status], f.detail, f.fix] for f in report.findings]


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


def build_system_tab(*, doctor: Callable[[], DoctorReport], weights_dir: Path,
                     start_download: Callable[..., Iterator[DownloadProgress]]) -> None:
    """Lay out the System tab in the current Blocks context.

    `doctor()` runs the checks (on page load and on Re-check). `start_download()` is called with no arguments
    and must yield `DownloadProgress` items ending with a DONE, FAILED or CANCELLED one, as
    `install.weights.iter_download` does; closing it must stop the download.
    """
    gr.Markdown("### Setup check")
    headline = gr.Markdown("⏳ Checking this machine…")
    table = gr.Dataframe(headers=TABLE_HEADERS, value=[], datatype=["str", "str", "str", "str"],
                         interactive=False, wrap=True, column_widths=["13%", "10%", "40%", "37%"],
                         label="Setup check", show_label=False)
    recheck = gr.Button("Re-check", variant="secondary", size="sm")

    gr.Markdown("### Model weights")
    gr.Markdown(f"Folder: `{weights_dir}` — about {format_bytes(22.2e9)} (INT8 DiT, UMT5 INT8 text encoder, VAE, "
                "tokenizer). The download resumes where it stopped if it is interrupted.")
    with gr.Row():
        download = gr.Button("Download weights", variant="primary")
        stop = gr.Button("Stop download", variant="secondary")
    progress = gr.Markdown("")

    def check() -> tuple[str, list[list[str]]]:
        report = doctor()
        return report_headline(report), report_rows(report)

    def run_download() -> Iterator[tuple[Any, Any, Any]]:
        try:
            with closing(start_download()) as events:
                for event in events:
                    yield progress_markdown(event), gr.skip(), gr.skip()
        except StudioError as exc:
            yield f"✗ **Download failed.**\n\n{exc}", gr.skip(), gr.skip()
        # The weights (and the disk) changed: refresh the checks so the table matches.
        yield gr.skip(), *check()

    # triggers=None runs on page load, so the table is filled when the tab is first shown.
    gr.on(triggers=None, fn=check, outputs=[headline, table], api_visibility="private", show_progress="minimal")
    recheck.click(check, outputs=[headline, table], api_visibility="private", show_progress="minimal")
    download_event = download.click(run_download, outputs=[progress, headline, table], api_visibility="private",
                                    show_progress="hidden", concurrency_limit=1, concurrency_id="weights-download")
    # Cancelling closes the generator; `closing` passes that on to the download, which keeps its partial file.
    stop.click(None, cancels=[download_event])
