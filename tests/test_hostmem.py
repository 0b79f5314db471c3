"""Host memory readings: the must-hold / file-backed split, free RAM and swap, the host-OOM test."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.machine import gpu, hostmem
from pipeline.machine.hostmem import GIB, HostOutOfMemory, ProcessMemory

STATUS = """Name:\tpython
VmRSS:\t  3145728 kB
RssAnon:\t  1048576 kB
RssFile:\t  2097152 kB
RssShmem:\t     1024 kB
"""

SMAPS = """7f0000000000-7f0040000000 rw-s 00000000 00:05 123                        /dev/nvidiactl
Size:            1048576 kB
Rss:              524288 kB
7f0040000000-7f0040001000 r--p 00000000 fe:00 260386                     /usr/lib/libc.so.6
Size:                  4 kB
Rss:                   4 kB
7f0050000000-7f0050100000 rw-p 00000000 00:00 0
Rss:                1024 kB
7f0060000000-7f0060100000 rw-s 00000000 00:05 124                        /dev/nvidia0
Rss:                2048 kB
VmFlags: rd wr sh mr mw me ms
"""


def test_status_split_and_must_hold():
    m = hostmem.parse_status(STATUS)
    assert (m.anon_bytes, m.file_bytes, m.shmem_bytes) == (GIB, 2 * GIB, 1024 * 1024)
    assert m.must_hold_bytes == GIB + 1024 * 1024 and m.reclaimable_bytes == 2 * GIB
    assert hostmem.parse_status("Name: x\nVmRSS: 1 kB\n") is None  # kernels without the split


def test_pinned_bytes_counted_once_whether_or_not_the_driver_maps_them_into_rss():
    # Pinned pages outside RSS: torch's count adds to must-hold.
    invisible = ProcessMemory(GIB, 2 * GIB, 0, pinned_bytes=3 * GIB, device_mapped_bytes=0)
    assert invisible.must_hold_bytes == 4 * GIB and invisible.reclaimable_bytes == 2 * GIB
    # Pinned pages as RSS of a /dev/nvidia* mapping: moved from file-backed to must-hold, not doubled.
    mapped = ProcessMemory(GIB, 5 * GIB, 0, pinned_bytes=3 * GIB, device_mapped_bytes=3 * GIB)
    assert mapped.must_hold_bytes == 4 * GIB and mapped.reclaimable_bytes == 2 * GIB
    # Pinned pages as shared memory (RssShmem), as an H200 host's driver shows them: not doubled.
    # (Measured: 18.75 GiB pinned, 18.76 GiB RssShmem, 2.8 GiB RssAnon; the must-hold is 21.6, not 40.3.)
    shmem = ProcessMemory(GIB, 2 * GIB, 3 * GIB, pinned_bytes=3 * GIB, device_mapped_bytes=0)
    assert shmem.must_hold_bytes == 4 * GIB and shmem.reclaimable_bytes == 2 * GIB
    # Partly in one place, partly unseen: the unseen part still counts.
    partly = ProcessMemory(GIB, 2 * GIB, 2 * GIB, pinned_bytes=3 * GIB, device_mapped_bytes=0)
    assert partly.must_hold_bytes == 4 * GIB


def test_smaps_device_rss_sums_only_nvidia_mappings():
    assert hostmem.parse_smaps_device_rss(SMAPS) == (524288 + 2048) * 1024


def test_real_proc_self_status_parses_and_tracks_an_allocation():
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc on this system")
    assert hostmem.parse_status(text) is not None
    before = hostmem.read_process()
    block = np.ones(256 * 1024 * 1024, dtype=np.uint8)  # 256 MiB of anonymous pages, touched
    after = hostmem.read_process()
    assert after.anon_bytes - before.anon_bytes > 200 * 1024 * 1024
    assert int(block[::4096].sum()) == len(block[::4096])
    assert hostmem.device_mapped_bytes() is not None
    io = hostmem.read_io()
    assert io is None or io["read_bytes"] >= 0


def test_mmapped_file_pages_are_file_backed_not_must_hold(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (128 * 1024 * 1024))
    before = hostmem.read_process()
    if before is None:
        pytest.skip("no /proc on this system")
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mapped[::4096].sum()) == len(mapped[::4096])  # fault every page in
    after = hostmem.read_process()
    assert after.file_bytes - before.file_bytes > 100 * 1024 * 1024
    assert after.anon_bytes - before.anon_bytes < 32 * 1024 * 1024
    del mapped


def test_meminfo_and_system_reading():
    s = hostmem.parse_meminfo("MemTotal: 16384000 kB\nMemAvailable: 8192000 kB\nSwapTotal: 2048000 kB\n"
                              "SwapFree: 1024000 kB\n")
    assert (s.total_bytes, s.available_bytes, s.swap_total_bytes, s.swap_free_bytes) == (
        16384000 * 1024, 8192000 * 1024, 2048000 * 1024, 1024000 * 1024)
    assert hostmem.parse_meminfo("nothing") is None
    here = hostmem.read_system()
    assert here is None or here.total_bytes > 0


def test_readers_return_none_where_proc_is_missing(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setitem(sys.modules, "psutil", None)  # "not installed"
    assert hostmem.read_process() is None and hostmem.read_system() is None
    assert hostmem.read_io() is None and hostmem.device_mapped_bytes() is None


def test_available_for_process_counts_what_it_already_holds():
    system = hostmem.SystemMemory(32 * GIB, 4 * GIB)
    assert hostmem.available_for_process_gib(system, ProcessMemory(20 * GIB, GIB, 0)) == 24.0
    assert hostmem.available_for_process_gib(None, None) is None


def _pin_memory_failure():
    def create_pin_tensor():
        raise RuntimeError("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA` ...")

    try:
        create_pin_tensor()
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("exc", [
    MemoryError(),
    HostOutOfMemory("pinning 1.0 GiB failed"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 7516192768 bytes. Error code 12 (Cannot allocate memory)"),
    _pin_memory_failure(),
])
def test_host_allocation_failures_are_host_oom_and_oom(exc):
    assert hostmem.is_host_oom(exc) and gpu.is_oom(exc)


def test_device_oom_is_not_a_host_oom():
    import torch

    device = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert gpu.is_oom(device) and not hostmem.is_host_oom(device)
    plain = RuntimeError("CUDA error: out of memory")  # raised outside any pinning code
    assert gpu.is_oom(plain) and not hostmem.is_host_oom(plain)
    assert not hostmem.is_host_oom(ValueError("bad"))


def test_sampler_records_host_peaks_per_phase():
    readings = iter([ProcessMemory(GIB, 0, 0), ProcessMemory(3 * GIB, 2 * GIB, 0),
                     ProcessMemory(2 * GIB, GIB, 0)] + [ProcessMemory(GIB, 0, 0)] * 1000)

    class NoGpu:
        torch = gpu.NO_TORCH

        def read(self):
            return None

    sampler = gpu.VramSampler(NoGpu(), interval_s=60, host_reader=lambda: next(readings))
    with sampler:
        sampler.phase = "loading model"
        sampler._sample()
        sampler.phase = "denoising"
        sampler._sample()
    record = sampler.timeline.host.as_record()
    assert record["peak_must_hold_gib"] == 3.0 and record["peak_file_gib"] == 2.0
    assert record["per_phase"]["loading model"] == {"must_hold_gib": 3.0, "file_gib": 2.0}
    assert record["per_phase"]["denoising"]["must_hold_gib"] == 2.0
    assert record["per_phase"]["start"]["must_hold_gib"] == 1.0


def test_host_reader_reads_smaps_only_every_n_calls():
    calls = []
    reader = hostmem.HostReader(smaps_every=3, process=lambda d: ProcessMemory(0, 0, 0, None, d),
                                smaps=lambda: calls.append(1) or 5)
    values = [reader().device_mapped_bytes for _ in range(7)]
    assert values == [5] * 7 and len(calls) == 3


def test_pinned_bytes_from_torch_host_stats(monkeypatch):
    import types

    stats = {"allocations.current": 3, "allocated_bytes.current": 5 * GIB}
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True,
                                                            host_memory_stats=lambda: stats))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert hostmem.pinned_bytes() == 5 * GIB
    stats.clear()
    stats.update({"host_reserved_bytes.all.current": 2 * GIB})  # another release's name
    assert hostmem.pinned_bytes() == 2 * GIB
    fake.cuda.is_initialized = lambda: False  # never initialises CUDA to read it
    assert hostmem.pinned_bytes() is None
