"""./run.sh installs the PyTorch build that matches the NVIDIA driver: the choice, tested with a fake
nvidia-smi on PATH (nothing is downloaded: run.sh's dry run prints the command and stops)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from install import torch_build as tb

ROOT = Path(__file__).resolve().parents[1]


def _fake_nvidia_smi(bin_dir: Path, driver: str | None) -> dict[str, str]:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    body = f'echo "{driver}"' if driver else 'echo "NVIDIA-SMI has failed: no driver" >&2; exit 9'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WAN_STUDIO_SETUP_DRY_RUN": "1",
            "PYTHON": sys.executable}


@pytest.mark.parametrize("driver, expected", [
    ("580.95.05", "pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"),
    ("575.64.03", "pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 "
                  "--index-url https://download.pytorch.org/whl/cu128"),
    ("560.35.05", "pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 "
                  "--index-url https://download.pytorch.org/whl/cu126"),
    (None, "no NVIDIA GPU: the UI only"),  # no working driver: the UI-only install
])
def test_run_sh_chooses_the_torch_build_for_the_driver(tmp_path, driver, expected):
    venv_before = (ROOT / ".venv").exists()
    out = subprocess.run(["bash", str(ROOT / "run.sh")], env=_fake_nvidia_smi(tmp_path / "bin", driver),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
    assert (ROOT / ".venv").exists() == venv_before  # a dry run creates and installs nothing


def test_run_sh_stops_with_a_clear_message_when_the_driver_is_too_old(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "run.sh")], env=_fake_nvidia_smi(tmp_path / "bin", "535.230.02"),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == tb.TOO_OLD_EXIT and out.stdout == ""
    assert "NVIDIA driver 535.230.02 is too old" in out.stderr and "R580 or newer" in out.stderr


def test_the_choice_and_the_pins():
    assert tb.build_for_driver("590.1").tag == "cu130" and tb.build_for_driver("570.00").tag == "cu128"
    assert tb.build_for_driver("garbage") is None
    with pytest.raises(tb.DriverTooOld):
        tb.build_for_driver("470.256.02")
    assert tb.pinned() == ["torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"]
