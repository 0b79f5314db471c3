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
        "720x1280x81/tiled-vae", "720x1280x81/chunked-rope", "720x1280x81/lean",
        "480x832x81/fast", "480x832x81/tiled-vae", "480x832x81/lean",
        "480x832x49/fast", "480x832x49/tiled-vae", "480x832x49/lean"]


def test_without_a_gpu_reading_the_whole_ladder_is_tried():
    assert names(planner().plan("480x832x49", None)) == [
        "480x832x49/fast", "480x832x49/tiled-vae", "480x832x49/lean"]


def test_plan_skips_rungs_predicted_not_to_fit():
    # 720p: tiled-vae 10.9, chunked-rope 10.8, lean 8.1 (shipped figures)
    assert names(planner().plan("720x1280x81", 11.5))[0] == "720x1280x81/tiled-vae"
    # A slower rung with headroom beats a faster one without: an OOM at step 3 costs far more.
    assert names(planner().plan("720x1280x81", 11.0))[0] == "720x1280x81/lean"
    assert names(planner().plan("720x1280x81", 8.3))[0] == "720x1280x81/lean"  # tight
    assert names(planner().plan("720x1280x81", 6.0))[0] == "480x832x81/lean"
    assert names(planner().plan("720x1280x81", 1.0)) == ["480x832x49/lean"]


def test_forecast_verdicts():
    p = planner()
    assert p.forecast("480x832x49", 11.0).fit is Fit.FITS
    assert p.forecast("720x1280x81", 11.5).start.memory.name == "tiled-vae"
    tight = p.forecast("720x1280x81", 8.3)
    assert tight.fit is Fit.TIGHT and tight.start.memory.name == "lean"
    assert round(tight.margin_gib, 2) == 0.2
    down = p.forecast("720x1280x81", 6.0)
    assert down.fit is Fit.STEPS_DOWN and down.start.preset.name == "480x832x81"
    assert down.start.memory.name == "lean"
    assert "will start on 480x832x81/lean" in down.describe()
    assert p.forecast("720x1280x81", None).fit is Fit.UNKNOWN


def test_measured_peak_supersedes_shipped_prediction():
    measured = {("720x1280x81", "tiled-vae"): 9.6}
    forecast = planner().forecast("720x1280x81", 11.0, measured)
    assert forecast.fit is Fit.FITS and forecast.start.measured_here
    assert forecast.start.predicted_gib == 9.6
