"""What runs inside one GPU worker process.

The process owns its backend and its `PipelineCache` (the weights live here, not in the app's
process) and answers the requests of `pipeline.workers.protocol` one at a time. Its GPU is chosen
by the environment it is started with (CUDA_VISIBLE_DEVICES names one card, which the process sees
as cuda:0), set before anything imports torch.

Sequence parallelism: the N ranks of a group form a torch.distributed process group (NCCL on CUDA,
gloo for the CPU test double) before anything is loaded; every rank receives the same request from
the app, rank 0 alone sends progress, previews and frames. Cancel is agreed: every rank asks the
same question at the same points of the run (each block, each step) and a small all-reduce over a
gloo group on the CPU gives every rank the same answer, so no rank leaves a collective that the
others still wait in.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any

from pipeline.workers import protocol as p
from pipeline.workers import transfer

log = logging.getLogger(__name__)

# How long NCCL/gloo collectives wait for a missing rank before raising: a rank that is stuck
# behind a rank that died is restarted by the app well before this.
COLLECTIVE_TIMEOUT_S = 600


class PeerFailed(RuntimeError):
    """This rank's part went well, but another rank of the group failed (it speaks for the job)."""


def main(rank: int, world: int, conn: Any, cancel: Any, backend_spec: p.BackendSpec, env: dict[str, str],
         rendezvous: tuple[str, int] | None) -> None:
    """The worker's entry point (multiprocessing 'spawn' target)."""
    os.environ.update(env)  # before torch is imported: CUDA_VISIBLE_DEVICES, NCCL settings
    logging.basicConfig(level=os.environ.get("WAN_STUDIO_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s worker{rank}@%(process)d %(name)s: %(message)s")
    worker = _Worker(rank, world, conn, cancel, backend_spec, rendezvous)
    try:
        worker.serve()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        log.info("the app went away; worker %d exits", rank)
    finally:
        worker.close()


def join_group(rank: int, world: int, rendezvous: tuple[str, int]) -> Any:
    """Join the torch.distributed group of a sequence-parallel group (NCCL on CUDA, gloo for the CPU
    test double) at the app's store (`rendezvous`: its host and port, see group.rendezvous_store),
    and return the small gloo group the ranks agree over (cancel, loads, the attention kernel)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)  # this process's one visible card
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})
    kwargs: dict[str, Any] = {}
    if cuda:
        kwargs["device_id"] = torch.device("cuda", 0)
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    host, port = rendezvous
    store = dist.TCPStore(host, port, world_size=world, is_master=False, timeout=timeout)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout, **kwargs)
    consensus = dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d of %d joined (%s)", rank, world, dist.get_backend())
    return consensus


def build_backend(spec: p.BackendSpec, rank: int) -> Any:
    kwargs = {**spec.kwargs, **spec.per_rank.get(rank, {})}
    if spec.kind == "fake":
        from pipeline.backends.fake import FakeBackend

        return FakeBackend(**kwargs)
    if spec.kind == "lightx2v":
        from pipeline.backends.lightx2v import LightX2VBackend

        return LightX2VBackend(**kwargs)
    raise ValueError(f"unknown worker backend kind {spec.kind!r}")


class _Worker:
    def __init__(self, rank: int, world: int, conn: Any, cancel: Any, backend_spec: p.BackendSpec,
                 rendezvous: tuple[str, int] | None):
        from pipeline.cache import PipelineCache

        self.rank, self.world, self.conn, self.cancel = rank, world, conn, cancel
        self.consensus = None  # the gloo group that agrees on cancel (sequence parallelism)
        self.cancel_seen = False
        if world > 1:
            self._init_distributed(rendezvous)
        backend = build_backend(backend_spec, rank)
        if world > 1 and backend_spec.kind == "lightx2v":
            import torch.distributed as dist
            from pipeline.backends import kernels

            # Rank 0 chooses the attention kernel for every rank, over the CPU group.
            backend.ranks = kernels.rank_group(dist, self.consensus)
        if world > 1 and backend_spec.kind == "fake":
            # The fake stands for a model whose every step needs all ranks (Ulysses' all-to-all):
            # one collective per step, so a rank that fails leaves the others waiting, as on GPUs.
            # Its build needs all ranks too (LightX2V's create_generator makes the device mesh and
            # runs an all-reduce on every rank).
            backend.on_step_hook = self._fake_collective
            backend.on_load_hook = self._fake_load_collective
        # A rank rolling back alone after a failed load would build alone: see _get_model.
        self.cache = PipelineCache(backend, rollback=world == 1)

    # -- distributed -----------------------------------------------------------------------------

    def _init_distributed(self, rendezvous: tuple[str, int]) -> None:
        self.consensus = join_group(self.rank, self.world, rendezvous)

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank says True (one small CPU all-reduce)."""
        if self.consensus is None:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.consensus)
        return bool(t.item())

    def _fake_collective(self, spec: Any, step: int) -> None:
        self._agree(False)

    def _fake_load_collective(self, key: Any) -> None:
        self._agree(False)

    def _get_model(self, key: Any) -> Any:
        """The loaded model of `key`. In a sequence-parallel group every rank learns whether the
        load went well on every rank: a build is collective (the device mesh, an all-reduce), so a
        rank that kept a model the others lack would skip the next build the others run and wait
        for them in another collective, for good. Host memory shared by N loading ranks runs out on
        some of them, not all. When any rank failed, every rank gives its model up."""
        if self.consensus is None:
            return self.cache.get(key, self._on_phase)
        model, failure = None, None
        try:
            model = self.cache.get(key, self._on_phase)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank knows
            failure = exc
        if not self._agree(failure is not None):
            return model
        model = None
        self.cache.release()
        if failure is not None:
            raise failure
        raise PeerFailed("another GPU of this sequence-parallel group failed to load the model; "
                         "this one gave its copy up so that every GPU holds the same")

    # -- the request loop -------------------------------------------------------------------------

    def serve(self) -> None:
        self._send(p.Ready(self.rank, os.getpid(), self._readings()))
        while True:
            request = self.conn.recv()
            if isinstance(request, p.Stop):
                return
            if isinstance(request, p.ResetPeak):
                _torch_call("reset_peak_memory_stats")
                continue
            self._answer(request)

    def _answer(self, request: Any) -> None:
        failure = None
        value = None
        try:
            value = self._handle(request)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the app, typed
            failure = self._classify(exc)
            del exc
        if failure is not None:
            # Outside the except block: the failed run's frames (and their tensors) are gone.
            from pipeline.machine import gpu

            gpu.free_gpu_memory()
            self._send(failure)
            return
        if self.rank == 0:
            value = transfer.put(value, os.environ.get(transfer.FRAMES_DIR_ENV))
        self._send(p.Done(self.rank, value if self.rank == 0 else None, self._readings(),
                          loads=self.cache.loads, load_seconds=self.cache.last_load_seconds,
                          describe=self._describe(request)))

    def _describe(self, request: Any) -> dict[str, Any] | None:
        """Rank 0's backend description after a load or a run: a run adds what it chose at its
        first calls (the attention kernel per shape), which the record must show."""
        if self.rank != 0 or not isinstance(request, (p.Load, p.Generate, p.Decode)):
            return None
        return self.cache.backend.describe()

    def _handle(self, request: Any) -> Any:
        from pipeline.backend import RunHooks

        if isinstance(request, p.Load):
            self._get_model(request.key)
            return None
        if isinstance(request, (p.Generate, p.Decode)):
            self.cancel_seen = False
            hooks = RunHooks(on_phase=self._on_phase, on_step=self._on_step, should_stop=self._should_stop,
                             on_preview=self._on_preview, on_latents=self._on_latents)
            model = self._get_model(request.key)
            if isinstance(request, p.Generate):
                return model.generate(request.spec, hooks)
            return model.decode(request.latents, request.spec, hooks)
        if isinstance(request, p.Recover):
            model = self.cache._model
            if model is not None:
                model.recover()
            return None
        if isinstance(request, p.Release):
            self.cache.release()
            return None
        raise ValueError(f"unknown request {type(request).__name__}")

    # -- hooks: rank 0 reports, every rank agrees on cancel -------------------------------------

    def _on_phase(self, phase: Any) -> None:
        if self.rank == 0:
            self._send(p.PhaseEvent(phase))

    def _on_step(self, step: int, total: int) -> None:
        if self.rank == 0:
            self._send(p.StepEvent(step, total))

    def _on_preview(self, preview: Any) -> None:
        if self.rank == 0:
            self._send(p.PreviewEvent(preview))

    def _on_latents(self, latents: Any) -> None:
        if self.rank == 0:
            self._send(p.LatentsEvent(latents))

    def _should_stop(self) -> bool:
        if not self.cancel_seen:
            self.cancel_seen = self._agree(self.cancel.is_set())
        return self.cancel_seen

    # -- replies ---------------------------------------------------------------------------------

    def _send(self, message: Any) -> None:
        self.conn.send(message)

    def _classify(self, exc: BaseException) -> p.Failure:
        from pipeline.machine import gpu, hostmem
        from pipeline.backend import DecodeOutOfMemory
        from pipeline.errors import GenerationCancelled, StudioError

        message = str(exc) if isinstance(exc, StudioError) else f"{type(exc).__name__}: {exc}"
        readings = self._readings()
        if isinstance(exc, GenerationCancelled):
            return p.Failure(self.rank, p.CANCEL, str(exc), readings, type(exc).__name__)
        if isinstance(exc, PeerFailed):
            return p.Failure(self.rank, p.PEER, str(exc), readings, type(exc).__name__)
        if isinstance(exc, DecodeOutOfMemory):
            return p.Failure(self.rank, p.DECODE_OOM, exc.cause, readings, type(exc).__name__,
                             latents=exc.latents if self.rank == 0 else None)
        if hostmem.is_host_oom(exc):
            return p.Failure(self.rank, p.HOST_OOM, message, readings, type(exc).__name__)
        if gpu.is_oom(exc):
            return p.Failure(self.rank, p.OOM, message, readings, type(exc).__name__)
        if not isinstance(exc, StudioError):
            log.exception("worker %d: request failed", self.rank)
        return p.Failure(self.rank, p.ERROR, message, readings, type(exc).__name__)

    def _readings(self) -> p.Readings:
        from pipeline.machine import hostmem

        process = hostmem.read_process()
        torch = sys.modules.get("torch")
        reserved = allocated = peak = None
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            reserved, allocated = int(torch.cuda.memory_reserved(0)), int(torch.cuda.memory_allocated(0))
            peak = torch.cuda.max_memory_reserved(0) / 1024**3
        return p.Readings(peak_reserved_gib=peak, reserved_bytes=reserved, allocated_bytes=allocated,
                          host_must_hold_gib=process.must_hold_gib if process is not None else None)

    def close(self) -> None:
        try:
            self.cache.release()
        except Exception:  # noqa: BLE001 - the process is ending anyway
            log.warning("releasing the model at exit failed", exc_info=True)
        if self.consensus is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _torch_call(name: str) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        getattr(torch.cuda, name)()

