"""Weights download and verification against a local fake Hub, driven by the real huggingface_hub client."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from install import cli, weights as w
from install.progress import RateMeter
from tests import fakeweights as fw
from tests.hubserver import FakeRepo, HubServer, HubState

BIG_T5 = 24 * 1024 * 1024  # > 2 x huggingface_hub's 10 MiB chunk, so a broken transfer leaves bytes behind


@pytest.fixture
def hub(monkeypatch):
    """Start a fake Hub serving the INT8 repo; yields (server, state, files). Set `files` before use if needed."""
    servers: list[HubServer] = []

    def start(files: dict[str, bytes] | None = None, extra_repos: dict[str, FakeRepo] | None = None):
        files = files if files is not None else fw.repo_files()
        state = HubState(repos={fw.REPO_ID: FakeRepo(files), **(extra_repos or {})})
        server = HubServer(state).__enter__()
        servers.append(server)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        return server, state, files

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield start
    for server in servers:
        server.close()


def stop_once_t5_has_bytes(cancel: threading.Event):
    def on_progress(p: w.DownloadProgress) -> None:
        if p.file == fw.T5 and p.file_bytes_done > 0:
            cancel.set()

    return on_progress


def stopped_mid_t5(hub, tmp_path):
    """A download stopped once the big T5 file has bytes on disk; returns (state, files, its partial file)."""
    _, state, files = hub(fw.repo_files(t5_payload=BIG_T5))
    cancel = threading.Event()
    with pytest.raises(w.DownloadCancelled):
        w.download_weights(tmp_path, on_progress=stop_once_t5_has_bytes(cancel), cancel=cancel)
    parts = list((tmp_path / ".wan-studio" / "parts").rglob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size > 0
    return state, files, parts[0]


def _assert_matches(weights_dir: Path, files: dict[str, bytes]) -> None:
    for rel in fw.needed_paths(files):
        assert (weights_dir / rel).read_bytes() == files[rel], rel
    for rel in fw.NOT_NEEDED:
        assert not (weights_dir / rel).exists(), f"{rel} must not be downloaded"


def test_full_download_fetches_only_the_int8_files_and_verifies(hub, tmp_path):
    _, state, files = hub()
    events: list[w.DownloadProgress] = []
    result = w.download_weights(tmp_path / "weights", on_progress=events.append)

    assert result.report.ok, result.report.summary()
    _assert_matches(tmp_path / "weights", files)
    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in state.requests
               if r.method == "GET" and "/resolve/" in r.path}
    assert fetched == fw.needed_paths(files)  # nothing from distill_models/, loras/, distill_fp8/, no taew2_1
    layout = result.report.layout
    assert layout is not None and layout.num_layers == fw.NUM_LAYERS
    assert layout.t5 == tmp_path / "weights" / fw.T5 and layout.tokenizer.name == "umt5-xxl"

    downloading = [e for e in events if e.phase is w.DownloadPhase.DOWNLOADING]
    total = sum(len(files[p]) for p in fw.needed_paths(files))
    assert downloading[-1].bytes_total == total and downloading[-1].bytes_done == total
    assert all(a.bytes_done <= b.bytes_done for a, b in zip(downloading, downloading[1:], strict=False))
    assert any(e.rate_bps for e in downloading) and events[-1].phase is w.DownloadPhase.DONE
    assert "ETA" in downloading[-1].describe()


def test_second_run_downloads_nothing(hub, tmp_path):
    _, state, _ = hub()
    w.download_weights(tmp_path)
    before = len(state.gets(".safetensors"))
    result = w.download_weights(tmp_path)
    assert result.files_downloaded == 0 and result.report.ok
    assert len(state.gets(".safetensors")) == before


def test_broken_connection_is_resumed_with_a_range_request(hub, tmp_path):
    _, state, files = hub(fw.repo_files(t5_payload=BIG_T5))
    cut_at = 12 * 1024 * 1024 + 7
    state.cut_once[fw.T5] = cut_at

    result = w.download_weights(tmp_path)

    gets = state.gets(fw.T5)
    assert [g.range is None for g in gets] == [True, False]
    resumed_from = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= cut_at
    assert result.report.ok and (tmp_path / fw.T5).read_bytes() == files[fw.T5]


def test_stopped_download_resumes_in_the_next_run(hub, tmp_path):
    state, files, part = stopped_mid_t5(hub, tmp_path)
    kept = part.stat().st_size
    assert not (tmp_path / fw.T5).exists()

    result = w.download_weights(tmp_path)

    assert state.gets(fw.T5)[-1].range == f"bytes={kept}-"
    assert result.report.ok and (tmp_path / fw.T5).read_bytes() == files[fw.T5]
    assert not list((tmp_path / ".wan-studio" / "parts").rglob("*.part"))


def test_server_that_ignores_range_restarts_the_file_cleanly(hub, tmp_path):
    state, files, _part = stopped_mid_t5(hub, tmp_path)
    state.ignore_range = True
    events: list[w.DownloadProgress] = []

    result = w.download_weights(tmp_path, on_progress=events.append)

    assert state.gets(fw.T5)[-1].range is not None  # we asked to resume; the server sent everything
    assert result.report.ok and (tmp_path / fw.T5).read_bytes() == files[fw.T5]
    assert all(e.bytes_done <= e.bytes_total for e in events if e.bytes_total)


def test_damaged_transfer_is_rejected_by_checksum_then_repaired(hub, tmp_path):
    _, state, files = hub()
    bad = "distill_int8/block_5.safetensors"
    state.corrupt.add(bad)
    with pytest.raises(w.WeightsCorrupt, match="block_5.safetensors arrived damaged"):
        w.download_weights(tmp_path)
    assert not (tmp_path / bad).exists()

    state.corrupt.clear()
    result = w.download_weights(tmp_path)
    assert result.report.ok and (tmp_path / bad).read_bytes() == files[bad]


def test_verify_catches_corrupt_and_truncated_files(hub, tmp_path):
    _, _, files = hub()
    w.download_weights(tmp_path)
    assert w.verify(tmp_path).ok

    block = tmp_path / "distill_int8/block_3.safetensors"
    data = bytearray(block.read_bytes())
    data[12] = ord("#")  # inside the JSON header
    block.write_bytes(bytes(data))
    vae = tmp_path / fw.VAE
    vae.write_bytes(vae.read_bytes()[:-100])

    report = w.verify(tmp_path)
    problems = {p.path: p for p in report.problems}
    assert problems["distill_int8/block_3.safetensors"].kind == "corrupt"
    assert problems[fw.VAE].kind == "size" and "truncated" in problems[fw.VAE].detail
    with pytest.raises(w.WeightsCorrupt, match="block_3"):
        report.raise_for_problems()

    # The next download repairs both: they fail the size/structure checks, so they are fetched again.
    assert w.download_weights(tmp_path).files_downloaded == 2
    _assert_matches(tmp_path, files)


def test_damage_that_keeps_size_and_headers_needs_the_deep_check(hub, tmp_path):
    _, _, files = hub()
    w.download_weights(tmp_path)
    t5 = tmp_path / fw.T5
    data = bytearray(t5.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored tensor bytes: zip directory still intact
    t5.write_bytes(bytes(data))

    assert w.verify(tmp_path).ok  # the quick check cannot see it...
    deep = w.verify(tmp_path, deep=True)
    assert [p.path for p in deep.problems] == [fw.T5]  # ...the checksum can
    assert w.download_weights(tmp_path, rehash=True).files_downloaded == 1
    assert t5.read_bytes() == files[fw.T5]


def test_file_listed_but_missing_on_the_hub(hub, tmp_path):
    _, state, _ = hub()
    state.hidden.add("distill_int8/non_block.safetensors")
    with pytest.raises(w.WeightsFileMissing, match="non_block.safetensors is not on the Hub"):
        w.download_weights(tmp_path)


def test_repository_without_a_needed_file(hub, tmp_path):
    files = fw.repo_files()
    del files[fw.VAE]
    _, state, _ = hub(files)
    with pytest.raises(w.WeightsFileMissing, match=r"Wan2\.1_VAE\.pth.*layout may have changed"):
        w.download_weights(tmp_path)
    assert not state.gets(".pth")  # refused before the big transfers


def test_unknown_repository_or_revision(hub, tmp_path):
    hub()
    with pytest.raises(w.WeightsRepoNotFound, match="not found"):
        w.download_weights(tmp_path, repo_id="nobody/no-such-repo")
    with pytest.raises(w.WeightsRepoNotFound, match="revision"):
        w.download_weights(tmp_path, revision="v999")


def test_tokenizer_is_taken_from_the_wan_repo_when_missing(hub, tmp_path):
    wan = FakeRepo(fw.tokenizer_files(), commit="f" * 40)
    _, state, _ = hub(fw.repo_files(with_tokenizer=False), {w.TOKENIZER_FALLBACK_REPO_ID: wan})
    result = w.download_weights(tmp_path)
    assert result.report.ok
    assert state.gets(f"{w.TOKENIZER_FALLBACK_REPO_ID}/resolve/{'f' * 40}/google/umt5-xxl/tokenizer.json")


def test_no_network_is_reported_quickly(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(w.WeightsNetworkError, match="Cannot reach"):
        w.download_weights(tmp_path, endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 5


def test_not_enough_disk_space_before_starting(hub, tmp_path):
    _, state, _ = hub()
    with pytest.raises(w.WeightsDiskFull, match=r"needed in .* but only 1\.00 KB is free") as info:
        w.download_weights(tmp_path, disk_free=lambda _path: 1000)
    assert info.value.free_bytes == 1000 and info.value.needed_bytes > w.DISK_MARGIN_BYTES
    assert not state.gets(".safetensors")


def test_disk_full_while_writing_keeps_the_part_and_resumes(hub, tmp_path):
    _, state, files = hub(fw.repo_files(t5_payload=BIG_T5))

    class FillsUp:
        """The T5 file's disk fills after the first chunk."""

        def __init__(self, path: Path):
            self._f = path.open("ab")
            self._limited = "models_t5" in path.name
            self._written = 0

        def write(self, data: bytes) -> int:
            if self._limited and self._written > 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            self._written += len(data)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    with pytest.raises(w.WeightsDiskFull, match="filled up while writing .*models_t5.*resumes") as info:
        w.download_weights(tmp_path, opener=FillsUp)
    assert info.value.needed_bytes > 0  # the message says how much more is needed
    kept = next((tmp_path / ".wan-studio" / "parts").rglob("*.part")).stat().st_size
    assert kept > 0
    # Nothing lost: every file finished before the disk filled is in place, recorded, and not fetched again.
    finished = [rel for rel in fw.needed_paths(files) if (tmp_path / rel).exists()]
    assert finished and all((tmp_path / rel).read_bytes() == files[rel] for rel in finished)
    gets_before = {rel: len(state.gets(rel)) for rel in finished}

    result = w.download_weights(tmp_path)
    assert result.report.ok and result.files_downloaded == len(fw.needed_paths(files)) - len(finished)
    assert {rel: len(state.gets(rel)) for rel in finished} == gets_before
    assert state.gets(fw.T5)[-1].range == f"bytes={kept}-"
    assert state.gets(fw.T5)[-1].sent == len(files[fw.T5]) - kept
    assert (tmp_path / fw.T5).read_bytes() == files[fw.T5]


def test_offline_mode_uses_the_files_on_disk(hub, tmp_path, monkeypatch):
    _, state, _ = hub()
    w.download_weights(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(state.requests)
    events: list[w.DownloadProgress] = []
    result = w.download_weights(tmp_path, on_progress=events.append)
    assert result.report.ok and result.files_downloaded == 0
    assert len(state.requests) == before  # not a single request
    assert events[-1].phase is w.DownloadPhase.DONE and "offline" in events[-1].message


def test_offline_mode_with_missing_files_says_which(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "distill_int8").mkdir()
    with pytest.raises(w.WeightsIncomplete, match=r"(?s)HF_HUB_OFFLINE.*config\.json"):
        w.download_weights(tmp_path)


def test_existing_download_given_by_the_user(hub, tmp_path):
    """A folder from `hf download --local-dir` has no record of ours: it verifies, and a download run
    checks it against the Hub checksums instead of fetching it again."""
    _, state, _ = hub()
    w.download_weights(tmp_path / "first")
    theirs = tmp_path / "theirs"
    shutil.copytree(tmp_path / "first", theirs, ignore=shutil.ignore_patterns(".wan-studio"))

    report = w.verify(theirs)
    assert report.ok and not report.used_manifest
    before = len(state.gets(".safetensors"))
    assert w.download_weights(theirs).files_downloaded == 0
    assert len(state.gets(".safetensors")) == before


def test_pointing_at_the_distill_int8_folder_is_explained(hub, tmp_path):
    hub()
    w.download_weights(tmp_path)
    report = w.verify(tmp_path / "distill_int8")
    assert [p.kind for p in report.problems] == ["layout"] and "parent" in report.problems[0].detail


def test_weights_dir_that_is_a_file(tmp_path, hub):
    hub()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(w.WeightsDirNotWritable, match="is a file, not a folder"):
        w.download_weights(blocker)
    with pytest.raises(w.WeightsDirNotWritable, match="Cannot write to the weights folder"):
        w.download_weights(blocker / "weights")


def test_weights_dir_without_write_permission(tmp_path, hub, monkeypatch):
    hub()
    target = tmp_path / "locked"
    target.mkdir()
    if getattr(os, "geteuid", lambda: 1)() != 0:
        target.chmod(0o500)  # a real read-only folder
    else:  # root ignores permission bits; make the write itself fail the way it would for a user
        def denied(*_args, **_kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(w.tempfile, "NamedTemporaryFile", denied)
    try:
        with pytest.raises(w.WeightsDirNotWritable, match="Permission denied"):
            w.download_weights(target)
    finally:
        target.chmod(0o700)


def test_check_safetensors_rejects_inconsistent_headers(tmp_path):
    good = fw.safetensors_bytes({"blocks.0.a": ("F32", [2, 2], b"\0" * 16)})
    path = tmp_path / "x.safetensors"
    path.write_bytes(good)
    assert w.check_safetensors(path, expect_block=0) is None
    assert "block 1" in w.check_safetensors(path, expect_block=1)
    path.write_bytes(good + b"\0")
    assert "trailing" in w.check_safetensors(path)
    path.write_bytes(fw.safetensors_bytes({"a": ("F32", [3, 2], b"\0" * 16)}))
    assert "shape and byte range disagree" in w.check_safetensors(path)
    path.write_bytes(good[:-4])
    assert "truncated" in w.check_safetensors(path)


def test_cli_download_and_exit_codes(hub, tmp_path, capsys, monkeypatch):
    server, _, _ = hub()
    assert cli.main_download(["--weights-dir", str(tmp_path), "--endpoint", server.url]) == 0
    assert "Weights ready in" in capsys.readouterr().out
    monkeypatch.setenv(w.WEIGHTS_DIR_ENV, str(tmp_path / "from-env"))  # the folder the app will load from
    assert cli.main_download(["--endpoint", server.url]) == 0
    assert w.verify(tmp_path / "from-env").ok
    assert cli.main_download(["--no-such-flag"]) == 2
    assert cli.main_download(["--weights-dir", str(tmp_path / "x"), "--revision", "v999"]) == 1
    assert "Download failed" in capsys.readouterr().err


def test_iter_download_streams_progress_and_ends_with_the_outcome(hub, tmp_path):
    hub()
    events = list(w.iter_download(tmp_path, min_interval_s=0.0))
    assert events[-1].phase is w.DownloadPhase.DONE and events[-1].error is None
    assert [e.finished for e in events].count(True) == 1
    assert any(e.phase is w.DownloadPhase.DOWNLOADING for e in events)

    failed = list(w.iter_download(tmp_path / "other", revision="v999"))
    assert failed[-1].phase is w.DownloadPhase.FAILED
    assert isinstance(failed[-1].error, w.WeightsRepoNotFound) and "revision" in failed[-1].message


def test_closing_iter_download_stops_the_transfer(hub, tmp_path):
    _, state, _ = hub(fw.repo_files(t5_payload=BIG_T5))
    gen = w.iter_download(tmp_path, min_interval_s=0.0)
    for event in gen:
        if event.file == fw.T5 and event.file_bytes_done > 0:
            break
    gen.close()  # what a Gradio cancel does
    deadline = time.monotonic() + 5
    while any(t.name == "weights-download" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "weights-download" for t in threading.enumerate())
    assert not (tmp_path / fw.T5).exists()
    assert list((tmp_path / ".wan-studio" / "parts").rglob("*.part"))
    assert len(state.gets(fw.T5)) == 1


def test_rate_meter_falls_when_the_connection_stalls():
    now = [0.0]
    meter = RateMeter(window_s=8.0, clock=lambda: now[0])
    for _ in range(5):
        meter.add(10_000_000)
        now[0] += 1.0
    assert meter.rate() == pytest.approx(40_000_000 / 5)
    now[0] += 15.0  # nothing arrives for 15 s
    assert meter.rate() == pytest.approx(40_000_000 / 20)


def test_lfs_files_come_from_the_cdn_host_without_the_token(hub, tmp_path):
    """huggingface.co answers LFS files with a 302 to a signed URL on another host: both our resumable stream
    and hf_hub_download must follow it there and leave the Hub token behind."""
    _, state, files = hub(fw.repo_files(t5_payload=BIG_T5))
    state.cdn = True
    result = w.download_weights(tmp_path, token="hf_secret_for_the_hub_only")

    assert result.report.ok
    _assert_matches(tmp_path, files)
    cdn = [r for r in state.requests if r.host == "cdn"]
    assert {r.path.split("/", 5)[5] for r in cdn if r.method == "GET"} >= {fw.T5, "distill_int8/block_0.safetensors"}
    assert all(r.auth is None for r in cdn)  # the token never left the Hub
    redirected = [r for r in state.requests if r.host == "hub" and r.status == 302]
    assert redirected and all(r.auth == "Bearer hf_secret_for_the_hub_only" for r in redirected)


def test_a_killed_download_resumes_after_a_restart_without_refetching(hub, tmp_path):
    import subprocess
    import sys

    server, state, files = hub(fw.repo_files(t5_payload=BIG_T5))
    state.stall_once[fw.T5] = 5 * 1024 * 1024 + 123  # the process is killed while this transfer hangs
    code = (f"from install.weights import download_weights; download_weights({str(tmp_path)!r}, "
            f"endpoint={server.url!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    parts = tmp_path / ".wan-studio" / "parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(p.stat().st_size for p in parts.rglob("*.part")) < 5 * 1024 * 1024:
        assert proc.poll() is None, "the download ended instead of hanging"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no clean-up code runs
    proc.wait(timeout=10)
    kept = next(parts.rglob("*.part")).stat().st_size
    assert kept >= 5 * 1024 * 1024
    state.unstall.set()

    result = w.download_weights(tmp_path)

    assert result.report.ok and (tmp_path / fw.T5).read_bytes() == files[fw.T5]
    first, second = state.gets(fw.T5)
    assert second.range == f"bytes={kept}-"
    assert second.sent == len(files[fw.T5]) - kept  # the kept bytes were not fetched again
    assert result.bytes_downloaded < sum(len(files[p]) for p in fw.needed_paths(files)) - kept + 1


def test_a_damaged_partial_file_is_detected_and_fetched_again(hub, tmp_path):
    state, files, part = stopped_mid_t5(hub, tmp_path)
    data = bytearray(part.read_bytes())
    data[0] ^= 0xFF  # e.g. a crash mid-write: the kept bytes are not the Hub's
    part.write_bytes(bytes(data))

    result = w.download_weights(tmp_path)

    assert result.report.ok and (tmp_path / fw.T5).read_bytes() == files[fw.T5]
    ranges = [g.range for g in state.gets(fw.T5)]
    assert ranges[-2] == f"bytes={len(data)}-" and ranges[-1] is None  # resumed, failed the checksum, restarted


def test_a_corrupted_finished_file_is_found_and_fetched_again(hub, tmp_path):
    _, state, files = hub(fw.repo_files(t5_payload=BIG_T5))
    w.download_weights(tmp_path)
    block = tmp_path / "distill_int8/block_7.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF  # tensor bytes: size and header intact
    block.write_bytes(bytes(data))
    assert [p.path for p in w.verify(tmp_path, deep=True).problems] == ["distill_int8/block_7.safetensors"]
    before = {r.path for r in state.requests if r.method == "GET"}

    result = w.download_weights(tmp_path, rehash=True)

    assert result.files_downloaded == 1 and block.read_bytes() == files["distill_int8/block_7.safetensors"]
    assert w.verify(tmp_path, deep=True).ok
    assert len(state.gets("block_7.safetensors")) == 2 and len(state.gets(fw.T5)) == 1
    assert before  # the first run did fetch


def test_the_doctor_sees_the_tiny_vae_the_downloader_fetched(hub, tmp_path):
    from install import doctor as d
    from install.tinyvae import download_tiny_vae

    taehv = FakeRepo({"taew2_1.pth": fw.torch_zip_bytes(4096, seed=7), "taehv.pth": fw.torch_zip_bytes(64),
                      "README.md": b"# taehv\n"}, commit="e" * 40)
    _, state, _ = hub(extra_repos={"madebyollin/taehv": taehv})  # no lightx2v/Autoencoders on this Hub
    w.download_weights(tmp_path)
    assert d._check_tiny_vae(tmp_path).status is d.Status.INFO

    path = download_tiny_vae(tmp_path)

    assert path == tmp_path / "taew2_1.pth" and path.read_bytes() == taehv.files["taew2_1.pth"]
    assert state.gets("lightx2v/Autoencoders/resolve/main/.gitattributes") or any(
        "Autoencoders" in r.path for r in state.requests)  # it was asked for first
    assert not state.gets("taehv.pth")
    report = w.verify(tmp_path)
    assert report.ok and report.layout is not None and report.layout.tiny_vae == path
    finding = d._check_tiny_vae(tmp_path)
    assert finding.status is d.Status.OK and "taew2_1.pth" in finding.detail
    assert download_tiny_vae(tmp_path) == path and len(state.gets("taew2_1.pth")) == 1  # kept, not re-fetched
    assert cli.main_download(["--weights-dir", str(tmp_path), "--tiny-vae"]) == 0
    # What the System tab will call: the same generator as the main download, ending with the outcome.
    from install import download_tiny_vae as face, iter_download

    other = tmp_path / "other"
    events = list(iter_download(other, job=face, min_interval_s=0.0))
    assert events[-1].phase is w.DownloadPhase.DONE and "taew2_1.pth" in events[-1].message
    assert (other / "taew2_1.pth").read_bytes() == taehv.files["taew2_1.pth"]


def test_the_setup_package_uses_only_public_huggingface_hub_names():
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in (root / "install").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("huggingface_hub"):
                assert not any(part.startswith("_") for part in node.module.split(".")), (path.name, node.module)
                assert node.module in ("huggingface_hub", "huggingface_hub.utils", "huggingface_hub.errors",
                                       "huggingface_hub.constants"), (path.name, node.module)
                assert not any(a.name.startswith("_") for a in node.names), (path.name, [a.name for a in node.names])
    assert len((root / "install" / "weights.py").read_text().splitlines()) <= 500


def test_the_ui_imports_setup_code_only_from_the_package_face():
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in (root / "ui").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("install"):
                assert node.module == "install", (path.name, node.module)


def test_why_our_resume_code_exists_the_library_drops_its_partial_file(hub, tmp_path):
    """The premise of `_resumable`: when hf_hub_download stops mid-file, nothing of what arrived is kept for
    a later process. If a future huggingface_hub keeps it, this fails, and our own code can go."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import tqdm as hf_tqdm

    server, _, files = hub(fw.repo_files(t5_payload=BIG_T5))

    arrived: list[int] = []

    class Interrupt(hf_tqdm):  # the process "dies" once bytes have arrived
        def update(self, n=1):
            if n:
                arrived.append(int(n))
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hf_hub_download(fw.REPO_ID, fw.T5, local_dir=tmp_path, endpoint=server.url, tqdm_class=Interrupt)
    kept = [p for p in tmp_path.rglob("*") if p.is_file() and ("incomplete" in p.name or p.name == "t5" or
                                                              p.stat().st_size >= 1024 * 1024)]
    assert arrived and arrived[0] > 0  # bytes had been written when it stopped...
    assert kept == [], kept  # ...and none of them is left for the next process
