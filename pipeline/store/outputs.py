"""Writing a finished clip: the mp4 and its JSON record, each to a hidden temp name, then renamed.

A kill at any moment leaves either nothing or a hidden `.*.partial*` file that `clean_leftovers`
removes at the next start; the gallery never lists a half-written video. The record (prompt, seed,
presets, memory settings, versions, timings, VRAM timeline) goes both into the JSON file beside the
video and into the mp4's `comment` metadata, so a video copied elsewhere still explains itself.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import InvalidRequest, LatentsError, OutputError, OutputsInUse

log = logging.getLogger(__name__)

PARTIAL_MARK = ".partial"
# First-frame stills for the history gallery, made on demand; hidden so listings show only clips.
THUMBS_DIR = ".thumbs"
LOCK_NAME = ".wan-studio.lock"
# Each clip's final latents, beside it: "<stem>.latents.safetensors" (removed with the clip).
LATENTS_SUFFIX = ".latents.safetensors"
# Small animated previews shown during a run; hidden, a few kept, all removed at the next start.
PREVIEWS_DIR = ".previews"
PREVIEWS_KEPT = 16
# Below this much free space a failed write is reported as "disk full": ffmpeg run by
# imageio-ffmpeg reports ENOSPC only on its own stderr and exits without an exception.
DISK_FULL_FREE_BYTES = 64 * 1024**2

Mp4Writer = Callable[[np.ndarray, int, Path, str], None]


def _disk_full(path: Path) -> OutputError:
    return OutputError(f"The disk holding {path.parent} is full: the video was not saved. Free some "
                       f"space and generate again; earlier videos and the history are untouched.")


def _disk_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return _disk_full(path)
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
    """Encode uint8 frames [T, H, W, 3] as H.264 mp4 at `path` (written in place, not atomic).

    Not every failure raises (imageio-ffmpeg ignores ffmpeg's exit status): check the result with
    `count_mp4_frames`."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    if _bundled_ffmpeg_available():
        _write_mp4_imageio(frames, fps, path, comment)
    else:
        _write_mp4_pyav(frames, fps, path, comment)


@functools.lru_cache(maxsize=1)
def _bundled_ffmpeg_available() -> bool:
    # imageio-ffmpeg's pure-Python wheel (other platforms, or carried without its 68 MB binary)
    # imports fine but has no ffmpeg to run; PyAV links FFmpeg itself.
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        log.info("no ffmpeg binary from imageio-ffmpeg: writing mp4 with PyAV")
        return False
    return True


def read_record(path: str | Path | None) -> dict[str, Any] | None:
    """A clip's sidecar record, or None when it is missing, unreadable or not a JSON object."""
    if not path:
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def count_mp4_frames(path: Path) -> int | None:
    """Video packets actually present in the file (a truncated file has fewer); None without PyAV.

    Raises OSError/ValueError (PyAV's errors derive from them) when the file is not a readable mp4.
    """
    try:
        import av
    except ImportError:
        return None
    with av.open(str(path)) as container:
        if not container.streams.video:
            return 0
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder: its renames need no fsync of one
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("could not fsync %s", directory, exc_info=True)
    finally:
        os.close(fd)


class OutputStore:
    """The outputs folder: one `<stem>.mp4` and `<stem>.json` per finished job."""

    def __init__(self, root: Path, writer: Mp4Writer | None = None):
        self.root = Path(root)
        # Injectable so that tests (and the fake backend's fault switches) can simulate a full disk.
        self.writer: Mp4Writer = writer or write_mp4
        self._lock: Any = None  # the open lock file while this process owns the folder

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(self.root / "x", exc) from None

    def claim(self) -> None:
        """Take the folder for this process until it exits; call before `clean_leftovers`.

        A second app on the same folder would delete the first one's video while it is being
        written (its temp file looks like a leftover) and mark its running job interrupted. The
        lock is the operating system's, so a killed app never leaves a stale one behind."""
        if self._lock is not None:
            return
        path = self.root / LOCK_NAME
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the process's life
        except OSError as exc:
            raise _disk_error(path, exc) from None
        try:
            locked = _try_lock(handle)
        except OSError as exc:
            handle.close()
            raise _disk_error(path, exc) from None
        if not locked:
            try:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
            except OSError:
                holder = "unknown"
            handle.close()
            raise OutputsInUse(
                f"Another Wan T2V Studio is already using the outputs folder {self.root.resolve()} ({holder}). "
                f"Stop it first, or give this one a folder of its own with --outputs-dir.")
        try:  # who holds it, for the message a second app shows; the lock works without it
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
        except OSError as exc:
            log.warning("could not write %s: %s", path, exc)
        self._lock = handle

    def new_stem(self, job_id: int, preset: str, seed: int) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe_preset = re.sub(r"[^A-Za-z0-9_-]", "_", preset)
        return f"{stamp}_job{job_id:05d}_{safe_preset}_seed{seed}"

    def save(self, stem: str, frames: np.ndarray, fps: int, record: dict[str, Any],
             latents: Any = None) -> tuple[Path, Path]:
        """Write video, record and (when given) the final latents atomically; return the video's
        and the record's final paths. Raises OutputError."""
        self.ensure()
        video = self.root / f"{stem}.mp4"
        sidecar = self.root / f"{stem}.json"
        kept = self.root / f"{stem}{LATENTS_SUFFIX}"
        tmp_video = self.root / f".{stem}{PARTIAL_MARK}.mp4"
        tmp_sidecar = self.root / f".{stem}{PARTIAL_MARK}.json"
        tmp_kept = self.root / f".{stem}{PARTIAL_MARK}{LATENTS_SUFFIX}"
        record = dict(record, video=video.name)
        if latents is not None:
            record["latents"] = kept.name
        comment = json.dumps(record, separators=(",", ":"), default=str)
        try:
            started = time.perf_counter()
            self.writer(frames, fps, tmp_video, comment)
            encode_s = time.perf_counter() - started
            self._verify(tmp_video, len(frames), video)
            if isinstance(record.get("timings_s"), dict):
                # The copy inside the mp4 cannot know how long its own encode took; the sidecar can.
                record = dict(record, timings_s=dict(record["timings_s"], **{"writing mp4": round(encode_s, 3)}))
            # A kill or power cut after the rename must not leave a name pointing at lost data.
            _fsync_file(tmp_video)
            with open(tmp_sidecar, "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=2, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            # The sidecar and the latents land first: a video is only ever visible with its
            # record (and its latents) beside it.
            if latents is not None:
                write_latents(latents, tmp_kept, {"job_id": str(record.get("job_id")), "video": video.name})
                os.replace(tmp_kept, kept)
            os.replace(tmp_sidecar, sidecar)
            os.replace(tmp_video, video)
            _fsync_dir(self.root)
        except Exception as exc:  # noqa: BLE001 - any failure must remove the partial files first
            for leftover in (tmp_video, tmp_sidecar, tmp_kept):
                leftover.unlink(missing_ok=True)
            if not video.exists():
                sidecar.unlink(missing_ok=True)
                if latents is not None:
                    kept.unlink(missing_ok=True)
            if isinstance(exc, OutputError):
                raise
            log.warning("saving %s failed", video.name, exc_info=exc)
            # The encoder's own errors (a broken pipe, a RuntimeError) hide ENOSPC; free space tells.
            if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or self._disk_nearly_full():
                raise _disk_full(video) from None
            if isinstance(exc, OSError):
                raise _disk_error(video, exc) from None
            raise
        return video, sidecar

    def _disk_nearly_full(self) -> bool:
        try:
            return shutil.disk_usage(self.root).free < DISK_FULL_FREE_BYTES
        except OSError:
            return False

    def _verify(self, tmp_video: Path, expected_frames: int, video: Path) -> None:
        """Refuse to publish an mp4 the encoder left short: a full disk makes ffmpeg stop quietly."""
        try:
            found = count_mp4_frames(tmp_video)
        except (OSError, ValueError):
            found = 0
        if found is None:  # no PyAV: at least the file must not be empty
            found = expected_frames if tmp_video.exists() and tmp_video.stat().st_size else 0
        if found == expected_frames:
            return
        if self._disk_nearly_full():
            raise _disk_full(video)
        raise OutputError(f"Writing {video.name} failed: the encoder produced {found} of "
                          f"{expected_frames} frames. Nothing was saved; see the terminal log.")

    def thumbnail(self, video: Path, size: int = 320) -> Path | None:
        """A JPEG of the clip's first frame for the history gallery, made once and kept beside the
        videos. None when it cannot be made (no PyAV/Pillow, unreadable clip): show the video."""
        video = Path(video)
        thumb = self.root / THUMBS_DIR / f"{video.stem}.jpg"
        if thumb.exists():
            return thumb
        tmp = thumb.with_name(f".{thumb.stem}{PARTIAL_MARK}.jpg")
        try:
            import av

            with av.open(str(video)) as container:
                image = next(container.decode(video=0)).to_image()
            image.thumbnail((size, size))
            thumb.parent.mkdir(exist_ok=True)
            image.save(tmp, "JPEG", quality=85)
            os.replace(tmp, thumb)
        except Exception as exc:  # noqa: BLE001 - PyAV/Pillow errors of any kind: show the video
            log.debug("no thumbnail for %s: %s", video.name, exc)
            tmp.unlink(missing_ok=True)
            return None
        return thumb

    # -- kept latents ---------------------------------------------------------------------------

    @staticmethod
    def latents_of(video: Path | str) -> Path:
        video = Path(video)
        return video.with_name(video.stem + LATENTS_SUFFIX)

    def finishable_record(self, job_id: int, video: str, record_path: str | None) -> dict[str, Any]:
        """The record of finished clip #`job_id` when the clip, its record and its latents are all on
        disk (what "Finish at full quality" needs), else InvalidRequest / LatentsError saying which."""
        if not Path(video).exists():
            raise InvalidRequest(f"Clip #{job_id} is no longer on disk.")
        record = read_record(record_path)
        if record is None:
            raise LatentsError(f"The record of clip #{job_id} cannot be read, so the settings "
                               f"to decode it with are unknown; nothing was changed.")
        if not self.latents_of(video).is_file():
            self.load_latents(video, job_id)  # it words the missing file
        return record

    def load_latents(self, video: Path | str, job_id: int | None = None) -> Any:
        """The final latents kept beside `video`. Raises LatentsError (missing, unreadable,
        truncated, not ours) with a message that says nothing was lost."""
        path = self.latents_of(video)
        which = f"#{job_id}" if job_id is not None else Path(video).name
        if not path.is_file():
            raise LatentsError(f"The latents of clip {which} are not on disk ({path.name} is missing), "
                               f"so it cannot be finished at full quality. The clip and its record "
                               f"are untouched; generate it again with the same seed instead.")
        from safetensors import SafetensorError

        try:
            return read_latents(path)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise LatentsError(f"The latents of clip {which} ({path.name}) cannot be read "
                               f"({type(exc).__name__}: {str(exc)[:120]}); the file is damaged. The "
                               f"clip and its record are untouched; generate it again with the same "
                               f"seed instead.") from None

    def remove(self, video: Path | str) -> list[Path]:
        """Delete a clip and everything kept with it: record, latents, thumbnail."""
        video = Path(video)
        removed = []
        for path in (video, video.with_suffix(".json"), self.latents_of(video),
                     self.root / THUMBS_DIR / f"{video.stem}.jpg"):
            if path.exists():
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # -- previews during a run --------------------------------------------------------------------

    def write_preview(self, name: str, frames: np.ndarray, fps: float) -> Path | None:
        """An animated GIF of small uint8 frames [T, h, w, 3] in the hidden previews folder; the
        oldest beyond PREVIEWS_KEPT are removed. None when it cannot be written: a preview is a
        convenience and must never fail a run."""
        folder = self.root / PREVIEWS_DIR
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
        path = folder / f"{safe}.gif"
        tmp = folder / f".{safe}{PARTIAL_MARK}.gif"
        try:
            from PIL import Image

            folder.mkdir(parents=True, exist_ok=True)
            images = [Image.fromarray(frame) for frame in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=max(20, int(round(1000 / max(fps, 0.1)))), loop=0)
            os.replace(tmp, path)
            for old in sorted((p for p in folder.glob("*.gif") if not p.name.startswith(".")),
                              key=lambda p: p.stat().st_mtime)[:-PREVIEWS_KEPT]:
                old.unlink(missing_ok=True)
        except Exception as exc:  # noqa: BLE001 - Pillow/disk errors of any kind: no preview
            log.warning("could not write the preview %s: %s", path.name, exc)
            tmp.unlink(missing_ok=True)
            return None
        return path

    def find_saved(self, job_id: int) -> tuple[Path, Path, dict[str, Any]] | None:
        """The published video and record of `job_id`, if `save` got that far."""
        for sidecar in self.root.glob(f"*_job{job_id:05d}_*.json"):
            video, record = sidecar.with_suffix(".mp4"), read_record(sidecar)
            if record is not None and video.exists() and record.get("job_id") == job_id:
                return video, sidecar, record
        return None

    def clean_leftovers(self) -> list[Path]:
        """Remove temp files left by a kill mid-write, and records whose video never landed."""
        if not self.root.is_dir():
            return []
        removed = []
        for path in [*self.root.glob(f".*{PARTIAL_MARK}*"),
                     *(self.root / THUMBS_DIR).glob(f".*{PARTIAL_MARK}*")]:
            path.unlink(missing_ok=True)
            removed.append(path)
        for sidecar in self.root.glob("*.json"):
            video = sidecar.with_suffix(".mp4")
            # Only our own records (save() names the video in them): the folder may hold the
            # user's files too.
            if not video.exists() and (read_record(sidecar) or {}).get("video") == video.name:
                sidecar.unlink(missing_ok=True)
                removed.append(sidecar)
        for kept in self.root.glob(f"*_job*{LATENTS_SUFFIX}"):
            # Latents land before their video: a kill in between leaves them alone.
            if not kept.with_name(kept.name[:-len(LATENTS_SUFFIX)] + ".mp4").exists():
                kept.unlink(missing_ok=True)
                removed.append(kept)
        previews = self.root / PREVIEWS_DIR
        if previews.is_dir():  # last session's previews: nothing shows them any more
            shutil.rmtree(previews, ignore_errors=True)
        if removed:
            log.info("removed %d leftover file(s) from an interrupted run", len(removed))
        return removed


# Windows locks are mandatory: lock one byte far past the holder's text, so others can read it.
_WINDOWS_LOCK_OFFSET = 1 << 20
# Network and FUSE file systems may have no locks at all: run unlocked there, as before locks existed.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EINVAL,
             errno.ENOSYS}


def _try_lock(handle: Any) -> bool:
    """An exclusive, non-blocking lock on an open file; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            handle.seek(_WINDOWS_LOCK_OFFSET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
        log.warning("the file system of %s has no file locks (%s): nothing stops a second app from "
                    "using this outputs folder at the same time", handle.name, exc.strerror)
    return True


def write_latents(latents: Any, path: Path, metadata: dict[str, str]) -> None:
    """Save one latents array exactly as it is (dtype included) and fsync it. Torch tensors are
    written with safetensors' torch API (bfloat16 has no numpy type), numpy arrays with its numpy
    API; the file says which, so `read_latents` hands back the same kind."""
    if isinstance(latents, np.ndarray):
        from safetensors.numpy import save_file

        save_file({"latents": np.ascontiguousarray(latents)}, str(path), metadata=dict(metadata, kind="numpy"))
    else:
        from safetensors.torch import save_file

        save_file({"latents": latents.detach().to("cpu").contiguous()}, str(path),
                  metadata=dict(metadata, kind="torch"))
    _fsync_file(path)


def read_latents(path: Path) -> Any:
    """Raises OSError/ValueError/KeyError/safetensors.SafetensorError on a file that is not a
    complete latents file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        kind = (handle.metadata() or {}).get("kind")
    if kind not in ("numpy", "torch"):
        raise ValueError(f"{path.name} is not a latents file of this app")
    if kind == "numpy":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    return load_file(str(path))["latents"]


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
    try:
        record = json.loads(comment) if comment else None
    except ValueError:  # a comment written by another tool
        return None
    return record if isinstance(record, dict) else None
