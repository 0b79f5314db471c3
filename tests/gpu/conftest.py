"""Fixtures for the GPU tests (tests/gpu/README.md has the one command that runs them).

Checkpoints are synthetic (tools/synthetic_checkpoint.py: real layout, random values). They are
written once per session into a temporary folder unless WAN_STUDIO_TEST_CKPT (tiny) /
WAN_STUDIO_TEST_CKPT_FULL (full) point at existing ones. PyTorch is capped at WAN_STUDIO_TEST_CAP_GIB
(default 11.0 GiB: a 12 GB RTX 3060 less the desktop) in every test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.backends.lightx2v_compat import OPT_IN_ENV, OPT_IN_NAMES
from tests.gpu.gpuhelpers import CAP_GIB, make_service, set_cap



@pytest.fixture
def opt_in_changes_on(monkeypatch):
    """Every opt-in change on (lightx2v_compat.OPT_IN_NAMES), for the tests that prove them: the
    other GPU tests run what a user runs by default. Worker processes a test starts inherit it."""
    monkeypatch.setenv(OPT_IN_ENV, ",".join(sorted(OPT_IN_NAMES)))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    env = os.environ.get("WAN_STUDIO_TEST_CKPT")
    if env:
        return Path(env)
    from tools.synthetic_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny").root


@pytest.fixture(scope="session")
def full_ckpt(tmp_path_factory, tiny_ckpt) -> Path:
    env = os.environ.get("WAN_STUDIO_TEST_CKPT_FULL")
    if env:
        return Path(env)
    from tools.synthetic_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "full", "full", share_t5_vae_from=tiny_ckpt).root


@pytest.fixture(scope="session")
def tiny_service(tiny_ckpt, tmp_path_factory):
    service = make_service(tiny_ckpt, tmp_path_factory.mktemp("tiny-service"))
    yield service
    service.cache.release()


@pytest.fixture(scope="session")
def gpu_report():
    """Print measurements, and append them to the JSON-lines file WAN_STUDIO_GPU_REPORT if set."""
    path = os.environ.get("WAN_STUDIO_GPU_REPORT")

    def write(name: str, **values: Any) -> None:
        line = json.dumps({"test": name, **{k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                            for k, v in values.items()}}, default=str)
        print(line)
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    return write


@pytest.fixture
def capped():
    """Torch, with the test cap put back after a test that lowered it to force an OOM."""
    import torch

    yield torch
    set_cap(torch, CAP_GIB)
