"""Shared fixtures. GPU tests are skipped unless CUDA is available and LightX2V importable (as
pytest.ini says); browser tests unless Chromium is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.cache import PipelineCache
from pipeline.backends.fake import FakeBackend
from pipeline.machine.gpu import NO_TORCH, GpuMonitor
from pipeline.store.history import History
from pipeline.store.outputs import OutputStore
from pipeline.service import VideoService
from presets import load_presets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def gpu_skip_reason() -> str | None:
    """Why the GPU tests cannot run here, or None. Checked before any test writes a checkpoint:
    a CUDA machine without LightX2V skips them instead of failing each after a 7 GB write."""
    from pipeline.machine.software import module_present

    if not module_present("torch"):
        return "needs a CUDA GPU (PyTorch is not installed)"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not module_present("lightx2v"):
        return "needs LightX2V (pip install -r requirements-gpu.txt and LightX2V, see tests/gpu/README.md)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason() if any("gpu" in item.keywords for item in items) else None
    no_cuda = None if reason is None else pytest.mark.skip(reason=reason)
    no_browser = None if CHROMIUM else pytest.mark.skip(
        reason="needs Chromium (apt-get install chromium)")
    for item in items:
        if no_cuda is not None and "gpu" in item.keywords:
            item.add_marker(no_cuda)
        if no_browser is not None and "browser" in item.keywords:
            item.add_marker(no_browser)


class FakeNvml:
    """Just the NVML surface pipeline.machine.gpu uses, with settable memory figures."""

    class NVMLError(Exception):
        pass

    def __init__(self, total_gib: float = 12.0, used_gib: float = 0.5, name: str = "NVIDIA GeForce RTX 3060",
                 fail_init: bool = False, fail_memory: bool = False):
        self.total = int(total_gib * 1024**3)
        self.used = int(used_gib * 1024**3)
        self.name = name
        self.fail_init = fail_init
        self.fail_memory = fail_memory
        self.memory_calls = 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        # nvidia-ml-py (pynvml >= 11.5) returns str, not bytes.
        return self.name

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.memory_calls += 1
        if self.fail_memory:
            raise self.NVMLError("Not Supported")

        class Info:
            total = self.total
            used = self.used
            free = self.total - self.used

        return Info()

    def nvmlSystemGetDriverVersion(self):
        return "580.95.05"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return (8, 6)


@pytest.fixture
def presets():
    return load_presets()


@pytest.fixture
def fake_backend():
    return FakeBackend()


@pytest.fixture
def make_service(tmp_path, presets):
    def build(backend: FakeBackend | None = None, nvml=None, vram_cap_gib=None) -> VideoService:
        backend = backend or FakeBackend()
        # No torch reading: the fake NVML's device is not the CUDA device an earlier test may have
        # initialised, so its allocator figures must not leak into these numbers.
        monitor = GpuMonitor(nvml=nvml if nvml is not None else FakeNvml(fail_init=True),
                             torch=NO_TORCH)
        return VideoService(presets=presets, cache=PipelineCache(backend),
                            outputs=OutputStore(tmp_path / "outputs"),
                            history=History(tmp_path / "outputs" / "history.sqlite3"),
                            monitor=monitor, vram_cap_gib=vram_cap_gib)
    return build


@pytest.fixture
def artifacts_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path
