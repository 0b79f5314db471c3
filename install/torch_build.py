"""Which PyTorch build fits this machine's NVIDIA driver. Standard library only: ./run.sh runs it with the
system Python before any package is installed, and the doctor asks it which build to name.

PyPI's torch is the CUDA 13.0 build; PyTorch's own index carries the CUDA 12.8 and 12.6 builds of the same
release. Each CUDA toolkit needs a minimum driver (NVIDIA's CUDA release notes, "toolkit driver version",
Linux): 13.0 needs R580, 12.8 needs R570, 12.6 needs R560. CUDA's minor-version compatibility would run a
12.x build on an older R5xx driver, but not Triton's PTX, which the driver itself compiles (the INT8 kernels
are Triton), so the toolkit minimum is the line we hold.

    python install/torch_build.py     prints the pip arguments for this machine's driver, or "none" without
                                      an NVIDIA GPU; exits 3 with a message when the driver is too old.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INDEX = "https://download.pytorch.org/whl"
REQUIREMENTS_GPU = Path(__file__).resolve().parents[1] / "requirements-gpu.txt"
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")
TOO_OLD_EXIT = 3


@dataclass(frozen=True)
class TorchBuild:
    tag: str  # "cu130"
    cuda: str  # "13.0"
    min_driver: int  # driver branch (major version) it needs
    index_url: str | None  # None: PyPI's default build


BUILDS = (TorchBuild("cu130", "13.0", 580, None),
          TorchBuild("cu128", "12.8", 570, f"{INDEX}/cu128"),
          TorchBuild("cu126", "12.6", 560, f"{INDEX}/cu126"))


class DriverTooOld(Exception):
    pass


def driver_major(version: str | None) -> int | None:
    match = re.match(r"\s*(\d+)\.", version or "")
    return int(match.group(1)) if match else None


def build_for_driver(version: str | None) -> TorchBuild | None:
    """The newest build this driver runs; None when the version is unknown. Raises DriverTooOld."""
    major = driver_major(version)
    if major is None:
        return None
    for build in BUILDS:
        if major >= build.min_driver:
            return build
    oldest = BUILDS[-1]
    raise DriverTooOld(f"NVIDIA driver {version.strip()} is too old for every PyTorch build this app can use (the "
                       f"oldest, CUDA {oldest.cuda}, needs driver R{oldest.min_driver} or newer). Update the NVIDIA "
                       f"driver to R{BUILDS[0].min_driver} or newer (your distribution's driver package, or "
                       "nvidia.com/drivers), reboot, and run ./run.sh again.")


def read_driver_version() -> str | None:
    """The driver version nvidia-smi reports, or None without a working NVIDIA driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if line.strip()), None)


def pinned(requirements: Path = REQUIREMENTS_GPU) -> list[str]:
    """The torch packages as requirements-gpu.txt pins them, so there is one list of versions."""
    pins = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^(torch|torchvision|torchaudio)==(\S+)", line.strip())
        if match:
            pins[match.group(1)] = f"{match.group(1)}=={match.group(2)}"
    return [pins[name] for name in TORCH_PACKAGES if name in pins]


def pip_args(build: TorchBuild, requirements: Path = REQUIREMENTS_GPU) -> list[str]:
    return pinned(requirements) + (["--index-url", build.index_url] if build.index_url else [])


def main() -> int:
    version = read_driver_version()
    if version is None:
        print("none")
        return 0
    try:
        build = build_for_driver(version)
    except DriverTooOld as exc:
        sys.stderr.write(f"{exc}\n")
        return TOO_OLD_EXIT
    if build is None:
        sys.stderr.write(f"Could not read the NVIDIA driver version from nvidia-smi ({version!r}); "
                         "installing PyPI's PyTorch (CUDA 13.0, needs driver R580+).\n")
        build = BUILDS[0]
    sys.stderr.write(f"NVIDIA driver {version}: PyTorch {build.tag} (CUDA {build.cuda}) build.\n")
    print(" ".join(pip_args(build)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
