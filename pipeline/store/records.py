"""What a clip's record holds: the JSON written beside every video (and embedded in it).

The service gathers the facts of a job; this module puts them into the record's shape, so that the
shape lives beside the code that writes and reads records (outputs.py)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import time
from dataclasses import asdict
from typing import Any, Iterable

from pipeline.types import Attempt, GenerationRequest, PreviewKind, TEXT_ENCODER_MAX_TOKENS, prompt_token_estimate

APP_NAME = "Wan T2V Studio"
APP_VERSION = "0.1.0"

_VERSIONED_PACKAGES = ("torch", "triton", "lightx2v", "sageattention", "numpy", "imageio",
                       "imageio-ffmpeg", "av", "nvidia-ml-py", "gradio")

PREVIEW_SOURCES = {
    PreviewKind.LINEAR.value: "linear latent-to-RGB factors of the Wan 2.1 VAE (no weights)",
    PreviewKind.TINY_VAE.value: "tiny VAE decode of the step's clean-latent estimate",
}


def package_versions() -> dict[str, str | None]:
    return dict(_installed_versions())


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str | None], ...]:
    """Read once per process: each job's record and its peak's software fingerprint both ask, and
    the code a process runs does not change when a package is upgraded under it."""
    out: list[tuple[str, str | None]] = [("python", platform.python_version())]
    for name in _VERSIONED_PACKAGES:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, None))
    return tuple(out)


# What a GPU memory peak depends on besides the settings: the packages that run the model, the
# LightX2V commit (a git install has no version of its own) and the NVIDIA driver.
_PEAK_SOFTWARE = ("torch", "triton", "lightx2v", "sageattention")


def software_fingerprint(model: dict[str, Any], driver: str | None) -> str:
    """One line naming the software a peak was measured with, e.g. "torch 2.11.0, triton 3.6.0,
    LightX2V f8aee98b, driver 580.65". `model`: the backend's describe()."""
    versions = package_versions()
    parts = [f"{name} {versions[name]}" for name in _PEAK_SOFTWARE if name != "lightx2v" and versions.get(name)]
    lightx2v = model.get("lightx2v_commit") or model.get("lightx2v_version") or versions.get("lightx2v")
    if lightx2v:
        parts.append(f"LightX2V {str(lightx2v)[:12]}")
    if driver:
        parts.append(f"driver {driver}")
    return ", ".join(parts)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def job_record(*, job_id: int, request: GenerationRequest, preset: Any, rung_label: str, memory: dict[str, Any],
               attempts: Iterable[Attempt], frames_shape: tuple[int, ...], model: dict[str, Any],
               weights_loaded: bool, load_seconds: float | None, vram: dict[str, Any],
               host_memory: dict[str, Any] | None, argv: list[str], placement: dict[str, Any] | None,
               tiny_vae: str | None, previews: list[tuple[PreviewKind, float | None]],
               loads: list[dict[str, Any]], timings: dict[str, Any]) -> dict[str, Any]:
    """`preset`: the presets.Preset used; `vram`: the GPU facts and the sampler's timeline;
    `host_memory`: likewise for system RAM, None where it was not read (a finish);
    `tiny_vae`: the tiny VAE a draft decoded with; `loads`: the weight loads of the job."""
    frames, height, width = frames_shape[:3]
    # The size of the file as written: the fake backend writes a reduced size, and the record must
    # not claim the preset's.
    size: dict[str, Any] = {"height": height, "width": width, "frames": frames}
    if (height, width, frames) != (preset.height, preset.width, preset.frames):
        size["preset_size"] = {"height": preset.height, "width": preset.width, "frames": preset.frames}
    return {
        "app": APP_NAME, "app_version": APP_VERSION, "job_id": job_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "prompt_truncated": prompt_token_estimate(request.prompt) > TEXT_ENCODER_MAX_TOKENS,
        "seed": request.seed,
        "preset_requested": request.preset, "preset_used": preset.name, "rung_used": rung_label,
        **size, "fps": preset.fps,
        "steps": preset.steps, "shift": preset.shift, "guidance": preset.guidance,
        "memory_settings": memory,
        "attempts": [asdict(a) for a in attempts],
        "model": model,
        "weights_loaded_this_job": weights_loaded,
        "load_seconds": _round(load_seconds),
        "vram": vram,
        **({"host_memory": host_memory} if host_memory is not None else {}),
        "versions": package_versions(), "platform": platform.platform(),
        "argv": argv,
        **({"gpus": placement} if placement is not None else {}),
        "draft": request.draft,
        "decode": f"draft: tiny VAE ({tiny_vae})" if request.draft else "full VAE",
        "preview": preview_record(previews),
        "loads": loads,
        # Up to the mp4 encode, which the record precedes (the sidecar adds the encode time).
        "timings_s": timings,
    }


def preview_record(previews: list[tuple[PreviewKind, float | None]]) -> dict[str, Any] | None:
    """Which preview the job showed (the kinds in order, once each), how many and their worst cost."""
    kinds = list(dict.fromkeys(kind.value for kind, _ in previews))
    if not kinds:
        return None
    costs = [c for _, c in previews if c is not None]
    one = len(kinds) == 1
    return {"kind": kinds[-1] if one else kinds,
            "source": PREVIEW_SOURCES.get(kinds[-1], kinds[-1]) if one else [PREVIEW_SOURCES.get(k, k) for k in kinds],
            "count": len(previews),
            "cost_ms_max": round(max(costs), 3) if costs else None}
