"""Weights manager: fetch exactly what the INT8 path needs, resume after interruption, verify before loading.

What LightX2V loads (LightX2V f8aee98b) and therefore what lives under the weights
folder (= LightX2V's `model_path`):

    <weights_dir>/
      distill_int8/config.json                  DiT config (merged by set_config; model_path/config.json also works)
      distill_int8/block_{0..N-1}.safetensors   one INT8 DiT block each, N = config["num_layers"] (40 for 14B)
      distill_int8/non_block.safetensors        embeddings, time projection, head
      distill_int8/models_t5_umt5-xxl-enc-int8.pth   UMT5-XXL encoder, INT8 (torch zip)
      distill_int8/Wan2.1_VAE.pth               Wan VAE state dict (torch zip)
      google/umt5-xxl/                          tokenizer (wan_runner.py:292 default path)
      .wan-studio/                              ours: manifest.json, parts/ (resumable partial files), lock

Where the files come from -- what was checked, and how (the Hub itself is not reachable from the machine this was
written on, so no live listing of the repository could be taken):
  * LightX2V's own docs describe the distilled repos' layout: `distill_int8/` holding `block_xx.safetensors`,
    `models_t5_umt5-xxl-enc-int8.pth`, `Wan2.1_VAE.pth`, optional `taew2_1.pth` and `config.json`
    (ModelTC/LightX2V docs/EN/source/deploy_guides/model_structure.md, read from the xinyiqin/lightx2v copy at
    46c01aca; the example there is the sibling I2V repo). LightX2V's loader default names agree
    (`find_torch_model_path` searches `distill_int8/` then the root, utils.py:445-461; VAE name `Wan2.1_VAE.pth`,
    wan_runner.py:84; T5 name `models_t5_umt5-xxl-enc-int8.pth`).
  * A third-party bootstrap script for the sibling repo `lightx2v/Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-
    Lightx2v` requires `config.json` at the root, `google/umt5-xxl/tokenizer.json`, and
    `distill_int8/{non_block.safetensors, models_t5_umt5-xxl-enc-int8.pth, Wan2.1_VAE.pth}` (found through the
    code index; ensure_models.py, "fast" preset).
  * HF page https://huggingface.co/lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v/blob/main/loras/...
    and LightX2V's step_distill.md (`.../blob/main/distill_models/distill_model.safetensors`) show this repo also
    carries `loras/` and `distill_models/` (bf16, ~28 GB), which we must NOT download.
  * The UMT5 tokenizer folder `google/umt5-xxl/{special_tokens_map.json, spiece.model, tokenizer.json,
    tokenizer_config.json}` is confirmed in Wan-AI/Wan2.1-T2V-14B (HF commit listing of its duplicate
    wan-community/Wan2.1-T2V-14B@f71f4be). We take it from the LightX2V repo when that repo has it, else from there.
  * Sizes (measured on the real repository): 40 blocks x 0.352 GB, non_block
    0.931 GB, T5 int8 6.733 GB, VAE 0.508 GB -- about 22.2 GB in all.
Because the exact listing could not be read, nothing here trusts a hard-coded list: the download lists the repo
at a pinned commit, resolves each logical file in the places LightX2V looks, and names what is missing if the
layout ever changes. Sizes and checksums come from that listing (LFS sha256 / git blob id) and are stored in
`.wan-studio/manifest.json`, which `verify()` then checks against.

Resume: huggingface_hub 2.4 resumes a broken transfer with an HTTP Range request inside one `http_get` call, but
`hf_hub_download` deletes its partial file when the call fails (file_download.py, `_download_to_tmp_and_move`),
so closing the app would lose a half-done 6.7 GB file. We therefore drive the same client pieces ourselves
(`get_hf_file_metadata` + `http_get(resume_size=...)`) into a partial file that survives the process.
"""

from __future__ import annotations

import argparse
import enum
import errno
import hashlib
import importlib
import json
import logging
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from pipeline.errors import WeightsError

log = logging.getLogger(__name__)

REPO_ID = "lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
TOKENIZER_FALLBACK_REPO_ID = "Wan-AI/Wan2.1-T2V-14B"
DEFAULT_WEIGHTS_DIR = Path("weights") / "Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
# The app reads these too (app.py), so `app.py download` and `app.py doctor` look where the app will load from.
WEIGHTS_DIR_ENV = "WAN_STUDIO_WEIGHTS_DIR"
OUTPUTS_DIR_ENV = "WAN_STUDIO_OUTPUTS_DIR"
DEFAULT_ENDPOINT = "https://huggingface.co"

DIT_DIR = "distill_int8"
TOKENIZER_DIR = "google/umt5-xxl"
T5_FILENAME = "models_t5_umt5-xxl-enc-int8.pth"
VAE_FILENAME = "Wan2.1_VAE.pth"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "spiece.model")
# Keys LightX2V reads from the DiT config (LightX2V f8aee98b); without them loading fails much later.
CONFIG_KEYS_READ_BY_LOADER = ("dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim", "text_len")

# Used before the repo has been listed (doctor's disk check); the real numbers come from the listing.
APPROX_TOTAL_BYTES = int(40 * 0.352e9 + 0.931e9 + 6.733e9 + 0.508e9)

STATE_DIR = ".wan-studio"
MANIFEST_NAME = "manifest.json"
# Free space we keep on top of the bytes still to fetch: filesystems misreport a little, and a full disk breaks
# the manifest write at the very end.
DISK_MARGIN_BYTES = 256 * 1024**2
_GIT_LFS_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK_RE = re.compile(r"^block_(\d+)\.safetensors$")
# safetensors: u64 header length; anything above this is not a real header (100 MB, as the reference impl).
_MAX_SAFETENSORS_HEADER = 100 * 1024**2
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4}


# --------------------------------------------------------------------------------------------- errors


class WeightsNetworkError(WeightsError):
    """The Hub (or the mirror in HF_ENDPOINT) could not be reached, or the connection broke and did not recover."""


class WeightsRepoNotFound(WeightsError):
    """The repository or revision does not exist at the endpoint, or needs a login."""


class WeightsFileMissing(WeightsError):
    """A file the INT8 path needs is not in the repository."""


class WeightsDiskFull(WeightsError):
    """Not enough free disk space, before starting or while writing."""

    def __init__(self, message: str, *, needed_bytes: int, free_bytes: int | None):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


class WeightsCorrupt(WeightsError):
    """A file is truncated, does not parse, or does not match the checksum published on the Hub."""


class WeightsIncomplete(WeightsError):
    """Files are missing locally (for example in offline mode)."""


class WeightsDirNotWritable(WeightsError):
    """The weights folder cannot be created or written to."""


class DownloadCancelled(WeightsError):
    """The user stopped the download; finished files and the partial file are kept for the next run."""


# --------------------------------------------------------------------------------------------- formatting


def format_bytes(n: float | None) -> str:
    """Decimal units, as disks and download sites count them."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_rate(bytes_per_s: float | None) -> str:
    return "—" if not bytes_per_s else f"{format_bytes(bytes_per_s)}/s"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# --------------------------------------------------------------------------------------------- progress


class DownloadPhase(str, enum.Enum):
    CONNECTING = "connecting"
    CHECKING = "checking files on disk"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class DownloadProgress:
    """One progress reading. `bytes_done`/`bytes_total` cover every needed file, so a resumed download starts
    part-way; `rate_bps` and `eta_s` are measured on this session's transfer only."""

    phase: DownloadPhase
    message: str = ""
    file: str = ""
    file_index: int = 0
    file_count: int = 0
    file_bytes_done: int = 0
    file_bytes_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float | None = None
    eta_s: float | None = None
    error: WeightsError | None = field(default=None, compare=False)

    @property
    def fraction(self) -> float:
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total else 0.0

    @property
    def finished(self) -> bool:
        return self.phase in (DownloadPhase.DONE, DownloadPhase.FAILED, DownloadPhase.CANCELLED)

    def describe(self) -> str:
        """One plain-text line for a terminal or a status label."""
        if self.phase is DownloadPhase.CHECKING:
            return f"checking files on disk: [{self.file_index}/{self.file_count}] {self.file}"
        if self.phase is DownloadPhase.DOWNLOADING:
            return (f"[{self.file_index}/{self.file_count}] {self.file}  "
                    f"{format_bytes(self.bytes_done)} / {format_bytes(self.bytes_total)} "
                    f"({self.fraction:.0%})  {format_rate(self.rate_bps)}  ETA {format_eta(self.eta_s)}")
        text = self.phase.value
        if self.message:
            text = f"{text}: {self.message}"
        return text


class _RateMeter:
    """Transfer rate over the last `window_s` seconds: a whole-session average hides a stalled connection."""

    def __init__(self, window_s: float = 8.0, clock: Callable[[], float] = time.monotonic):
        self._window = window_s
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, n: int) -> None:
        self._total += n
        now = self._clock()
        self._samples.append((now, self._total))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, b0), (_, b1) = self._samples[0], self._samples[-1]
        elapsed = self._clock() - t0  # up to now, so a stalled connection shows a falling rate
        return (b1 - b0) / elapsed if elapsed > 0 else None


# --------------------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class WeightsLayout:
    """Paths to hand to LightX2V (`model_path`, `dit_quantized_ckpt`, `text_encoder_quantized_ckpt`, ...)."""

    model_path: Path
    dit_dir: Path
    config_path: Path
    t5_path: Path
    vae_path: Path
    tokenizer_dir: Path
    num_layers: int


@dataclass(frozen=True)
class VerifyProblem:
    path: str  # relative to the weights folder
    kind: str  # "missing" | "corrupt" | "size" | "layout" | "unreadable"
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    weights_dir: Path
    problems: tuple[VerifyProblem, ...]
    files_checked: int
    bytes_checked: int
    used_manifest: bool
    deep: bool
    layout: WeightsLayout | None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(p.path for p in self.problems if p.kind == "missing")

    def summary(self, limit: int = 5) -> str:
        if self.ok:
            how = "checked against the Hub checksums" if self.deep and self.used_manifest else (
                "sizes checked against the download record" if self.used_manifest else "headers checked")
            return (f"All {self.files_checked} weight files are present in {self.weights_dir} "
                    f"({format_bytes(self.bytes_checked)}; {how}).")
        lines = [f"{len(self.problems)} problem(s) with the weights in {self.weights_dir}:"]
        lines += [f"- {p.path}: {p.detail}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"- ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """For the loader: a clear WeightsError instead of a LightX2V traceback halfway through loading."""
        if self.ok:
            return
        fix = ("Run `python app.py download` (or press Download weights in the System tab); it fetches only "
               "what is missing or damaged.")
        if all(p.kind == "missing" for p in self.problems):
            raise WeightsIncomplete(f"{self.summary()}\n{fix}")
        raise WeightsCorrupt(f"{self.summary()}\n{fix}")


def check_safetensors(path: Path, *, expect_block: int | None = None) -> str | None:
    """Structural check of a .safetensors file; returns what is wrong, or None. Reads only the header.

    The format is `u64 little-endian header length | JSON header | data`, and the data buffer must be covered
    exactly by the tensors' offsets, so a truncated or padded file shows up without reading the data.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "too short to be a safetensors file"
            header_len = int.from_bytes(head, "little")
            if header_len <= 0 or header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
                return "header length is invalid (truncated or not a safetensors file)"
            raw = f.read(header_len)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "header is not valid JSON (file is corrupt)"
    if not isinstance(header, dict):
        return "header is not a JSON object (file is corrupt)"
    data_len = size - 8 - header_len
    end_max = 0
    names = [k for k in header if k != "__metadata__"]
    for name in names:
        info = header[name]
        try:
            start, end = (int(v) for v in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has a malformed entry (file is corrupt)"
        if not 0 <= start <= end:
            return f"tensor {name!r} has invalid offsets (file is corrupt)"
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None:
            count = 1
            for d in shape:
                count *= d
            if (count * bits + 7) // 8 != end - start:
                return f"tensor {name!r}: shape and byte range disagree (file is corrupt)"
        end_max = max(end_max, end)
    if end_max != data_len:
        if end_max > data_len:
            return (f"truncated: the header needs {format_bytes(8 + header_len + end_max)} but the file has "
                    f"{format_bytes(size)}")
        return "has trailing bytes after the last tensor (file is corrupt)"
    if expect_block is not None and not any(n.startswith(f"blocks.{expect_block}.") for n in names):
        return f"holds no 'blocks.{expect_block}.*' tensors: not the file for block {expect_block}"
    return None


def check_torch_zip(path: Path, *, deep: bool = False) -> str | None:
    """A `torch.save` file is a zip with `<name>/data.pkl`; the central directory sits at the end, so a
    truncated download fails to open. `deep` also CRC-checks every member (reads the whole file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.endswith("data.pkl") for n in names):
                return "is a zip but not a PyTorch checkpoint (no data.pkl)"
            if deep:
                bad = zf.testzip()
                if bad is not None:
                    return f"member {bad!r} fails its CRC check (file is corrupt)"
    except zipfile.BadZipFile:
        return "is not a readable PyTorch checkpoint (truncated or corrupt)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return None, "is not valid JSON (file is corrupt)"


def _state_dir(weights_dir: Path) -> Path:
    return weights_dir / STATE_DIR


def _load_manifest(weights_dir: Path) -> dict[str, Any] | None:
    data, err = _read_json(_state_dir(weights_dir) / MANIFEST_NAME)
    if err is not None or not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def _first_existing(root: Path, rel_paths: tuple[str, ...]) -> str | None:
    for rel in rel_paths:
        if (root / rel).is_file():
            return rel
    return None


def verify(weights_dir: Path | str, *, deep: bool = False) -> VerifyReport:
    """Check that every file LightX2V's INT8 path opens is present and sound. Never raises.

    Quick (default, seconds): presence, sizes from the download record when there is one, safetensors headers,
    torch zip directories, JSON files. `deep`: also hashes every file against the Hub checksums in the record
    (minutes: it reads all ~22 GB), or CRC-checks the .pth members of a folder that has no record.
    """
    root = Path(weights_dir).expanduser()
    try:
        return _verify(root, deep)
    except OSError as exc:  # e.g. a folder we may not list; per-file read errors are reported per file
        problem = VerifyProblem(".", "unreadable", f"cannot be read ({exc.strerror or exc})")
        return VerifyReport(root, (problem,), 0, 0, False, deep, None)


def _verify(root: Path, deep: bool) -> VerifyReport:
    problems: list[VerifyProblem] = []
    checked: list[tuple[str, int]] = []

    def problem(rel: str, kind: str, detail: str) -> None:
        problems.append(VerifyProblem(rel, kind, detail))

    if not root.is_dir():
        problem(".", "missing", f"folder {root} does not exist")
        return VerifyReport(root, tuple(problems), 0, 0, False, deep, None)
    if root.name == DIT_DIR and (root / "non_block.safetensors").exists():
        problem(".", "layout", f"this is the {DIT_DIR} folder itself; point the weights folder at its parent "
                               f"({root.parent})")
        return VerifyReport(root, tuple(problems), 0, 0, False, deep, None)

    manifest = _load_manifest(root)
    recorded: dict[str, dict[str, Any]] = manifest["files"] if manifest else {}

    def note(rel: str) -> bool:
        """Presence and recorded size; returns whether the file can be inspected further."""
        path = root / rel
        if not path.is_file():
            problem(rel, "missing", "missing")
            return False
        size = path.stat().st_size
        want = recorded.get(rel, {}).get("size")
        if isinstance(want, int) and want != size:
            problem(rel, "size", f"is {format_bytes(size)}, the Hub file is {format_bytes(want)} "
                                 f"({'truncated' if size < want else 'wrong file'})")
            return False
        checked.append((rel, size))
        return True

    # Config: LightX2V merges model_path/config.json and dit_quantized_ckpt/config.json; one must be there.
    config_rel = _first_existing(root, (f"{DIT_DIR}/config.json", "config.json"))
    num_layers = 0
    if config_rel is None:
        problem(f"{DIT_DIR}/config.json", "missing", "missing (the DiT config)")
    elif note(config_rel):
        config, err = _read_json(root / config_rel)
        if err:
            problem(config_rel, "corrupt", err)
        elif not isinstance(config, dict) or any(k not in config for k in CONFIG_KEYS_READ_BY_LOADER):
            absent = [k for k in CONFIG_KEYS_READ_BY_LOADER if not isinstance(config, dict) or k not in config]
            problem(config_rel, "corrupt", f"lacks keys the loader reads: {', '.join(absent)}")
        elif not isinstance(config["num_layers"], int) or config["num_layers"] <= 0:
            problem(config_rel, "corrupt", f"num_layers is {config['num_layers']!r}")
        else:
            num_layers = config["num_layers"]

    for i in range(num_layers):
        rel = f"{DIT_DIR}/block_{i}.safetensors"
        if note(rel) and (err := check_safetensors(root / rel, expect_block=i)):
            problem(rel, "corrupt", err)
    rel = f"{DIT_DIR}/non_block.safetensors"
    if note(rel) and (err := check_safetensors(root / rel)):
        problem(rel, "corrupt", err)

    resolved: dict[str, str] = {}
    for label, name in (("T5 text encoder", T5_FILENAME), ("VAE", VAE_FILENAME)):
        rel = _first_existing(root, (f"{DIT_DIR}/{name}", name))
        if rel is None:
            problem(f"{DIT_DIR}/{name}", "missing", f"missing (the {label})")
            continue
        resolved[name] = rel
        if note(rel) and (err := check_torch_zip(root / rel, deep=deep and rel not in recorded)):
            problem(rel, "corrupt", err)

    tok = root / TOKENIZER_DIR
    if not (tok / "tokenizer_config.json").is_file():
        problem(f"{TOKENIZER_DIR}/tokenizer_config.json", "missing", "missing (the UMT5 tokenizer)")
    if not (tok / "tokenizer.json").is_file() and not (tok / "spiece.model").is_file():
        problem(f"{TOKENIZER_DIR}/tokenizer.json", "missing", "missing (needs tokenizer.json or spiece.model)")
    for name in TOKENIZER_FILES:
        rel = f"{TOKENIZER_DIR}/{name}"
        if (root / rel).is_file() and note(rel):
            if name.endswith(".json"):
                if err := _read_json(root / rel)[1]:
                    problem(rel, "corrupt", err)
            elif (root / rel).stat().st_size == 0:
                problem(rel, "corrupt", "is empty")

    # Anything the download recorded must still be there (e.g. a tokenizer file deleted by hand).
    checked_names = {rel for rel, _ in checked}
    for rel in recorded:
        if rel not in checked_names and not any(p.path == rel for p in problems):
            note(rel)

    if deep and manifest:
        bad = {p.path for p in problems}
        for rel, _size in checked:
            entry = recorded.get(rel)
            if rel in bad or not entry:
                continue
            try:
                if not _matches_checksum(root / rel, entry):
                    problem(rel, "corrupt", "content does not match the Hub checksum (file is corrupt)")
            except OSError as exc:
                problem(rel, "unreadable", f"cannot be read ({exc.strerror or exc})")

    layout = None
    if not problems and config_rel is not None:
        layout = WeightsLayout(model_path=root, dit_dir=root / DIT_DIR, config_path=root / config_rel,
                               t5_path=root / resolved[T5_FILENAME], vae_path=root / resolved[VAE_FILENAME],
                               tokenizer_dir=tok, num_layers=num_layers)
    return VerifyReport(root, tuple(problems), len(checked), sum(s for _, s in checked), manifest is not None,
                        deep, layout)


# --------------------------------------------------------------------------------------------- hashing


class _ContentHash:
    """The checksum the Hub publishes: sha256 for LFS files, the git blob id (sha1 of "blob <size>\\0" + data)
    for small files kept in git."""

    def __init__(self, kind: str, size: int):
        self.kind = kind
        self._h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
        if kind == "git-sha1":
            self._h.update(f"blob {size}\0".encode())

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _hash_file(path: Path, kind: str, size: int, limit: int | None = None) -> _ContentHash:
    h = _ContentHash(kind, size)
    remaining = limit
    with path.open("rb") as f:
        while True:
            chunk = f.read(8 * 1024**2 if remaining is None else min(8 * 1024**2, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h


def _matches_checksum(path: Path, entry: dict[str, Any]) -> bool:
    kind, digest, size = entry.get("hash_kind"), entry.get("hash"), entry.get("size")
    if not kind or not digest or not isinstance(size, int):
        return path.stat().st_size == size  # nothing to hash against: size is all we know
    return _hash_file(path, kind, size).hexdigest() == digest


# --------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedFile:
    repo_id: str
    revision: str  # a commit sha, so every file comes from the same snapshot
    remote_path: str
    local_path: str  # relative to the weights folder
    size: int
    hash_kind: str | None  # "sha256" | "git-sha1" | None (Xet-only file: size check only)
    hash: str | None


def _hash_of(entry: Any) -> tuple[str | None, str | None]:
    lfs = getattr(entry, "lfs", None)
    if lfs is not None and _GIT_LFS_SHA256.match(str(getattr(lfs, "sha256", ""))):
        return "sha256", str(lfs.sha256)
    if lfs is None and getattr(entry, "xet_hash", None) is None and getattr(entry, "blob_id", None):
        return "git-sha1", str(entry.blob_id)
    return None, None


def _plan(entries: dict[str, Any], *, repo_id: str, commit: str, num_layers: int,
          tokenizer_entries: dict[str, Any], tokenizer_repo: str, tokenizer_commit: str) -> list[PlannedFile]:
    """Map the repo listing onto the files the INT8 path needs, in the places LightX2V looks for them."""
    missing: list[str] = []

    def take(rel: str, repo: str, rev: str, table: dict[str, Any]) -> PlannedFile:
        entry = table[rel]
        kind, digest = _hash_of(entry)
        return PlannedFile(repo, rev, rel, rel, int(entry.size), kind, digest)

    planned: list[PlannedFile] = []
    configs = [p for p in (f"{DIT_DIR}/config.json", "config.json") if p in entries]
    if not configs:
        missing.append(f"{DIT_DIR}/config.json")
    planned += [take(p, repo_id, commit, entries) for p in configs]
    for i in range(num_layers):
        rel = f"{DIT_DIR}/block_{i}.safetensors"
        if rel in entries:
            planned.append(take(rel, repo_id, commit, entries))
        else:
            missing.append(rel)
    for rel_options in ((f"{DIT_DIR}/non_block.safetensors",),
                        (f"{DIT_DIR}/{T5_FILENAME}", T5_FILENAME),
                        (f"{DIT_DIR}/{VAE_FILENAME}", VAE_FILENAME)):
        rel = next((r for r in rel_options if r in entries), None)
        if rel is None:
            missing.append(rel_options[0])
        else:
            planned.append(take(rel, repo_id, commit, entries))
    tok = [f"{TOKENIZER_DIR}/{n}" for n in TOKENIZER_FILES if f"{TOKENIZER_DIR}/{n}" in tokenizer_entries]
    has_vocab = any(p.endswith(("tokenizer.json", "spiece.model")) for p in tok)
    if f"{TOKENIZER_DIR}/tokenizer_config.json" not in tok or not has_vocab:
        missing.append(f"{TOKENIZER_DIR}/ (tokenizer_config.json + tokenizer.json or spiece.model) "
                       f"in {repo_id} or {tokenizer_repo}")
    planned += [take(p, tokenizer_repo, tokenizer_commit, tokenizer_entries) for p in tok]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise WeightsFileMissing(
            f"The repository {repo_id} (commit {commit[:10]}) lacks files the INT8 path needs: {shown}. "
            "Its layout may have changed; check the repository page, or try an older --revision.")
    return planned


# --------------------------------------------------------------------------------------------- download


class _NoBar:
    """huggingface_hub draws a tqdm bar per file unless given a class; we report progress ourselves."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: float | None = 1) -> None:
        return None


class _ProgressWriter:
    """File object for `http_get`: counts and hashes bytes as they land, and stops at a cancel request.

    `http_get` only writes, and on a server that ignores Range it seeks back and truncates; after that the
    running hash is no longer the hash of the file, so we re-read the file at the end instead.
    """

    def __init__(self, raw: BinaryIO, content_hash: _ContentHash | None, on_bytes: Callable[[int], None],
                 on_truncate: Callable[[], None], cancel: threading.Event):
        self._raw = raw
        self.content_hash = content_hash
        self.hash_valid = True
        self._on_bytes = on_bytes
        self._on_truncate = on_truncate
        self._cancel = cancel

    def write(self, data: bytes) -> int:
        if self._cancel.is_set():
            raise DownloadCancelled("Download stopped.")
        written = self._raw.write(data)
        if self.content_hash is not None:
            self.content_hash.update(data)
        self._on_bytes(len(data))
        return written

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.hash_valid = False
        return self._raw.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        self.hash_valid = False
        pos = self._raw.truncate(size)
        self._on_truncate()
        return pos

    def flush(self) -> None:
        self._raw.flush()


def _open_part(path: Path) -> BinaryIO:
    """Append mode: a resumed transfer continues at the end of what an earlier run wrote."""
    return path.open("ab")


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _is_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment may have been set after that.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_endpoint(endpoint: str | None = None) -> str:
    """Argument, else HF_ENDPOINT read now (huggingface_hub froze its copy at import), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _ensure_writable(weights_dir: Path) -> Path:
    if weights_dir.exists() and not weights_dir.is_dir():
        raise WeightsDirNotWritable(f"{weights_dir} is a file, not a folder. Pass a folder with --weights-dir PATH.")
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
        state = _state_dir(weights_dir)
        (state / "parts").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state, prefix="write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WeightsDiskFull(f"The disk holding {weights_dir} is full ({reason}).", needed_bytes=0,
                                  free_bytes=0) from exc
        raise WeightsDirNotWritable(
            f"Cannot write to the weights folder {weights_dir} ({reason}). Choose a folder you own with "
            "--weights-dir PATH, or fix its permissions.") from exc
    return state


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses: httpx2 in 2.x, httpx in 1.x (the GPU
    requirements pin 1.33 for LightX2V's transformers, the test venv has 2.4)."""
    found: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _map_hub_error(exc: BaseException, what: str, endpoint: str) -> WeightsError:
    """Turn huggingface_hub / transport exceptions into messages that say what to do."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, WeightsError):
        return exc
    if isinstance(exc, OfflineModeIsEnabled):
        return WeightsIncomplete(f"Offline mode (HF_HUB_OFFLINE) is on, so {what} cannot be fetched. "
                                 "Unset HF_HUB_OFFLINE to download, or copy the files in by hand.")
    if isinstance(exc, GatedRepoError):
        return WeightsRepoNotFound(f"{what}: the repository needs you to log in and accept its terms "
                                   "(`hf auth login`).")
    if isinstance(exc, RevisionNotFoundError):
        return WeightsRepoNotFound(f"{what}: that revision does not exist. Check --revision.")
    if isinstance(exc, RemoteEntryNotFoundError):
        return WeightsFileMissing(f"{what} is not on the Hub (404). The repository layout may have changed.")
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsRepoNotFound(f"{what}: the repository was not found at {endpoint}. If HF_ENDPOINT points "
                                   "at a mirror, check that the mirror carries it.")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and status >= 500:
            return WeightsNetworkError(f"{what}: {endpoint} answered HTTP {status}. The Hub may be down; try "
                                       "again later (finished files are kept).")
        return WeightsError(f"{what}: {endpoint} answered HTTP {status}: {exc}")
    if isinstance(exc, _transport_errors()):
        return WeightsNetworkError(
            f"Cannot reach {endpoint} ({type(exc).__name__}: {exc}). Check the internet connection; behind a "
            "firewall, set HF_ENDPOINT (or --endpoint) to a mirror. Files already downloaded are kept and the "
            "next run resumes.")
    return WeightsError(f"{what}: {type(exc).__name__}: {exc}")


def _structure_problem(path: Path) -> str | None:
    """The cheap per-file checks `verify` runs, by file type; None when the file looks sound."""
    if path.suffix == ".safetensors":
        match = _BLOCK_RE.match(path.name)
        return check_safetensors(path, expect_block=int(match.group(1)) if match else None)
    if path.suffix == ".pth":
        return check_torch_zip(path)
    if path.suffix == ".json":
        return _read_json(path)[1]
    return None


@dataclass(frozen=True)
class DownloadResult:
    weights_dir: Path
    commit: str | None
    files_downloaded: int
    bytes_downloaded: int
    report: VerifyReport


class _Downloader:
    def __init__(self, weights_dir: Path, *, repo_id: str, revision: str | None, endpoint: str,
                 token: str | bool | None, on_progress: Callable[[DownloadProgress], None] | None,
                 cancel: threading.Event, disk_free: Callable[[Path], int], opener: Callable[[Path], BinaryIO],
                 rehash: bool):
        self.weights_dir = weights_dir
        self.rehash = rehash
        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = endpoint
        self.token = token
        self._emit_cb = on_progress
        self.cancel = cancel
        self.disk_free = disk_free
        self.opener = opener
        self.meter = _RateMeter()
        self.bytes_total = 0
        self.bytes_present = 0  # complete files plus partial bytes, for the overall bar

    # -- progress
    def emit(self, phase: DownloadPhase, message: str = "", **kw: Any) -> None:
        if self._emit_cb is None:
            return
        rate = self.meter.rate()
        remaining = max(0, self.bytes_total - self.bytes_present)
        eta = remaining / rate if rate else None
        self._emit_cb(DownloadProgress(phase=phase, message=message, bytes_done=self.bytes_present,
                                       bytes_total=self.bytes_total, rate_bps=rate, eta_s=eta, **kw))

    # -- hub calls
    def _headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        return build_hf_headers(token=self.token, library_name="wan-t2v-studio")

    def resolve_commit(self, repo_id: str, revision: str | None, *, probe_network: bool) -> str:
        """Pin a commit so every file comes from one snapshot. The probe is one HEAD without retries, so a
        machine with no network gets its answer in seconds, not after the listing API's ~20 s of backoff."""
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import RemoteEntryNotFoundError

        rev = revision or "main"
        url = hf_hub_url(repo_id, ".gitattributes", revision=rev, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint,
                                        retry_on_errors=not probe_network)
            commit = meta.commit_hash
        except RemoteEntryNotFoundError as exc:
            # Every Hub repo starts with .gitattributes, but it can be deleted; the 404 still names the commit.
            commit = exc.response.headers.get("X-Repo-Commit") if exc.response is not None else None
            if commit is None:
                try:
                    commit = HfApi(endpoint=self.endpoint, token=self.token).model_info(repo_id, revision=rev).sha
                except Exception as inner:  # noqa: BLE001 - mapped to a user message
                    raise _map_hub_error(inner, f"Repository {repo_id}", self.endpoint) from inner
        except Exception as exc:  # noqa: BLE001 - mapped to a user message
            raise _map_hub_error(exc, f"Repository {repo_id}", self.endpoint) from exc
        if not commit:
            raise WeightsNetworkError(
                f"{self.endpoint} answered, but not like a Hugging Face Hub (no X-Repo-Commit header). "
                "Check HF_ENDPOINT / --endpoint, or a proxy rewriting the responses.")
        return commit

    def list_files(self, repo_id: str, commit: str, path_in_repo: str | None) -> dict[str, Any]:
        from huggingface_hub import HfApi, RepoFile
        from huggingface_hub.errors import RemoteEntryNotFoundError

        api = HfApi(endpoint=self.endpoint, token=self.token, library_name="wan-t2v-studio")
        try:
            items = api.list_repo_tree(repo_id, path_in_repo=path_in_repo, recursive=True, revision=commit)
            return {item.path: item for item in items if isinstance(item, RepoFile)}
        except RemoteEntryNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001 - mapped to a user message
            raise _map_hub_error(exc, f"Listing {repo_id}", self.endpoint) from exc

    # -- one file
    def part_path(self, pf: PlannedFile) -> Path:
        tag = (pf.hash or pf.revision)[:16]
        return _state_dir(self.weights_dir) / "parts" / f"{pf.local_path}.{tag}.part"

    def fetch(self, pf: PlannedFile, index: int, count: int) -> int:
        """Download one file into its partial file, check it, move it into place. Returns bytes transferred."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get

        what = f"{pf.repo_id}/{pf.remote_path}"
        url = hf_hub_url(pf.repo_id, pf.remote_path, revision=pf.revision, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint, retry_on_errors=True)
        except Exception as exc:  # noqa: BLE001 - mapped to a user message
            raise _map_hub_error(exc, what, self.endpoint) from exc
        size = meta.size if meta.size is not None else pf.size
        part = self.part_path(pf)
        part.parent.mkdir(parents=True, exist_ok=True)
        for stale in part.parent.glob(f"{Path(pf.local_path).name}.*.part"):
            if stale != part:  # an older version of this file: its bytes cannot be continued
                stale.unlink(missing_ok=True)
        resume = part.stat().st_size if part.exists() else 0
        if resume > size:  # not a prefix of this file; the planning step counted it as `size` bytes
            part.unlink()
            self.bytes_present -= size
            resume = 0
        content_hash = None
        if pf.hash_kind:
            # Continue the checksum over what an earlier run wrote, so the finished file is fully checked.
            content_hash = _hash_file(part, pf.hash_kind, size, limit=resume) if resume else _ContentHash(
                pf.hash_kind, size)
        headers = self._headers()
        location = meta.location or url
        if urlparse(location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # signed CDN URL: the token must not leave the Hub
        file_done = resume
        transferred = 0

        def on_truncate() -> None:
            # The server ignored our Range and http_get restarted the file: recount from what is on disk.
            nonlocal file_done
            now = part.stat().st_size
            self.bytes_present -= file_done - now
            file_done = now

        def on_bytes(n: int) -> None:
            nonlocal file_done, transferred
            file_done += n
            transferred += n
            self.bytes_present += n
            self.meter.add(n)
            self.emit(DownloadPhase.DOWNLOADING, file=pf.local_path, file_index=index, file_count=count,
                      file_bytes_done=file_done, file_bytes_total=size)

        if resume:
            log.info("resuming %s at %s of %s", pf.local_path, format_bytes(resume), format_bytes(size))
        self.emit(DownloadPhase.DOWNLOADING, file=pf.local_path, file_index=index, file_count=count,
                  file_bytes_done=resume, file_bytes_total=size)
        try:
            with self.opener(part) as raw:
                writer = _ProgressWriter(raw, content_hash, on_bytes, on_truncate, self.cancel)
                http_get(location, writer, resume_size=resume, headers=headers,  # type: ignore[arg-type]
                         expected_size=size, displayed_filename=pf.local_path, tqdm_class=_NoBar)
        except (DownloadCancelled, WeightsError):
            raise
        except OSError as exc:
            raise self._map_os_error(exc, pf.local_path) from exc
        except Exception as exc:  # noqa: BLE001 - mapped to a user message
            raise _map_hub_error(exc, what, self.endpoint) from exc

        if pf.hash_kind and pf.hash:
            digest = (content_hash.hexdigest() if content_hash is not None and writer.hash_valid
                      else _hash_file(part, pf.hash_kind, size).hexdigest())
            if digest != pf.hash:
                part.unlink(missing_ok=True)
                self.bytes_present -= size
                raise WeightsCorrupt(
                    f"{pf.local_path} arrived damaged: its checksum does not match the Hub's. The bad copy was "
                    "deleted; run the download again. If it keeps happening, a proxy or mirror is altering it.")
        dest = self.weights_dir / pf.local_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
        return transferred

    def _map_os_error(self, exc: OSError, rel_path: str) -> WeightsError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = None
            try:
                free = self.disk_free(self.weights_dir)
            except OSError:
                pass
            needed = max(0, self.bytes_total - self.bytes_present)
            return WeightsDiskFull(
                f"The disk filled up while writing {rel_path}. About {format_bytes(needed)} more is needed"
                f"{'' if free is None else f'; {format_bytes(free)} is free'}. Free some space (or choose "
                "another --weights-dir) and run the download again: it resumes where it stopped.",
                needed_bytes=needed, free_bytes=free)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return WeightsDirNotWritable(f"Cannot write {rel_path} into {self.weights_dir} "
                                         f"({exc.strerror}). Fix the folder's permissions or choose another.")
        if exc.errno is None:
            # huggingface_hub's "Consistency check failed": the server sent fewer bytes than announced.
            return WeightsNetworkError(f"The transfer of {rel_path} ended early ({exc}). Run the download "
                                       "again; it resumes from what arrived.")
        return WeightsError(f"Writing {rel_path} failed: {exc.strerror or exc}")

    # -- whole run
    def is_current(self, pf: PlannedFile, recorded: dict[str, Any]) -> bool:
        """Whether the file on disk can be kept. Files without a record (a folder downloaded some other way)
        are hashed once against the Hub checksum and then recorded."""
        dest = self.weights_dir / pf.local_path
        if not dest.is_file() or dest.stat().st_size != pf.size or _structure_problem(dest) is not None:
            return False
        entry = recorded.get(pf.local_path)
        if not self.rehash and entry and entry.get("hash") == pf.hash and entry.get("size") == pf.size:
            return True  # recorded by an earlier run at this checksum: trusted, as hf_hub_download trusts etags
        if pf.hash_kind and pf.hash:
            return _hash_file(dest, pf.hash_kind, pf.size).hexdigest() == pf.hash
        return True

    def run(self) -> DownloadResult:
        from filelock import FileLock, Timeout

        state = _ensure_writable(self.weights_dir)
        lock = FileLock(str(state / "download.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            raise WeightsError(f"Another download into {self.weights_dir} is already running. Wait for it "
                               "to finish, or stop it first.") from exc
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> DownloadResult:
        self.emit(DownloadPhase.CONNECTING, f"{self.endpoint}/{self.repo_id}")
        commit = self.resolve_commit(self.repo_id, self.revision, probe_network=True)
        entries = self.list_files(self.repo_id, commit, None)
        tok_repo, tok_commit, tok_entries = self.repo_id, commit, entries
        if not any(p.startswith(f"{TOKENIZER_DIR}/") for p in entries):
            tok_repo = TOKENIZER_FALLBACK_REPO_ID
            tok_commit = self.resolve_commit(tok_repo, None, probe_network=False)
            tok_entries = self.list_files(tok_repo, tok_commit, TOKENIZER_DIR)
            log.info("%s has no %s/; taking the tokenizer from %s", self.repo_id, TOKENIZER_DIR, tok_repo)

        # The block count comes from the config, so fetch the (tiny) config first.
        manifest = _load_manifest(self.weights_dir) or {}
        recorded: dict[str, Any] = dict(manifest.get("files", {}))
        config_plan = _plan_configs(entries, self.repo_id, commit)
        for pf in config_plan:
            if not self.is_current(pf, recorded):
                self.fetch(pf, 0, 0)
            recorded[pf.local_path] = _record(pf)
        num_layers = _num_layers(self.weights_dir / config_plan[0].local_path)
        plan = _plan(entries, repo_id=self.repo_id, commit=commit, num_layers=num_layers,
                     tokenizer_entries=tok_entries, tokenizer_repo=tok_repo, tokenizer_commit=tok_commit)
        # Forget files an older snapshot needed and this one does not, so verify() stops expecting them.
        recorded = {rel: entry for rel, entry in recorded.items() if any(pf.local_path == rel for pf in plan)}

        self.bytes_total = sum(pf.size for pf in plan)
        self.bytes_present = 0  # recounted below; the config bytes above would otherwise count twice
        to_fetch: list[PlannedFile] = []
        for i, pf in enumerate(plan, 1):
            if self.cancel.is_set():
                raise DownloadCancelled("Download stopped.")
            self.emit(DownloadPhase.CHECKING, pf.local_path, file=pf.local_path, file_index=i,
                      file_count=len(plan))
            if self.is_current(pf, recorded):
                self.bytes_present += pf.size
                recorded[pf.local_path] = _record(pf)
            else:
                to_fetch.append(pf)
                part = self.part_path(pf)
                self.bytes_present += min(part.stat().st_size, pf.size) if part.exists() else 0
        self._write_manifest(commit, recorded)

        still_needed = self.bytes_total - self.bytes_present
        if to_fetch:
            free = self.disk_free(self.weights_dir)
            if free < still_needed + DISK_MARGIN_BYTES:
                raise WeightsDiskFull(
                    f"Not enough disk space for the weights: {format_bytes(still_needed + DISK_MARGIN_BYTES)} is "
                    f"needed in {self.weights_dir}, but only {format_bytes(free)} is free. Free some space, or "
                    "choose a folder on another disk with --weights-dir PATH.",
                    needed_bytes=still_needed + DISK_MARGIN_BYTES, free_bytes=free)
            log.info("downloading %d of %d files, %s of %s still to fetch", len(to_fetch), len(plan),
                     format_bytes(still_needed), format_bytes(self.bytes_total))

        transferred = 0
        for i, pf in enumerate(to_fetch, 1):
            if self.cancel.is_set():
                raise DownloadCancelled("Download stopped.")
            transferred += self.fetch(pf, i, len(to_fetch))
            recorded[pf.local_path] = _record(pf)
            self._write_manifest(commit, recorded)

        self.emit(DownloadPhase.VERIFYING, "checking every file")
        report = verify(self.weights_dir)
        if not report.ok:
            raise WeightsCorrupt(f"The download finished but the check failed.\n{report.summary()}")
        self.emit(DownloadPhase.DONE, report.summary())
        return DownloadResult(self.weights_dir, commit, len(to_fetch), transferred, report)

    def _write_manifest(self, commit: str, files: dict[str, Any]) -> None:
        data = {"repo_id": self.repo_id, "commit": commit, "endpoint": self.endpoint,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        target = _state_dir(self.weights_dir) / MANIFEST_NAME
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            raise self._map_os_error(exc, f"{STATE_DIR}/{MANIFEST_NAME}") from exc


def _record(pf: PlannedFile) -> dict[str, Any]:
    return {"size": pf.size, "hash_kind": pf.hash_kind, "hash": pf.hash, "repo_id": pf.repo_id,
            "revision": pf.revision, "remote_path": pf.remote_path}


def _plan_configs(entries: dict[str, Any], repo_id: str, commit: str) -> list[PlannedFile]:
    configs = [p for p in (f"{DIT_DIR}/config.json", "config.json") if p in entries]
    if not configs:
        raise WeightsFileMissing(f"The repository {repo_id} (commit {commit[:10]}) has no {DIT_DIR}/config.json "
                                 "or config.json; its layout may have changed.")
    out = []
    for rel in configs:
        kind, digest = _hash_of(entries[rel])
        out.append(PlannedFile(repo_id, commit, rel, rel, int(entries[rel].size), kind, digest))
    return out


def _num_layers(config_path: Path) -> int:
    config, err = _read_json(config_path)
    layers = config.get("num_layers") if isinstance(config, dict) else None
    if err or not isinstance(layers, int) or layers <= 0:
        raise WeightsCorrupt(f"{config_path.name} from the repository has no usable num_layers "
                             f"({err or repr(layers)}).")
    return layers


def download_weights(weights_dir: Path | str = DEFAULT_WEIGHTS_DIR, *, repo_id: str = REPO_ID,
                     revision: str | None = None, endpoint: str | None = None, token: str | bool | None = None,
                     on_progress: Callable[[DownloadProgress], None] | None = None,
                     cancel: threading.Event | None = None,
                     disk_free: Callable[[Path], int] = free_disk_bytes,
                     opener: Callable[[Path], BinaryIO] = _open_part, rehash: bool = False) -> DownloadResult:
    """Fetch what the INT8 path needs into `weights_dir`, resuming earlier partial work, then verify.

    Files already there are kept when their size and structure are right and an earlier run recorded them at
    the Hub's checksum; `rehash` re-reads them all against the checksums instead (minutes for ~22 GB), which
    also repairs damage that keeps a file's size and headers intact.

    Raises a `WeightsError` subclass with a user-facing message on every expected failure. With HF_HUB_OFFLINE
    set it touches no network: it succeeds if the folder already verifies and raises `WeightsIncomplete`
    naming the missing files otherwise.
    """
    root = Path(weights_dir).expanduser()
    if _is_offline():
        report = verify(root)
        if not report.ok:
            raise WeightsIncomplete(
                f"Offline mode (HF_HUB_OFFLINE) is on and the weights are not complete.\n{report.summary()}\n"
                "Unset HF_HUB_OFFLINE to download them, or copy a finished download there and pass "
                "--weights-dir PATH.")
        if on_progress is not None:
            on_progress(DownloadProgress(DownloadPhase.DONE, f"offline mode: {report.summary()}",
                                         bytes_done=report.bytes_checked, bytes_total=report.bytes_checked))
        return DownloadResult(root, None, 0, 0, report)
    downloader = _Downloader(root, repo_id=repo_id, revision=revision, endpoint=resolve_endpoint(endpoint),
                             token=token, on_progress=on_progress, cancel=cancel or threading.Event(),
                             disk_free=disk_free, opener=opener, rehash=rehash)
    return downloader.run()


def iter_download(weights_dir: Path | str = DEFAULT_WEIGHTS_DIR, *, min_interval_s: float = 0.5,
                  **kwargs: Any) -> Iterator[DownloadProgress]:
    """`download_weights` on a worker thread, as a generator for a UI. Never raises for download failures: the
    last item has phase DONE, FAILED (with `.error` and the message) or CANCELLED. Closing the generator
    (a Gradio cancel) stops the download at the next chunk; the partial file is kept for the next run."""
    events: queue.Queue[DownloadProgress | None] = queue.Queue()
    cancel = threading.Event()
    outcome: list[DownloadProgress] = []

    def work() -> None:
        try:
            result = download_weights(weights_dir, on_progress=events.put, cancel=cancel, **kwargs)
            outcome.append(DownloadProgress(DownloadPhase.DONE, result.report.summary(),
                                            bytes_done=result.report.bytes_checked,
                                            bytes_total=result.report.bytes_checked))
        except DownloadCancelled as exc:
            outcome.append(DownloadProgress(DownloadPhase.CANCELLED, "stopped; finished files and the partial "
                                            "file are kept, so the next download resumes", error=exc))
        except WeightsError as exc:
            outcome.append(DownloadProgress(DownloadPhase.FAILED, str(exc), error=exc))
        except Exception as exc:  # noqa: BLE001 - a UI generator must end with a message, not a dead thread
            log.exception("weights download crashed")
            outcome.append(DownloadProgress(DownloadPhase.FAILED, f"unexpected error: {exc}",
                                            error=WeightsError(str(exc))))
        finally:
            events.put(None)

    worker = threading.Thread(target=work, name="weights-download", daemon=True)
    worker.start()
    last_yield = 0.0
    try:
        while (item := events.get()) is not None:
            if item.finished:
                continue  # the outcome below says it once, with the error attached
            # Phase changes always go through; byte counts at most every `min_interval_s` (a 10 MB chunk each).
            now = time.monotonic()
            if item.phase is not DownloadPhase.DOWNLOADING or now - last_yield >= min_interval_s:
                last_yield = now
                yield item
        yield outcome[0]
    finally:
        cancel.set()


# --------------------------------------------------------------------------------------------- CLI


class _TerminalProgress:
    """Plain log lines (no carriage returns, so it reads the same in a log file): one per file and at most
    one every `interval_s` seconds while bytes flow."""

    def __init__(self, interval_s: float = 2.0):
        self._interval = interval_s
        self._last = 0.0
        self._last_key: tuple[str, str] = ("", "")

    def __call__(self, p: DownloadProgress) -> None:
        key = (p.phase.value, p.file)
        now = time.monotonic()
        # Checking is fast when files are recorded but hashes ~22 GB for a folder from elsewhere: log it at the
        # interval only, rather than one line per file.
        new_file = key != self._last_key and p.phase is not DownloadPhase.CHECKING
        if new_file or now - self._last >= self._interval or p.finished:
            self._last, self._last_key = now, key
            log.info("%s", p.describe())


def _build_download_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py download",
                                     description=f"Download the INT8 weights ({REPO_ID}: distill_int8/ and the "
                                                 "UMT5 tokenizer, about 22 GB). Safe to re-run: it resumes.")
    parser.add_argument("--weights-dir", type=Path, default=default_dir(WEIGHTS_DIR_ENV, DEFAULT_WEIGHTS_DIR),
                        help=f"folder to download into, or an existing download to check (${WEIGHTS_DIR_ENV}; "
                             "default: %(default)s)")
    parser.add_argument("--outputs-dir", type=Path, default=default_dir(OUTPUTS_DIR_ENV, Path("outputs")),
                        help="accepted for symmetry with the other commands; not used here")
    parser.add_argument("--endpoint", default=None,
                        help="Hub endpoint or mirror URL (default: $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the repository (default: main)")
    parser.add_argument("--rehash", action="store_true",
                        help="re-check files already on disk against the Hub checksums and re-fetch damaged ones")
    return parser


def default_dir(env_name: str, fallback: Path) -> Path:
    """The folder the app itself would use: its environment variable, else the built-in default."""
    value = os.environ.get(env_name, "").strip()
    return Path(value) if value else fallback


def _parse(parser: argparse.ArgumentParser, args_list: list[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits on --help and on bad arguments; the caller wants a code
        return int(exc.code or 0)


def _configure_cli_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The HTTP client logs every request at INFO; our progress lines already say what is happening.
    for name in ("httpx2", "httpcore2", "httpx", "httpcore"):  # huggingface_hub 2.x / 1.x
        logging.getLogger(name).setLevel(logging.WARNING)


def main_download(args_list: list[str] | None = None) -> int:
    """`python app.py download [...]`. Exit codes: 0 ready, 1 failed, 2 bad arguments, 130 interrupted."""
    parsed = _parse(_build_download_parser(), args_list)
    if isinstance(parsed, int):
        return parsed
    _configure_cli_logging()
    cancel = threading.Event()
    try:
        result = download_weights(parsed.weights_dir, revision=parsed.revision, endpoint=parsed.endpoint,
                                  on_progress=_TerminalProgress(), cancel=cancel, rehash=parsed.rehash)
    except KeyboardInterrupt:
        cancel.set()
        sys.stderr.write("\nStopped. Finished files and the partial file are kept; run the same command again "
                         "to resume.\n")
        return 130
    except DownloadCancelled:
        sys.stderr.write("Stopped. Run the same command again to resume.\n")
        return 130
    except WeightsError as exc:
        sys.stderr.write(f"\nDownload failed: {exc}\n")
        return 1
    got = (f"downloaded {result.files_downloaded} file(s), {format_bytes(result.bytes_downloaded)}"
           if result.files_downloaded else "nothing to download")
    commit = f" (commit {result.commit[:10]})" if result.commit else ""
    sys.stdout.write(f"\nWeights ready in {result.weights_dir}{commit}: {got}.\n{result.report.summary()}\n")
    return 0
