"""Host (system) memory: what this process must hold, what the machine has free, and the one test
for "the host ran out of memory".

The split that matters for a model whose weights sit in host RAM:
- must-hold: anonymous pages (`RssAnon`: Python, torch's pageable tensors), shared memory
  (`RssShmem`) and pinned (page-locked) buffers. The kernel cannot drop any of them; if they do not
  fit, the machine swaps or the OOM killer ends the process.
- file-backed (`RssFile`): pages of memory-mapped files (safetensors weights read through mmap).
  Under pressure the kernel drops them and reads them again later, so they cost speed, not a crash.

Pinned memory from `cudaHostAlloc` is mapped by the NVIDIA driver, and where its pages show up
depends on the driver: as `RssShmem` (measured on an H200 host, 2026-11-30: 18.75 GiB pinned, 18.76
GiB RssShmem), as `RssFile` of a `/dev/nvidia*` mapping, or not in RSS at all. So must-hold is
anon + shmem + the /dev/nvidia* RSS, plus whatever part of torch's pinned count none of those holds;
file-backed subtracts the /dev/nvidia* RSS. (A process that also held shared memory of its own
while its pinned pages sat outside RSS would be under-counted by the smaller of the two; this app
creates no shared memory of its own.)

Every reader returns None where the facts cannot be read (no /proc on Windows and macOS without
psutil, a sandbox hiding /proc), never raises: the sampler and the planner call them all the time.
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

GIB = 1024**3

# Messages of host allocation failures: torch's CPU allocator, the CUDA pinned-host allocator.
_HOST_OOM_MARKERS = (
    "defaultcpuallocator: can't allocate memory",
    "can't allocate memory: you tried to allocate",
    "cudahostalloc",
    "pinned memory",
    "out of host memory",
)


class HostOutOfMemory(MemoryError):
    """A host allocation (pageable or pinned) failed. The LightX2V adapter raises it, without the
    failed run's traceback, for any host-memory failure it caught; a MemoryError, so anything that
    catches those (and `is_host_oom`) still recognises it."""


@dataclass(frozen=True)
class ProcessMemory:
    anon_bytes: int
    file_bytes: int
    shmem_bytes: int
    pinned_bytes: int | None = None  # torch's pinned-host allocator, when CUDA is up
    device_mapped_bytes: int | None = None  # RSS of /dev/nvidia* mappings, when read

    @property
    def must_hold_bytes(self) -> int:
        mapped = self.device_mapped_bytes or 0
        unseen_pinned = max(0, (self.pinned_bytes or 0) - self.shmem_bytes - mapped)
        return self.anon_bytes + self.shmem_bytes + mapped + unseen_pinned

    @property
    def reclaimable_bytes(self) -> int:
        """File-backed pages the kernel may drop (memory-mapped weights)."""
        return max(0, self.file_bytes - (self.device_mapped_bytes or 0))

    @property
    def must_hold_gib(self) -> float:
        return self.must_hold_bytes / GIB

    @property
    def file_gib(self) -> float:
        return self.reclaimable_bytes / GIB


@dataclass(frozen=True)
class SystemMemory:
    total_bytes: int
    available_bytes: int | None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None

    @property
    def available_gib(self) -> float | None:
        return None if self.available_bytes is None else self.available_bytes / GIB


def parse_status(text: str) -> ProcessMemory | None:
    """The Rss* lines of /proc/<pid>/status (kB). None when they are absent (kernels before 4.5)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            parts = rest.split()
            try:
                fields[key] = int(parts[0]) * 1024
            except (IndexError, ValueError):
                return None
    if len(fields) != 3:
        return None
    return ProcessMemory(fields["RssAnon"], fields["RssFile"], fields["RssShmem"])


def parse_smaps_device_rss(text: str, prefix: str = "/dev/nvidia") -> int:
    """Sum of `Rss:` (kB) over the mappings in /proc/<pid>/smaps whose path starts with `prefix`."""
    total = 0
    inside = False
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5].strip().startswith(prefix)
        elif inside and line.startswith("Rss:"):
            try:
                total += int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                continue
    return total


def initialised_cuda() -> Any:
    """`torch.cuda` when torch is imported and CUDA is up, else None: reading never initialises CUDA."""
    torch = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a torch without CUDA support: no reading
        return None


def pinned_bytes() -> int | None:
    """Bytes torch's pinned-host allocator holds (its rounded blocks, cached ones included)."""
    cuda = initialised_cuda()
    try:
        stats = cuda.host_memory_stats() if cuda is not None else None
    except Exception:  # noqa: BLE001 - older torch: no reading
        return None
    if stats is None:
        return None
    for key in ("allocated_bytes.current", "allocated_bytes.all.current", "reserved_bytes.current"):
        value = stats.get(key)
        if isinstance(value, int):
            return value
    # Key names moved between torch releases: any current byte count of allocated/reserved blocks.
    for key, value in stats.items():
        if isinstance(value, int) and key.endswith("current") and ("allocated_bytes" in key or "reserved_bytes" in key):
            return value
    return None


def device_mapped_bytes() -> int | None:
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            return parse_smaps_device_rss(f.read())
    except OSError:
        return None


def read_process(device_mapped: int | None = None) -> ProcessMemory | None:
    """This process's memory split, or None where /proc/self/status cannot be read.
    `device_mapped`: a recent `device_mapped_bytes()` (reading smaps costs more than status)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            status = parse_status(f.read())
    except OSError:
        status = None
    if status is None:
        try:
            import psutil  # type: ignore[import-not-found]

            info = psutil.Process().memory_info()
            # No split outside Linux: all of RSS counts as must-hold (the safe side).
            status = ProcessMemory(int(info.rss), 0, 0)
        except Exception:  # noqa: BLE001 - ImportError, AccessDenied: no reading
            return None
    return ProcessMemory(status.anon_bytes, status.file_bytes, status.shmem_bytes, pinned_bytes(), device_mapped)


def parse_meminfo(text: str) -> SystemMemory | None:
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            try:
                fields[key] = int(parts[0]) * 1024
            except ValueError:
                continue
    if "MemTotal" not in fields:
        return None
    return SystemMemory(fields["MemTotal"], fields.get("MemAvailable"), fields.get("SwapTotal"),
                        fields.get("SwapFree"))


def read_system() -> SystemMemory | None:
    """Total and available RAM and swap: psutil when installed (Linux, Windows, macOS), else
    /proc/meminfo; None when neither answers."""
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            vm, sw = psutil.virtual_memory(), psutil.swap_memory()
            return SystemMemory(int(vm.total), int(vm.available), int(sw.total), int(sw.free))
        except Exception:  # noqa: BLE001 - psutil raises its own errors on odd systems
            log.debug("psutil could not read memory", exc_info=True)
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            return parse_meminfo(f.read())
    except OSError:
        return None


def available_for_process_gib(system: SystemMemory | None, process: ProcessMemory | None) -> float | None:
    """What a (re)load in this process can count on: free RAM plus what this process already holds
    (a reload releases the old model first), as VRAM's free + reserved. None without a reading."""
    if system is None or system.available_bytes is None:
        return None
    held = process.must_hold_bytes if process is not None else 0
    return (system.available_bytes + held) / GIB


def read_io() -> dict[str, int] | None:
    """Bytes this process read: `read_bytes` from storage (page-cache hits and mmap pages already in
    memory excluded; mmap faults included) and `rchar` through read calls. None where unreadable."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            out = {}
            for line in f:
                key, _, value = line.partition(":")
                if key in ("rchar", "read_bytes"):
                    out[key] = int(value)
            return out if "read_bytes" in out else None
    except (OSError, ValueError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        io = psutil.Process().io_counters()
        return {"read_bytes": int(io.read_bytes), "rchar": int(getattr(io, "read_chars", io.read_bytes))}
    except Exception:  # noqa: BLE001 - ImportError, AccessDenied, not supported (macOS)
        return None


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its cause (or context), and so on, each exception once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_host_oom(exc: BaseException) -> bool:
    """True when `exc` (or its cause/context chain) is a failed host allocation: MemoryError (ours
    included), torch's CPU allocator, or CUDA's pinned-host allocator (cudaHostAlloc: "CUDA error:
    out of memory" raised from pinning code)."""
    torch = sys.modules.get("torch")
    device_oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    for current in exception_chain(exc):
        text = str(current).lower()
        if isinstance(current, MemoryError) or any(marker in text for marker in _HOST_OOM_MARKERS):
            return True
        # CUDA reports a failed cudaHostAlloc with the same words as some device failures: the
        # names of the frames that raised it (pinning code) tell the two apart.
        if "cuda error: out of memory" in text and not (isinstance(device_oom, type) and isinstance(current, device_oom)):
            if any("pin" in frame.f_code.co_name.lower() for frame, _ in traceback.walk_tb(current.__traceback__)):
                return True
    return False


@dataclass
class HostPeaks:
    """Peak must-hold and file-backed bytes, overall and per phase."""

    peak_must_hold_bytes: int = 0
    peak_file_bytes: int = 0
    per_phase: dict[str, list[int]] | None = None  # phase -> [must_hold, file]
    samples: int = 0

    def note(self, phase: str, reading: ProcessMemory) -> None:
        must, file = reading.must_hold_bytes, reading.reclaimable_bytes
        self.samples += 1
        self.peak_must_hold_bytes = max(self.peak_must_hold_bytes, must)
        self.peak_file_bytes = max(self.peak_file_bytes, file)
        if self.per_phase is None:
            self.per_phase = {}
        slot = self.per_phase.setdefault(phase or "start", [0, 0])
        slot[0], slot[1] = max(slot[0], must), max(slot[1], file)

    def as_record(self) -> dict[str, Any]:
        if not self.samples:
            return {"peak_must_hold_gib": None, "peak_file_gib": None, "per_phase": {}}
        return {"peak_must_hold_gib": round(self.peak_must_hold_bytes / GIB, 3),
                "peak_file_gib": round(self.peak_file_bytes / GIB, 3),
                "per_phase": {phase: {"must_hold_gib": round(m / GIB, 3), "file_gib": round(f / GIB, 3)}
                              for phase, (m, f) in (self.per_phase or {}).items()}}


class HostReader:
    """`read_process` with the smaps reading refreshed every `smaps_every` calls (it walks every
    mapping; status is cheap). The VRAM sampler calls it on each tick."""

    def __init__(self, smaps_every: int = 10, process: Callable[..., ProcessMemory | None] = read_process,
                 smaps: Callable[[], int | None] = device_mapped_bytes):
        self._every = max(1, smaps_every)
        self._process = process
        self._smaps = smaps
        self._calls = 0
        self._device: int | None = None

    def __call__(self) -> ProcessMemory | None:
        if self._calls % self._every == 0:
            self._device = self._smaps()
        self._calls += 1
        return self._process(self._device)
