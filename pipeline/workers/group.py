"""The app's side of the GPU workers: a group of worker processes and the backend that drives it.

Two ways to use several GPUs (`--multi-gpu`):

- lanes: one group of one process per GPU; the job queue runs one job per lane at a time, each on
  the free GPU whose memory fits it (pipeline/jobs.py).
- seq: one group of N processes over N GPUs (N in 2, 4, 8: it must divide the 40 attention heads),
  one clip split over them by LightX2V's Ulysses sequence parallelism.

`RemoteBackend` makes a group look like any backend: `VideoService` plans, runs its OOM ladder,
writes records and history exactly as on one GPU, while the weights and the CUDA work live in the
workers. A worker that dies fails the job it ran with `WorkerDied` and is started again; in a
sequence-parallel group a rank that fails while the others wait for it in a collective makes the
whole group restart (every card's memory goes back to its level), and the failure (an OOM) is the
job's.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

from pipeline import errors
from pipeline.machine import hostmem
from pipeline.backend import DecodeOutOfMemory, LoadKey, RunHooks
from pipeline.errors import GenerationCancelled, StudioError, WorkerDied
from pipeline.machine.gpu import GpuMonitor, MemorySnapshot, NO_TORCH, TorchReadings
from pipeline.types import Phase, RunSpec
from pipeline.workers import child
from pipeline.workers import protocol as p
from pipeline.workers import transfer

log = logging.getLogger(__name__)

MODES = ("lanes", "seq")
ATTENTION_HEADS = 40  # Wan2.1-14B: Ulysses splits the heads, so the group size must divide them
SEQ_SIZES = tuple(n for n in (2, 4, 8) if ATTENTION_HEADS % n == 0)
POLL_S = 0.1


class WorkerOutOfMemory(RuntimeError):
    """A worker ran out of GPU memory (its message carries CUDA's words, which `gpu.is_oom` reads)."""


class WorkerError(RuntimeError):
    """A worker's request failed with an error that is not the app's own (a bug, a driver error)."""


def parse_gpus(text: str, device_count: int | None) -> tuple[int, ...]:
    """`--gpus`: "all" or a comma list of distinct GPU indices, checked against the machine."""
    text = (text or "").strip()
    if text == "all":
        if not device_count:
            raise ValueError("--gpus all: no NVIDIA GPU was found (NVML does not answer).")
        return tuple(range(device_count))
    try:
        gpus = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--gpus must be 'all' or GPU indices like 0,1; got {text!r}.") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"--gpus must name distinct GPU indices like 0,1; got {text!r}.")
    if device_count is not None and max(gpus) >= device_count:
        raise ValueError(f"--gpus {text}: this machine has {device_count} GPU(s), indices 0 to "
                         f"{device_count - 1}.")
    return gpus


def check_mode(mode: str, gpus: tuple[int, ...]) -> None:
    if mode not in MODES:
        raise ValueError(f"--multi-gpu must be one of {', '.join(MODES)}; got {mode!r}.")
    if mode == "seq" and len(gpus) not in SEQ_SIZES:
        raise ValueError(f"--multi-gpu seq splits the model's {ATTENTION_HEADS} attention heads over the "
                         f"GPUs, so it needs {', '.join(map(str, SEQ_SIZES))} GPUs; --gpus names {len(gpus)}.")


def worker_env(gpus: tuple[int, ...], rank: int, seq: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one worker: its one card, and the multi-GPU defaults the user did not set."""
    base = os.environ if base is None else base
    env = {k: v for k, v in p.WORKER_ENV_DEFAULTS.items() if k not in base}
    env["CUDA_VISIBLE_DEVICES"] = str(gpus[rank])
    if "PYTORCH_CUDA_ALLOC_CONF" not in base:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if seq:
        env["WAN_STUDIO_SEQ_PARALLEL"] = str(len(gpus))
    return env


RENDEZVOUS_HOST = "127.0.0.1"


def rendezvous_store(host: str = RENDEZVOUS_HOST) -> Any:
    """The key-value store a sequence-parallel group meets at, served by the app's process on a
    port the OS picks (port 0) and holds from now on: no window between choosing a port and
    binding it in which another program could take it. The ranks join it as clients
    (`child.join_group`); it lives as long as the group, and a restart gets a new one (no keys of
    the dead group's run left in it)."""
    from torch.distributed import TCPStore

    return TCPStore(host, 0, is_master=True, wait_for_workers=False,
                    timeout=timedelta(seconds=child.COLLECTIVE_TIMEOUT_S))


def _exit_words(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Rank:
    process: Any
    conn: Any
    pid: int | None = None
    readings: p.Readings = field(default_factory=p.Readings)
    ready: bool = False  # said Ready (its backend is built; a seq rank has joined the group)


class WorkerGroup:
    """N worker processes, one per GPU in `gpus`; `seq`: they form one sequence-parallel group."""

    def __init__(self, backend_spec: p.BackendSpec, gpus: tuple[int, ...], seq: bool = False, *,
                 failure_grace_s: float = 30.0, env: dict[str, str] | None = None):
        """`failure_grace_s`: after one rank of a sequence-parallel group failed, how long the others
        may take to fail too before they count as stuck in a collective (then the group restarts)."""
        if seq and len(gpus) < 2:
            raise ValueError("a sequence-parallel group needs at least two GPUs")
        if not seq and len(gpus) != 1:
            raise ValueError("a lane is one GPU")
        self.backend_spec = backend_spec
        self.gpus = tuple(gpus)
        self.seq = seq
        self.failure_grace_s = failure_grace_s
        self.extra_env = dict(env or {})
        self.cancel = multiprocessing.get_context("spawn").Event()
        self.ranks: list[_Rank] = []
        self.restarts = 0
        self.last_describe: dict[str, Any] | None = None
        self.last_exit: str | None = None
        self._lock = threading.RLock()
        self._peak: list[float | None] = [None] * len(gpus)
        self.store: Any = None  # the rendezvous store of the running sequence-parallel group
        # Where the workers leave a clip's frames for this process (None: through the pipe).
        self.frames_dir: str | None = None

    # -- processes ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.gpus)

    @property
    def mode(self) -> str:
        return "seq" if self.seq else "lanes"

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        rendezvous = None
        if self.seq:
            self.store = rendezvous_store()
            rendezvous = (self.store.host, self.store.port)
        self.cancel.clear()
        if self.frames_dir is None:
            self.frames_dir = transfer.make_dir()
        ranks = []
        for rank in range(self.size):
            parent_end, child_end = ctx.Pipe()
            env = {**worker_env(self.gpus, rank, self.seq), **self.extra_env}
            if self.frames_dir is not None:
                env[transfer.FRAMES_DIR_ENV] = self.frames_dir
            process = ctx.Process(target=child.main, name=f"gpu-worker-{self.gpus[rank]}",
                                  args=(rank, self.size, child_end, self.cancel, self.backend_spec, env, rendezvous),
                                  daemon=True)
            process.start()
            child_end.close()
            ranks.append(_Rank(process, parent_end, pid=process.pid))
        self.ranks = ranks
        log.info("started %s worker(s) for GPU %s: pids %s", self.mode, ",".join(map(str, self.gpus)),
                 [r.pid for r in ranks])

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until every rank said it is up (tests; the app does not need to wait)."""
        deadline = time.monotonic() + timeout
        for rank in self.ranks:
            while not rank.ready:
                if not rank.conn.poll(min(POLL_S, max(0.0, deadline - time.monotonic()))):
                    if not rank.process.is_alive() or time.monotonic() > deadline:
                        raise self._not_started(rank)
                    continue
                try:
                    message = rank.conn.recv()
                except (EOFError, OSError):
                    # It ended before saying Ready (its pipe closed with it): say how it ended.
                    raise self._not_started(rank) from None
                self._dispatch(self.ranks.index(rank), message, {}, None)

    def _not_started(self, rank: _Rank) -> WorkerDied:
        rank.process.join(timeout=2)
        return WorkerDied(f"GPU worker {rank.process.name} did not start ({_exit_words(rank.process.exitcode)}); "
                          f"its log says why")

    def pids(self) -> list[int | None]:
        return [r.pid for r in self.ranks]

    def restart(self, reason: str) -> None:
        with self._lock:
            log.warning("restarting the %s worker(s) of GPU %s: %s", self.mode, ",".join(map(str, self.gpus)), reason)
            self._terminate()
            self.restarts += 1
            self._peak = [None] * self.size
            self.start()

    def close(self) -> None:
        with self._lock:
            for rank in self.ranks:
                try:
                    rank.conn.send(p.Stop())
                except (OSError, ValueError):
                    pass
            for rank in self.ranks:
                rank.process.join(timeout=10)
            self._terminate()
            self.ranks = []
            transfer.remove(self.frames_dir)
            self.frames_dir = None

    def _terminate(self) -> None:
        for rank in self.ranks:
            if rank.process.is_alive():
                rank.process.terminate()
        for rank in self.ranks:
            rank.process.join(timeout=10)
            if rank.process.is_alive():
                rank.process.kill()
                rank.process.join(timeout=5)
            rank.conn.close()
        # The store of the group that ended: its server stops with the last reference.
        self.store = None
        transfer.clear(self.frames_dir)  # frames a killed worker was writing

    # -- one request ------------------------------------------------------------------------------

    def call(self, request: Any, hooks: RunHooks | None = None) -> p.Done:
        """Send `request` to every rank and wait for every reply, passing rank 0's events to `hooks`
        and the app's cancel (hooks.should_stop) to the workers. Raises the job's error."""
        with self._lock:
            if not self.ranks:
                self.start()
            self._restart_if_dead()
            self.cancel.clear()
            for rank in self.ranks:
                rank.conn.send(request)
            replies: dict[int, p.Done | p.Failure] = {}
            try:
                done = self._collect(request, hooks, replies)
            except BaseException:
                for reply in replies.values():  # frames of a rank whose job failed elsewhere
                    transfer.discard(getattr(reply, "value", None))
                raise
            if done.describe is not None:
                self.last_describe = done.describe
            return replace(done, value=transfer.take(done.value))

    def _collect(self, request: Any, hooks: RunHooks | None, replies: dict[int, Any]) -> p.Done:
        """Wait for every rank's reply to `request` (into `replies`); rank 0's Done, or the job's
        error raised."""
        failed_at: float | None = None
        while len(replies) < self.size:
            if hooks is not None and not self.cancel.is_set() and hooks.should_stop():
                self.cancel.set()
            waiting = {i: r for i, r in enumerate(self.ranks) if i not in replies}
            handles = {r.conn: i for i, r in waiting.items()}
            sentinels = {r.process.sentinel: i for i, r in waiting.items()}
            for ready in wait([*handles, *sentinels], timeout=POLL_S):
                if ready in sentinels:
                    self._died(sentinels[ready], request)
                index = handles[ready]
                try:
                    message = ready.recv()
                except (EOFError, OSError):
                    self._died(index, request)
                self._dispatch(index, message, replies, hooks)
            if failed_at is None and any(isinstance(r, p.Failure) for r in replies.values()):
                failed_at = time.monotonic()
            if failed_at is not None and len(replies) < self.size and \
                    time.monotonic() - failed_at > self.failure_grace_s:
                failure = _worst([r for r in replies.values() if isinstance(r, p.Failure)])
                stuck = [self.gpus[i] for i in range(self.size) if i not in replies]
                # The other ranks wait in a collective for the one that failed; only new
                # processes get every card back to its level.
                self.restart(f"rank {failure.rank} failed ({failure.kind}) and GPU(s) {stuck} "
                             f"stayed waiting for it")
                raise self._exception(failure)
        failures = [r for r in replies.values() if isinstance(r, p.Failure)]
        if failures:
            raise self._exception(_worst(failures))
        done = replies[0]
        assert isinstance(done, p.Done)
        return done

    def send(self, request: Any) -> None:
        """A request without a reply (ResetPeak)."""
        with self._lock:
            for rank in self.ranks:
                if rank.process.is_alive():
                    rank.conn.send(request)

    def _dispatch(self, index: int, message: Any, replies: dict, hooks: RunHooks | None) -> None:
        rank = self.ranks[index]
        if isinstance(message, p.Ready):
            rank.pid, rank.readings, rank.ready = message.pid, message.readings, True
        elif isinstance(message, (p.Done, p.Failure)):
            replies[index] = message
            rank.readings = message.readings
            self._peak[index] = message.readings.peak_reserved_gib
        elif hooks is None:
            return
        elif isinstance(message, p.PhaseEvent):
            hooks.on_phase(message.phase)
        elif isinstance(message, p.StepEvent):
            hooks.on_step(message.step, message.total)
        elif isinstance(message, p.PreviewEvent):
            hooks.on_preview(message.preview)
        elif isinstance(message, p.LatentsEvent):
            hooks.on_latents(message.latents)

    def _restart_if_dead(self) -> None:
        dead = [r for r in self.ranks if not r.process.is_alive()]
        if dead:
            # Died between jobs: no job to fail, the next one runs on fresh workers.
            self.last_exit = _exit_words(dead[0].process.exitcode)
            self.restart(f"worker pid {dead[0].pid} had stopped ({self.last_exit})")

    def _died(self, index: int, request: Any) -> None:
        rank = self.ranks[index]
        rank.process.join(timeout=2)
        self.last_exit = words = _exit_words(rank.process.exitcode)
        what = "running this job" if isinstance(request, (p.Generate, p.Decode)) else "loading or cleaning up"
        self.restart(f"worker pid {rank.pid} for GPU {self.gpus[index]} stopped ({words})")
        raise WorkerDied(f"The GPU worker for GPU {self.gpus[index]} (pid {rank.pid}) stopped while {what} "
                         f"({words}: ended by the system or by hand, or a GPU driver reset). It has been "
                         f"restarted with the model unloaded; the queue goes on. Press Generate to try again.")

    def _exception(self, failure: p.Failure) -> BaseException:
        where = f"GPU {self.gpus[failure.rank]}" + (f", rank {failure.rank} of {self.size}" if self.seq else "")
        if failure.kind == p.CANCEL:
            return GenerationCancelled(failure.message)
        if failure.kind == p.DECODE_OOM and failure.latents is not None:
            return DecodeOutOfMemory(failure.latents, f"{failure.message} ({where})")
        if failure.kind == p.HOST_OOM:
            return hostmem.HostOutOfMemory(f"{failure.message} ({where})")
        if failure.kind in (p.OOM, p.DECODE_OOM):
            text = failure.message if "out of memory" in failure.message.lower() else \
                f"CUDA out of memory: {failure.message}"
            return WorkerOutOfMemory(f"{text} ({where})")
        studio = getattr(errors, failure.error_type, None)
        if isinstance(studio, type) and issubclass(studio, StudioError) and studio is not errors.OutOfVRAM:
            return studio(failure.message)
        return WorkerError(f"{failure.message} ({where})")

    # -- readings -------------------------------------------------------------------------------

    def reset_peak(self) -> None:
        self._peak = [None] * self.size
        self.send(p.ResetPeak())

    def peak_reserved_gib(self) -> float | None:
        """The highest per-GPU peak of the last request (each card holds its own share)."""
        known = [v for v in self._peak if v is not None]
        return max(known) if known else None

    def per_gpu_peaks(self) -> list[float | None]:
        return [None if v is None else round(v, 3) for v in self._peak]

    def torch_memory(self) -> tuple[int, int] | None:
        """(reserved, allocated) of the tightest rank: what the planner may count as this app's."""
        known = [(r.readings.reserved_bytes, r.readings.allocated_bytes or 0) for r in self.ranks
                 if r.readings.reserved_bytes is not None]
        return min(known) if known else None

    def ram_gib(self) -> float | None:
        """System RAM one rank may use: the free RAM shared by the ranks, plus what the rank
        already holds (its weights are in host memory)."""
        system = hostmem.read_system()
        free = system.available_gib if system is not None else None
        if free is None:
            return None
        held = [r.readings.host_must_hold_gib for r in self.ranks if r.readings.host_must_hold_gib is not None]
        return free / self.size + (min(held) if held else 0.0)

    def placement(self) -> dict[str, Any]:
        """For the record: which GPUs ran the job, how, and each card's peak."""
        return {"mode": self.mode, "gpu_indices": list(self.gpus), "worker_pids": self.pids(),
                "per_gpu_peak_reserved_gib": self.per_gpu_peaks(), "worker_restarts": self.restarts,
                **({"seq_p_size": self.size, "seq_p_attn_type": "ulysses"} if self.seq else {})}

    def label(self, gpu_name: str) -> str:
        """The name measurements are kept under: the card and where it sits (and the mode)."""
        if self.seq:
            return f"{gpu_name} [GPUs {','.join(map(str, self.gpus))} seq]"
        return f"{gpu_name} [GPU {self.gpus[0]}]"


def _worst(failures: list[p.Failure]) -> p.Failure:
    """The failure that speaks for the job: an error over running out of memory over a cancel
    over a rank that gave up only because another failed; rank 0's among equals (it holds the
    latents of a decode that ran out of memory)."""
    order = {p.ERROR: 0, p.HOST_OOM: 1, p.OOM: 2, p.DECODE_OOM: 3, p.CANCEL: 4, p.PEER: 5}
    return min(failures, key=lambda f: (order.get(f.kind, 0), f.rank))


class RemoteModel:
    """The `LoadedModel` of a worker group: every call is a request to the workers."""

    def __init__(self, group: WorkerGroup, key: LoadKey):
        self.group = group
        self.key = key

    def generate(self, spec: RunSpec, hooks: RunHooks) -> Any:
        return self.group.call(p.Generate(self.key, spec), hooks).value

    def decode(self, latents: Any, spec: RunSpec, hooks: RunHooks) -> Any:
        return self.group.call(p.Decode(self.key, latents, spec), hooks).value

    def recover(self) -> None:
        self.group.call(p.Recover())

    def release(self) -> None:
        self.group.call(p.Release())


class RemoteBackend:
    """A backend whose models live in a `WorkerGroup`. `local` is the same backend built in the
    app's process, which answers the cheap questions (load keys, availability, the tiny VAE)."""

    def __init__(self, group: WorkerGroup, local: Any):
        self.group = group
        self.local = local
        self.name = local.name

    def check_available(self) -> None:
        self.local.check_available()

    def load_key(self, memory: dict[str, Any]) -> LoadKey:
        return self.local.load_key(memory)

    def load(self, key: LoadKey, on_phase: Callable[[Phase], None]) -> RemoteModel:
        on_phase(Phase.LOADING)
        self.group.call(p.Load(key), RunHooks(on_phase=on_phase, on_step=lambda i, n: None,
                                              should_stop=lambda: False))
        return RemoteModel(self.group, key)

    def tiny_vae(self) -> str | None:
        return self.local.tiny_vae()

    def available_ram_gib(self) -> float | None:
        own = getattr(self.local, "available_ram_gib", None)
        value = own() if own is not None else None
        return value if value is not None else self.group.ram_gib()

    def describe(self) -> dict[str, Any]:
        return {**self.local.describe(), **(self.group.last_describe or {}),
                "workers": {"mode": self.group.mode, "gpus": list(self.group.gpus)}}


class GroupMonitor:
    """The GPU readings of a group, in the shape of `GpuMonitor`: NVML per card (by its index on
    the machine), the tightest card for the planner, and the workers' PyTorch allocators."""

    def __init__(self, group: WorkerGroup, nvml: Any = None, monitors: list[GpuMonitor] | None = None):
        self.group = group
        self.monitors = monitors or [GpuMonitor(nvml, device_index=i, torch=NO_TORCH) for i in group.gpus]
        self.torch = TorchReadings(memory=lambda device_index: group.torch_memory(),
                                   peak_reserved_gib=group.peak_reserved_gib, reset_peak=group.reset_peak)

    def per_gpu(self) -> list[tuple[int, MemorySnapshot | None]]:
        return [(index, monitor.read()) for index, monitor in zip(self.group.gpus, self.monitors)]

    def read(self) -> MemorySnapshot | None:
        snaps = [snap for _, snap in self.per_gpu()]
        if not snaps or any(s is None for s in snaps):
            return None
        tight = min(snaps, key=lambda s: s.free_bytes)
        torch_memory = self.group.torch_memory()
        reserved, allocated = torch_memory if torch_memory is not None else (None, None)
        return MemorySnapshot(gpu_name=self.group.label(tight.gpu_name), used_bytes=max(s.used_bytes for s in snaps),
                              total_bytes=min(s.total_bytes for s in snaps), free_bytes=tight.free_bytes,
                              torch_reserved_bytes=reserved, torch_allocated_bytes=allocated)

    def facts(self) -> dict[str, Any] | None:
        return self.monitors[0].facts()


def build_groups(mode: str, gpus: tuple[int, ...], backend_spec: p.BackendSpec, **kwargs: Any) -> list[WorkerGroup]:
    """The worker groups of a mode: one per GPU (lanes) or one over all of them (seq). Not started."""
    check_mode(mode, gpus)
    if mode == "seq":
        return [WorkerGroup(backend_spec, gpus, seq=True, **kwargs)]
    return [WorkerGroup(backend_spec, (gpu,), seq=False, **kwargs) for gpu in gpus]
