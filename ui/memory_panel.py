"""Pure formatting for the VRAM panel: snapshots and timelines in, markdown and table rows out."""

from __future__ import annotations

from typing import Any

from pipeline.machine.gpu import GIB, MemorySnapshot
from pipeline.planner import Fit, PresetForecast

NO_GPU_TEXT = "**No NVIDIA GPU** detected (NVML unavailable): generation needs one."
FAKE_BACKEND_TEXT = ("**Fake backend** (`--backend fake`): a CPU test double that writes noise clips "
                     "and uses no GPU, so there is no GPU memory to show.")
NO_RUNS_TEXT = "No runs yet: the chart shows the GPU memory of the last run once a clip is made."
NO_SAMPLES_TEXT = "The last run has no GPU memory readings (no NVIDIA GPU was read while it ran)."

# A coloured disc (U+25CF is in every common font; colour emoji are not on many Linux desktops).
def _badge(colour: str, text: str) -> str:
    return f'<span style="color:{colour}">●</span> {text}'


_FIT_BADGE = {Fit.FITS: _badge("#16a34a", "fits"), Fit.TIGHT: _badge("#ea580c", "tight"),
              Fit.STEPS_DOWN: _badge("#dc2626", "will step down"), Fit.WONT_FIT: _badge("#dc2626", "won't fit"),
              Fit.UNKNOWN: _badge("#9ca3af", "unknown")}


def format_memory(snapshot: MemorySnapshot | None, last_peak_gib: float | None = None,
                  backend: str | None = None) -> str:
    if backend == "fake":
        # Whatever GPU the machine has, the clips shown were not made on it.
        return FAKE_BACKEND_TEXT
    if snapshot is None:
        return NO_GPU_TEXT
    used, total = snapshot.used_bytes / GIB, snapshot.total_bytes / GIB
    pct = 100 * used / total if total else 0
    lines = [f"**{snapshot.gpu_name}**",
             f"In use: **{used:.2f} / {total:.2f} GiB** ({pct:.0f} %), free {snapshot.free_bytes / GIB:.2f} GiB"]
    if snapshot.torch_reserved_bytes is not None:
        lines.append(f"This app's PyTorch: reserved {snapshot.torch_reserved_bytes / GIB:.2f} GiB, "
                     f"allocated {(snapshot.torch_allocated_bytes or 0) / GIB:.2f} GiB")
    lines.append("Peak of last run: " + ("—" if last_peak_gib is None else f"**{last_peak_gib:.2f} GiB**"))
    return "  \n".join(lines)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.1f} min"


def _ram_cell(f: PresetForecast) -> str:
    need = f.start.predicted_host_gib
    if need is None:
        return "—"
    text = f"~{need:.0f} GiB"
    margin = f.ram_margin_gib
    if margin is not None:
        text += " (fits)" if margin >= 0 else f" ({-margin:.1f} GiB short)"
    return text


def what_to_free(f: PresetForecast) -> str:
    """For WONT_FIT: what is short, by how much, and what to do about it."""
    parts, advice = [], []
    if "GPU memory" in f.short_of and f.start.predicted_gib is not None and f.available_gib is not None:
        parts.append(f"{f.start.predicted_gib - f.available_gib:.1f} GiB more GPU memory")
        advice.append("close programs that use the GPU (browsers with hardware acceleration, games)")
    if "system RAM" in f.short_of and f.start.predicted_host_gib is not None \
            and f.ram_available_gib is not None:
        parts.append(f"{f.start.predicted_host_gib - f.ram_available_gib:.1f} GiB more system RAM")
        advice.append("close large programs to free RAM")
    need = " and ".join(parts) or "more memory"
    return (f"even {f.start.label}, the leanest settings, needs {need}: "
            f"{' or '.join(advice) or 'free memory'}, or pick a smaller preset")


def format_forecasts(forecasts: list[PresetForecast], labels: dict[str, str]) -> str:
    # Short headers: the verdict column takes the width, and long headers broke mid-word there.
    rows = ["| preset | GPU peak | RAM | will it run? | time |", "|---|---|---|---|---|"]
    for f in forecasts:
        # The figure belongs to the rung the run would start on (or, for "won't fit", the leanest).
        pred = "—" if f.start.predicted_gib is None else f"{f.start.predicted_gib:.1f} GiB"
        if f.start.measured_here:
            pred += " measured here"
        # The row names the preset; the rung alone unless the run would start on another preset.
        same = f.start.preset.name == f.preset
        pred += f" ({f.start.memory.name})" if same else f" ({f.start.preset.name}/{f.start.memory.name})"
        verdict = _FIT_BADGE[f.fit]
        if f.fit is Fit.STEPS_DOWN:
            verdict += f" to {f.start.preset.name}/{f.start.memory.name}"
        elif f.fit is Fit.WONT_FIT:
            verdict += f": {what_to_free(f)}"
        elif f.fit is not Fit.UNKNOWN:
            verdict += f" ('{f.start.memory.name}', margin {f.margin_gib:+.1f} GiB)"
        rows.append(f"| {labels.get(f.preset, f.preset)} | {pred} | {_ram_cell(f)} | {verdict} | "
                    f"{format_duration(f.eta_s)} |")
    available = next((f.available_gib for f in forecasts if f.available_gib is not None), None)
    ram = next((f.ram_available_gib for f in forecasts if f.ram_available_gib is not None), None)
    rows.append("")
    rows.append("Available now: " + ("no GPU reading" if available is None else f"{available:.1f} GiB GPU memory")
                + ("" if ram is None else f", {ram:.1f} GiB system RAM")
                + ". Times are from earlier runs on this GPU (the first run also loads the model).")
    return "\n".join(rows)


def timeline_note(has_run: bool, rows: list[dict[str, Any]]) -> str:
    """What the VRAM chart says when it has nothing to draw."""
    if not has_run:
        return NO_RUNS_TEXT
    return "" if rows else NO_SAMPLES_TEXT


def timeline_rows(vram_record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The saved timeline of a run as rows for a line plot: seconds, GiB in use, phase."""
    if not vram_record:
        return []
    return [{"seconds": t, "GiB in use": gib, "phase": phase or "—"}
            for t, gib, phase in vram_record.get("samples", [])]
