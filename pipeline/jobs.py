"""The one job queue: jobs run in submission order on the GPU lane(s).

One lane (the default, one GPU, or one sequence-parallel group of GPUs) runs one job at a time. With
several lanes (`--multi-gpu lanes`, one GPU each) a job goes to a free lane whose GPU memory fits
it; when only a busy lane's GPU would fit it, it waits for that lane, and later jobs that fit a free
lane go ahead of it.

The UI submits a job and follows its events; the job does not belong to the browser tab. If the tab
closes, the job still finishes and lands in history. Cancel is cooperative: a waiting job is
withdrawn at once; a running one has its flag set, which the backend checks at step boundaries.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from pipeline.machine import gpu
from pipeline.errors import AppStopped, GenerationCancelled, LaneFull, StudioError
from pipeline.planner import Fit
from pipeline.service import VideoService
from pipeline.types import FinishRequest, GenerationRequest, GenerationResult, ProgressEvent

log = logging.getLogger(__name__)

# Put on a job's event queue after its last event, so that a follower ends at once instead of
# noticing `done` only at its next poll timeout.
_END = object()


@dataclass
class Job:
    id: int
    request: GenerationRequest | FinishRequest  # a FinishRequest decodes a kept clip's latents
    owner: str | None = None  # the client session that submitted it; Cancel reaches its own jobs
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    events: "queue.Queue[ProgressEvent | object]" = field(default_factory=queue.Queue)
    result: GenerationResult | None = None
    error: BaseException | None = None
    started: bool = False  # taken by the worker (set under the queue's lock)
    lane: int | None = None  # the lane (GPU) that took it

    def cancel(self) -> None:
        self.cancel_flag.set()

    def pending_events(self) -> tuple[list[ProgressEvent], bool]:
        """The events that arrived since the last call, without waiting, and whether the job has
        ended (for an async follower that must not hold a thread while the job waits)."""
        out: list[ProgressEvent] = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return out, self.done.is_set() and self.events.empty()
            if event is _END:
                return out, True
            out.append(event)


class JobQueue:
    """The one GPU lane. Every Generate becomes a job here at once: its place in the queue, the
    waiting cap and Cancel (of a waiting job as well as a running one) all live here and nowhere
    else. Requests arrive checked (GenerationRequest with a preset from the book, FinishRequest of a
    finishable clip): generations and finishes share the lane."""

    def __init__(self, service: VideoService, max_waiting: int = 100,
                 lanes: list[VideoService] | None = None, poll_s: float = 0.5):
        """`lanes`: one service per GPU lane (multi-GPU lanes mode); default: `service` alone.
        `poll_s`: how often an idle lane looks again without being woken (memory readings change
        without a notification)."""
        self.max_waiting = max_waiting
        self.poll_s = poll_s
        self.lanes = list(lanes) if lanes else [service]
        self.service = self.lanes[0]
        self._waiting: list[Job] = []
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._busy = [False] * len(self.lanes)
        # GiB available on each lane's GPU when it last became idle: what a busy lane will offer.
        self._idle_available: list[float | None] = [None] * len(self.lanes)
        self._stopping: str | None = None  # why every job is being stopped (the app is closing)
        self._workers = []
        for index, lane in enumerate(self.lanes):
            # The low-RAM rung keeps its text encoder for the next prompt when one is waiting.
            lane.prompt_waiting = self.prompt_waiting
            worker = threading.Thread(target=self._work, args=(index,), daemon=True,
                                      name="gpu-lane" if len(self.lanes) == 1 else f"gpu-lane-{index}")
            worker.start()
            self._workers.append(worker)

    def prompt_waiting(self) -> bool:
        """Whether a generation job (one with a prompt to encode) waits behind the running one."""
        with self._lock:
            return any(not j.started and not j.done.is_set() and isinstance(j.request, GenerationRequest)
                       for j in self._jobs.values())

    def submit(self, request: GenerationRequest | FinishRequest, owner: str | None = None) -> Job:
        return self.submit_all([request], owner)[0]

    def submit_all(self, requests: list[GenerationRequest | FinishRequest],
                   owner: str | None = None) -> list[Job]:
        """Queue the requests back to back, all or none (a batch never half fits the cap)."""
        with self._lock:
            if self._stopping:
                raise AppStopped(self._stopping)  # a click while the app closes never reaches the GPU
            waiting = sum(1 for j in self._jobs.values() if not j.done.is_set())
            if waiting + len(requests) > self.max_waiting:
                # Jobs of closed tabs stay in the lane: the cap counts them too.
                raise LaneFull(f"{waiting} jobs are already waiting for the GPU (at most "
                               f"{self.max_waiting}); try again when some have finished.")
            jobs = [Job(next(self._ids), request, owner) for request in requests]
            for job in jobs:
                self._jobs[job.id] = job
                self._waiting.append(job)
            self._wake.notify_all()
        return jobs

    def ahead_of(self, job: Job) -> int:
        """Unfinished jobs submitted before `job` (the one running included)."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.id < job.id and not j.done.is_set())

    def cancel(self, job_id: int, owner: str | None = None) -> bool:
        """Cancel one job (of `owner`, when given): a waiting job leaves the queue at once and never
        reaches the GPU; a running one stops at its next step boundary."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.done.is_set() or (owner is not None and job.owner != owner):
                return False
            self._cancel_locked(job)
        return True

    def cancel_owner(self, owner: str) -> tuple[int, int]:
        """Cancel every unfinished job of one client session: (withdrawn while waiting, running)."""
        withdrawn = running = 0
        with self._lock:
            for job in self._jobs.values():
                if job.owner == owner and not job.done.is_set():
                    if self._cancel_locked(job):
                        running += 1
                    else:
                        withdrawn += 1
        return withdrawn, running

    def _cancel_locked(self, job: Job) -> bool:
        """True when the job was running (it stops at a step boundary), False when withdrawn."""
        job.cancel()
        if job.started:
            return True
        job.error = (AppStopped(self._stopping) if self._stopping else
                     GenerationCancelled("Withdrawn from the queue before it reached the GPU."))
        job.done.set()
        job.events.put(_END)
        return False

    def _work(self, lane: int) -> None:
        service = self.lanes[lane]
        while True:
            with self._wake:
                job = None
                while job is None:
                    if self._closed:
                        return
                    job = self._next_for(lane)
                    if job is None:
                        # Memory readings change without a notification: look again now and then.
                        self._wake.wait(timeout=self.poll_s)
                self._waiting.remove(job)
                job.started, job.lane = True, lane
                self._busy[lane] = True
                if len(self.lanes) > 1:
                    # Every lane's choice changes when one lane turns busy: a job this lane passed
                    # over for this very lane now belongs to another free one, which must not sleep
                    # until its next poll to notice (two clips submitted together start together).
                    self._wake.notify_all()
            try:
                run = service.finish if isinstance(job.request, FinishRequest) else service.generate
                job.result = run(job.request, job.events.put, job.cancel_flag.is_set)
            except GenerationCancelled as exc:
                stopping = self._stopping
                job.error = AppStopped(stopping) if stopping else gpu.drop_frame_locals(exc)
            except StudioError as exc:
                job.error = gpu.drop_frame_locals(exc)
            except Exception as exc:  # noqa: BLE001 - the lane must survive any job
                log.exception("job %d crashed", job.id)
                job.error = gpu.drop_frame_locals(exc)
            finally:
                job.done.set()
                job.events.put(_END)
                available = self._available(lane) if len(self.lanes) > 1 else None
                with self._wake:
                    self._busy[lane] = False
                    self._idle_available[lane] = available
                    # Keep finished jobs briefly for late followers; drop old ones.
                    for old in [k for k, j in self._jobs.items() if j.done.is_set()][:-50]:
                        del self._jobs[old]
                    self._wake.notify_all()

    def _next_for(self, lane: int) -> Job | None:
        """The oldest waiting job that should run on `lane` now (under the lock)."""
        self._waiting = [j for j in self._waiting if not j.done.is_set()]  # withdrawn ones go
        if self._busy[lane]:
            return None
        for job in self._waiting:
            if self.choose_lane(job) == lane:
                return job
        return None

    def choose_lane(self, job: Job) -> int | None:
        """The lane `job` should run on now, or None to wait (under the lock). One lane: it, when
        free. Several: among the free lanes, those whose GPU fits the requested preset (the
        planner's forecast with the lane's own measurements), the one with the most memory
        available; if none fits but a busy lane's GPU would, wait for it; else the free lane with
        the most memory (the run will step down there)."""
        idle = [i for i, busy in enumerate(self._busy) if not busy]
        if len(self.lanes) == 1 or not idle or isinstance(job.request, FinishRequest):
            return idle[0] if idle else None
        preset = job.request.preset
        available = {i: self._available(i) for i in idle}
        fitting = [i for i in idle if self._fits(i, preset, available[i])]
        if fitting:
            return max(fitting, key=lambda i: (available[i] if available[i] is not None else -1.0, -i))
        busy = [i for i, b in enumerate(self._busy) if b]
        if any(self._fits(i, preset, self._idle_available[i]) for i in busy):
            return None
        return max(idle, key=lambda i: (available[i] if available[i] is not None else -1.0, -i))

    def _available(self, lane: int) -> float | None:
        return self.lanes[lane].available_gib()[1]

    def _fits(self, lane: int, preset: str, available: float | None) -> bool:
        service = self.lanes[lane]
        gpu_name = service.available_gib()[0]
        measured = service.history.measured_peaks(gpu_name)
        forecast = service.planner.forecast(preset, available, measured)
        return forecast.fit in (Fit.FITS, Fit.TIGHT, Fit.UNKNOWN)

    def stop_all(self, reason: str) -> int:
        """The app is closing: stop every unfinished job (a running one at its next step boundary);
        their followers are told `reason`. Returns how many there were."""
        with self._lock:
            self._stopping = reason
            unfinished = [j for j in self._jobs.values() if not j.done.is_set()]
            for job in unfinished:
                self._cancel_locked(job)
        return len(unfinished)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is unfinished; False on timeout."""
        with self._lock:
            unfinished = [j for j in self._jobs.values() if not j.done.is_set()]
        deadline = time.monotonic() + timeout
        return all(j.done.wait(max(0.0, deadline - time.monotonic())) for j in unfinished)

    def shutdown(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
