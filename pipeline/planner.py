"""Which memory rung a preset starts on, and the explicit ladder it steps down on OOM.

The ladder for a preset is its own rungs (fast -> lean) followed by its fallback preset's ladder.
A run starts on the fastest rung of the requested preset whose predicted peak fits the memory that
is available at click time (free on the device plus what this process already holds), keeping a
headroom, so an OOM is the exception rather than the way to find out. Predictions are the peaks
measured on this GPU when there are any (history DB), else the figures shipped in the preset.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

from presets import MemoryRung, Preset, PresetBook

# Below this margin a rung is "tight": fragmentation and a browser opening a tab can eat it.
HEADROOM_GIB = 0.5


class Fit(str, enum.Enum):
    FITS = "fits"
    TIGHT = "tight"
    STEPS_DOWN = "will step down"
    UNKNOWN = "unknown"  # no GPU reading, or no prediction


@dataclass(frozen=True)
class Rung:
    preset: Preset
    memory: MemoryRung
    predicted_gib: float | None
    measured_here: bool  # the prediction comes from a run on this machine


@dataclass(frozen=True)
class PresetForecast:
    preset: str
    fit: Fit
    start: Rung  # where a run would start
    available_gib: float | None
    eta_s: float | None = None  # median time of recent runs of the start rung on this GPU

    @property
    def margin_gib(self) -> float | None:
        if self.available_gib is None or self.start.predicted_gib is None:
            return None
        return self.available_gib - self.start.predicted_gib

    def describe(self) -> str:
        p = self.start.predicted_gib
        pred = "no prediction" if p is None else f"~{p:.1f} GiB" + (
            " (measured here)" if self.start.measured_here else "")
        if self.fit is Fit.UNKNOWN:
            return f"{self.preset}: {pred}; no GPU reading"
        avail = f"{self.available_gib:.1f} GiB available"
        if self.fit is Fit.STEPS_DOWN:
            return (f"{self.preset}: {avail}; will start on {self.start.preset.name}/"
                    f"{self.start.memory.name} ({pred})")
        return f"{self.preset}: {self.fit.value}, {pred} of {avail}, '{self.start.memory.name}' settings"


class Planner:
    def __init__(self, presets: PresetBook, headroom_gib: float = HEADROOM_GIB):
        self.presets = presets
        self.headroom_gib = headroom_gib

    def ladder(self, preset_name: str, measured: Mapping[tuple[str, str], float] | None = None) -> list[Rung]:
        measured = measured or {}
        out = []
        for preset in self.presets.chain(preset_name):
            for rung in preset.rungs:
                here = measured.get((preset.name, rung.name))
                out.append(Rung(preset, rung, here if here is not None else rung.predicted_peak_gib,
                                here is not None))
        return out

    def _start_index(self, ladder: list[Rung], available_gib: float) -> int:
        # Within each preset, in ladder order: the fastest rung that fits with headroom, else one
        # that fits at all (tight). A smaller preset is a worse clip, so a tight fit of the
        # requested preset beats a roomy fit of its fallback. Nothing fits: the leanest rung.
        for preset_name in dict.fromkeys(r.preset.name for r in ladder):
            group = [(i, r) for i, r in enumerate(ladder) if r.preset.name == preset_name]
            for margin in (self.headroom_gib, 0.0):
                for index, rung in group:
                    if rung.predicted_gib is None or rung.predicted_gib + margin <= available_gib:
                        return index
        return len(ladder) - 1

    def plan(self, preset_name: str, available_gib: float | None,
             measured: Mapping[tuple[str, str], float] | None = None) -> list[Rung]:
        """The ladder from the starting rung on: rungs predicted not to fit are skipped."""
        ladder = self.ladder(preset_name, measured)
        if available_gib is None:
            return ladder
        return ladder[self._start_index(ladder, available_gib):]

    def forecast(self, preset_name: str, available_gib: float | None,
                 measured: Mapping[tuple[str, str], float] | None = None,
                 seconds: Mapping[tuple[str, str], float] | None = None) -> PresetForecast:
        ladder = self.ladder(preset_name, measured)
        seconds = seconds or {}
        if available_gib is None:
            # No GPU reading (the fake backend): no verdict, but a time measured here still shows.
            return PresetForecast(preset_name, Fit.UNKNOWN, ladder[0], None,
                                  seconds.get((ladder[0].preset.name, ladder[0].memory.name)))
        start = ladder[self._start_index(ladder, available_gib)]
        if start.predicted_gib is None:
            fit = Fit.UNKNOWN
        elif start.preset.name != preset_name or start.predicted_gib > available_gib:
            fit = Fit.STEPS_DOWN
        elif start.predicted_gib + self.headroom_gib <= available_gib:
            fit = Fit.FITS
        else:
            fit = Fit.TIGHT
        return PresetForecast(preset_name, fit, start, available_gib,
                              seconds.get((start.preset.name, start.memory.name)))
