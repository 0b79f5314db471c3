"""Setup doctor: checks the machine against what the INT8 Wan2.1 path needs and says what to fix.

Every fact comes through `SystemProbes`, so tests can describe any machine (a 12 GB sm_86 card with 16 GB of
RAM, no GPU, an old driver) without one. Nothing here raises: a check that itself fails becomes a finding.
Torch is imported only inside `probe_torch_build`, when the doctor runs, never when this module is imported,
and LightX2V is only looked up (find_spec), never imported: importing it initialises CUDA and pulls every runner.
"""

from __future__ import annotations

import argparse
import enum
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.machine.software import module_present
from pipeline.machine import hostmem
from pipeline.backends import weights_layout
from pipeline.machine.gpu import GIB, GpuMonitor
from install.cli import default_dir
from install import torch_build
from install.progress import format_bytes
from install.verify import VerifyReport, verify
from install.weights import APPROX_TOTAL_BYTES, DEFAULT_WEIGHTS_DIR, OUTPUTS_DIR_ENV, WEIGHTS_DIR_ENV, free_disk_bytes
from presets import PresetBook, PresetError, load_presets

log = logging.getLogger(__name__)

DEFAULT_OUTPUTS_DIR = Path("outputs")

# LightX2V keeps the DiT blocks (~14.5 GB) and T5 blocks (~4.6 GB) pinned in host RAM (docs/lightx2v.md §2):
# measured 18.75 GiB pinned, 21.6 GiB must-hold for the whole process on the fast rungs
# (docs/host-memory.md).
PINNED_HOST_GIB = 19
APP_FAST_HOST_GIB = 22
# A "32 GB" machine reports ~31 GiB (firmware and kernel reservations), so the line sits a little below 32.
RAM_RECOMMENDED_GIB = 30
# What the desktop, a browser and the kernel keep for themselves when judging which rungs fit.
RAM_RESERVED_FOR_OTHERS_GIB = 4.0
VRAM_MIN_GIB = 8
VRAM_TARGET_GIB = 11.5  # a 12 GB card reports 12.0 GiB; below this the 720p preset does not fit
VRAM_BUSY_GIB = 1.5  # more than this already in use by other programs costs the large presets
OUTPUTS_WARN_BYTES = 5 * 10**9
OUTPUTS_FAIL_BYTES = 1 * 10**9
# torch wheels built for CUDA 13 need an R580+ driver (the notes, TL;DR 9: PyPI torch 2.11.0 is +cu130).
DRIVER_FOR_CUDA_MAJOR = {13: 580, 12: 525, 11: 450}
NOTHING_TO_DO = "Nothing to do."
# What app.py sets with os.environ.setdefault before CUDA starts (its build_app reads it from here).
APP_ALLOC_CONF = "expandable_segments:True"


class Status(str, enum.Enum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"


_SEVERITY = {Status.OK: 0, Status.INFO: 0, Status.WARN: 1, Status.FAIL: 2}


@dataclass(frozen=True)
class Finding:
    name: str
    status: Status
    detail: str
    fix: str


@dataclass(frozen=True)
class DoctorReport:
    findings: tuple[Finding, ...]

    @property
    def worst(self) -> Status:
        return max((f.status for f in self.findings), key=lambda s: _SEVERITY[s], default=Status.OK)

    @property
    def has_failures(self) -> bool:
        return any(f.status is Status.FAIL for f in self.findings)

    def get(self, name: str) -> Finding | None:
        return next((f for f in self.findings if f.name == name), None)

    def rows(self) -> list[list[str]]:
        """Rows for a table: check, status, what we found, what to do."""
        return [[f.name, f.status.value, f.detail, f.fix] for f in self.findings]

    def headline(self) -> str:
        fails = sum(f.status is Status.FAIL for f in self.findings)
        warns = sum(f.status is Status.WARN for f in self.findings)
        if fails:
            return f"{fails} problem(s) must be fixed before generating; {warns} warning(s)."
        if warns:
            return f"Ready, with {warns} warning(s)."
        return "Everything checked is ready."

    def to_text(self) -> str:
        lines = [self.headline(), ""]
        for f in self.findings:
            lines.append(f"[{f.status.value.upper():4}] {f.name}: {f.detail}")
            if f.fix and f.fix != NOTHING_TO_DO:
                lines.append(f"       fix: {f.fix}")
        return "\n".join(lines)


# Total and available RAM and swap, as pipeline.machine.hostmem reads them (one reading, one type).
MemoryInfo = hostmem.SystemMemory


@dataclass(frozen=True)
class TorchBuild:
    installed: bool
    version: str | None = None
    cuda: str | None = None  # torch.version.cuda: "13.0", or None for a CPU-only build
    error: str | None = None  # import failed: the message


def probe_memory() -> MemoryInfo | None:
    """Total and available RAM and swap: pipeline.machine.hostmem (psutil, else /proc/meminfo), then sysconf
    elsewhere on POSIX (no psutil, no /proc), then the Windows API."""
    system = hostmem.read_system()
    if system is not None:
        return system
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return MemoryInfo(int(total), int(avail))
    except (AttributeError, OSError, ValueError):
        pass
    if sys.platform == "win32":
        return _probe_memory_windows()
    return None


def _probe_memory_windows() -> MemoryInfo | None:
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return MemoryInfo(int(status.ullTotalPhys), int(status.ullAvailPhys))


def probe_torch_build() -> TorchBuild:
    """Imports torch (only here, only when asked) to read its version and CUDA build."""
    if importlib.util.find_spec("torch") is None:
        return TorchBuild(installed=False)
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install raises all sorts (OSError for a missing libcudart)
        return TorchBuild(installed=True, error=f"{type(exc).__name__}: {exc}")
    return TorchBuild(installed=True, version=str(torch.__version__), cuda=getattr(torch.version, "cuda", None))


def _disk_free_or_none(path: Path) -> int | None:
    try:
        return free_disk_bytes(path)
    except OSError:
        return None


@dataclass(frozen=True)
class SystemProbes:
    """The facts the doctor reads. `default()` reads this machine; tests replace any of them."""

    monitor: GpuMonitor
    memory: Callable[[], MemoryInfo | None] = probe_memory
    disk_free: Callable[[Path], int | None] = _disk_free_or_none
    torch_build: Callable[[], TorchBuild] = probe_torch_build
    has_module: Callable[[str], bool] = module_present
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    verify_weights: Callable[[Path], VerifyReport] = verify
    platform: str = sys.platform

    @classmethod
    def default(cls, monitor: GpuMonitor | None = None) -> SystemProbes:
        return cls(monitor=monitor or GpuMonitor())


# --------------------------------------------------------------------------------------------- checks


def _architecture(major: int, minor: int) -> str:
    names = {7: "Volta/Turing", 8: "Ampere" if minor < 9 else "Ada Lovelace", 9: "Hopper", 10: "Blackwell",
             12: "Blackwell"}
    return names.get(major, "unknown architecture")


def _check_gpu(facts: dict[str, Any] | None, probes: SystemProbes) -> list[Finding]:
    if facts is None:
        if not probes.has_module("pynvml"):
            return [Finding("GPU", Status.FAIL, "Cannot query the GPU: the nvidia-ml-py package is not installed.",
                            "pip install nvidia-ml-py, then re-check.")]
        return [Finding("GPU", Status.FAIL, "No NVIDIA GPU found (the NVIDIA driver did not answer).",
                        "This app needs an NVIDIA GPU with CUDA. Install or repair the NVIDIA driver; "
                        "nvidia-smi in a terminal should list the card.")]
    name = facts.get("name") or "NVIDIA GPU"
    cc = facts.get("compute_capability")
    if not (isinstance(cc, (tuple, list)) and len(cc) == 2):
        return [Finding("GPU", Status.WARN, f"{name}; compute capability unknown.",
                        "Update the NVIDIA driver so it reports the compute capability.")]
    major, minor = int(cc[0]), int(cc[1])
    arch = _architecture(major, minor)
    gpu = Finding("GPU", Status.OK, f"{name}, compute capability {major}.{minor} ({arch}).", NOTHING_TO_DO)
    if (major, minor) < (8, 0):
        path = Finding("INT8 path", Status.FAIL,
                       f"sm_{major}{minor} is older than Ampere (sm_80): it lacks the INT8 tensor-core "
                       "instructions the Triton INT8 kernels and SageAttention use.",
                       "Use an RTX 30-series or newer card (Ampere, sm_80+).")
    elif (major, minor) < (8, 9):
        path = Finding("INT8 path", Status.OK,
                       f"sm_{major}{minor}: INT8 weights run on the INT8 tensor cores (int8-triton). Ampere has no "
                       "FP8 tensor cores, so FP8 weights would only save disk, not time; INT8 is the right choice.",
                       NOTHING_TO_DO)
    else:
        path = Finding("INT8 path", Status.OK,
                       f"sm_{major}{minor}: INT8 runs on tensor cores; this card also has FP8 tensor cores.",
                       NOTHING_TO_DO)
    return [gpu, path]


def _check_vram(probes: SystemProbes, facts: dict[str, Any] | None) -> Finding:
    snap = probes.monitor.read() if facts is not None else None
    if snap is None:
        return Finding("VRAM", Status.FAIL if facts is None else Status.WARN, "No GPU memory reading.",
                       "See the GPU check above." if facts is None else "Update the NVIDIA driver.")
    total, free = snap.total_bytes / GIB, snap.free_bytes / GIB
    busy = (snap.total_bytes - snap.free_bytes) / GIB
    detail = f"{total:.1f} GB total, {free:.1f} GB free ({busy:.1f} GB in use by other programs)."
    if total < VRAM_MIN_GIB:
        return Finding("VRAM", Status.FAIL, detail, f"At least {VRAM_MIN_GIB} GB of GPU memory is needed; "
                                                    "12 GB is the target.")
    if total < VRAM_TARGET_GIB:
        return Finding("VRAM", Status.WARN, detail,
                       "Below 12 GB only the 480p presets will fit; 720p will fall back to 480p.")
    if busy > VRAM_BUSY_GIB:
        return Finding("VRAM", Status.WARN, detail,
                       "Close programs that use the GPU (browsers with video, games, other AI apps) before "
                       "generating; the 720p preset needs nearly all 12 GB.")
    return Finding("VRAM", Status.OK, detail, NOTHING_TO_DO)


def _parse_driver_major(driver: Any) -> int | None:
    try:
        return int(str(driver).split(".")[0])
    except ValueError:
        return None


def _cuda_version_tuple(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def matching_torch(driver: Any) -> tuple[str, str]:
    """The PyTorch build that fits this driver (./run.sh installs the same) and how to install it."""
    try:
        match = torch_build.build_for_driver(None if driver is None else str(driver))
    except torch_build.DriverTooOld as exc:
        return "none (driver too old)", str(exc)
    if match is None:
        return "unknown (driver version unreadable)", "Run ./run.sh: it reads the driver and installs the right build."
    return (f"{match.tag} (CUDA {match.cuda}, driver R{match.min_driver}+)",
            "pip install " + " ".join(torch_build.pip_args(match)))


def _check_driver_and_torch(facts: dict[str, Any] | None, probes: SystemProbes) -> Finding:
    build = probes.torch_build()
    driver = facts.get("driver") if facts else None
    match, install = matching_torch(driver) if driver else ("", "")
    for_driver = f" For NVIDIA driver {driver} the matching build is {match}." if driver else ""
    if not build.installed or build.error or not build.cuda:
        what = ("PyTorch is not installed." if not build.installed else
                f"PyTorch is installed but fails to import: {build.error}" if build.error else
                f"PyTorch {build.version} is a CPU-only build.")
        return Finding("Driver / PyTorch", Status.FAIL, what + for_driver,
                       install or "Install the NVIDIA driver first; ./run.sh then installs the matching PyTorch.")
    torch_cuda = _cuda_version_tuple(build.cuda)
    if facts is None:
        return Finding("Driver / PyTorch", Status.FAIL,
                       f"PyTorch {build.version} is built for CUDA {build.cuda}, but no NVIDIA driver answered.",
                       "Install the NVIDIA driver (R580 or newer for CUDA 13 builds of PyTorch).")
    driver_major = _parse_driver_major(driver)
    cuda_driver = facts.get("cuda_driver")  # NVML: e.g. 13000 = the newest CUDA this driver runs
    driver_cuda = (int(cuda_driver) // 1000, int(cuda_driver) % 1000 // 10) if isinstance(cuda_driver, int) else None
    detail = (f"NVIDIA driver {driver or 'unknown'}"
              f"{f' (supports CUDA up to {driver_cuda[0]}.{driver_cuda[1]})' if driver_cuda else ''}; "
              f"PyTorch {build.version} built for CUDA {build.cuda}.{for_driver}")
    if torch_cuda is None:
        return Finding("Driver / PyTorch", Status.WARN, detail, "Could not read the CUDA version of PyTorch.")
    needed = DRIVER_FOR_CUDA_MAJOR.get(torch_cuda[0])
    too_old = (driver_major is not None and needed is not None and driver_major < needed) or (
        driver_cuda is not None and driver_cuda[0] < torch_cuda[0])
    if too_old:
        return Finding("Driver / PyTorch", Status.FAIL, detail + " The driver is too old for this PyTorch build.",
                       f"Update the NVIDIA driver to R{needed or '?'} or newer, or install the PyTorch build "
                       f"for your driver: {install}")
    if driver_cuda is not None and driver_cuda < torch_cuda:
        return Finding("Driver / PyTorch", Status.WARN, detail,
                       "The driver is one CUDA minor version behind PyTorch; it normally works (minor-version "
                       "compatibility) but a driver update avoids rare kernel-compilation errors.")
    return Finding("Driver / PyTorch", Status.OK, detail, NOTHING_TO_DO)


def _rungs_that_fit(presets: PresetBook, usable_gib: float) -> tuple[list[str], list[str]]:
    """(rung names whose predicted host memory fits `usable_gib`, those that do not), by rung name
    across presets (every preset ships the same rung kinds)."""
    fit: dict[str, bool] = {}
    for preset in presets.values():
        for rung in preset.rungs:
            ok = rung.predicted_host_gib is None or rung.predicted_host_gib <= usable_gib
            fit[rung.name] = fit.get(rung.name, True) and ok
    return [n for n, ok in fit.items() if ok], [n for n, ok in fit.items() if not ok]


def _check_ram(probes: SystemProbes, presets: PresetBook | None = None) -> Finding:
    mem = probes.memory()
    if mem is None:
        return Finding("System RAM", Status.INFO, "Could not read the amount of RAM.",
                       f"Make sure the machine has at least 32 GB: LightX2V keeps about {PINNED_HOST_GIB} GB of "
                       "weights in RAM (16 GB runs the slower low-RAM settings).")
    total = mem.total_bytes / GIB
    avail = f", {mem.available_bytes / GIB:.1f} GB available now" if mem.available_bytes is not None else ""
    swap = ""
    if mem.swap_total_bytes is not None:
        swap = (f"; swap {mem.swap_total_bytes / GIB:.1f} GB"
                + (f" ({mem.swap_free_bytes / GIB:.1f} GB free)" if mem.swap_free_bytes is not None else "")
                if mem.swap_total_bytes else "; no swap")
    detail = (f"{total:.1f} GB installed{avail}{swap}. LightX2V keeps about {PINNED_HOST_GIB} GB of weights "
              f"pinned in RAM on the fast settings (about {APP_FAST_HOST_GIB} GB for the app in all).")
    if presets is None:
        try:
            presets = load_presets()
        except PresetError:
            presets = None
    usable = total - RAM_RESERVED_FOR_OTHERS_GIB
    runs, not_runs = _rungs_that_fit(presets, usable) if presets is not None else ([], [])
    if presets is not None:
        detail += (f" With {usable:.0f} GB left beside the desktop this machine can run: "
                   f"{', '.join(runs) or 'no rung'}" + (f" (not: {', '.join(not_runs)})" if not_runs else "") + ".")
    if presets is not None and not runs:
        return Finding("System RAM", Status.FAIL, detail,
                       "Even the low-RAM settings need about 10 GB of RAM for this app alone; add RAM or swap.")
    if total < RAM_RECOMMENDED_GIB:
        return Finding("System RAM", Status.WARN, detail,
                       "32 GB or more is recommended. With less, the app runs the low-RAM settings: the DiT "
                       "is read from disk on every step (LightX2V's lazy_load; slower, best on an NVMe SSD) "
                       "and the text encoder is loaded for each prompt. Close browsers and other large "
                       "programs before generating; adding RAM fixes it.")
    return Finding("System RAM", Status.OK, detail, NOTHING_TO_DO)


def _check_disks(weights_dir: Path, outputs_dir: Path, probes: SystemProbes, weights_ok: bool) -> list[Finding]:
    out: list[Finding] = []
    free = probes.disk_free(weights_dir)
    if free is None:
        out.append(Finding("Disk (weights)", Status.INFO, f"Could not read free space at {weights_dir}.",
                           "Make sure about 23 GB is free there before downloading."))
    elif weights_ok:
        out.append(Finding("Disk (weights)", Status.OK, f"{format_bytes(free)} free at {weights_dir}.",
                           NOTHING_TO_DO))
    else:
        need = APPROX_TOTAL_BYTES
        status = Status.FAIL if free < need else Status.OK
        out.append(Finding("Disk (weights)", status,
                           f"{format_bytes(free)} free at {weights_dir}; the weights need about "
                           f"{format_bytes(need)}.",
                           NOTHING_TO_DO if status is Status.OK else
                           "Free disk space, or download to another disk with --weights-dir PATH."))
    free = probes.disk_free(outputs_dir)
    if free is None:
        out.append(Finding("Disk (outputs)", Status.INFO, f"Could not read free space at {outputs_dir}.",
                           "Make sure a few GB are free for the videos."))
    else:
        status = (Status.FAIL if free < OUTPUTS_FAIL_BYTES else
                  Status.WARN if free < OUTPUTS_WARN_BYTES else Status.OK)
        out.append(Finding("Disk (outputs)", status, f"{format_bytes(free)} free at {outputs_dir}.",
                           NOTHING_TO_DO if status is Status.OK else
                           "Free some space or choose another --outputs-dir; videos and their records are "
                           "written there."))
    return out


def _check_packages(probes: SystemProbes) -> list[Finding]:
    out = []
    if probes.has_module("lightx2v"):
        out.append(Finding("LightX2V", Status.OK, "The lightx2v package is installed.", NOTHING_TO_DO))
    else:
        out.append(Finding("LightX2V", Status.FAIL, "The lightx2v package is not installed.",
                           "On the GPU machine, ./run.sh installs it; by hand: pip install -r requirements-gpu.txt "
                           "and pip install --no-deps \"lightx2v @ git+https://github.com/ModelTC/LightX2V@f8aee98b\"."))
    if probes.has_module("triton"):
        out.append(Finding("Triton", Status.OK, "triton is installed (INT8 GEMM kernels).", NOTHING_TO_DO))
    else:
        fix = ("pip install triton-windows" if probes.platform == "win32" else
               "pip install -r requirements-gpu.txt (it pins triton to match PyTorch; ./run.sh does this)")
        out.append(Finding("Triton", Status.FAIL, "triton is not installed; the int8-triton kernels need it.", fix))
    if probes.has_module("sageattention"):
        out.append(Finding("SageAttention", Status.OK, "sageattention is installed (fast attention).",
                           NOTHING_TO_DO))
    else:
        out.append(Finding("SageAttention", Status.WARN,
                           "sageattention is not installed; attention must use PyTorch SDPA, which is slower.",
                           "pip install sageattention==1.0.6"))
    return out


def _check_hopper_attention(facts: dict[str, Any] | None, probes: SystemProbes) -> list[Finding]:
    """FlashAttention 3 is optional and Hopper-only; the package registry does not carry it."""
    cc = (facts or {}).get("compute_capability")
    if not (isinstance(cc, (tuple, list)) and tuple(int(c) for c in cc) == (9, 0)):
        return []
    if probes.has_module("flash_attn_interface"):
        return [Finding("FlashAttention 3", Status.OK, "FlashAttention 3 (flash_attn_interface) is found; the app "
                        "uses it where it imports and measures faster than the other attention kernels.",
                        NOTHING_TO_DO)]
    return [Finding("FlashAttention 3", Status.INFO,
                    "Optional on this Hopper GPU: FlashAttention 3 was 1.17x faster than PyTorch's cuDNN attention "
                    "on an H200 (about 10 % of a step), with the same accuracy.",
                    "Build it from source: README, 'Performance and memory' (about 1.5 minutes on 16 cores).")]


def _check_allocator(probes: SystemProbes) -> Finding:
    # PyTorch 2.9+ reads PYTORCH_ALLOC_CONF and still honours the older PYTORCH_CUDA_ALLOC_CONF.
    values = {k: probes.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    setting = next(((k, v) for k, v in values.items() if v), None)
    if probes.platform == "win32":
        shown = f"{setting[0]}={setting[1]}" if setting else "PYTORCH_CUDA_ALLOC_CONF is not set"
        return Finding("Allocator", Status.INFO, f"{shown}. Expandable segments are not supported on Windows.",
                       NOTHING_TO_DO)
    if setting is None:
        # app.py sets this default itself before CUDA starts, so an unset variable is the normal case.
        return Finding("Allocator", Status.OK, f"PYTORCH_CUDA_ALLOC_CONF={APP_ALLOC_CONF}, set by the app at start "
                                               "(expandable segments: less fragmentation).", NOTHING_TO_DO)
    options = dict(part.partition(":")[::2] for part in setting[1].replace(" ", "").split(","))
    if options.get("expandable_segments", "").lower() == "true":
        return Finding("Allocator", Status.OK, f"{setting[0]}={setting[1]}.", NOTHING_TO_DO)
    return Finding("Allocator", Status.WARN,
                   f"{setting[0]}={setting[1]} is set in the environment, so the app keeps it: without expandable "
                   "segments, memory fragments and the 720p preset can run out of GPU memory when it would "
                   "otherwise fit.",
                   f"Unset {setting[0]} (the app then sets {APP_ALLOC_CONF} itself), or add "
                   "expandable_segments:True to it.")


def _check_tiny_vae(weights_dir: Path) -> Finding:
    """The optional tiny VAE, where the layout rule finds it."""
    found = weights_layout.tiny_vae(lambda rel: (weights_dir / rel).is_file())
    if found:
        return Finding("Tiny VAE", Status.OK, f"{found} is installed (draft decode and better previews).",
                       NOTHING_TO_DO)
    return Finding("Tiny VAE", Status.INFO, "Not installed: optional, enables draft decode and better previews.",
                   "python app.py download --tiny-vae (a few MB).")


def _check_weights(report: VerifyReport, *, in_ui: bool = False) -> Finding:
    if report.ok and weights_layout.is_synthetic(report.weights_dir):
        return Finding("Weights", Status.WARN, f"{report.summary()} They are a SYNTHETIC checkpoint: random "
                                               "weights, for tests and sizing only; every video will be noise.",
                       "Download the real weights (python app.py download --weights-dir PATH) into another folder and start "
                       "with --weights-dir PATH.")
    if report.ok:
        return Finding("Weights", Status.OK, report.summary(), NOTHING_TO_DO)
    if all(p.kind == "missing" for p in report.problems) and report.files_checked == 0:
        detail = f"Not downloaded yet ({report.weights_dir})."
    else:
        detail = report.summary(limit=3)
    how = "Press Download weights below" if in_ui else "Run python app.py download"
    return Finding("Weights", Status.FAIL, detail,
                   f"{how}; it fetches only what is missing or damaged. If you already have them elsewhere, "
                   "start with --weights-dir PATH.")


def _safely(name: str, check: Callable[[], Finding | list[Finding]]) -> list[Finding]:
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - the doctor reports; it must never be the thing that crashes
        log.warning("doctor check %s failed", name, exc_info=True)
        return [Finding(name, Status.WARN, f"This check could not run ({type(exc).__name__}: {exc}).",
                        "Re-check; if it persists, include this message in a bug report.")]
    return result if isinstance(result, list) else [result]


def run_doctor(*, weights_dir: Path | str = DEFAULT_WEIGHTS_DIR, outputs_dir: Path | str = DEFAULT_OUTPUTS_DIR,
               monitor: GpuMonitor | None = None, probes: SystemProbes | None = None,
               in_ui: bool = False) -> DoctorReport:
    """Check this machine (or the one `probes` describes). Never raises. `in_ui`: the fixes may point at the
    System tab's buttons; in a terminal they name commands."""
    weights_dir, outputs_dir = Path(weights_dir).expanduser(), Path(outputs_dir).expanduser()
    if probes is None:
        probes = SystemProbes.default(monitor)
    elif monitor is not None:
        probes = replace(probes, monitor=monitor)

    facts_box: list[dict[str, Any] | None] = [None]
    weights_box: list[VerifyReport | None] = [None]

    def gpu() -> list[Finding]:
        facts_box[0] = probes.monitor.facts()
        return _check_gpu(facts_box[0], probes)

    def weights() -> Finding:
        weights_box[0] = probes.verify_weights(weights_dir)
        return _check_weights(weights_box[0], in_ui=in_ui)

    findings: list[Finding] = []
    findings += _safely("GPU", gpu)
    findings += _safely("VRAM", lambda: _check_vram(probes, facts_box[0]))
    findings += _safely("Driver / PyTorch", lambda: _check_driver_and_torch(facts_box[0], probes))
    findings += _safely("System RAM", lambda: _check_ram(probes))
    weights_findings = _safely("Weights", weights)
    findings += _safely("Disk", lambda: _check_disks(weights_dir, outputs_dir, probes,
                                                     weights_box[0] is not None and weights_box[0].ok))
    findings += _safely("Packages", lambda: _check_packages(probes))
    findings += _safely("FlashAttention 3", lambda: _check_hopper_attention(facts_box[0], probes))
    findings += _safely("Allocator", lambda: _check_allocator(probes))
    findings += weights_findings
    findings += _safely("Tiny VAE", lambda: _check_tiny_vae(weights_dir))
    return DoctorReport(tuple(findings))


# --------------------------------------------------------------------------------------------- CLI


def main_doctor(args_list: list[str] | None = None) -> int:
    """`python app.py doctor [...]`. Exit code 0 when nothing failed (warnings allowed), 1 otherwise."""
    parser = argparse.ArgumentParser(prog="app.py doctor",
                                     description="Check GPU, driver, RAM, disk, packages and weights.")
    parser.add_argument("--weights-dir", type=Path, default=default_dir(WEIGHTS_DIR_ENV, DEFAULT_WEIGHTS_DIR),
                        help=f"weights folder to check (${WEIGHTS_DIR_ENV}; default: %(default)s)")
    parser.add_argument("--outputs-dir", type=Path, default=default_dir(OUTPUTS_DIR_ENV, DEFAULT_OUTPUTS_DIR),
                        help=f"where videos are written (${OUTPUTS_DIR_ENV}; default: %(default)s)")
    parser.add_argument("--deep", action="store_true",
                        help="also hash every weight file against the Hub checksums (reads ~22 GB)")
    try:
        parsed = parser.parse_args(args_list)
    except SystemExit as exc:  # --help or bad arguments: hand the code back instead of exiting
        return int(exc.code or 0)
    probes = SystemProbes.default()
    if parsed.deep:
        probes = replace(probes, verify_weights=lambda p: verify(p, deep=True))
    report = run_doctor(weights_dir=parsed.weights_dir, outputs_dir=parsed.outputs_dir, probes=probes)
    sys.stdout.write(report.to_text() + "\n")
    return 1 if report.has_failures else 0
