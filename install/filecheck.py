"""Cheap structural checks of the weight files (no torch): a truncated or damaged file is caught before
LightX2V fails halfway through loading it. Also the Hub's checksum kinds (LFS sha256, git blob sha1)."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from install.progress import format_bytes

_BLOCK_RE = re.compile(r"^block_(\d+)\.safetensors$")
# safetensors: u64 header length; anything above this is not a real header (100 MB, as the reference impl).
_MAX_SAFETENSORS_HEADER = 100 * 1024**2
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4}


def read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return None, "is not valid JSON (file is corrupt)"


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
    data_len, end_max = size - 8 - header_len, 0
    names = [k for k in header if k != "__metadata__"]
    for name in names:
        try:
            start, end = (int(v) for v in header[name]["data_offsets"])
            shape = [int(d) for d in header[name]["shape"]]
            bits = _DTYPE_BITS.get(str(header[name]["dtype"]))
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has a malformed entry (file is corrupt)"
        if not 0 <= start <= end:
            return f"tensor {name!r} has invalid offsets (file is corrupt)"
        count = 1
        for d in shape:
            count *= d
        if bits is not None and (count * bits + 7) // 8 != end - start:
            return f"tensor {name!r}: shape and byte range disagree (file is corrupt)"
        end_max = max(end_max, end)
    if end_max > data_len:
        return f"truncated: the header needs {format_bytes(8 + header_len + end_max)} but the file has " \
               f"{format_bytes(size)}"
    if end_max < data_len:
        return "has trailing bytes after the last tensor (file is corrupt)"
    if expect_block is not None and not any(n.startswith(f"blocks.{expect_block}.") for n in names):
        return f"holds no 'blocks.{expect_block}.*' tensors: not the file for block {expect_block}"
    return None


def check_torch_zip(path: Path, *, deep: bool = False) -> str | None:
    """A `torch.save` file is a zip with `<name>/data.pkl`; the central directory sits at the end, so a
    truncated download fails to open. `deep` also CRC-checks every member (reads the whole file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                return "is a zip but not a PyTorch checkpoint (no data.pkl)"
            if deep and (bad := zf.testzip()) is not None:
                return f"member {bad!r} fails its CRC check (file is corrupt)"
    except zipfile.BadZipFile:
        return "is not a readable PyTorch checkpoint (truncated or corrupt)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def structure_problem(path: Path, *, deep: bool = False) -> str | None:
    """The cheap per-file check by file type; None when the file looks sound."""
    if path.suffix == ".safetensors":
        match = _BLOCK_RE.match(path.name)
        return check_safetensors(path, expect_block=int(match.group(1)) if match else None)
    if path.suffix == ".pth":
        return check_torch_zip(path, deep=deep)
    if path.suffix == ".json":
        return read_json(path)[1]
    if path.stat().st_size == 0:
        return "is empty"
    return None


class ContentHash:
    """The checksum the Hub publishes: sha256 for LFS files, the git blob id (sha1 of "blob <size>\\0" + data)
    for small files kept in git."""

    def __init__(self, kind: str, size: int):
        self._h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
        if kind == "git-sha1":
            self._h.update(f"blob {size}\0".encode())

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def hash_file(path: Path, kind: str, size: int, limit: int | None = None) -> ContentHash:
    """The checksum of `path` (of its first `limit` bytes: the start of a resumed transfer)."""
    h = ContentHash(kind, size)
    remaining = size if limit is None else limit
    with path.open("rb") as f:
        while remaining > 0 and (chunk := f.read(min(8 * 1024**2, remaining))):
            h.update(chunk)
            remaining -= len(chunk)
    return h
