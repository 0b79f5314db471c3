"""The messages between the app's process and a GPU worker process. Plain picklable dataclasses:
requests go down a Pipe, events and one reply per request come back up it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.backend import LoadKey
from pipeline.types import Phase, Preview, RunSpec

# Environment every worker gets unless the user set the variable: NVLink SHARP (NVLS) multicast
# and symmetric-memory multicast hang or fail on machines whose fabric manager does not grant
# multicast objects, and sequence parallelism needs neither.
# CUDA_DEVICE_ORDER: `--gpus` names cards by NVML's index (nvidia-smi's, PCI bus order), and a
# worker's CUDA_VISIBLE_DEVICES must name the same card; CUDA's default order (fastest first) may
# differ on a machine of mixed cards, and the VRAM panel would then read another card than the one
# the worker runs on.
WORKER_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


@dataclass(frozen=True)
class BackendSpec:
    """How a worker builds its backend: `kind` "fake" or "lightx2v", with keyword arguments.
    `per_rank`: extra keyword arguments for some ranks only (tests inject faults on one rank)."""

    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    per_rank: dict[int, dict[str, Any]] = field(default_factory=dict)


# -- requests (app -> worker) -------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    key: LoadKey


@dataclass(frozen=True)
class Generate:
    key: LoadKey  # the worker loads it first when it has not (a restarted worker has nothing)
    spec: RunSpec


@dataclass(frozen=True)
class Decode:
    key: LoadKey
    latents: Any
    spec: RunSpec


@dataclass(frozen=True)
class Recover:
    pass


@dataclass(frozen=True)
class Release:
    pass


@dataclass(frozen=True)
class ResetPeak:
    """No reply: start a new peak window (per attempt, as the one-GPU service does)."""


@dataclass(frozen=True)
class Stop:
    pass


# -- events and replies (worker -> app) --------------------------------------------------------

@dataclass(frozen=True)
class Readings:
    """The worker's own memory, read where it lives (the app's process has no CUDA context)."""

    peak_reserved_gib: float | None = None
    reserved_bytes: int | None = None
    allocated_bytes: int | None = None
    host_must_hold_gib: float | None = None


@dataclass(frozen=True)
class Ready:
    rank: int
    pid: int
    readings: Readings


@dataclass(frozen=True)
class PhaseEvent:
    phase: Phase


@dataclass(frozen=True)
class StepEvent:
    step: int
    total: int


@dataclass(frozen=True)
class PreviewEvent:
    preview: Preview


@dataclass(frozen=True)
class LatentsEvent:
    latents: Any


@dataclass(frozen=True)
class FramesFile:
    """A clip's frames in a file of the group's shared-memory folder (pipeline/workers/transfer.py),
    in place of the array itself: the app reads the file and removes it."""

    path: str
    shape: tuple[int, ...]
    dtype: str  # numpy's dtype.str, e.g. "|u1"


@dataclass(frozen=True)
class Done:
    rank: int
    value: Any  # frames (rank 0 of a generate/decode: an array or a FramesFile), None otherwise
    readings: Readings
    loads: int = 0  # weight loads in this worker so far
    load_seconds: float | None = None
    describe: dict[str, Any] | None = None


# Failure.kind. PEER: a rank of a sequence-parallel group whose own part went well gave up because
# another rank failed (a load that failed on one rank is undone on all); never the job's error.
CANCEL, DECODE_OOM, OOM, HOST_OOM, ERROR, PEER = "cancel", "decode_oom", "oom", "host_oom", "error", "peer"


@dataclass(frozen=True)
class Failure:
    rank: int
    kind: str
    message: str
    readings: Readings
    error_type: str = ""  # the pipeline.errors class name of a StudioError, else the exception's
    latents: Any = None  # DECODE_OOM only
