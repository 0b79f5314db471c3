"""Writing a finished clip: the mp4 and its JSON record, each to a hidden temp name, then renamed.

A kill at any moment leaves either nothing or a hidden `.*.partial*` file that `clean_leftovers`
removes at the next start; the gallery never lists a half-written video. The record (prompt, seed,
presets, memory settings, versions, timings, VRAM timeline) goes both into the JSON file beside the
video and into the mp4's `comment` metadata, so a video copied elsewhere still explains itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import OutputError

log = logging.getLogger(__name__)

PARTIAL_MARK = ".partial"


def _disk_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"The disk holding {path.parent} is full: the video was not saved. "
                           f"Free some space and generate again; earlier videos and the history "
                           f"are untouched.")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return OutputError(f"Cannot write to {path.parent} ({exc.strerror}). Choose a writable "
                           f"outputs folder with --outputs-dir.")
    return OutputError(f"Saving {path.name} failed: {exc}")


def _write_mp4_imageio(frames: np.ndarray, fps: int, path: Path, comment: str) -> None:
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
        pixelformat="yuv420p", macro_block_size=16, ffmpeg_log_level="error",
        output_params=["-metadata", f"comment={comment}", "-movflags", "+faststart"],
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _write_mp4_pyav(frames: np.ndarray, fps: int, path: Path, comment: str) -> None:
    # Used only where imageio-ffmpeg (68 MB, bundles ffmpeg) is not installed but PyAV is.
    import av

    with av.open(str(path), "w", format="mp4") as container:
        container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_mp4(frames: np.ndarray, fps: int, path: Path, comment: str) -> None:
    """Encode uint8 frames [T, H, W, 3] as H.264 mp4 at `path` (written in place, not atomic)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        _write_mp4_pyav(frames, fps, path, comment)
    else:
        _write_mp4_imageio(frames, fps, path, comment)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputStore:
    """The outputs folder: one `<stem>.mp4` and `<stem>.json` per finished job."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(self.root / "x", exc) from None

    def new_stem(self, job_id: int, preset: str, seed: int) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe_preset = re.sub(r"[^A-Za-z0-9_-]", "_", preset)
        return f"{stamp}_job{job_id:05d}_{safe_preset}_seed{seed}"

    def save(self, stem: str, frames: np.ndarray, fps: int, record: dict[str, Any]) -> tuple[Path, Path]:
        """Write video and record atomically; return their final paths. Raises OutputError."""
        self.ensure()
        video = self.root / f"{stem}.mp4"
        sidecar = self.root / f"{stem}.json"
        tmp_video = self.root / f".{stem}{PARTIAL_MARK}.mp4"
        tmp_sidecar = self.root / f".{stem}{PARTIAL_MARK}.json"
        record = dict(record, video=video.name)
        comment = json.dumps(record, separators=(",", ":"), default=str)
        try:
            write_mp4(frames, fps, tmp_video, comment)
            with open(tmp_sidecar, "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=2, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            # The sidecar lands first: a video is only ever visible with its record beside it.
            os.replace(tmp_sidecar, sidecar)
            os.replace(tmp_video, video)
            _fsync_dir(self.root)
        except OSError as exc:
            for leftover in (tmp_video, tmp_sidecar):
                leftover.unlink(missing_ok=True)
            if not video.exists():
                sidecar.unlink(missing_ok=True)
            raise _disk_error(video, exc) from None
        return video, sidecar

    def clean_leftovers(self) -> list[Path]:
        """Remove temp files left by a kill mid-write, and records whose video never landed."""
        if not self.root.is_dir():
            return []
        removed = []
        for path in self.root.glob(f".*{PARTIAL_MARK}*"):
            path.unlink(missing_ok=True)
            removed.append(path)
        for sidecar in self.root.glob("*.json"):
            if not sidecar.with_suffix(".mp4").exists():
                sidecar.unlink(missing_ok=True)
                removed.append(sidecar)
        if removed:
            log.info("removed %d leftover file(s) from an interrupted run", len(removed))
        return removed


def read_mp4_record(path: Path) -> dict[str, Any] | None:
    """The record embedded in an mp4's comment metadata (None when absent or unreadable)."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(path)) as container:
            comment = container.metadata.get("comment")
    except Exception:  # noqa: BLE001 - any unreadable file simply has no record
        return None
    return json.loads(comment) if comment else None
