"""`python app.py download [...]`: the weights manager in a terminal."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from install.errors import DownloadCancelled
from install.progress import TerminalProgress, format_bytes
from install.tinyvae import TINY_VAE_REPO_IDS, download_tiny_vae
from install.weights import DEFAULT_WEIGHTS_DIR, REPO_ID, WEIGHTS_DIR_ENV, download_weights
from pipeline.errors import WeightsError


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
