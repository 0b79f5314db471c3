"""What goes wrong while getting the weights, as exceptions with messages that say what to do, and the
mapping from huggingface_hub's and the HTTP client's exceptions onto them."""

from __future__ import annotations

import errno
import importlib

from pipeline.errors import WeightsError


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




def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx in 1.x, httpx2 in 2.x)."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def map_hub_error(exc: BaseException, what: str, endpoint: str) -> WeightsError:
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
    if isinstance(exc, transport_errors()):
        return WeightsNetworkError(
            f"Cannot reach {endpoint} ({type(exc).__name__}: {exc}). Check the internet connection; behind a "
            "firewall, set HF_ENDPOINT (or --endpoint) to a mirror. Files already downloaded are kept and the "
            "next run resumes.")
    return WeightsError(f"{what}: {type(exc).__name__}: {exc}")


