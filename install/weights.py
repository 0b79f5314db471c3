"""Weights manager: fetch exactly what the INT8 path needs from the Hub, resume, verify before loading.

Where files go is the rule of pipeline/backends/weights_layout.py (the same one the backend and the doctor
use). The Hub work is huggingface_hub's public API: `HfApi.list_repo_tree` lists the repository at one
pinned commit with sizes and checksums (LFS sha256, git blob ids), `get_hf_file_metadata` says where a file
is served from and whether it is Xet-backed, and `hf_hub_download` fetches it (through hf_xet when
installed). Every file is checked against the Hub's checksum before it is moved into place and recorded in
`.wan-studio/manifest.json`, which `verify()` reads.

Our own transfer code exists for one case only, because the library provably lacks it: resuming a
plain-HTTP file after the app was closed or killed. huggingface_hub 1.x downloads into a process-unique
`<name>.<uuid>.incomplete` file and deletes it when the call fails (`_download_to_tmp_and_move`), so a half
done 6.7 GB T5 file would start again from zero. hf_xet writes into that same temporary file; what it can
reuse after a restart is its size-capped chunk cache (HF_XET_CHUNK_CACHE_SIZE_BYTES), a user setting, not a
resume of the file, so a Xet transfer is accepted as restartable only. So plain-HTTP files of at
least RESUMABLE_MIN_BYTES are streamed with the library's HTTP session (`get_session`) into a partial file
under `.wan-studio/parts/` that survives the process, continued with a Range request. Xet-backed files, and
small files whose loss costs nothing, go through `hf_hub_download`.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from install.errors import (DownloadCancelled, WeightsCorrupt, WeightsDirNotWritable, WeightsDiskFull,
                            WeightsFileMissing, WeightsIncomplete, WeightsNetworkError, WeightsRepoNotFound,
                            map_hub_error, transport_errors)
from install.filecheck import check_safetensors, check_torch_zip, hash_file, structure_problem
from install.progress import DownloadPhase, DownloadProgress, RateMeter, format_bytes
from install.verify import MANIFEST_NAME, STATE_DIR, VerifyProblem, VerifyReport, read_manifest, verify
from pipeline.backends import weights_layout
from pipeline.errors import WeightsError

__all__ = ["DownloadCancelled", "DownloadResult", "VerifyProblem", "VerifyReport", "WeightsCorrupt",
           "WeightsDirNotWritable", "WeightsDiskFull", "WeightsFileMissing", "WeightsIncomplete",
           "WeightsNetworkError", "WeightsRepoNotFound", "check_safetensors", "check_torch_zip", "download_weights", "iter_download", "verify"]

log = logging.getLogger(__name__)

REPO_ID = "lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
TOKENIZER_FALLBACK_REPO_ID = "Wan-AI/Wan2.1-T2V-14B"
DEFAULT_WEIGHTS_DIR = Path("weights") / "Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
WEIGHTS_DIR_ENV = "WAN_STUDIO_WEIGHTS_DIR"  # app.py reads these too, so every command looks in one place
OUTPUTS_DIR_ENV = "WAN_STUDIO_OUTPUTS_DIR"
DEFAULT_ENDPOINT = "https://huggingface.co"
# Measured on the real repository: 40 blocks x 0.352 GB, non_block 0.931 GB, T5 6.733 GB, VAE 0.508 GB.
APPROX_TOTAL_BYTES = int(40 * 0.352e9 + 0.931e9 + 6.733e9 + 0.508e9)
DISK_MARGIN_BYTES = 256 * 1024**2  # filesystems misreport a little; the manifest is written last
RESUMABLE_MIN_BYTES = 16 * 1024**2  # smaller plain-HTTP files are cheap to fetch again
RETRIES = 5


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
        manifest = read_manifest(root) or {}
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
                raise map_hub_error(inner, f"Repository {repo_id}", self.endpoint) from inner
        except Exception as exc:  # noqa: BLE001 - mapped to a user message
            raise map_hub_error(exc, f"Repository {repo_id}", self.endpoint) from exc
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
            raise map_hub_error(exc, f"Listing {repo_id}", self.endpoint) from exc

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
                part, sent = (self._via_library(pf, index, count, xet=meta.xet_file_data is not None) if via_library
                              else self._resumable(pf, meta.location or url, url, index, count))
            except OSError as exc:
                raise self._disk_error(exc, pf.path) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
                    map_hub_error(exc, what, self.endpoint) from exc
            except Exception as exc:  # noqa: BLE001 - mapped to a user message
                raise map_hub_error(exc, what, self.endpoint) from exc
            if part.stat().st_size == pf.size and (
                    not pf.hash or hash_file(part, pf.hash_kind or "sha256", pf.size).hexdigest() == pf.hash):
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

    def _via_library(self, pf: PlannedFile, index: int, count: int, *, xet: bool) -> tuple[Path, int]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import tqdm as hf_tqdm

        outer, done = self, [0]

        class Bar(hf_tqdm):  # the library's progress hook: our events instead of a terminal bar
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **{**kwargs, "disable": True})

            def update(self, n: float | None = 1) -> bool | None:
                if outer.cancel.is_set() and not xet:  # hf_xet reports from its own threads: stop between files
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
            if attempt > RETRIES:  # every answer ended early without an error
                raise WeightsNetworkError(f"The transfer of {pf.path} keeps ending early; run the download again "
                                          "later (it resumes from what arrived).")
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
                        for chunk in response.iter_bytes():  # as it arrives: what lands is kept
                            if self.cancel.is_set():
                                raise DownloadCancelled("Download stopped.")
                            raw.write(chunk)
                            raw.flush()  # what is on disk is what the next run continues from
                            done, sent = done + len(chunk), sent + len(chunk)
                            self._progress(pf, index, count, done, len(chunk))
            except transport_errors() as exc:
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
        tokenizer = weights_layout.tokenizer_files(listed.__contains__)
        if not tokenizer:
            wan = d.pin(TOKENIZER_FALLBACK_REPO_ID, None, quick=False)
            wan_listed = d.listing(TOKENIZER_FALLBACK_REPO_ID, wan, weights_layout.TOKENIZER_DIR)
            if tok := weights_layout.tokenizer_files(wan_listed.__contains__):
                log.info("%s has no tokenizer; taking it from %s", repo_id, TOKENIZER_FALLBACK_REPO_ID)
                listed.update({p: wan_listed[p] for p in tok})
        configs = weights_layout.config_paths(listed.__contains__)
        for rel in configs:  # the block count is in the (tiny) configs, so they come first
            if not d.is_current(listed[rel]):
                d.fetch(listed[rel], 0, 0)
        config, _, bad = weights_layout.read_config(d.root)
        layers = config.get("num_layers") if configs and not bad and not weights_layout.config_problem(config) else None
        if configs and layers is None:
            raise WeightsCorrupt(f"The config from {repo_id} is unusable: "
                                 f"{bad[0][1] if bad else weights_layout.config_problem(config)}.")
        res = weights_layout.resolve(listed.__contains__, layers or 0)
        if res.missing:
            shown = "; ".join(res.missing[:6])
            raise WeightsFileMissing(f"The repository {repo_id} (commit {commit[:10]}) lacks files the INT8 path "
                                     f"needs: {shown}. Its layout may have changed; check the repository page, or "
                                     "try an older --revision.")
        # Forget files an older snapshot needed and this one does not, so verify() stops expecting them.
        d.recorded = {rel: e for rel, e in d.recorded.items()
                      if rel in res.files or Path(rel).name in weights_layout.TINY_VAE_NAMES}
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
