"""Typed objects that cross the UI border. They are built by keyword, never by widget order."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InvalidRequest

MAX_SEED = 2**32 - 1
# Marks an attempt that decoded kept latents again on the leanest VAE settings.
LEAN_DECODE_SUFFIX = "+lean-decode"
# The UMT5 encoder truncates at 512 tokens. Tokens are not characters, so the UI counts characters
# only as a guard against pastes that are far too long; the truncation warning comes from the
# token count (see `prompt_token_estimate`).
MAX_PROMPT_CHARS = 2000
TEXT_ENCODER_MAX_TOKENS = 512


def prompt_token_estimate(prompt: str) -> int:
    """A tokenizer-free upper-bound estimate of UMT5 tokens (~1 per 3.5 chars of English, +1 </s>)."""
    return int(len(prompt) / 3.5) + 1


# Control characters other than newline and tab (NUL, escape sequences, ...) are refused: they
# are invisible in the UI and in the record, and NUL cannot be stored in every file system name.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _check_text(value: object, what: str, required: bool) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(f"The {what} must be text, got {type(value).__name__} {value!r:.40}.")
    if required and not value.strip():
        raise InvalidRequest(f"The {what} is empty: describe the clip you want.")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"The {what} is {len(value)} characters; the limit is "
                             f"{MAX_PROMPT_CHARS} (the text encoder reads at most "
                             f"{TEXT_ENCODER_MAX_TOKENS} tokens).")
    bad = _CONTROL_CHARS.search(value)
    if bad:
        raise InvalidRequest(f"The {what} contains a control character ({bad.group()!r} at "
                             f"position {bad.start() + 1}); only text, newlines and tabs are "
                             f"allowed.")


@dataclass(frozen=True)
class GenerationRequest:
    """A request as it crosses the UI border: every field is checked here, once. The preset name is
    checked against the preset book by the one function that builds requests from widget values
    (`ui.handlers.make_request`); everything behind the border trusts this object."""

    prompt: str
    preset: str
    seed: int
    negative_prompt: str = ""
    # Decode with the tiny VAE: seconds and a fraction of the memory, a rougher clip. The final
    # latents are kept either way, so "Finish at full quality" can decode them later.
    draft: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.draft, bool):
            raise InvalidRequest(f"'Draft decode' must be true or false, got {self.draft!r:.40}.")
        _check_text(self.prompt, "prompt", required=True)
        _check_text(self.negative_prompt, "negative prompt", required=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidRequest(f"The seed must be a whole number, got {self.seed!r:.40}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest(f"The seed must be between 0 and {MAX_SEED}, got {self.seed}.")
        if not isinstance(self.preset, str) or not self.preset:
            raise InvalidRequest("No preset was chosen." if self.preset in (None, "") else
                                 f"The preset must be a preset name, got {self.preset!r:.40}.")


class Phase(str, enum.Enum):
    QUEUED = "queued"
    LOADING = "loading model"
    TEXT_ENCODING = "text encoding"
    DENOISING = "denoising"
    DECODING = "VAE decode"
    ENCODING = "writing mp4"
    DONE = "done"


@dataclass(frozen=True)
class FinishRequest:
    """Decode the latents a finished (draft) job kept with the full VAE; no step runs again."""

    job_id: int

    def __post_init__(self) -> None:
        if isinstance(self.job_id, bool) or not isinstance(self.job_id, int) or self.job_id < 1:
            raise InvalidRequest(f"Choose a clip in the history to finish, got {self.job_id!r:.40}.")


class PreviewKind(str, enum.Enum):
    # The published linear map from Wan 2.1's 16 latent channels to RGB: no weights, milliseconds.
    LINEAR = "linear"
    # The tiny autoencoder (taew2_1.pth), when installed: closer to the final clip, costs more.
    TINY_VAE = "tiny-vae"


@dataclass(frozen=True)
class Preview:
    """The model's estimate of the clean clip after one denoising step, as small uint8 frames."""

    step: int
    total: int
    frames: Any = field(repr=False)  # np.ndarray uint8 [T, h, w, 3]
    kind: PreviewKind
    fps: float
    cost_ms: float | None = None  # time the backend spent making it (GPU work included)


@dataclass(frozen=True)
class ProgressEvent:
    phase: Phase
    step: int = 0
    total: int = 0
    message: str = ""
    preview: Preview | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RunSpec:
    """What one backend attempt is asked to do: a preset at one memory rung."""

    preset: str
    rung: str
    prompt: str
    negative_prompt: str
    seed: int
    height: int
    width: int
    frames: int
    steps: int
    shift: float
    guidance: float
    memory: dict[str, Any]  # MemoryRung.settings()
    preview: PreviewKind | None = PreviewKind.LINEAR  # None: no previews
    draft: bool = False  # decode with the tiny VAE


# Attempt.outcome of a rung whose host allocation (pageable or pinned) failed.
HOST_OOM = "out of host memory"


@dataclass(frozen=True)
class Attempt:
    """One rung tried by the OOM ladder, as recorded and shown to the user."""

    preset: str
    rung: str
    outcome: str  # "ok" | "out of memory" (GPU) | HOST_OOM (system RAM, pinned memory)
    phase: str = ""
    detail: str = ""
    peak_gib: float | None = None

    def shortfall(self) -> str:
        """What ran out where, for messages: "<preset>/<rung> ran out of GPU memory in <phase>"."""
        what = "system RAM" if self.outcome == HOST_OOM else "GPU memory"
        return f"{self.preset}/{self.rung} ran out of {what}{' in ' + self.phase if self.phase else ''}"


@dataclass(frozen=True)
class GenerationResult:
    video_path: Path
    record_path: Path
    record: dict[str, Any] = field(compare=False)
    attempts: tuple[Attempt, ...]

    @property
    def preset_used(self) -> str:
        return self.record["preset_used"]

    @property
    def fell_back(self) -> bool:
        return len(self.attempts) > 1
