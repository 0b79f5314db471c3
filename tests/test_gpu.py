"""GPU memory reading with no NVML, a fake NVML and failing NVML calls; the OOM predicate."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.machine.gpu import NO_TORCH, GpuMonitor, TorchReadings, VramSampler, is_oom
from tests.conftest import FakeNvml

GIB = 1024**3


def test_the_real_nvml_without_a_driver_returns_none(monkeypatch):
    # The real nvidia-ml-py module, made to answer as it does on a machine without the NVIDIA
    # driver (whatever this machine has): the monitor must fail quietly.
    pynvml = pytest.importorskip("pynvml")

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    monitor = GpuMonitor()
    assert monitor.read() is None and monitor.facts() is None


def test_this_machines_reading_is_none_or_consistent():
    # Holds with and without an NVIDIA GPU: never an exception, and sane numbers when there is one.
    snap = GpuMonitor().read()
    if snap is not None:
        assert isinstance(snap.gpu_name, str) and snap.gpu_name
        assert 0 <= snap.used_bytes <= snap.total_bytes and snap.free_bytes <= snap.total_bytes


def test_missing_driver_returns_none():
    assert GpuMonitor(nvml=FakeNvml(fail_init=True)).read() is None


def test_not_supported_memory_query_returns_none():
    assert GpuMonitor(nvml=FakeNvml(fail_memory=True)).read() is None


def test_fake_nvml_snapshot():
    # The fake answers with str like nvidia-ml-py; a reader that called .decode() would get None.
    assert isinstance(FakeNvml().nvmlDeviceGetName(None), str)
    snap = GpuMonitor(nvml=FakeNvml(total_gib=12.0, used_gib=3.0), torch=NO_TORCH).read()
    assert snap.gpu_name == "NVIDIA GeForce RTX 3060"
    assert snap.total_gib == pytest.approx(12.0) and snap.used_gib == pytest.approx(3.0)
    assert snap.available_gib == pytest.approx(9.0)
    assert snap.torch_reserved_bytes is None  # no allocator reading for this device


def test_memory_this_process_reserved_counts_as_available():
    # Independent of whether CUDA was initialised by an earlier test: the reading is injected.
    monitor = GpuMonitor(nvml=FakeNvml(total_gib=12.0, used_gib=8.0),
                         torch=TorchReadings(memory=lambda i: (3 * GIB, 2 * GIB)))
    snap = monitor.read()
    assert (snap.torch_reserved_bytes, snap.torch_allocated_bytes) == (3 * GIB, 2 * GIB)
    assert snap.available_gib == pytest.approx(4.0 + 3.0)


def test_a_driver_that_answers_bytes_is_read_too():
    class OldNvml(FakeNvml):
        def nvmlDeviceGetName(self, handle):
            return b"Tesla T4"

    assert GpuMonitor(nvml=OldNvml(), torch=NO_TORCH).read().gpu_name == "Tesla T4"


def test_facts_for_the_doctor():
    facts = GpuMonitor(nvml=FakeNvml()).facts()
    assert facts["compute_capability"] == (8, 6) and facts["driver"] == "580.95.05"


def test_sampler_keeps_peak_and_timeline():
    nvml = FakeNvml(total_gib=12.0, used_gib=1.0)
    readings = TorchReadings(memory=lambda i: None, peak_reserved_gib=lambda: 7.25, reset_peak=lambda: None)
    with VramSampler(GpuMonitor(nvml=nvml, torch=readings), interval_s=0.01) as sampler:
        sampler.phase = "denoising"
        nvml.used = int(9.5 * GIB)
        time.sleep(0.08)
        nvml.used = int(2.0 * GIB)
        time.sleep(0.05)
    tl = sampler.timeline
    assert tl.baseline_used_bytes == 1 * GIB and tl.peak_used_bytes == int(9.5 * GIB)
    record = tl.as_record()
    assert record["peak_used_gib"] == 9.5 and record["baseline_used_gib"] == 1.0
    assert record["peak_torch_reserved_gib"] == 7.25  # from the monitor's allocator readings
    assert any(phase == "denoising" and gib == 9.5 for _, gib, phase in record["samples"])
    times = [t for t, _, _ in record["samples"]]
    assert times == sorted(times)


def test_sampler_without_gpu_records_nothing():
    with VramSampler(GpuMonitor(nvml=FakeNvml(fail_init=True), torch=NO_TORCH), interval_s=0.01) as sampler:
        time.sleep(0.03)
    assert sampler.timeline.as_record()["samples"] == [] and sampler.timeline.as_record()["peak_used_gib"] is None


@pytest.mark.parametrize("exc, expected", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("bad value"), False),
    (KeyError("target_video_length"), False),
])
def test_is_oom(exc, expected):
    assert is_oom(exc) is expected


def test_is_oom_follows_the_cause_chain():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except torch.cuda.OutOfMemoryError as inner:
            raise Exception("find rank: 0 failed") from inner
    except Exception as outer:  # noqa: BLE001
        assert is_oom(outer)


def test_triton_out_of_resources_is_not_vram():
    class OutOfResources(Exception):
        pass

    # Same words as a VRAM OOM, but a per-kernel shared-memory limit: a leaner rung would not help.
    assert not is_oom(OutOfResources("out of memory: shared memory, Required: 99000"))
