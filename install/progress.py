"""How a download reports itself: byte/rate/time formatting, the progress record the UI and the terminal
read, and a rate meter. No network, no torch: the UI may import this (through `install`)."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.errors import WeightsError

log = logging.getLogger(__name__)


def format_bytes(n: float | None) -> str:
    """Decimal units, as disks and download sites count them."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_rate(bytes_per_s: float | None) -> str:
    return "—" if not bytes_per_s else f"{format_bytes(bytes_per_s)}/s"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class DownloadPhase(str, enum.Enum):
    CONNECTING = "connecting"
    CHECKING = "checking files on disk"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class DownloadProgress:
    """One progress reading. `bytes_done`/`bytes_total` cover every needed file, so a resumed download starts
    part-way; `rate_bps` and `eta_s` are measured on this session's transfer only."""

    phase: DownloadPhase
    message: str = ""
    file: str = ""
    file_index: int = 0
    file_count: int = 0
    file_bytes_done: int = 0
    file_bytes_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float | None = None
    eta_s: float | None = None
    error: WeightsError | None = field(default=None, compare=False)

    @property
    def fraction(self) -> float:
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total else 0.0

    @property
    def finished(self) -> bool:
        return self.phase in (DownloadPhase.DONE, DownloadPhase.FAILED, DownloadPhase.CANCELLED)

    def describe(self) -> str:
        """One plain-text line for a terminal or a status label."""
        if self.phase is DownloadPhase.CHECKING:
            return f"checking files on disk: [{self.file_index}/{self.file_count}] {self.file}"
        if self.phase is DownloadPhase.DOWNLOADING:
            return (f"[{self.file_index}/{self.file_count}] {self.file}  "
                    f"{format_bytes(self.bytes_done)} / {format_bytes(self.bytes_total)} "
                    f"({self.fraction:.0%})  {format_rate(self.rate_bps)}  ETA {format_eta(self.eta_s)}")
        return f"{self.phase.value}: {self.message}" if self.message else self.phase.value


class RateMeter:
    """Transfer rate over the last `window_s` seconds: a whole-session average hides a stalled connection."""

    def __init__(self, window_s: float = 8.0, clock: Callable[[], float] = time.monotonic):
        self._window = window_s
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, n: int) -> None:
        self._total += n
        now = self._clock()
        self._samples.append((now, self._total))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, b0), (_, b1) = self._samples[0], self._samples[-1]
        elapsed = self._clock() - t0  # up to now, so a stalled connection shows a falling rate
        return (b1 - b0) / elapsed if elapsed > 0 else None


class TerminalProgress:
    """Plain log lines (no carriage returns, so it reads the same in a log file): one per file and at most
    one every `interval_s` seconds while bytes flow."""

    def __init__(self, interval_s: float = 2.0):
        self._interval = interval_s
        self._last = 0.0
        self._last_key: tuple[str, str] = ("", "")

    def __call__(self, p: DownloadProgress) -> None:
        key = (p.phase.value, p.file)
        now = time.monotonic()
        # Checking hashes ~22 GB for a folder from elsewhere: log it at the interval only.
        new_file = key != self._last_key and p.phase is not DownloadPhase.CHECKING
        if new_file or now - self._last >= self._interval or p.finished:
            self._last, self._last_key = now, key
            log.info("%s", p.describe())
