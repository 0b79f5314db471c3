"""Shared fixtures. GPU tests are skipped unless CUDA is available; browser tests unless Chromium is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.cache import PipelineCache
from pipeline.backends.fake import FakeBackend
from pipeline.gpu import GpuMonitor
from pipeline.history import History
from pipeline.outputs import OutputStore
from pipeline.service import VideoService
from presets import load_presets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    no_cuda = None if _cuda_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    no_browser = None if CHROMIUM else pytest.mark.skip(
        reason="needs Chromium (apt-get install chromium)")
    for item in items:
        if no_cuda is not None and "gpu" in item.keywords:
            item.add_marker(no_cuda)
        if no_browser is not None and "browser" in item.keywords:
            item.add_marker(no_browser)


class FakeNvml:
    """Just the NVML surface pipeline.gpu uses, with settable memory figures."""

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
        return self.name.encode()

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
        return b"580.95.05"

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
        monitor = GpuMonitor(nvml=nvml if nvml is not None else FakeNvml(fail_init=True))
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
