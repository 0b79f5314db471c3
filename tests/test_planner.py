"""Ladder planning and the per-preset forecast shown before Generate."""

from __future__ import annotations

from pipeline.planner import Fit, Planner
from presets import load_presets
from ui.memory_panel import what_to_free


def planner():
    return Planner(load_presets())


def names(rungs):
    return [f"{r.preset.name}/{r.memory.name}" for r in rungs]


def test_full_ladder_is_rungs_then_fallback_presets():
    assert names(planner().ladder("720x1280x81")) == [
        "720x1280x81/chunked-rope", "720x1280x81/lean", "720x1280x81/low-ram",
        "480x832x81/fast", "480x832x81/tiled-vae", "480x832x81/lean", "480x832x81/low-ram",
        "480x832x49/fast", "480x832x49/tiled-vae", "480x832x49/lean", "480x832x49/low-ram"]


def test_without_a_gpu_reading_the_whole_ladder_is_tried():
    assert names(planner().plan("480x832x49", None)) == [
        "480x832x49/fast", "480x832x49/tiled-vae", "480x832x49/lean", "480x832x49/low-ram"]


def test_plan_skips_rungs_predicted_not_to_fit():
    book = load_presets()
    chunked = book["720x1280x81"].rung("chunked-rope").predicted_peak_gib
    lean = book["720x1280x81"].rung("lean").predicted_peak_gib
    p = planner()
    assert names(p.plan("720x1280x81", chunked + 0.5))[0] == "720x1280x81/chunked-rope"
    # A slower rung with headroom beats a faster one without: an OOM at step 3 costs far more.
    assert lean < chunked
    between = (lean + chunked) / 2 + 0.5  # lean fits with headroom, chunked-rope only tightly
    assert names(p.plan("720x1280x81", between))[0] == "720x1280x81/lean"
    below = lean - 0.1
    first_480 = next(r for r in p.ladder("480x832x81") if r.predicted_gib + 0.5 <= below)
    assert names(p.plan("720x1280x81", below))[0] == f"480x832x81/{first_480.memory.name}"
    assert names(p.plan("720x1280x81", 1.0)) == ["480x832x49/lean"]


def test_forecast_verdicts():
    book = load_presets()
    p = planner()
    assert p.forecast("480x832x49", 11.0).fit is Fit.FITS
    lean = book["720x1280x81"].rung("lean").predicted_peak_gib
    tight = p.forecast("720x1280x81", lean + 0.2)
    assert tight.fit is Fit.TIGHT and tight.start.memory.name == "lean"
    assert round(tight.margin_gib, 2) == 0.2
    down = p.forecast("720x1280x81", lean - 0.1)
    assert down.fit is Fit.STEPS_DOWN and down.start.preset.name == "480x832x81"
    assert p.forecast("720x1280x81", None).fit is Fit.UNKNOWN


def test_measured_peak_supersedes_shipped_prediction():
    measured = {("720x1280x81", "chunked-rope"): 6.0}
    forecast = planner().forecast("720x1280x81", 7.0, measured)
    assert forecast.fit is Fit.FITS and forecast.start.measured_here
    assert forecast.start.memory.name == "chunked-rope" and forecast.start.predicted_gib == 6.0


# -- system RAM (issue 15) and "won't fit" (issue 13) --------------------------------------------


def test_low_ram_machine_starts_on_the_low_ram_rung_of_the_requested_preset():
    p = planner()
    # 16 GB machine, ~13 GiB usable: the fast rungs (~22 GiB) do not fit, the low-RAM rung does.
    assert names(p.plan("480x832x81", 11.0, ram_gib=13.0)) == ["480x832x81/low-ram", "480x832x49/low-ram"]
    forecast = p.forecast("480x832x81", 11.0, ram_gib=13.0)
    assert forecast.fit is Fit.FITS and forecast.start.memory.name == "low-ram"
    assert round(forecast.ram_margin_gib, 1) == 3.5
    # Plenty of RAM: the fast rung, with the low-RAM rungs kept at the end of each preset.
    assert names(p.plan("480x832x81", 11.0, ram_gib=60.0))[0] == "480x832x81/fast"
    assert "480x832x81/low-ram" in names(p.plan("480x832x81", 11.0, ram_gib=60.0))


def test_ram_headroom_prefers_the_low_ram_rung_to_a_tight_fast_one():
    # 22 GiB + less than the 1.5 GiB headroom: swapping mid-run costs more than reading from disk.
    forecast = planner().forecast("480x832x49", 11.0, ram_gib=22.5)
    assert forecast.fit is Fit.FITS and forecast.start.memory.name == "low-ram"
    # Only a tight fit anywhere in the preset: that one, and the verdict says so.
    tight = planner().forecast("480x832x49", 3.0, ram_gib=10.0)
    assert tight.fit is Fit.TIGHT and tight.start.memory.name == "low-ram"


def test_wont_fit_names_the_leanest_rung_and_what_to_free():
    p = planner()
    # The issue-13 case: 480x832x49 with 2.0 GiB free used to "step down to" itself.
    low = p.forecast("480x832x49", 2.0)
    assert low.fit is Fit.WONT_FIT and low.short_of == ("GPU memory",)
    assert low.start.label == "480x832x49/lean"  # the leanest GPU settings that keep RAM use low
    text = what_to_free(low)
    assert "0.9 GiB more GPU memory" in text
    assert "close programs that use the GPU" in text and "smaller preset" in text
    assert "step down" not in text
    assert p.plan("480x832x49", 2.0) and names(p.plan("480x832x49", 2.0)) == ["480x832x49/lean"]
    # Not enough RAM even for the low-RAM rung.
    ram = p.forecast("720x1280x81", 11.0, ram_gib=6.0)
    assert ram.fit is Fit.WONT_FIT and ram.short_of == ("system RAM",)
    assert ram.start.label == "480x832x49/low-ram" and "3.5 GiB more system RAM" in what_to_free(ram)
    both = p.forecast("480x832x49", 1.0, ram_gib=6.0)
    assert both.short_of == ("GPU memory", "system RAM")


def test_skip_after_host_failure_jumps_to_a_rung_needing_less_ram():
    p = planner()
    ladder = p.ladder("480x832x49")
    fast = ladder[0]
    failures = [(fast, True)]
    assert [r.memory.name for r in ladder if not p.skip_after(r, failures)] == ["low-ram"]
    # A GPU failure on lean skips low-ram (same GPU settings), not the smaller preset's rungs.
    lean = next(r for r in ladder if r.memory.name == "lean")
    assert p.skip_after(ladder[-1], [(lean, False)]) and not p.skip_after(fast, [(lean, False)])


def test_without_a_gpu_reading_ram_alone_can_say_wont_fit():
    p = planner()
    # No GPU reading (the fake backend, a driver that does not answer): no GPU verdict...
    assert p.forecast("480x832x49", None, ram_gib=64.0).fit is Fit.UNKNOWN
    assert p.forecast("480x832x49", None).fit is Fit.UNKNOWN
    # ...but 6 GiB of RAM is too little even for the low-RAM rung, and the forecast says so.
    ram = p.forecast("720x1280x81", None, ram_gib=6.0)
    assert ram.fit is Fit.WONT_FIT and ram.short_of == ("system RAM",)
    assert ram.start.label == "480x832x49/low-ram" and "more system RAM" in what_to_free(ram)
