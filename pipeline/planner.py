"""Which memory rung a preset starts on, and the explicit ladder it steps down on OOM.

The ladder for a preset is its own rungs (fast -> lean) followed by its fallback preset's ladder.
A run starts on the fastest rung of the requested preset whose predicted peak fits the memory that
is available at click time (free on the device plus what this process already holds), keeping a
headroom, so an OOM is the exception rather than the way to find out. Predictions are the peaks
measured on this GPU when there are any (history DB), else the figures shipped in the preset.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping

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
            return PresetForecast(preset_name, Fit.UNKNOWN, ladder[0], None)
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


def oom_bound_gib(peak_gib: float | None, detail: str) -> float | None:
    """An upper bound on the memory this process could really use, learnt from an OOM: the peak
    it reached plus the allocation that did not fit ("Tried to allocate 740.00 MiB"). None when
    the failure carries no peak (no CUDA reading)."""
    if peak_gib is None:
        return None
    match = _TRIED.search(detail or "")
    tried = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    return peak_gib + tried


_TRIED = re.compile(r"Tried to allocate ([\d.]+) ?(GiB|MiB|KiB|B)\b")
_UNITS = {"GiB": 1.0, "MiB": 1 / 1024, "KiB": 1 / 1024**2, "B": 1 / 1024**3}


def replan(ladder: list[Rung], failed: Rung, tried: set[tuple[str, str]],
           available_gib: float | None, key_of: Callable[[Rung], Hashable],
           current_key: Hashable | None, left_keys: set, reload_allowed: bool,
           skip: Callable[[Rung], bool] = lambda rung: False) -> list[Rung]:
    """The rungs to try after `failed` ran out of memory, in order, under the one-reload rule.

    - every rung below `failed` in the ladder not tried yet, skipping those predicted not to fit
      the memory that is really free now (no margin: `available_gib` is already the best reading
      there is); when none is predicted to fit, the leanest one is still tried (a prediction can
      be pessimistic);
    - never a load key this click already left (going back loads the same weights again);
    - grouped by load key, the groups in the order of their best rung, so that the ladder's order
      of preference (the requested clip first) holds between groups and rungs sharing a key run
      together;
    - at most one key other than `current_key` (one reload), and none when `reload_allowed` is
      False (the click spent its reload);
    - nothing `skip` rules out (known to fail the same way), before the groups are formed.
    """
    names = [(r.preset.name, r.memory.name) for r in ladder]
    start = names.index((failed.preset.name, failed.memory.name)) + 1
    eligible = [r for r in ladder[start:] if (r.preset.name, r.memory.name) not in tried
                and key_of(r) not in left_keys and not skip(r)]
    fitting = [r for r in eligible if available_gib is None or r.predicted_gib is None
               or r.predicted_gib <= available_gib]
    if not fitting and eligible:
        fitting = [eligible[-1]]
    groups: dict[Hashable, list[Rung]] = {}
    for rung in fitting:
        groups.setdefault(key_of(rung), []).append(rung)
    out: list[Rung] = []
    for key, rungs in groups.items():
        if key == current_key:
            out.extend(rungs)
        elif reload_allowed:
            # The one reload. After it the current key is left for good, so only what came
            # before it stays, and later groups (yet other keys) would need a second reload.
            out.extend(rungs)
            break
    return out
