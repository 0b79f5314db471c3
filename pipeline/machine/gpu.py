"""Everything that reads or frees GPU memory, in one module.

`GpuMonitor.read()` returns a `MemorySnapshot` or `None`: no NVIDIA driver, no `nvidia-ml-py`, an
NVML call that is not supported, all give `None`, never an exception, because the VRAM panel calls
it from a timer. Torch is consulted only when something else has already imported it, so reading
memory never initialises CUDA.
"""

from __future__ import annotations

import gc
import logging
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.machine import hostmem

log = logging.getLogger(__name__)

GIB = hostmem.GIB

# Messages that mean "the allocator could not get device memory" even where the exception type is
# a plain RuntimeError: cuBLAS/cuDNN workspace allocations fail this way, and LightX2V re-raises
# some errors as bare Exception with the original text.
_OOM_MARKERS = (
    "cuda out of memory",
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "cudaerrormemoryallocation",
)


def is_oom(exc: BaseException) -> bool:
    """True when `exc` (or anything in its cause/context chain) is an out-of-memory error: the GPU's,
    or the host's (a failed pageable or pinned allocation, `hostmem.is_host_oom`), which the ladder
    treats the same way: step down to a rung that needs less."""
    if hostmem.is_host_oom(exc):
        return True
    torch = sys.modules.get("torch")
    oom_types = () if torch is None else tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None),
                    getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if isinstance(t, type))
    for current in hostmem.exception_chain(exc):
        if oom_types and isinstance(current, oom_types):
            return True
        # Triton's OutOfResources is shared memory per kernel, not VRAM: stepping down won't help.
        if type(current).__name__ != "OutOfResources" and any(
                marker in str(current).lower() for marker in _OOM_MARKERS):
            return True
    return False


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


def drop_frame_locals(exc: BaseException) -> BaseException:
    """Clear the locals of the frames in `exc`'s traceback and return `exc`. Those locals may be
    the failed run's GPU tensors, alive for as long as the exception is kept (pytorch#18853)."""
    traceback.clear_frames(exc.__traceback__)
    return exc


def free_gpu_memory() -> None:
    """Collect garbage and return cached blocks to the driver. Call it outside `except` blocks."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        except RuntimeError:
            log.warning("could not empty the CUDA cache", exc_info=True)


@dataclass(frozen=True)
class MemorySnapshot:
    gpu_name: str
    used_bytes: int
    total_bytes: int
    free_bytes: int
    torch_reserved_bytes: int | None = None  # this process's PyTorch caching allocator
    torch_allocated_bytes: int | None = None

    @property
    def used_gib(self) -> float:
        return self.used_bytes / GIB

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def available_gib(self) -> float:
        """What a new run can use: free on the device plus what this process already reserved."""
        return (self.free_bytes + (self.torch_reserved_bytes or 0)) / GIB


def torch_memory(device_index: int) -> tuple[int, int] | None:
    """(reserved, allocated) bytes of this process's PyTorch allocator on the device, or None when
    torch is not imported or CUDA not initialised."""
    cuda = hostmem.initialised_cuda()
    try:
        return None if cuda is None else (int(cuda.memory_reserved(device_index)),
                                          int(cuda.memory_allocated(device_index)))
    except Exception:  # noqa: BLE001
        return None


class GpuMonitor:
    """NVML view of one GPU, plus this process's PyTorch allocator on it (`torch`). `nvml` defaults
    to the `pynvml` module of nvidia-ml-py; tests pass a fake, and with it `NO_TORCH`: the real
    allocator (which an earlier test may have initialised) is not the fake device's."""

    def __init__(self, nvml: Any = None, device_index: int = 0, torch: "TorchReadings | None" = None):
        self.torch = torch or TorchReadings()
        self._nvml = nvml
        self._device_index = device_index
        self._handle: Any = None
        self._name: str | None = None
        self._lock = threading.Lock()
        self._failed = False

    def _ensure(self) -> bool:
        if self._handle is not None:
            return True
        if self._failed:
            return False
        try:
            if self._nvml is None:
                import pynvml  # nvidia-ml-py

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self._device_index)
            name = self._nvml.nvmlDeviceGetName(self._handle)
            self._name = name.decode() if isinstance(name, bytes) else str(name)
            return True
        except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
            log.info("NVML unavailable: no NVIDIA GPU readings")
            self._failed = True
            return False

    def read(self) -> MemorySnapshot | None:
        with self._lock:
            if not self._ensure():
                return None
            try:
                info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            except Exception:  # noqa: BLE001 - NVMLError_NotSupported / GPU lost: no reading
                log.debug("nvmlDeviceGetMemoryInfo failed", exc_info=True)
                return None
        reserved, allocated = self.torch.memory(self._device_index) or (None, None)
        return MemorySnapshot(gpu_name=self._name or "GPU", used_bytes=int(info.used),
                              total_bytes=int(info.total), free_bytes=int(info.free),
                              torch_reserved_bytes=reserved, torch_allocated_bytes=allocated)

    def facts(self) -> dict[str, Any] | None:
        """Static facts for the doctor: name, driver, compute capability. None without NVML."""
        with self._lock:
            if not self._ensure():
                return None
            out: dict[str, Any] = {"name": self._name}
            for key, call in (("driver", lambda: self._nvml.nvmlSystemGetDriverVersion()),
                              ("cuda_driver", lambda: self._nvml.nvmlSystemGetCudaDriverVersion()),
                              ("compute_capability",
                               lambda: self._nvml.nvmlDeviceGetCudaComputeCapability(self._handle))):
                try:
                    value = call()
                    out[key] = value.decode() if isinstance(value, bytes) else value
                except Exception:  # noqa: BLE001
                    out[key] = None
            return out


def device_count(nvml: Any = None) -> int | None:
    """How many NVIDIA GPUs the driver reports (NVML indices, CUDA_VISIBLE_DEVICES ignored), or
    None without a driver or nvidia-ml-py."""
    try:
        if nvml is None:
            import pynvml  # nvidia-ml-py

            nvml = pynvml
        nvml.nvmlInit()
        return int(nvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
        return None


@dataclass
class VramTimeline:
    """Samples of device memory in use during one job: (seconds since start, used bytes, phase)."""

    samples: list[tuple[float, int, str]] = field(default_factory=list)
    peak_used_bytes: int = 0
    baseline_used_bytes: int | None = None
    peak_torch_reserved_bytes: int | None = None
    host: hostmem.HostPeaks = field(default_factory=hostmem.HostPeaks)

    def as_record(self) -> dict[str, Any]:
        return {
            "baseline_used_gib": None if self.baseline_used_bytes is None
            else round(self.baseline_used_bytes / GIB, 3),
            "peak_used_gib": round(self.peak_used_bytes / GIB, 3) if self.samples else None,
            "peak_torch_reserved_gib": None if self.peak_torch_reserved_bytes is None
            else round(self.peak_torch_reserved_bytes / GIB, 3),
            "samples": [[round(t, 3), round(u / GIB, 3), p] for t, u, p in self.samples],
        }


class VramSampler:
    """Samples `monitor.read()` on a thread while a job runs; keeps the peak and the timeline."""

    def __init__(self, monitor: GpuMonitor, interval_s: float = 0.1, max_samples: int = 20000,
                 host_reader: Callable[[], hostmem.ProcessMemory | None] | None = None):
        """`host_reader`: this process's host memory per tick (default `hostmem.HostReader()`);
        its peaks per phase land in `timeline.host`."""
        self._monitor = monitor
        self._host_reader = host_reader if host_reader is not None else hostmem.HostReader()
        self._interval = interval_s
        self._max = max_samples
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.phase = ""
        self.timeline = VramTimeline()

    def _sample(self) -> None:
        host = self._host_reader()
        if host is not None:
            self.timeline.host.note(self.phase, host)
        snap = self._monitor.read()
        if snap is None:
            return
        tl = self.timeline
        if tl.baseline_used_bytes is None:
            tl.baseline_used_bytes = snap.used_bytes
        tl.peak_used_bytes = max(tl.peak_used_bytes, snap.used_bytes)
        if len(tl.samples) < self._max:
            tl.samples.append((time.monotonic() - self._t0, snap.used_bytes, self.phase))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> "VramSampler":
        self._t0 = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="vram-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sample()
        peak = self._monitor.torch.peak_reserved_gib()
        if peak is not None:
            self.timeline.peak_torch_reserved_bytes = int(peak * GIB)


def reset_torch_peak() -> None:
    """Start a new peak-reserved window (per attempt), if torch has CUDA initialised."""
    cuda = hostmem.initialised_cuda()
    try:
        if cuda is not None:
            cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001
        log.debug("could not reset the peak memory statistics", exc_info=True)


def torch_peak_reserved_gib() -> float | None:
    cuda = hostmem.initialised_cuda()
    try:
        return None if cuda is None else cuda.max_memory_reserved() / GIB
    except Exception:  # noqa: BLE001
        return None


@dataclass(frozen=True)
class TorchReadings:
    """Where a GpuMonitor reads this process's PyTorch allocator: the real one by default."""

    memory: Callable[[int], "tuple[int, int] | None"] = torch_memory
    peak_reserved_gib: Callable[[], "float | None"] = torch_peak_reserved_gib
    reset_peak: Callable[[], None] = reset_torch_peak


# For a monitor of a fake device: no allocator readings at all.
NO_TORCH = TorchReadings(memory=lambda device_index: None, peak_reserved_gib=lambda: None,
                         reset_peak=lambda: None)
