"""Ladder planning and the per-preset forecast shown before Generate."""

from __future__ import annotations

from pipeline.planner import Fit, Planner
from presets import load_presets


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
    assert f"will start on 480x832x81/{down.start.memory.name}" in down.describe()
    assert p.forecast("720x1280x81", None).fit is Fit.UNKNOWN


def test_measured_peak_supersedes_shipped_prediction():
    measured = {("720x1280x81", "chunked-rope"): 6.0}
    forecast = planner().forecast("720x1280x81", 7.0, measured)
    assert forecast.fit is Fit.FITS and forecast.start.measured_here
    assert forecast.start.memory.name == "chunked-rope" and forecast.start.predicted_gib == 6.0
