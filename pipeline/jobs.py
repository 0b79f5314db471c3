"""The one GPU lane: a single worker thread that runs jobs in submission order.

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

    def __init__(self, service: VideoService, max_waiting: int = 100):
        self.max_waiting = max_waiting
        self.service = service
        self._queue: "queue.Queue[Job | None]" = queue.Queue()
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._stopping: str | None = None  # why every job is being stopped (the app is closing)
        # The low-RAM rung keeps its text encoder for the next prompt when one is waiting.
        service.prompt_waiting = self.prompt_waiting
        self._worker = threading.Thread(target=self._work, name="gpu-lane", daemon=True)
        self._worker.start()

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
                self._queue.put(job)
        return jobs

    def ahead_of(self, job: Job) -> int:
        """Unfinished jobs submitted before `job` (the one running included)."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.id < job.id and not j.done.is_set())

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

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

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.done.is_set():  # withdrawn while it waited
                    continue
                job.started = True
            try:
                run = (self.service.finish if isinstance(job.request, FinishRequest)
                       else self.service.generate)
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
                with self._lock:
                    # Keep finished jobs briefly for late followers; drop old ones.
                    for old in [k for k, j in self._jobs.items() if j.done.is_set()][:-50]:
                        del self._jobs[old]

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
        self._queue.put(None)
