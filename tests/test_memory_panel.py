"""The VRAM panel's and the forecast table's text, from snapshots and forecasts."""

from __future__ import annotations

from pipeline.machine.gpu import NO_TORCH, GpuMonitor
from pipeline.planner import Planner
from presets import load_presets
from tests.conftest import FakeNvml
from ui.memory_panel import NO_GPU_TEXT, format_duration, format_forecasts, format_memory, timeline_rows


def test_no_gpu_panel():
    assert format_memory(None) == NO_GPU_TEXT and "No NVIDIA GPU" in NO_GPU_TEXT


def test_the_fake_backend_says_so_instead_of_asking_for_a_gpu():
    snap = GpuMonitor(nvml=FakeNvml(), torch=NO_TORCH).read()
    for reading in (None, snap):
        text = format_memory(reading, 1.0, backend="fake")
        assert "Fake backend" in text and "No NVIDIA GPU" not in text and "needs one" not in text
    assert format_memory(None, backend="lightx2v") == NO_GPU_TEXT


def test_the_vram_chart_says_when_there_is_nothing_to_draw():
    from ui.memory_panel import NO_RUNS_TEXT, NO_SAMPLES_TEXT, timeline_note

    assert timeline_note(False, []) == NO_RUNS_TEXT and "No runs yet" in NO_RUNS_TEXT
    assert timeline_note(True, []) == NO_SAMPLES_TEXT
    assert timeline_note(True, timeline_rows({"samples": [[0.0, 1.0, "denoising"]]})) == ""


def test_panel_shows_used_total_and_last_peak():
    snap = GpuMonitor(nvml=FakeNvml(total_gib=12.0, used_gib=3.0), torch=NO_TORCH).read()
    text = format_memory(snap, last_peak_gib=8.61)
    assert "NVIDIA GeForce RTX 3060" in text and "3.00 / 12.00 GiB" in text and "(25 %)" in text
    assert "free 9.00 GiB" in text and "**8.61 GiB**" in text
    assert "Peak of last run: —" in format_memory(snap)


def test_forecast_table_verdicts_margins_and_times():
    book = load_presets()
    planner = Planner(book)
    labels = {n: p.label for n, p in book.items()}
    seconds = {("480x832x49", "fast"): 75.0}
    forecasts = [planner.forecast(n, 11.0, None, seconds) for n in book]
    text = format_forecasts(forecasts, labels)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| 4") or
            line.startswith("| 7")}
    assert "fits ('fast'" in rows[labels["480x832x49"]] and "~75 s" in rows[labels["480x832x49"]]
    assert "Available now: 11.0 GiB" in text
    low = format_forecasts([planner.forecast("720x1280x81", 3.0)], labels)
    assert "will step down to 480x832x49/" in low


def test_durations():
    assert (format_duration(None), format_duration(42), format_duration(150)) == ("—", "~42 s", "~2.5 min")


def test_timeline_rows():
    rows = timeline_rows({"samples": [[0.0, 1.5, "text encoding"], [0.1, 7.25, ""]]})
    assert rows == [{"seconds": 0.0, "GiB in use": 1.5, "phase": "text encoding"},
                    {"seconds": 0.1, "GiB in use": 7.25, "phase": "—"}]
    assert timeline_rows(None) == []


def test_forecast_table_wont_fit_and_ram_column():
    book = load_presets()
    planner = Planner(book)
    labels = {n: p.label for n, p in book.items()}
    text = format_forecasts([planner.forecast("480x832x49", 2.0, ram_gib=40.0)], labels)
    row = next(line for line in text.splitlines() if line.startswith("| 480"))
    assert "won't fit" in row and "close programs that use the GPU" in row and "smaller preset" in row
    assert "will step down" not in row
    # The predicted-peak figure names the rung it belongs to (the row names the preset).
    assert "2.9 GiB (lean)" in row and "~22 GiB (fits)" in row
    low_ram = format_forecasts([planner.forecast("720x1280x81", 11.0, ram_gib=13.0)], labels)
    assert "(low-ram)" in low_ram and "~10 GiB (fits)" in low_ram
    # A run that would start on another preset says which.
    steps_down = format_forecasts([planner.forecast("720x1280x81", 5.0, ram_gib=40.0)], labels)
    assert "GiB (480x832x" in steps_down, steps_down
    assert "13.0 GiB system RAM" in low_ram
    short = format_forecasts([planner.forecast("720x1280x81", 11.0, ram_gib=6.0)], labels)
    assert "GiB short" in short and "more system RAM" in short
