"""Several GPUs on the CPU: the lanes' dispatch and lane choice by free memory, real worker
processes running the fake backend (killed, cancelled), and a sequence-parallel group of two fake
ranks that are real processes joined by torch.distributed's gloo backend."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from pipeline.backend import RunHooks
from pipeline.backends.fake import FakeBackend
from pipeline.cache import PipelineCache
from pipeline.errors import GenerationCancelled, WorkerDied
from pipeline.machine.gpu import NO_TORCH, GpuMonitor
from pipeline.store.history import History
from pipeline.jobs import JobQueue
from pipeline.store.outputs import OutputStore, count_mp4_frames, write_mp4
from pipeline.service import VideoService
from pipeline.types import GenerationRequest, Phase, RunSpec
from pipeline.workers import group as workers
from pipeline.workers import protocol as p
from pipeline.workers import transfer
from pipeline.workers.setup import multi_gpu_services
from tests.conftest import FakeNvml

REQUEST = dict(prompt="a lighthouse in a storm", negative_prompt="")


@pytest.fixture
def store(tmp_path):
    outputs = OutputStore(tmp_path / "outputs")
    outputs.ensure()
    return outputs, History(tmp_path / "outputs" / "history.sqlite3")


def _wait(job, timeout=60.0):
    assert job.done.wait(timeout), f"job {job.id} did not finish"
    return job


# -- flags ------------------------------------------------------------------------------------


def test_gpus_flag_and_modes():
    assert workers.parse_gpus("all", 4) == (0, 1, 2, 3)
    assert workers.parse_gpus("1,0", 2) == (1, 0)
    for bad in ("", "0,0", "a", "-1"):
        with pytest.raises(ValueError):
            workers.parse_gpus(bad, 2)
    with pytest.raises(ValueError, match="indices 0 to 1"):
        workers.parse_gpus("0,2", 2)
    with pytest.raises(ValueError, match="no NVIDIA GPU"):
        workers.parse_gpus("all", None)
    workers.check_mode("seq", (0, 1, 2, 3))
    with pytest.raises(ValueError, match="40 attention heads"):
        workers.check_mode("seq", (0, 1, 2))
    workers.check_mode("lanes", (0, 1, 2))


def test_worker_environment_keeps_what_the_user_set():
    env = workers.worker_env((3, 5), 1, seq=True, base={"NCCL_NVLS_ENABLE": "1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    assert "NCCL_NVLS_ENABLE" not in env  # the user's own setting stays
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["WAN_STUDIO_SEQ_PARALLEL"] == "2"
    # CUDA_VISIBLE_DEVICES names the card by the index NVML (and --gpus) gives it.
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "CUDA_DEVICE_ORDER" not in workers.worker_env((0,), 0, seq=False, base={"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})


# -- lane choice (in-process services, each with its own fake GPU) -------------------------------


def _lanes(presets, store, totals_gib, step_seconds=0.0):
    outputs, history = store
    lanes = []
    for index, total in enumerate(totals_gib):
        nvml = FakeNvml(total_gib=total, used_gib=0.5, name="NVIDIA Test GPU")
        monitor = GpuMonitor(nvml=nvml, device_index=index, torch=NO_TORCH)
        lanes.append(VideoService(presets=presets, cache=PipelineCache(FakeBackend(step_seconds=step_seconds)),
                                  outputs=outputs, history=history, monitor=monitor))
    return lanes


def test_a_job_goes_to_the_free_gpu_whose_memory_fits(presets, store):
    small, big = _lanes(presets, store, totals_gib=[4.0, 24.0])
    queue = JobQueue(small, lanes=[small, big])
    try:
        job = _wait(queue.submit(GenerationRequest(preset="720x1280x81", seed=1, **REQUEST)))
        assert job.error is None and job.lane == 1  # only the 24 GiB card fits 720p
        assert job.result.preset_used == "720x1280x81"
        small_job = _wait(queue.submit(GenerationRequest(preset="480x832x49", seed=2, **REQUEST)))
        assert small_job.lane == 1  # both fit: the one with more memory available
    finally:
        queue.shutdown()


def test_a_job_waits_for_the_busy_gpu_that_fits_it_and_a_small_one_goes_ahead(presets, store):
    small, big = _lanes(presets, store, totals_gib=[4.0, 24.0], step_seconds=0.3)
    queue = JobQueue(small, lanes=[small, big])
    try:
        first, big_job, small_job = queue.submit_all([
            GenerationRequest(preset="720x1280x81", seed=1, **REQUEST),
            GenerationRequest(preset="720x1280x81", seed=2, **REQUEST),
            GenerationRequest(preset="480x832x49", seed=3, **REQUEST)])
        for job in (first, big_job, small_job):
            _wait(job)
            assert job.error is None
        assert (first.lane, big_job.lane) == (1, 1)  # the second 720p waited for the big card
        assert big_job.result.preset_used == "720x1280x81"  # ... and did not step down on the small one
        assert small_job.lane == 0  # the small clip went ahead on the free small card
        assert small_job.done.is_set() and small_job.result.record["created_at"] <= big_job.result.record["created_at"]
    finally:
        queue.shutdown()


def test_two_jobs_submitted_together_start_together_without_waiting_for_a_poll(presets, store):
    """Both fake GPUs fit the clip and the second has more memory, so while both lanes are idle the
    first lane to look passes both jobs over for the other one. Once that lane takes a job, the first
    must learn that the second job is now its own at once, not at its next poll (here a minute):
    each job waits at its first step until the other job runs too."""
    lanes = _lanes(presets, store, totals_gib=[12.0, 24.0])
    together = threading.Barrier(2, timeout=20)
    for lane in lanes:
        lane.cache.backend.on_step_hook = lambda spec, step: step == 1 and together.wait()
    queue = JobQueue(lanes[0], lanes=lanes, poll_s=60.0)
    try:
        for round_ in range(4):  # which idle lane looks first is up to the threads: several pairs
            pair = queue.submit_all([GenerationRequest(preset="480x832x49", seed=10 * round_ + s, **REQUEST)
                                     for s in (1, 2)])
            for job in pair:
                _wait(job, timeout=40)
                assert job.error is None, job.error
            assert sorted(j.lane for j in pair) == [0, 1]
    finally:
        queue.shutdown()


# -- real worker processes (lanes) --------------------------------------------------------------


@pytest.fixture
def lane_workers(presets, store):
    outputs, history = store
    services, groups = multi_gpu_services(mode="lanes", gpus=(0, 1), presets=presets, outputs=outputs,
                                          history=history, backend_spec=p.BackendSpec("fake", {"step_seconds": 0.4}))
    for g in groups:
        g.wait_ready(120)
    queue = JobQueue(services[0], lanes=services)
    yield services, groups, queue, history
    queue.shutdown()
    for g in groups:
        g.close()


def test_two_lanes_run_two_clips_at_once_and_the_record_names_the_gpu(lane_workers):
    services, groups, queue, history = lane_workers
    started = time.monotonic()
    jobs = queue.submit_all([GenerationRequest(preset="480x832x49", seed=s, **REQUEST) for s in (1, 2)])
    for job in jobs:
        _wait(job)
        assert job.error is None, job.error
    took = time.monotonic() - started
    assert sorted(j.lane for j in jobs) == [0, 1]
    # One clip is 4 steps of 0.4 s: two at once take about one clip's time, not two.
    assert took < 2 * 4 * 0.4
    for job in jobs:
        gpus = job.result.record["gpus"]
        assert gpus["mode"] == "lanes" and gpus["gpu_indices"] == [job.lane]
        assert gpus["worker_pids"] == groups[job.lane].pids() and os.getpid() not in gpus["worker_pids"]
        assert job.result.video_path.is_file()
        assert history.get(job.result.record["job_id"]).status == "done"


def test_two_lanes_overlap_their_host_work_on_full_size_clips(presets, tmp_path, monkeypatch):
    """Two 480x832x49 clips (59 MB of frames each) from two worker processes: the frames come back
    through the group's shared-memory folder (not pickled through the pipe), and each clip's mp4
    encode (the real one) starts only once the other lane's has begun, which a save path that ran
    one job at a time (a lock, one saving thread) could never reach."""
    spans: list[tuple[str, str]] = []
    both_encoding = threading.Barrier(2, timeout=60)

    def writer(frames, fps, path, comment):
        spans.append(("start", threading.current_thread().name))
        both_encoding.wait()
        write_mp4(frames, fps, path, comment)
        spans.append(("end", threading.current_thread().name))

    outputs = OutputStore(tmp_path / "outputs", writer=writer)
    outputs.ensure()
    history = History(tmp_path / "outputs" / "history.sqlite3")
    came = []
    take = transfer.take
    monkeypatch.setattr(transfer, "take", lambda value: (came.append(type(value).__name__), take(value))[1])
    services, groups = multi_gpu_services(mode="lanes", gpus=(0, 1), presets=presets, outputs=outputs,
                                          history=history, backend_spec=p.BackendSpec("fake", {"scale": 1}))
    queue = JobQueue(services[0], lanes=services, poll_s=60.0)
    try:
        jobs = queue.submit_all([GenerationRequest(preset="480x832x49", seed=s, **REQUEST) for s in (1, 2)])
        for job in jobs:
            _wait(job, timeout=120)
            assert job.error is None, job.error
        assert sorted(j.lane for j in jobs) == [0, 1]
        assert [what for what, _ in spans[:2]] == ["start", "start"]
        assert {lane for _, lane in spans} == {"gpu-lane-0", "gpu-lane-1"}
        if all(g.frames_dir for g in groups):  # Linux: /dev/shm
            assert came.count("FramesFile") == 2 and "ndarray" not in came
            assert all(os.listdir(g.frames_dir) == [] for g in groups)
        for job in jobs:
            record = job.result.record
            assert (record["frames"], record["height"], record["width"]) == (49, 480, 832)
            assert count_mp4_frames(job.result.video_path) == 49
            assert history.get(job.result.record["job_id"]).status == "done"
    finally:
        queue.shutdown()
        folders = [g.frames_dir for g in groups]
        for g in groups:
            g.close()
    assert not any(f and os.path.exists(f) for f in folders)


def test_frames_file_round_trip_and_the_pipe_where_there_is_no_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, size=(9, 64, 640, 3), dtype=np.uint8)
    sent = transfer.put(frames, str(tmp_path))
    assert isinstance(sent, p.FramesFile) and os.path.getsize(sent.path) == frames.nbytes
    back = transfer.take(sent)
    assert back.dtype == frames.dtype and np.array_equal(back, frames)
    assert os.listdir(tmp_path) == []
    # Small values, and a folder that cannot take the file (gone, or a full tmpfs), use the pipe.
    small = frames[:1, :8]
    assert transfer.put(small, str(tmp_path)) is small
    assert transfer.put(frames, str(tmp_path / "gone")) is frames
    assert transfer.put(frames, None) is frames and transfer.take(frames) is frames
    unused = transfer.put(frames, str(tmp_path))
    transfer.discard(unused)
    assert os.listdir(tmp_path) == []


def test_frames_file_is_removed_when_the_app_cannot_hold_the_frames(tmp_path, monkeypatch):
    # The app runs out of RAM making room for the clip (a host OOM the ladder steps down from):
    # the file must not stay in the tmpfs, where it holds as much RAM as the clip until the group
    # closes, while the next rung runs on a machine short of RAM.
    frames = np.zeros((9, 64, 640, 3), dtype=np.uint8)
    sent = transfer.put(frames, str(tmp_path))
    assert isinstance(sent, p.FramesFile)

    def no_room(*args, **kwargs):
        raise MemoryError("cannot allocate the frames")

    monkeypatch.setattr(transfer.np, "fromfile", no_room)
    with pytest.raises(MemoryError):
        transfer.take(sent)
    assert os.listdir(tmp_path) == []


def test_frames_folders_of_apps_that_are_gone_are_removed(tmp_path):
    import multiprocessing

    ended = multiprocessing.get_context("spawn").Process(target=os.getpid)
    ended.start()
    ended.join()
    stale = tmp_path / f"{transfer.PREFIX}{ended.pid}-abc"
    stale.mkdir()
    (stale / "1-0.frames").write_bytes(b"x")
    mine = transfer.make_dir(str(tmp_path))
    assert mine is not None and os.path.basename(mine).startswith(f"{transfer.PREFIX}{os.getpid()}-")
    assert not stale.exists() and os.path.isdir(mine)
    transfer.remove(mine)
    assert not os.path.exists(mine)


def test_a_killed_worker_fails_its_job_is_restarted_and_the_queue_goes_on(lane_workers):
    services, groups, queue, history = lane_workers
    done = _wait(queue.submit(GenerationRequest(preset="480x832x49", seed=1, **REQUEST)))
    assert done.error is None
    lane = groups[done.lane]
    victim = _wait_running(queue, GenerationRequest(preset="480x832x49", seed=2, **REQUEST), lane=done.lane)
    old_pid = lane.pids()[0]
    os.kill(old_pid, signal.SIGKILL)
    _wait(victim)
    assert isinstance(victim.error, WorkerDied)
    assert "restarted" in str(victim.error) and "SIGKILL" in str(victim.error)
    assert lane.restarts == 1 and lane.pids()[0] != old_pid
    # The queue goes on, on the restarted worker, and the history keeps every job.
    after = _wait(queue.submit(GenerationRequest(preset="480x832x49", seed=3, **REQUEST)))
    assert after.error is None
    rows = {e.id: e for e in history.recent(10, status=None)}
    assert rows[done.result.record["job_id"]].status == "done"
    assert rows[after.result.record["job_id"]].status == "done"
    failed = [e for e in rows.values() if e.status == "failed"]
    assert len(failed) == 1 and "stopped while running this job" in (failed[0].error or "")


def test_cancel_reaches_the_worker_at_a_step_boundary(lane_workers):
    services, groups, queue, history = lane_workers
    job = _wait_running(queue, GenerationRequest(preset="480x832x49", seed=4, **REQUEST), step=1)
    pid = groups[job.lane].pids()[0]
    queue.cancel(job.id)
    _wait(job, timeout=10)
    assert isinstance(job.error, GenerationCancelled)
    assert groups[job.lane].pids()[0] == pid and groups[job.lane].restarts == 0  # stopped, not killed
    assert any(e.status == "cancelled" for e in history.recent(5, status=None))
    again = _wait(queue.submit(GenerationRequest(preset="480x832x49", seed=4, **REQUEST)))
    assert again.error is None


def _wait_running(queue, request, step=0, lane=None, timeout=30.0):
    """Submit and return the job once it runs (and has reached denoising `step`)."""
    deadline = time.monotonic() + timeout
    while True:
        job = queue.submit(request)
        seen = []
        while time.monotonic() < deadline and not job.done.is_set():
            events, _ = job.pending_events()
            seen += events
            if any(e.phase is Phase.DENOISING and e.step >= step for e in seen if e.preview is None):
                if lane is None or job.lane == lane:
                    return job
                break
            time.sleep(0.02)
        assert time.monotonic() < deadline, "the job never ran"
        _wait(job)


# -- a sequence-parallel group of two fake ranks --------------------------------------------------


def _spec(preset="480x832x49", seed=7, rung="fast"):
    return RunSpec(preset=preset, rung=rung, prompt=REQUEST["prompt"], negative_prompt="", seed=seed,
                   height=480, width=832, frames=49, steps=4, shift=5.0, guidance=1.0,
                   memory={"offload_granularity": "block", "text_encoder": "offload"})


def _hooks(steps, stop=lambda: False):
    return RunHooks(on_phase=lambda ph: steps.append(ph), on_step=lambda i, n: steps.append((i, n)),
                    should_stop=stop)


def test_seq_group_gives_one_gpus_frames_and_only_rank0_reports(presets):
    group = workers.WorkerGroup(p.BackendSpec("fake", {}), (0, 1), seq=True)
    group.start()
    try:
        group.wait_ready(120)
        local = FakeBackend()
        backend = workers.RemoteBackend(group, local)
        key = backend.load_key(_spec().memory)
        model = backend.load(key, lambda ph: None)
        events: list = []
        group.last_describe = None
        frames = model.generate(_spec(), _hooks(events))
        # A run's reply describes the backend after it (what it chose at its first calls: the
        # attention kernel per shape), for the record; not only a load's.
        assert group.last_describe is not None and group.last_describe["backend"] == "fake"
        one_gpu = local.load(key, lambda ph: None).generate(_spec(), _hooks([]))
        assert np.array_equal(frames, one_gpu)
        assert [e for e in events if isinstance(e, tuple)] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # rank 0's only
        assert len(set(group.pids())) == 2
    finally:
        group.close()


def test_seq_cancel_is_agreed_by_every_rank(presets):
    group = workers.WorkerGroup(p.BackendSpec("fake", {"step_seconds": 0.3}), (0, 1), seq=True)
    group.start()
    try:
        group.wait_ready(120)
        backend = workers.RemoteBackend(group, FakeBackend())
        model = backend.load(backend.load_key(_spec().memory), lambda ph: None)
        events: list = []
        with pytest.raises(GenerationCancelled):
            model.generate(_spec(), _hooks(events, stop=lambda: any(isinstance(e, tuple) for e in events)))
        assert group.restarts == 0  # both ranks stopped at the same step: nothing stuck
        model.recover()
        assert model.generate(_spec(seed=8), _hooks([])).dtype == np.uint8
    finally:
        group.close()


def test_seq_oom_on_one_rank_is_the_jobs_oom_every_rank_recovers(presets, store):
    outputs, history = store
    spec = p.BackendSpec("fake", {}, per_rank={1: {"oom_at": {("720x1280x81", "*", Phase.DENOISING)}}})
    services, groups = multi_gpu_services(mode="seq", gpus=(0, 1), presets=presets, outputs=outputs,
                                          history=history, backend_spec=spec,
                                          group_kwargs={"failure_grace_s": 1.0})
    service, group = services[0], groups[0]
    try:
        group.wait_ready(120)
        pids = group.pids()
        result = service.generate(GenerationRequest(preset="720x1280x81", seed=5, **REQUEST))
        # Rank 1 ran out of memory while rank 0 waited for it in the step's collective: the
        # attempt is an OOM, the group was restarted (fresh processes: every card's memory back),
        # and the ladder went on to a clip that fits.
        assert [a.outcome for a in result.attempts][0] == "out of memory"
        assert "rank 1 of 2" in result.attempts[0].detail
        assert result.attempts[-1].outcome == "ok" and result.preset_used != "720x1280x81"
        assert group.restarts >= 1 and set(group.pids()).isdisjoint(pids)
        assert result.record["gpus"]["mode"] == "seq" and result.record["gpus"]["gpu_indices"] == [0, 1]
    finally:
        group.close()


def _bounded(group, seconds, work):
    """work()'s result or exception; a group still stuck after `seconds` has its workers killed
    (which ends the call) and fails the test."""
    import threading

    box: list = []

    def run():
        try:
            box.append(work())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for pid in group.pids():
            os.kill(pid, signal.SIGKILL)
        thread.join(30)
        pytest.fail(f"the group was still stuck after {seconds} s")
    return box[0]


def test_seq_load_that_fails_on_one_rank_is_undone_on_every_rank(presets):
    # Host memory shared by the loading ranks runs out on some of them. A build is collective
    # (LightX2V makes its device mesh and runs an all-reduce in every build; the fake runs one
    # collective per load), so a rank that kept its model would skip the next build the others
    # run and wait for them in another collective for good.
    spec = p.BackendSpec("fake", {}, per_rank={1: {"host_oom_loads": True}})
    group = workers.WorkerGroup(spec, (0, 1), seq=True, failure_grace_s=5.0)
    group.start()
    try:
        group.wait_ready(120)
        backend = workers.RemoteBackend(group, FakeBackend())
        key = backend.load_key(_spec().memory)
        with pytest.raises(Exception) as failed:
            backend.load(key, lambda ph: None)
        # The job's error is rank 1's own (the ladder steps down by RAM), not rank 0's giving up.
        assert "host memory" in str(failed.value).lower() or "can't allocate" in str(failed.value), failed.value
        assert "GPU 1" in str(failed.value)
        assert group.restarts == 0  # nobody was left waiting in a collective
        # Rank 0 gave its copy up: the same load again is a build on both ranks (it fails again on
        # rank 1, in time, instead of rank 0 skipping it and waiting for rank 1 forever).
        outcome = _bounded(group, 20.0, lambda: backend.load(key, lambda ph: None))
        assert isinstance(outcome, Exception) and "GPU 1" in str(outcome), outcome
        assert group.restarts == 0
        # A build that needs no pinned DiT (the low-RAM rung) loads on both and runs.
        low = dict(_spec().memory, dit_from_disk=True)
        model = backend.load(backend.load_key(low), lambda ph: None)
        assert model.generate(replace(_spec(), memory=low), _hooks([])).dtype == np.uint8
        assert group.restarts == 0
    finally:
        group.close()


# -- the rendezvous of a sequence-parallel group ------------------------------------------------


def test_seq_group_holds_its_rendezvous_port_from_start_to_the_end():
    # The ranks take seconds to import torch before they meet. A port probed free, closed and bound
    # later by rank 0 could be taken in that window (rank 0 then failed with EADDRINUSE): the app's
    # own store holds it from start() on, and the ranks join it as clients.
    group = workers.WorkerGroup(p.BackendSpec("fake", {}), (0, 1), seq=True)
    group.start()
    try:
        port = group.store.port
        with socket.socket() as thief, pytest.raises(OSError) as taken:
            thief.bind(("127.0.0.1", port))
            thief.listen()
        assert taken.value.errno == errno.EADDRINUSE
        group.wait_ready(120)
        backend = workers.RemoteBackend(group, FakeBackend())
        model = backend.load(backend.load_key(_spec().memory), lambda ph: None)
        assert model.generate(_spec(), _hooks([])).dtype == np.uint8
        # A restart meets at a new store (nothing of the old group's keys); the old port is let go.
        group.restart("test")
        assert group.store.port != port
        group.wait_ready(120)
        assert backend.load(backend.load_key(_spec().memory), lambda ph: None).generate(_spec(), _hooks([])).dtype == np.uint8
    finally:
        group.close()
    assert group.store is None
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # closed: the port is free for others


def test_a_killed_seq_rank_fails_the_job_clearly_and_the_group_starts_again(presets, store):
    outputs, history = store
    services, groups = multi_gpu_services(mode="seq", gpus=(0, 1), presets=presets, outputs=outputs,
                                          history=history, backend_spec=p.BackendSpec("fake", {"step_seconds": 0.4}))
    queue = JobQueue(services[0], lanes=services)
    group = groups[0]
    try:
        group.wait_ready(120)
        first_port = group.store.port
        victim = _wait_running(queue, GenerationRequest(preset="480x832x49", seed=2, **REQUEST), step=1)
        old = group.pids()
        os.kill(old[1], signal.SIGKILL)
        _wait(victim)
        assert isinstance(victim.error, WorkerDied)
        assert "GPU 1" in str(victim.error) and "SIGKILL" in str(victim.error) and "restarted" in str(victim.error)
        assert group.restarts == 1 and set(group.pids()).isdisjoint(old) and group.store.port != first_port
        after = _wait(queue.submit(GenerationRequest(preset="480x832x49", seed=3, **REQUEST)))
        assert after.error is None, after.error
        rows = {e.id: e for e in history.recent(10, status=None)}
        assert rows[after.result.record["job_id"]].status == "done"
        failed = [e for e in rows.values() if e.status == "failed"]
        assert len(failed) == 1 and "stopped while running this job" in (failed[0].error or "")
    finally:
        queue.shutdown()
        group.close()


# -- two real ranks joined as a seq group's workers join (gloo), running one function each ----------


def _rank_main(rank, world, rendezvous, task, results):
    import torch.distributed as dist

    from pipeline.workers.child import join_group

    consensus = join_group(rank, world, rendezvous)
    try:
        results.put((rank, task(rank, consensus)))
    except Exception as exc:  # noqa: BLE001 - handed to the test
        results.put((rank, repr(exc)))
    finally:
        dist.destroy_process_group()


def _two_ranks(task, timeout=120.0):
    """task(rank, consensus group) on two processes that joined like a seq group's workers; the
    results in rank order."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    store = workers.rendezvous_store()
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, (store.host, store.port), task, results), daemon=True)
             for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        got = dict(results.get(timeout=timeout) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [got[0], got[1]]


def _two_builds_mesh_groups(rank, consensus):
    """Two sequence-parallel builds as the backend makes them, each followed by the device mesh
    LightX2V's set_parallel_config makes (utils/set_config.py:453) with torch's init_device_mesh."""
    import sys
    import types

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from pipeline.backends import lightx2v as backend_module
    from pipeline.backends import lightx2v_compat as compat

    set_config = types.ModuleType("lightx2v.utils.set_config")
    set_config.init_device_mesh = init_device_mesh
    platform = types.ModuleType("lightx2v_platform.registry_factory")
    platform.PLATFORM_DEVICE_REGISTER = {}
    sys.modules.update({"lightx2v": types.ModuleType("lightx2v"), "lightx2v.utils": types.ModuleType("lightx2v.utils"),
                        "lightx2v.utils.set_config": set_config, "lightx2v_platform": types.ModuleType("lightx2v_platform"),
                        "lightx2v_platform.registry_factory": platform})

    class Pipe:
        def enable_parallel(self, cfg_p_size=1, seq_p_size=1, seq_p_attn_type="ulysses"):
            self.parallel = {}

    names = []
    for _ in range(2):
        backend_module._enable_sequence_parallel(types.SimpleNamespace(compat=compat), compat.CompatFixes(), Pipe(), 2)
        mesh = set_config.init_device_mesh("cpu", (1, 2), mesh_dim_names=("cfg_p", "seq_p"))
        names.append((mesh.get_group("cfg_p").group_name, mesh.get_group("seq_p").group_name))
        dist.barrier()
    return names


def test_a_seq_rebuild_makes_no_new_process_groups():
    # LightX2V made a new device mesh in every build; its cfg_p dimension split new process groups
    # (an NCCL communicator each on GPUs) off the default one, never destroyed: a leak per rebuild.
    for names in _two_ranks(_two_builds_mesh_groups):
        assert isinstance(names, list), names
        assert names[0] == names[1]


def _choose_attention(rank, consensus):
    """An attention selector per rank over two CPU kernels, each rank timing a different one as
    the fastest (its own head shard): the kernel each rank ran, and how it came to it."""
    import torch
    import torch.distributed as dist

    from pipeline.backends import kernels

    def exact(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

    timed: list[str] = []
    fastest = "sdpa_cudnn" if rank == 0 else "sdpa_flash"

    def clock(name, call):
        timed.append(name)
        call()
        return 0.01 if name == fastest else 0.05

    selector = kernels.AttentionSelector(
        torch=torch, fns={"sage_attn2": exact, "sdpa_cudnn": exact, "sdpa_flash": exact},
        offered=["sage_attn2", "sdpa_cudnn", "sdpa_flash"], baseline="sage_attn2", gpu_name=f"Fake GPU {rank}",
        versions="t", clock=clock, store=kernels.MemoryStore(), ranks=kernels.rank_group(dist, consensus))
    q, k, v = (torch.randn(128, 2, 8, generator=torch.Generator().manual_seed(10 * rank + i)) for i in range(3))
    selector(q, k, v)
    choice = next(iter(selector.choices.values()))
    return choice.backend, choice.source, choice.ranks, choice.gpu, bool(timed)


def test_seq_ranks_run_the_attention_kernel_rank_0_chose():
    zero, one = _two_ranks(_choose_attention)
    assert zero == ("sdpa_cudnn", "measured", 2, "Fake GPU 0", True)
    assert one == ("sdpa_cudnn", "measured on rank 0", 2, "Fake GPU 0", False)  # rank 1 measured nothing


def _load_fails_on_rank_1(rank, consensus):
    """One sequence-parallel load as the worker runs it: rank 1 runs out of host memory pinning its
    weights (before its build reaches the kernels); rank 0's build goes on to kernels.install and
    builds the attention selector over the group; then every rank says how its load went
    (child._Worker._get_model's one all-reduce). What each rank learnt."""
    import torch
    import torch.distributed as dist

    from pipeline.backends import kernels
    from tests.test_kernels import _fake_torch

    if rank == 0:
        kernels.build_selector(_fake_torch((9, 0), "NVIDIA H200"), lambda *a, **k: None, ("sageattn",),
                               ranks=kernels.rank_group(dist, consensus))
    failed = torch.tensor([1 if rank == 1 else 0], dtype=torch.int32)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=consensus)
    return bool(failed.item())


def test_a_seq_load_that_fails_on_one_rank_before_the_kernels_leaves_no_rank_waiting():
    # The build's collectives and the load's agreement share the gloo group: a collective in the
    # build of the ranks that loaded, which the rank that failed never reaches, held every rank
    # until the gloo timeout (10 minutes), and the job failed with that timeout instead of the host
    # OOM the ladder steps down from.
    assert _two_ranks(_load_fails_on_rank_1, timeout=60.0) == [True, True]
