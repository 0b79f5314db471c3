"""The optional Wan 2.1 tiny VAE (draft decode and better previews): found on the Hub at run time, fetched
verified through the weights manager, placed where pipeline/backends/weights_layout.py's rule finds it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from install.errors import WeightsFileMissing, WeightsRepoNotFound
from install.progress import DownloadPhase, DownloadProgress
from install.weights import DEFAULT_WEIGHTS_DIR, _Downloader, _open_part, free_disk_bytes, resolve_endpoint
from pipeline.backends import weights_layout

# Where a Wan 2.1 tiny VAE is published: LightX2V's own autoencoders, then the taehv author's.
TINY_VAE_REPO_IDS = ("lightx2v/Autoencoders", "madebyollin/taehv")


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
        # Only where the layout rule looks (the repo's root or distill_int8/), so no file is moved after its check.
        found = [listed[c] for n in weights_layout.TINY_VAE_NAMES
                 for c in weights_layout.pth_candidates(n) if c in listed]
        if not found:
            tried.append(f"{repo_id} (no {' or '.join(weights_layout.TINY_VAE_NAMES)} at its root)")
            continue
        d.run(lambda: found[:1])
        target = root / found[0].path
        d.emit(DownloadPhase.DONE, f"tiny VAE {found[0].path} from {repo_id} in {root}")
        return target
    raise WeightsFileMissing("No Wan 2.1 tiny VAE found: " + "; ".join(tried))
