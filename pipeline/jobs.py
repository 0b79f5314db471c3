"""The one GPU lane: a single worker thread that runs jobs in submission order.

The UI submits a job and follows its events; the job does not belong to the browser tab. If the tab
closes, the job still finishes and lands in history. Cancel is cooperative: it sets the job's flag,
which the backend checks at step boundaries.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

from pipeline import gpu
from pipeline.errors import LaneFull, StudioError
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
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    events: "queue.Queue[ProgressEvent | object]" = field(default_factory=queue.Queue)
    result: GenerationResult | None = None
    error: BaseException | None = None

    def cancel(self) -> None:
        self.cancel_flag.set()

    def follow(self, poll_s: float = 0.25) -> Iterator[ProgressEvent | None]:
        """Progress events until the job ends; yields None every `poll_s` without news."""
        while True:
            try:
                event = self.events.get(timeout=poll_s)
            except queue.Empty:
                if self.done.is_set() and self.events.empty():
                    return
                yield None
                continue
            if event is _END:
                return
            yield event


class JobQueue:
    def __init__(self, service: VideoService, max_waiting: int = 100):
        self.max_waiting = max_waiting
        self.service = service
        self._queue: "queue.Queue[Job | None]" = queue.Queue()
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="gpu-lane", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest | FinishRequest) -> Job:
        # Reject bad requests here, before they take a place in the lane.
        self.service.validate(request)
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if not j.done.is_set())
            if waiting >= self.max_waiting:
                # Jobs of closed tabs stay in the lane, so Gradio's own queue limit is not enough.
                raise LaneFull(f"{waiting} jobs are already waiting for the GPU; try again when "
                               f"some have finished.")
            job = Job(next(self._ids), request)
            self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def ahead_of(self, job: Job) -> int:
        """Unfinished jobs submitted before `job` (the one running included)."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.id < job.id and not j.done.is_set())

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: int) -> bool:
        job = self.get(job_id)
        if job is None or job.done.is_set():
            return False
        job.cancel()
        return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                run = (self.service.finish if isinstance(job.request, FinishRequest)
                       else self.service.generate)
                job.result = run(job.request, job.events.put, job.cancel_flag.is_set)
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

    def shutdown(self) -> None:
        self._queue.put(None)
