"""Weights manager: fetch exactly what the INT8 path needs from the Hub, resume, verify before loading.

Where files go is pipeline/layout.py's rule (the same one the backend and the doctor use). The Hub work is
huggingface_hub's public API: `HfApi.list_repo_tree` lists the repository at one pinned commit with sizes
and checksums (LFS sha256, git blob ids), `get_hf_file_metadata` says where a file is served from and
whether it is Xet-backed, and `hf_hub_download` fetches it (through hf_xet when installed). Every file is
checked against the Hub's checksum before it is moved into place and recorded in `.wan-studio/manifest.json`,
which `verify()` reads.

Our own transfer code exists for one case only, because the library provably lacks it: resuming a
plain-HTTP file after the app was closed or killed. huggingface_hub 1.x downloads into a process-unique
`<name>.<uuid>.incomplete` file and deletes it when the call fails (`_download_to_tmp_and_move`), so a half
done 6.7 GB T5 file would start again from zero; hf_xet writes into that same temporary file, and its chunk
cache (HF_XET_CHUNK_CACHE_SIZE_BYTES) is not something we can count on being on. So plain-HTTP files of at
least RESUMABLE_MIN_BYTES are streamed with the library's HTTP session (`get_session`) into a partial file
under `.wan-studio/parts/` that survives the process, continued with a Range request. Xet-backed files, and
small files whose loss costs nothing, go through `hf_hub_download`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from install.filecheck import (ContentHash, check_safetensors, check_torch_zip, hash_file, read_json,
                               structure_problem)
from install.progress import (DownloadPhase, DownloadProgress, RateMeter, TerminalProgress, format_bytes,
                              format_eta, format_rate)
from pipeline import layout
from pipeline.errors import WeightsError

__all__ = ["DownloadPhase", "DownloadProgress", "format_bytes", "format_eta", "format_rate", "check_safetensors",
           "check_torch_zip", "verify", "download_weights", "iter_download", "download_tiny_vae"]

log = logging.getLogger(__name__)

REPO_ID = "lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
TOKENIZER_FALLBACK_REPO_ID = "Wan-AI/Wan2.1-T2V-14B"
# Where a Wan 2.1 tiny VAE is published: LightX2V's own autoencoders, then the taehv author's.
TINY_VAE_REPO_IDS = ("lightx2v/Autoencoders", "madebyollin/taehv")
DEFAULT_WEIGHTS_DIR = Path("weights") / "Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
WEIGHTS_DIR_ENV = "WAN_STUDIO_WEIGHTS_DIR"  # app.py reads these too, so every command looks in one place
OUTPUTS_DIR_ENV = "WAN_STUDIO_OUTPUTS_DIR"
DEFAULT_ENDPOINT = "https://huggingface.co"
# Measured on the real repository: 40 blocks x 0.352 GB, non_block 0.931 GB, T5 6.733 GB, VAE 0.508 GB.
APPROX_TOTAL_BYTES = int(40 * 0.352e9 + 0.931e9 + 6.733e9 + 0.508e9)
STATE_DIR = ".wan-studio"
MANIFEST_NAME = "manifest.json"
DISK_MARGIN_BYTES = 256 * 1024**2  # filesystems misreport a little; the manifest is written last
RESUMABLE_MIN_BYTES = 16 * 1024**2  # smaller plain-HTTP files are cheap to fetch again
CHUNK_BYTES = 1024**2
RETRIES = 5


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
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes


class WeightsCorrupt(WeightsError):
    """A file is truncated, does not parse, or does not match the checksum published on the Hub."""


class WeightsIncomplete(WeightsError):
    """Files are missing locally (for example in offline mode)."""


class WeightsDirNotWritable(WeightsError):
    """The weights folder cannot be created or written to."""


class DownloadCancelled(WeightsError):
    """The user stopped the download; finished files and the partial file are kept for the next run."""


# --------------------------------------------------------------------------------------------- verify


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
    layout: layout.WeightsLayout | None

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
        fix = "Run python app.py download (or Download weights in the System tab); it fetches only what is " \
              "missing or damaged."
        kind = WeightsIncomplete if all(p.kind == "missing" for p in self.problems) else WeightsCorrupt
        raise kind(f"{self.summary()}\n{fix}")


def _manifest(root: Path) -> dict[str, Any] | None:
    data, err = read_json(root / STATE_DIR / MANIFEST_NAME)
    return data if err is None and isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def verify(weights_dir: Path | str, *, deep: bool = False) -> VerifyReport:
    """Check that every file the INT8 path opens is present and sound. Never raises.

    Quick (default, seconds): the layout rule, sizes from the download record, safetensors headers, torch
    zip directories, JSON. `deep`: also hashes every recorded file against the Hub checksum (reads ~22 GB),
    or CRC-checks the .pth members of a folder without a record.
    """
    root = Path(weights_dir).expanduser()
    problems: list[VerifyProblem] = []
    checked: list[tuple[str, int]] = []
    found = None
    try:
        if not root.is_dir():
            problems.append(VerifyProblem(".", "missing", f"folder {root} does not exist"))
        elif root.name == layout.DIT_DIR and (root / "non_block.safetensors").exists():
            problems.append(VerifyProblem(".", "layout", f"this is the {layout.DIT_DIR} folder itself; point "
                                                         f"the weights folder at its parent ({root.parent})"))
        else:
            found = _verify(root, deep, problems, checked)
    except OSError as exc:  # a folder we may not list; per-file read errors are reported per file
        problems.append(VerifyProblem(".", "unreadable", f"cannot be read ({exc.strerror or exc})"))
    return VerifyReport(root, tuple(problems), len(checked), sum(s for _, s in checked), _manifest(root) is not None
                        if root.is_dir() else False, deep, found if not problems else None)


def _verify(root: Path, deep: bool, problems: list[VerifyProblem], checked: list[tuple[str, int]]
            ) -> layout.WeightsLayout | None:
    manifest = _manifest(root)
    recorded: dict[str, dict[str, Any]] = manifest["files"] if manifest else {}
    config, used, bad = layout.read_config(root)
    problems += [VerifyProblem(rel, "corrupt", why) for rel, why in bad]
    if used and (err := layout.config_problem(config)):
        problems.append(VerifyProblem(used[-1], "corrupt", err))
    layers = config.get("num_layers") if not problems else 0
    res = layout.resolve(lambda r: (root / r).is_file(), layers if isinstance(layers, int) else 0)
    problems += [VerifyProblem(m.split(" ", 1)[0], "missing", f"missing: {m}") for m in res.missing]
    for rel in dict.fromkeys([*res.files, *recorded, *([res.tiny_vae] if res.tiny_vae else [])]):
        path, want = root / rel, recorded.get(rel, {})
        if not path.is_file():
            problems.append(VerifyProblem(rel, "missing", "missing (recorded by the download)"))
            continue
        size = path.stat().st_size
        if isinstance(want.get("size"), int) and want["size"] != size:
            problems.append(VerifyProblem(rel, "size", f"is {format_bytes(size)}, the Hub file is "
                            f"{format_bytes(want['size'])} ({'truncated' if size < want['size'] else 'wrong file'})"))
            continue
        checked.append((rel, size))
        if err := structure_problem(path, deep=deep and not want):
            problems.append(VerifyProblem(rel, "corrupt", err))
        elif deep and want.get("hash") and hash_file(path, want["hash_kind"], size).hexdigest() != want["hash"]:
            problems.append(VerifyProblem(rel, "corrupt", "content does not match the Hub checksum (file is corrupt)"))
    if problems:
        return None
    try:
        return layout.locate(root)
    except WeightsError as exc:
        problems.append(VerifyProblem(".", "layout", str(exc)))
        return None


# --------------------------------------------------------------------------------------------- Hub


@dataclass(frozen=True)
class PlannedFile:
    repo_id: str
    revision: str  # a commit sha, so every file comes from the same snapshot
    path: str  # in the repo and, relative to the weights folder, on disk
    size: int
    hash_kind: str | None  # "sha256" | "git-sha1" | None (Xet-only entry: size check only)
    hash: str | None

    def record(self) -> dict[str, Any]:
        return {"size": self.size, "hash_kind": self.hash_kind, "hash": self.hash, "repo_id": self.repo_id,
                "revision": self.revision}


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx in 1.x, httpx2 in 2.x)."""
    found = []
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
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WeightsDiskFull(f"The disk filled up while writing {what}. Free some space (or choose another "
                               "--weights-dir) and run the download again: it resumes where it stopped.",
                               needed_bytes=0, free_bytes=None)
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WeightsDirNotWritable(f"Cannot write {what} ({exc.strerror}). Fix the folder's permissions.")
    if isinstance(exc, OfflineModeIsEnabled):
        return WeightsIncomplete(f"Offline mode (HF_HUB_OFFLINE) is on, so {what} cannot be fetched.")
    if isinstance(exc, GatedRepoError):
        return WeightsRepoNotFound(f"{what}: the repository needs you to log in and accept its terms "
                                   "(hf auth login).")
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


def _open_part(path: Path) -> BinaryIO:
    """Append mode: a resumed transfer continues at the end of what an earlier run wrote."""
    return path.open("ab")


def _ensure_writable(weights_dir: Path) -> Path:
    if weights_dir.exists() and not weights_dir.is_dir():
        raise WeightsDirNotWritable(f"{weights_dir} is a file, not a folder. Pass a folder with --weights-dir PATH.")
    try:
        state = weights_dir / STATE_DIR
        (state / "parts").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state, prefix="write-test-"):
            pass
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WeightsDiskFull(f"The disk holding {weights_dir} is full ({exc.strerror}).", needed_bytes=0,
                                  free_bytes=0) from exc
        raise WeightsDirNotWritable(f"Cannot write to the weights folder {weights_dir} ({exc.strerror or exc}). "
                                    "Choose a folder you own with --weights-dir PATH, or fix its permissions.") from exc
    return state


class _Downloader:
    def __init__(self, root: Path, *, endpoint: str, token: str | bool | None, rehash: bool,
                 on_progress: Callable[[DownloadProgress], None] | None, cancel: threading.Event,
                 disk_free: Callable[[Path], int], opener: Callable[[Path], BinaryIO]):
        self.root, self.endpoint, self.token, self.rehash = root, endpoint, token, rehash
        self._emit_cb, self.cancel, self.disk_free, self.opener = on_progress, cancel, disk_free, opener
        self.meter = RateMeter()
        self.bytes_total = self.bytes_present = 0  # complete files plus partial bytes, for the overall bar
        manifest = _manifest(root) or {}
        self.recorded: dict[str, Any] = dict(manifest.get("files", {}))

    def emit(self, phase: DownloadPhase, message: str = "", **kw: Any) -> None:
        if self._emit_cb is not None:
            rate = self.meter.rate()
            eta = max(0, self.bytes_total - self.bytes_present) / rate if rate else None
            self._emit_cb(DownloadProgress(phase, message, bytes_done=self.bytes_present,
                                           bytes_total=self.bytes_total, rate_bps=rate, eta_s=eta, **kw))

    def api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token, library_name="wan-t2v-studio")

    def pin(self, repo_id: str, revision: str | None, *, quick: bool) -> str:
        """The commit `revision` points at, so every file comes from one snapshot. One HEAD without retries
        when `quick`, so a machine without network gets its answer in seconds."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import RemoteEntryNotFoundError

        url = hf_hub_url(repo_id, ".gitattributes", revision=revision or "main", endpoint=self.endpoint)
        try:
            commit = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint,
                                          retry_on_errors=not quick).commit_hash
        except RemoteEntryNotFoundError as exc:  # no .gitattributes: the 404 still names the commit
            commit = exc.response.headers.get("X-Repo-Commit") if exc.response is not None else None
            try:
                commit = commit or self.api().model_info(repo_id, revision=revision).sha
            except Exception as inner:  # noqa: BLE001 - mapped to a user message
                raise _map_hub_error(inner, f"Repository {repo_id}", self.endpoint) from inner
        except Exception as exc:  # noqa: BLE001 - mapped to a user message
            raise _map_hub_error(exc, f"Repository {repo_id}", self.endpoint) from exc
        if not commit:
            raise WeightsNetworkError(f"{self.endpoint} answered, but not like a Hugging Face Hub (no "
                                      "X-Repo-Commit header). Check HF_ENDPOINT / --endpoint.")
        return commit

    def listing(self, repo_id: str, commit: str, under: str | None = None) -> dict[str, PlannedFile]:
        from huggingface_hub import RepoFile
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            items = self.api().list_repo_tree(repo_id, path_in_repo=under, recursive=True, revision=commit)
            out = {}
            for item in items:
                if isinstance(item, RepoFile):
                    sha = getattr(item.lfs, "sha256", None) if item.lfs else None
                    kind, digest = ("sha256", sha) if sha else ("git-sha1", item.blob_id) if not item.lfs else (None, None)
                    out[item.path] = PlannedFile(repo_id, commit, item.path, int(item.size), kind, digest)
            return out
        except RemoteEntryNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001 - mapped to a user message
            raise _map_hub_error(exc, f"Listing {repo_id}", self.endpoint) from exc

    def is_current(self, pf: PlannedFile) -> bool:
        """Whether the file on disk can be kept: right size and structure, and recorded at this checksum by an
        earlier run (as hf_hub_download trusts etags), else hashed once against the Hub's checksum."""
        dest = self.root / pf.path
        if not dest.is_file() or dest.stat().st_size != pf.size or structure_problem(dest) is not None:
            return False
        entry = self.recorded.get(pf.path) or {}
        if not self.rehash and entry.get("hash") == pf.hash and entry.get("size") == pf.size:
            return True
        return not pf.hash or hash_file(dest, pf.hash_kind or "sha256", pf.size).hexdigest() == pf.hash

    def part_path(self, pf: PlannedFile) -> Path:
        return self.root / STATE_DIR / "parts" / f"{pf.path}.{(pf.hash or pf.revision)[:16]}.part"

    def fetch(self, pf: PlannedFile, index: int, count: int) -> int:
        """One file, checked against the Hub checksum, moved into place. Returns the bytes transferred."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(pf.repo_id, pf.path, revision=pf.revision, endpoint=self.endpoint)
        what = f"{pf.repo_id}/{pf.path}"
        resumed = self.part_path(pf).exists()
        for attempt in (1, 2):
            try:
                meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint, retry_on_errors=True)
                via_library = (meta.xet_file_data is not None and importlib.util.find_spec("hf_xet") is not None
                               ) or pf.size < RESUMABLE_MIN_BYTES
                part, sent = (self._via_library(pf, index, count) if via_library
                              else self._resumable(pf, meta.location or url, url, index, count))
            except OSError as exc:
                raise self._disk_error(exc, pf.path) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
                    _map_hub_error(exc, what, self.endpoint) from exc
            except Exception as exc:  # noqa: BLE001 - mapped to a user message
                raise _map_hub_error(exc, what, self.endpoint) from exc
            if not pf.hash or hash_file(part, pf.hash_kind or "sha256", pf.size).hexdigest() == pf.hash:
                break
            part.unlink(missing_ok=True)
            self.bytes_present -= pf.size
            if not resumed or attempt == 2:
                raise WeightsCorrupt(f"{pf.path} arrived damaged: its checksum does not match the Hub's. The bad "
                                     "copy was deleted; run the download again. If it keeps happening, a proxy or "
                                     "mirror is altering it.")
            # A partial file from an earlier run held bad bytes (a crash mid-write, a disk error): start it over.
            log.warning("%s: the partial file from an earlier run was damaged; fetching it again", pf.path)
        dest = self.root / pf.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
        self.recorded[pf.path] = pf.record()
        self._write_manifest()
        return sent

    def _progress(self, pf: PlannedFile, index: int, count: int, file_done: int, n: int) -> None:
        self.bytes_present += n
        self.meter.add(n)
        self.emit(DownloadPhase.DOWNLOADING, file=pf.path, file_index=index, file_count=count,
                  file_bytes_done=file_done, file_bytes_total=pf.size)

    def _via_library(self, pf: PlannedFile, index: int, count: int) -> tuple[Path, int]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import tqdm as hf_tqdm

        outer, done = self, [0]

        class Bar(hf_tqdm):  # the library's progress hook: our events instead of a terminal bar
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **{**kwargs, "disable": True})

            def update(self, n: float | None = 1) -> bool | None:
                if outer.cancel.is_set():
                    raise DownloadCancelled("Download stopped.")
                done[0] += int(n or 0)
                outer._progress(pf, index, count, done[0], int(n or 0))
                return None

        staging = self.root / STATE_DIR / "hub"  # the library's local_dir; moved into place once checked
        path = hf_hub_download(pf.repo_id, pf.path, revision=pf.revision, endpoint=self.endpoint, token=self.token,
                               local_dir=staging, force_download=True, tqdm_class=Bar)
        return Path(path), done[0]

    def _resumable(self, pf: PlannedFile, location: str, hub_url: str, index: int, count: int) -> tuple[Path, int]:
        """Stream into a partial file that outlives the process, continuing it with a Range request."""
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        part = self.part_path(pf)
        part.parent.mkdir(parents=True, exist_ok=True)
        for stale in part.parent.glob(f"{Path(pf.path).name}.*.part"):
            if stale != part:  # an older version of this file: its bytes cannot be continued
                stale.unlink(missing_ok=True)
        headers = build_hf_headers(token=self.token, library_name="wan-t2v-studio")
        if urlparse(location).netloc != urlparse(hub_url).netloc:
            headers.pop("authorization", None)  # the Hub redirects LFS files to a CDN: the token stays home
        sent, attempt = 0, 0
        while (done := part.stat().st_size if part.exists() else 0) < pf.size:
            attempt += 1
            if done > pf.size:  # not a prefix of this file (counted as pf.size when planning)
                part.unlink()
                self.bytes_present -= pf.size
                continue
            if done:
                log.info("resuming %s at %s of %s", pf.path, format_bytes(done), format_bytes(pf.size))
            try:
                with get_session().stream("GET", location, headers={**headers, "Range": f"bytes={done}-"} if done
                                          else headers, follow_redirects=True, timeout=30) as response:
                    hf_raise_for_status(response)
                    if done and response.status_code == 200:  # the server ignored Range: start the file again
                        part.unlink()
                        self.bytes_present -= done
                        done = 0
                    with self.opener(part) as raw:
                        for chunk in response.iter_bytes(CHUNK_BYTES):
                            if self.cancel.is_set():
                                raise DownloadCancelled("Download stopped.")
                            raw.write(chunk)
                            raw.flush()  # what is on disk is what the next run continues from
                            done, sent = done + len(chunk), sent + len(chunk)
                            self._progress(pf, index, count, done, len(chunk))
            except _transport_errors() as exc:
                if attempt >= RETRIES:
                    raise
                log.warning("%s: connection broke (%s); resuming", pf.path, exc)
                time.sleep(0.2 * attempt)
        return part, sent

    def _disk_error(self, exc: OSError, rel: str) -> WeightsDiskFull:
        try:
            free: int | None = self.disk_free(self.root)
        except OSError:
            free = None
        needed = max(0, self.bytes_total - self.bytes_present)
        return WeightsDiskFull(
            f"The disk filled up while writing {rel}. About {format_bytes(needed)} more is needed"
            f"{'' if free is None else f'; {format_bytes(free)} is free'}. Free some space (or choose another "
            "--weights-dir) and run the download again: it resumes where it stopped, finished files are kept.",
            needed_bytes=needed, free_bytes=free)

    def _write_manifest(self) -> None:
        target = self.root / STATE_DIR / MANIFEST_NAME
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"endpoint": self.endpoint, "files": self.recorded}, indent=1, sort_keys=True))
            os.replace(tmp, target)
        except OSError as exc:
            raise self._disk_error(exc, f"{STATE_DIR}/{MANIFEST_NAME}") if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                else WeightsDirNotWritable(f"Cannot write {target} ({exc.strerror}).") from exc

    def run(self, plan: Callable[[], list[PlannedFile]]) -> tuple[int, int]:
        """Plan under the folder's lock, check what is there, fetch the rest. Returns (files, bytes) fetched."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(_ensure_writable(self.root) / "download.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            raise WeightsError(f"Another download into {self.root} is already running. Wait for it to finish, "
                               "or stop it first.") from exc
        try:
            files = plan()
            self.bytes_total, self.bytes_present = sum(pf.size for pf in files), 0  # the configs count below
            to_fetch = []
            for i, pf in enumerate(files, 1):
                if self.cancel.is_set():
                    raise DownloadCancelled("Download stopped.")
                self.emit(DownloadPhase.CHECKING, pf.path, file=pf.path, file_index=i, file_count=len(files))
                if self.is_current(pf):
                    self.bytes_present += pf.size
                    self.recorded[pf.path] = pf.record()
                else:
                    to_fetch.append(pf)
                    part = self.part_path(pf)
                    self.bytes_present += min(part.stat().st_size, pf.size) if part.exists() else 0
            self._write_manifest()
            needed = self.bytes_total - self.bytes_present + DISK_MARGIN_BYTES
            if to_fetch and (free := self.disk_free(self.root)) < needed:
                raise WeightsDiskFull(
                    f"Not enough disk space for the weights: {format_bytes(needed)} is needed in {self.root}, but "
                    f"only {format_bytes(free)} is free. Free some space, or choose a folder on another disk with "
                    "--weights-dir PATH.", needed_bytes=needed, free_bytes=free)
            sent = 0
            for i, pf in enumerate(to_fetch, 1):
                if self.cancel.is_set():
                    raise DownloadCancelled("Download stopped.")
                sent += self.fetch(pf, i, len(to_fetch))
            return len(to_fetch), sent
        finally:
            lock.release()


# --------------------------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class DownloadResult:
    weights_dir: Path
    commit: str | None
    files_downloaded: int
    bytes_downloaded: int
    report: VerifyReport


def _plan_model(d: _Downloader, repo_id: str, revision: str | None) -> tuple[str, Callable[[], list[PlannedFile]]]:
    d.emit(DownloadPhase.CONNECTING, f"{d.endpoint}/{repo_id}")
    commit = d.pin(repo_id, revision, quick=True)

    def plan() -> list[PlannedFile]:
        listed = d.listing(repo_id, commit)
        tokenizer = layout.tokenizer_files(listed.__contains__)
        if not tokenizer:
            wan = d.pin(TOKENIZER_FALLBACK_REPO_ID, None, quick=False)
            wan_listed = d.listing(TOKENIZER_FALLBACK_REPO_ID, wan, layout.TOKENIZER_DIR)
            if tok := layout.tokenizer_files(wan_listed.__contains__):
                log.info("%s has no tokenizer; taking it from %s", repo_id, TOKENIZER_FALLBACK_REPO_ID)
                listed.update({p: wan_listed[p] for p in tok})
        configs = layout.config_paths(listed.__contains__)
        for rel in configs:  # the block count is in the (tiny) configs, so they come first
            if not d.is_current(listed[rel]):
                d.fetch(listed[rel], 0, 0)
        config, _, bad = layout.read_config(d.root)
        layers = config.get("num_layers") if configs and not bad and not layout.config_problem(config) else None
        if configs and layers is None:
            raise WeightsCorrupt(f"The config from {repo_id} is unusable: "
                                 f"{bad[0][1] if bad else layout.config_problem(config)}.")
        res = layout.resolve(listed.__contains__, layers or 0)
        if res.missing:
            shown = "; ".join(res.missing[:6])
            raise WeightsFileMissing(f"The repository {repo_id} (commit {commit[:10]}) lacks files the INT8 path "
                                     f"needs: {shown}. Its layout may have changed; check the repository page, or "
                                     "try an older --revision.")
        # Forget files an older snapshot needed and this one does not, so verify() stops expecting them.
        d.recorded = {rel: e for rel, e in d.recorded.items() if rel in res.files or rel == res.tiny_vae}
        return [listed[rel] for rel in res.files]

    return commit, plan


def download_weights(weights_dir: Path | str = DEFAULT_WEIGHTS_DIR, *, repo_id: str = REPO_ID,
                     revision: str | None = None, endpoint: str | None = None, token: str | bool | None = None,
                     on_progress: Callable[[DownloadProgress], None] | None = None,
                     cancel: threading.Event | None = None, disk_free: Callable[[Path], int] = free_disk_bytes,
                     opener: Callable[[Path], BinaryIO] = _open_part, rehash: bool = False) -> DownloadResult:
    """Fetch what the INT8 path needs into `weights_dir`, resuming earlier partial work, then verify.

    Files already there are kept when size and structure are right and an earlier run recorded them at the
    Hub's checksum; `rehash` re-reads them all against the checksums instead. Raises a `WeightsError` with a
    user-facing message on every expected failure. With HF_HUB_OFFLINE set it touches no network.
    """
    root = Path(weights_dir).expanduser()
    if _is_offline():
        report = verify(root)
        if not report.ok:
            raise WeightsIncomplete(f"Offline mode (HF_HUB_OFFLINE) is on and the weights are not complete.\n"
                                    f"{report.summary()}\nUnset HF_HUB_OFFLINE to download them, or copy a finished "
                                    "download there and pass --weights-dir PATH.")
        if on_progress is not None:
            on_progress(DownloadProgress(DownloadPhase.DONE, f"offline mode: {report.summary()}",
                                         bytes_done=report.bytes_checked, bytes_total=report.bytes_checked))
        return DownloadResult(root, None, 0, 0, report)
    d = _Downloader(root, endpoint=resolve_endpoint(endpoint), token=token, rehash=rehash, on_progress=on_progress,
                    cancel=cancel or threading.Event(), disk_free=disk_free, opener=opener)
    commit, plan = _plan_model(d, repo_id, revision)
    files, sent = d.run(plan)
    d.emit(DownloadPhase.VERIFYING, "checking every file")
    report = verify(root)
    if not report.ok:
        raise WeightsCorrupt(f"The download finished but the check failed.\n{report.summary()}")
    d.emit(DownloadPhase.DONE, report.summary())
    return DownloadResult(root, commit, files, sent, report)


def download_tiny_vae(weights_dir: Path | str = DEFAULT_WEIGHTS_DIR, *, repo_ids: tuple[str, ...] = TINY_VAE_REPO_IDS,
                      endpoint: str | None = None, token: str | bool | None = None,
                      on_progress: Callable[[DownloadProgress], None] | None = None,
                      cancel: threading.Event | None = None) -> Path:
    """The optional Wan 2.1 tiny VAE (draft decode, better previews), verified, where the layout rule finds
    it. The source repositories are listed now, not assumed: the first that holds a known tiny-VAE name wins."""
    root = Path(weights_dir).expanduser()
    d = _Downloader(root, endpoint=resolve_endpoint(endpoint), token=token, rehash=False, on_progress=on_progress,
                    cancel=cancel or threading.Event(), disk_free=free_disk_bytes, opener=_open_part)
    tried = []
    for repo_id in repo_ids:
        try:
            listed = d.listing(repo_id, d.pin(repo_id, None, quick=True))
        except (WeightsRepoNotFound, WeightsFileMissing) as exc:
            tried.append(f"{repo_id} ({exc})")
            continue
        by_name = {Path(p).name: p for p in sorted(listed, key=lambda p: p.count("/"))}
        name = next((n for n in layout.TINY_VAE_NAMES if n in by_name), None)
        if name is None:
            tried.append(f"{repo_id} (no {' or '.join(layout.TINY_VAE_NAMES)})")
            continue
        pf = listed[by_name[name]]
        local = PlannedFile(pf.repo_id, pf.revision, pf.path, pf.size, pf.hash_kind, pf.hash)
        d.run(lambda: [local])
        dest = root / pf.path
        target = root / layout.pth_candidates(name)[0]  # distill_int8/, where the layout rule looks first
        if dest != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(dest, target)
            d.recorded[target.relative_to(root).as_posix()] = d.recorded.pop(pf.path)
            d._write_manifest()
        d.emit(DownloadPhase.DONE, f"tiny VAE {name} from {repo_id} in {target.parent}")
        return target
    raise WeightsFileMissing("No Wan 2.1 tiny VAE found: " + "; ".join(tried))


def iter_download(weights_dir: Path | str = DEFAULT_WEIGHTS_DIR, *, min_interval_s: float = 0.5,
                  job: Callable[..., Any] = download_weights, **kwargs: Any) -> Iterator[DownloadProgress]:
    """`job` (download_weights or download_tiny_vae) on a worker thread, as a generator for a UI. Never raises
    for download failures: the last item is DONE, FAILED (with `.error`) or CANCELLED. Closing the generator
    (a Gradio cancel) stops the download at the next chunk; the partial file is kept for the next run."""
    events: queue.Queue[DownloadProgress | None] = queue.Queue()
    cancel = threading.Event()
    outcome: list[DownloadProgress] = []

    def work() -> None:
        try:
            result = job(weights_dir, on_progress=events.put, cancel=cancel, **kwargs)
            summary = result.report.summary() if isinstance(result, DownloadResult) else f"saved {result}"
            done = result.report.bytes_checked if isinstance(result, DownloadResult) else 0
            outcome.append(DownloadProgress(DownloadPhase.DONE, summary, bytes_done=done, bytes_total=done))
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

    threading.Thread(target=work, name="weights-download", daemon=True).start()
    last_yield = 0.0
    try:
        while (item := events.get()) is not None:
            if item.finished:
                continue  # the outcome below says it once, with the error attached
            now = time.monotonic()  # phase changes always; byte counts at most every `min_interval_s`
            if item.phase is not DownloadPhase.DOWNLOADING or now - last_yield >= min_interval_s:
                last_yield = now
                yield item
        yield outcome[0]
    finally:
        cancel.set()


def default_dir(env_name: str, fallback: Path) -> Path:
    """The folder the app itself would use: its environment variable, else the built-in default."""
    value = os.environ.get(env_name, "").strip()
    return Path(value) if value else fallback


def main_download(args_list: list[str] | None = None) -> int:
    """`python app.py download [...]`. Exit codes: 0 ready, 1 failed, 2 bad arguments, 130 interrupted."""
    parser = argparse.ArgumentParser(prog="app.py download", description=f"Download the INT8 weights ({REPO_ID}: "
                                     "distill_int8/ and the UMT5 tokenizer, about 22 GB). Safe to re-run: it resumes.")
    parser.add_argument("--weights-dir", type=Path, default=default_dir(WEIGHTS_DIR_ENV, DEFAULT_WEIGHTS_DIR),
                        help=f"folder to download into (${WEIGHTS_DIR_ENV}; default: %(default)s)")
    parser.add_argument("--outputs-dir", type=Path, help="accepted for symmetry with the other commands; unused")
    parser.add_argument("--endpoint", help="Hub endpoint or mirror URL (default: $HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--revision", help="branch, tag or commit of the repository (default: main)")
    parser.add_argument("--rehash", action="store_true",
                        help="re-check files already on disk against the Hub checksums and re-fetch damaged ones")
    parser.add_argument("--tiny-vae", action="store_true", help="download only the optional Wan 2.1 tiny VAE "
                        "(draft decode, better previews; a few MB), from " + " or ".join(TINY_VAE_REPO_IDS))
    try:
        parsed = parser.parse_args(args_list)
    except SystemExit as exc:  # --help or bad arguments: hand the code back instead of exiting
        return int(exc.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("httpx2", "httpcore2", "httpx", "httpcore"):  # they log every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    cancel = threading.Event()
    try:
        if parsed.tiny_vae:
            path = download_tiny_vae(parsed.weights_dir, endpoint=parsed.endpoint, on_progress=TerminalProgress(),
                                     cancel=cancel)
            sys.stdout.write(f"\nTiny VAE ready: {path}\n")
            return 0
        result = download_weights(parsed.weights_dir, revision=parsed.revision, endpoint=parsed.endpoint,
                                  on_progress=TerminalProgress(), cancel=cancel, rehash=parsed.rehash)
    except (KeyboardInterrupt, DownloadCancelled):
        cancel.set()
        sys.stderr.write("\nStopped. Finished files and the partial file are kept; run the same command again "
                         "to resume.\n")
        return 130
    except WeightsError as exc:
        sys.stderr.write(f"\nDownload failed: {exc}\n")
        return 1
    got = (f"downloaded {result.files_downloaded} file(s), {format_bytes(result.bytes_downloaded)}"
           if result.files_downloaded else "nothing to download")
    commit = f" (commit {result.commit[:10]})" if result.commit else ""
    sys.stdout.write(f"\nWeights ready in {result.weights_dir}{commit}: {got}.\n{result.report.summary()}\n")
    return 0
