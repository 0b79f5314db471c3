"""Presets: strict data files (one TOML file per preset) and their loader.

A preset is a recipe: output size, frame count, sampler settings, the memory rungs the backend may
run it on (ordered fast -> lean) and the smaller preset to fall back to when every rung runs out of
GPU memory. Everything here is plain data; nothing imports torch, gradio or the pipeline. Beside
the memory settings stands when each takes effect (at build, per call, only in the VAE decode, only
on host memory): the planner, the service and the backends ask here and keep no list of their own.

The loader is deliberately unforgiving: an unknown key, a frame count that is not 4n+1, a size that
is not a multiple of 16, a fallback naming a preset that does not exist or a fallback cycle raises
`PresetError` naming the file and the field. A typo in a preset must never be silently ignored.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

PRESETS_DIR = Path(__file__).resolve().parent
# The 4-step distilled model's schedule has exactly this many steps (LightX2V fixes it at build).
DISTILLED_STEPS = 4


class PresetError(ValueError):
    """A preset file is malformed. The message names the file and the field."""


class OffloadGranularity(str, enum.Enum):
    # "model" is deliberately absent: it moves the whole 14 GB DiT onto the GPU.
    BLOCK = "block"
    PHASE = "phase"


class TextEncoderPlacement(str, enum.Enum):
    # Blocks streamed from pinned host memory; the 2.1 GB token embedding goes back to the CPU after
    # each prompt (LightX2V leaves it on the GPU otherwise, docs/lightx2v.md §1, bug 5).
    OFFLOAD = "offload"
    # LightX2V's own behaviour: blocks streamed, the token embedding stays on the GPU after first use.
    OFFLOAD_KEEP_EMBEDDING = "offload_keep_embedding"
    # Whole int8 encoder resident (6.7 GB): only for cards far larger than our target.
    GPU = "gpu"


@dataclass(frozen=True)
class MemoryRung:
    """One way to run a preset, with the memory settings the backend must apply."""

    name: str
    offload_granularity: OffloadGranularity = OffloadGranularity.BLOCK
    text_encoder: TextEncoderPlacement = TextEncoderPlacement.OFFLOAD
    vae_offload: bool = False
    vae_tiling: bool = False
    rope_chunk: int = 0  # tokens per RoPE chunk; 0 = unchunked
    clean_cuda_cache: bool = False
    # DiT blocks streamed from the block_N.safetensors files on every step instead of held in pinned
    # host RAM (LightX2V's lazy_load): the low-RAM rung. Needs a reload to change.
    dit_from_disk: bool = False
    # Release the text encoder after each prompt's encoding (loaded again for the next one) unless
    # the next prompt is already waiting. Per call.
    release_text_encoder: bool = False
    # Measured peak of torch-reserved GPU memory (GiB) for this preset on this rung; None = unmeasured.
    predicted_peak_gib: float | None = None
    # Peak host memory this process must hold (GiB: anonymous + pinned, load included); None = unknown.
    predicted_host_gib: float | None = None

    def settings(self) -> dict[str, Any]:
        """The memory settings as plain values (what records and the backend see)."""
        return {
            "offload_granularity": self.offload_granularity.value,
            "text_encoder": self.text_encoder.value,
            "vae_offload": self.vae_offload,
            "vae_tiling": self.vae_tiling,
            "rope_chunk": self.rope_chunk,
            "clean_cuda_cache": self.clean_cuda_cache,
            "dit_from_disk": self.dit_from_disk,
            "release_text_encoder": self.release_text_encoder,
        }


# Settings that only change how the VAE decode runs (per call); True is the leanest value of each.
DECODE_SETTINGS = ("vae_tiling", "vae_offload", "clean_cuda_cache")
# Settings that only save host memory: the GPU memory a rung needs does not depend on them.
RAM_ONLY_SETTINGS = ("dit_from_disk", "release_text_encoder")


def build_settings(memory: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `memory` (MemoryRung.settings()) fixed when the backend builds the model: a change
    reloads the weights, every other setting applies per call. Of the text encoder's placement only
    resident ("gpu") or offloaded counts: where an offloaded encoder's token embedding lives is set
    per call."""
    return {"offload_granularity": memory.get("offload_granularity", OffloadGranularity.BLOCK.value),
            "text_encoder_offload": memory.get("text_encoder") != TextEncoderPlacement.GPU.value,
            "dit_from_disk": bool(memory.get("dit_from_disk", False))}


def gpu_settings(memory: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The settings that decide the GPU memory a rung needs, as sorted pairs."""
    return tuple(sorted((k, v) for k, v in memory.items() if k not in RAM_ONLY_SETTINGS))


def dit_settings(memory: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The settings that decide the GPU memory of the denoising steps (the decode's left out)."""
    return tuple((k, v) for k, v in gpu_settings(memory) if k not in DECODE_SETTINGS)


def lean_decode(memory: Mapping[str, Any]) -> dict[str, Any]:
    """`memory` with the leanest VAE decode settings."""
    return dict(memory, **dict.fromkeys(DECODE_SETTINGS, True))


@dataclass(frozen=True)
class Preset:
    name: str  # the file stem, e.g. "480x832x81"
    label: str
    height: int
    width: int
    frames: int
    fps: int
    steps: int
    shift: float
    guidance: float
    rungs: tuple[MemoryRung, ...]
    fallback: str | None  # name of the preset to run when every rung is out of memory
    source: Path = field(compare=False)

    @property
    def seconds(self) -> float:
        return (self.frames - 1) / self.fps

    def rung(self, name: str) -> MemoryRung:
        for rung in self.rungs:
            if rung.name == name:
                return rung
        raise KeyError(f"preset {self.name} has no memory rung {name!r}")


_PRESET_KEYS = {
    "label": str,
    "height": int,
    "width": int,
    "frames": int,
    "fps": int,
    "steps": int,
    "shift": float,
    "guidance": float,
    "fallback": str,
    "rungs": list,
}
_REQUIRED_PRESET_KEYS = set(_PRESET_KEYS) - {"fallback"}
_RUNG_KEYS = {
    "name": str,
    "offload_granularity": str,
    "text_encoder": str,
    "vae_offload": bool,
    "vae_tiling": bool,
    "rope_chunk": int,
    "clean_cuda_cache": bool,
    "dit_from_disk": bool,
    "release_text_encoder": bool,
    "predicted_peak_gib": float,
    "predicted_host_gib": float,
}
_REQUIRED_RUNG_KEYS = {"name"}


def _check_type(path: Path, where: str, value: Any, expected: type) -> Any:
    # bool is an int subclass in Python; a preset saying `frames = true` is still a mistake.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise PresetError(f"{path.name}: field '{where}' must be {expected.__name__}, got {value!r}")
    return value


def _check_keys(path: Path, where: str, data: Mapping[str, Any], allowed: dict, required: set) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise PresetError(f"{path.name}: unknown field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(where + k) for k in unknown)}")
    missing = sorted(required - set(data))
    if missing:
        raise PresetError(f"{path.name}: missing field{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(where + k) for k in missing)}")


def _parse_rung(path: Path, index: int, data: Any) -> MemoryRung:
    where = f"rungs[{index}]."
    if not isinstance(data, dict):
        raise PresetError(f"{path.name}: field 'rungs[{index}]' must be a table")
    _check_keys(path, where, data, _RUNG_KEYS, _REQUIRED_RUNG_KEYS)
    values = {k: _check_type(path, where + k, v, _RUNG_KEYS[k]) for k, v in data.items()}
    for key, enum_type in (("offload_granularity", OffloadGranularity),
                           ("text_encoder", TextEncoderPlacement)):
        if key in values:
            allowed = [m.value for m in enum_type]
            if values[key] not in allowed:
                raise PresetError(f"{path.name}: field '{where}{key}' must be one of "
                                  f"{', '.join(allowed)}; got {values[key]!r}")
            values[key] = enum_type(values[key])
    if values.get("rope_chunk", 0) < 0:
        raise PresetError(f"{path.name}: field '{where}rope_chunk' must be >= 0")
    for key in ("predicted_peak_gib", "predicted_host_gib"):
        if values.get(key) is not None and values[key] <= 0:
            raise PresetError(f"{path.name}: field '{where}{key}' must be > 0")
    return MemoryRung(**values)


def load_preset_file(path: Path) -> Preset:
    """Parse and validate one preset file (fallback targets are checked by `load_presets`)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path.name}: not valid TOML: {exc}") from None
    _check_keys(path, "", data, _PRESET_KEYS, _REQUIRED_PRESET_KEYS)
    v = {k: _check_type(path, k, val, _PRESET_KEYS[k]) for k, val in data.items()}

    for dim in ("height", "width"):
        if v[dim] <= 0 or v[dim] % 16:
            raise PresetError(f"{path.name}: field '{dim}' must be a positive multiple of 16 "
                              f"(VAE stride 8 x patch 2), got {v[dim]}")
    if v["frames"] < 1 or (v["frames"] - 1) % 4:
        raise PresetError(f"{path.name}: field 'frames' must be 4n+1 (the VAE packs 4 frames per "
                          f"latent after the first), got {v['frames']}")
    if v["steps"] != DISTILLED_STEPS:
        raise PresetError(f"{path.name}: field 'steps' must be {DISTILLED_STEPS}: the step-distilled "
                          f"model runs exactly that many denoising steps, got {v['steps']}")
    if v["fps"] < 1:
        raise PresetError(f"{path.name}: field 'fps' must be >= 1")
    if v["guidance"] != 1.0:
        raise PresetError(f"{path.name}: field 'guidance' must be 1.0: the distilled model runs "
                          f"without CFG")
    if not v["rungs"]:
        raise PresetError(f"{path.name}: field 'rungs' needs at least one memory rung")
    rungs = tuple(_parse_rung(path, i, r) for i, r in enumerate(v["rungs"]))
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise PresetError(f"{path.name}: field 'rungs': duplicate rung names {names}")
    return Preset(
        name=path.stem, label=v["label"], height=v["height"], width=v["width"],
        frames=v["frames"], fps=v["fps"], steps=v["steps"], shift=v["shift"],
        guidance=v["guidance"], rungs=rungs, fallback=v.get("fallback") or None, source=path,
    )


class PresetBook(Mapping[str, Preset]):
    """Validated presets in file-name order, with the fallback ladder between them."""

    def __init__(self, presets: dict[str, Preset]):
        self._presets = presets

    def __getitem__(self, name: str) -> Preset:
        return self._presets[name]

    def __iter__(self):
        return iter(self._presets)

    def __len__(self) -> int:
        return len(self._presets)

    def chain(self, name: str) -> list[Preset]:
        """The preset and every fallback below it, in order."""
        out = [self._presets[name]]
        while out[-1].fallback:
            out.append(self._presets[out[-1].fallback])
        return out


def load_presets(directory: Path = PRESETS_DIR) -> PresetBook:
    """Load every `*.toml` in `directory`; raise PresetError on the first problem."""
    files = sorted(Path(directory).glob("*.toml"))
    if not files:
        raise PresetError(f"{directory}: no preset files (*.toml)")
    presets = {p.name: p for p in (load_preset_file(f) for f in files)}
    for preset in presets.values():
        if preset.fallback is not None and preset.fallback not in presets:
            raise PresetError(f"{preset.source.name}: field 'fallback' names {preset.fallback!r}, "
                              f"which is not a preset in {directory}")
    for preset in presets.values():
        seen = [preset.name]
        current = preset
        while current.fallback is not None:
            if current.fallback in seen:
                raise PresetError(f"{preset.source.name}: field 'fallback' makes a cycle: "
                                  f"{' -> '.join(seen + [current.fallback])}")
            seen.append(current.fallback)
            current = presets[current.fallback]
    return PresetBook(presets)
