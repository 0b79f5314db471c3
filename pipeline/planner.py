"""Which memory rung a preset starts on, and the explicit ladder it steps down on OOM.

The ladder for a preset is its own rungs (fast -> lean) followed by its fallback preset's ladder.
A run starts on the fastest rung of the requested preset whose predicted peak fits the memory that
is available at click time (free on the device plus what this process already holds), keeping a
headroom, so an OOM is the exception rather than the way to find out. Predictions are the peaks
measured on this GPU when there are any (history DB), else the figures shipped in the preset.

System RAM is the second budget: each rung also predicts the host memory this process must hold
(`predicted_host_gib`), and a rung starts only where both fit. When even the leanest rung of the
whole fallback chain does not fit, the forecast says "won't fit" and what to free; the plan still
tries that leanest rung (predictions can be pessimistic), and the ladder reports the outcome.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping

from presets import MemoryRung, Preset, PresetBook, gpu_settings

# Below this margin a rung is "tight": fragmentation and a browser opening a tab can eat it.
HEADROOM_GIB = 0.5
# System RAM moves more (browser tabs, page cache the kernel has to give back first).
RAM_HEADROOM_GIB = 1.5


class Fit(str, enum.Enum):
    FITS = "fits"
    TIGHT = "tight"
    STEPS_DOWN = "will step down"
    WONT_FIT = "won't fit"
    UNKNOWN = "unknown"  # no GPU reading, or no prediction


@dataclass(frozen=True)
class Rung:
    preset: Preset
    memory: MemoryRung
    predicted_gib: float | None
    measured_here: bool  # the prediction comes from a run on this machine
    predicted_host_gib: float | None = None  # host memory it must hold (shipped estimate)

    @property
    def label(self) -> str:
        return f"{self.preset.name}/{self.memory.name}"


@dataclass(frozen=True)
class PresetForecast:
    preset: str
    fit: Fit
    start: Rung  # where a run would start
    available_gib: float | None
    eta_s: float | None = None  # median time of recent runs of the start rung on this GPU
    ram_available_gib: float | None = None  # system RAM this process can use (free + its own)
    short_of: tuple[str, ...] = ()  # for WONT_FIT: "GPU memory" and/or "system RAM"

    @property
    def ram_margin_gib(self) -> float | None:
        if self.ram_available_gib is None or self.start.predicted_host_gib is None:
            return None
        return self.ram_available_gib - self.start.predicted_host_gib

    @property
    def margin_gib(self) -> float | None:
        if self.available_gib is None or self.start.predicted_gib is None:
            return None
        return self.available_gib - self.start.predicted_gib


def fits(rung: Rung, available_gib: float | None, ram_gib: float | None,
         headroom_gib: float = 0.0, ram_headroom_gib: float = 0.0) -> bool:
    """Whether `rung` is predicted to fit both budgets with the given margins (None: no reading or
    no prediction, which does not rule a rung out)."""
    vram_ok = (available_gib is None or rung.predicted_gib is None
               or rung.predicted_gib + headroom_gib <= available_gib)
    ram_ok = (ram_gib is None or rung.predicted_host_gib is None
              or rung.predicted_host_gib + ram_headroom_gib <= ram_gib)
    return vram_ok and ram_ok


def leanest(rungs: list[Rung], ram_gib: float | None) -> Rung:
    """The last preset's rung with the least GPU memory; among equals the first that fits system
    RAM (the low-RAM rung only when the others do not fit it: it reads the DiT from disk)."""
    group = [r for r in rungs if r.preset.name == rungs[-1].preset.name]
    known = [r.predicted_gib for r in group if r.predicted_gib is not None]
    least = [r for r in group if not known or r.predicted_gib == min(known)]
    return next((r for r in least if fits(r, None, ram_gib)), least[-1])


class Planner:
    def __init__(self, presets: PresetBook, headroom_gib: float = HEADROOM_GIB,
                 ram_headroom_gib: float = RAM_HEADROOM_GIB):
        self.presets = presets
        self.headroom_gib = headroom_gib
        self.ram_headroom_gib = ram_headroom_gib

    def ladder(self, preset_name: str, measured: Mapping[tuple[str, str], float] | None = None) -> list[Rung]:
        measured = measured or {}
        out = []
        for preset in self.presets.chain(preset_name):
            for rung in preset.rungs:
                here = measured.get((preset.name, rung.name))
                out.append(Rung(preset, rung, here if here is not None else rung.predicted_peak_gib,
                                here is not None, rung.predicted_host_gib))
        return out

    def _roomy(self, rung: Rung, available_gib: float | None, ram_gib: float | None) -> bool:
        return fits(rung, available_gib, ram_gib, self.headroom_gib, self.ram_headroom_gib)

    def _start_index(self, ladder: list[Rung], available_gib: float | None, ram_gib: float | None) -> int | None:
        # Within each preset, in ladder order: the fastest rung that fits both budgets with headroom,
        # else one that fits at all (tight). A smaller preset is a worse clip, so a tight fit of the
        # requested preset beats a roomy fit of its fallback. Nothing fits: None.
        for preset_name in dict.fromkeys(r.preset.name for r in ladder):
            group = [(i, r) for i, r in enumerate(ladder) if r.preset.name == preset_name]
            for fit in (self._roomy, fits):
                for index, rung in group:
                    if fit(rung, available_gib, ram_gib):
                        return index
        return None

    def skip_after(self, rung: Rung, failures: list[tuple[Rung, bool]]) -> bool:
        """Whether the ladder should pass over `rung` after `failures` ((rung, ran out of host memory)
        pairs): after a host-memory failure, every rung predicted to need as much host memory; after
        a GPU one, a rung of the same preset with the same GPU settings (it differs only in how it
        saves host memory, so it would run out of GPU memory the same way)."""
        for failed, host in failures:
            if host:
                if failed.predicted_host_gib is not None and (
                        rung.predicted_host_gib is None or rung.predicted_host_gib >= failed.predicted_host_gib):
                    return True
            elif failed.preset.name == rung.preset.name and (
                    gpu_settings(failed.memory.settings()) == gpu_settings(rung.memory.settings())):
                return True
        return False

    def plan(self, preset_name: str, available_gib: float | None,
             measured: Mapping[tuple[str, str], float] | None = None,
             ram_gib: float | None = None) -> list[Rung]:
        """The ladder from the starting rung on. Rungs predicted not to fit are skipped: before the
        start for either budget, after it for system RAM (a rung that needs more RAM than is free
        would fail the load, not the run). Nothing fits: the leanest rung alone, tried anyway."""
        ladder = self.ladder(preset_name, measured)
        if available_gib is None and ram_gib is None:
            return ladder
        start = self._start_index(ladder, available_gib, ram_gib)
        if start is None:
            return [leanest(ladder, ram_gib)]
        rest = [r for r in ladder[start + 1:] if fits(r, None, ram_gib)]
        return [ladder[start], *rest]

    def forecast(self, preset_name: str, available_gib: float | None,
                 measured: Mapping[tuple[str, str], float] | None = None,
                 seconds: Mapping[tuple[str, str], float] | None = None,
                 ram_gib: float | None = None) -> PresetForecast:
        ladder = self.ladder(preset_name, measured)
        seconds = seconds or {}
        if available_gib is None:
            # No GPU reading (the fake backend, a driver that does not answer): no GPU verdict, but
            # RAM alone can still say that even the leanest rung cannot run on this machine.
            if ram_gib is not None and not any(fits(r, None, ram_gib) for r in ladder):
                # Among equals the smallest preset: the last resort a user would try.
                least = min(reversed(ladder), key=lambda r: r.predicted_host_gib or 0.0)
                return PresetForecast(preset_name, Fit.WONT_FIT, least, None, ram_available_gib=ram_gib,
                                      short_of=("system RAM",))
            # A time measured here still shows.
            return PresetForecast(preset_name, Fit.UNKNOWN, ladder[0], None,
                                  seconds.get((ladder[0].preset.name, ladder[0].memory.name)),
                                  ram_available_gib=ram_gib)
        index = self._start_index(ladder, available_gib, ram_gib)
        if index is None:
            lean = leanest(ladder, ram_gib)
            short = tuple(name for name, ok in (
                ("GPU memory", fits(lean, available_gib, None)),
                ("system RAM", fits(lean, None, ram_gib))) if not ok)
            return PresetForecast(preset_name, Fit.WONT_FIT, lean, available_gib,
                                  ram_available_gib=ram_gib, short_of=short or ("GPU memory",))
        start = ladder[index]
        if start.predicted_gib is None:
            fit = Fit.UNKNOWN
        elif start.preset.name != preset_name:
            fit = Fit.STEPS_DOWN
        elif self._roomy(start, available_gib, ram_gib):
            fit = Fit.FITS
        else:
            fit = Fit.TIGHT
        return PresetForecast(preset_name, fit, start, available_gib,
                              seconds.get((start.preset.name, start.memory.name)), ram_available_gib=ram_gib)


def replan(ladder: list[Rung], failed: Rung, tried: set[tuple[str, str]],
           available_gib: float | None, key_of: Callable[[Rung], Hashable],
           current_key: Hashable | None, left_keys: set, reload_allowed: bool,
           skip: Callable[[Rung], bool] = lambda rung: False,
           ram_gib: float | None = None) -> list[Rung]:
    """The rungs to try after `failed` ran out of memory, in order, under the one-reload rule.

    - every rung below `failed` in the ladder not tried yet, skipping those predicted not to fit
      the GPU memory or the system RAM (`ram_gib`) that is really free now (no margin: these are
      already the best readings there are); when none is predicted to fit, the leanest one (`leanest`:
      the low-RAM rung only where RAM is short) is still tried (a prediction can be pessimistic);
    - never a load key this click already left (going back loads the same weights again);
    - grouped by load key, the groups in the order of their best rung, so that the ladder's order
      of preference (the requested clip first) holds between groups and rungs sharing a key run
      together;
    - at most one key other than `current_key` (one reload), and none when `reload_allowed` is
      False (the click spent its reload);
    - nothing `skip` rules out (known to fail the same way: `Planner.skip_after`'s host-memory and
      GPU rules, undecodable latents), before the groups are formed.
    """
    names = [(r.preset.name, r.memory.name) for r in ladder]
    start = names.index((failed.preset.name, failed.memory.name)) + 1
    eligible = [r for r in ladder[start:] if (r.preset.name, r.memory.name) not in tried
                and key_of(r) not in left_keys and not skip(r)]
    fitting = [r for r in eligible if fits(r, available_gib, ram_gib)]
    if not fitting and eligible:
        fitting = [leanest(eligible, ram_gib)]
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
