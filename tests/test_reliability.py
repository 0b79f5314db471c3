"""Reliability and security of the running app, on CPU: the real app.py as a subprocess with the fake
backend, driven over HTTP with gradio_client on 127.0.0.1.

Load (20 concurrent submissions), faults (SIGKILL mid-generation and mid-write, disk full, OOM in
every phase, a client that disconnects mid-job), bad input through the API, auth, and the file
routes. Figures for the issue: see the counts asserted in each test.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from tests.apphelpers import (PYTHON, REPO, free_port, history_rows, listed_files, raw_get, raw_post,
                              run_app_to_exit, running_app, start_app, wait_for)
from pipeline.store.outputs import LOCK_NAME, read_mp4_record

pytestmark = pytest.mark.slow

PRESET = "480x832x81"  # untouched by the OOM rules below
# Every phase that can run out of memory: 720p fails in decode (and the decode-only retry) on its
# first rung, then in text encoding on its second, and falls back to 480x832x81. The 49-frame
# preset, which has no fallback, runs out in denoising everywhere: the clear-error path.
OOM_RULES = ("720x1280x81:chunked-rope:decoding,720x1280x81:lean:text_encoding,"
             "480x832x49:*:denoising")
SECRET = b"weights-secret-6b1f"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    # The working folder looks like an install: weights beside the outputs.
    (tmp / "weights").mkdir()
    (tmp / "weights" / "model.safetensors").write_bytes(SECRET)
    with running_app(tmp, faults=True, WAN_STUDIO_FAKE_OOM=OOM_RULES) as running:
        yield running


def _unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def _rows_for(app, prompt: str) -> list[dict]:
    return [r for r in app.history() if r["prompt"] == prompt]


def _file_name(value) -> str:
    """The file name of a video output, whether downloaded (a path) or not (FileData as a dict)."""
    if isinstance(value, dict):
        return Path(value.get("orig_name") or value["path"]).name
    return Path(value).name


# -- load -------------------------------------------------------------------------------------------

def test_twenty_concurrent_submissions_finish_in_queue_order(app):
    client = app.client(download_files=False)
    n = 20
    prompts = [_unique(f"load {i:02d}") for i in range(n)]
    jobs = []
    for i, prompt in enumerate(prompts):
        job = client.submit(prompt, PRESET, i, False, "", api_name="/generate")
        # Wait until the server has taken it into its queue, so that submission order is defined.
        wait_for(lambda: job.status().code not in (Status.STARTING, Status.JOINING_QUEUE), 15,
                 0.01, f"submission {i} to join the queue")
        jobs.append(job)

    results = [job.result(timeout=60) for job in jobs]

    assert all(r[0].startswith("Done:") for r in results), [r[0] for r in results]
    rows = {r["prompt"]: r for r in app.history() if r["prompt"] in prompts}
    assert len(rows) == n, "every submission has exactly one history row"
    ordered = [rows[p] for p in prompts]
    ids = [r["id"] for r in ordered]
    assert ids == sorted(ids), f"history order differs from submission order: {ids}"
    assert all(r["status"] == "done" for r in ordered)
    files = [Path(r["video_path"]) for r in ordered]
    assert len(set(files)) == n and all(f.is_file() and f.with_suffix(".json").is_file() for f in files)
    for row, result in zip(ordered, results):
        assert _file_name(result[2]) == Path(row["video_path"]).name  # each caller got its own clip
        assert json.loads(Path(row["record_path"]).read_text())["job_id"] == row["id"]
    # Each caller was told its place in the one GPU lane (JobQueue), counted down to its turn.
    told = [[int(o[0].split()[1]) for o in job.outputs() if o[0].startswith("Queued:")] for job in jobs]
    assert any(t and t[0] > 0 for t in told), "no caller was ever told a queue position"
    assert all(t == sorted(t, reverse=True) for t in told), told


# -- bad input --------------------------------------------------------------------------------------

OK = dict(prompt="a red fox in snow", preset="480x832x49", seed=1, randomize=False, negative="", count=1)
BAD_INPUTS = [
    ("empty prompt", dict(prompt=""), "prompt is empty"),
    ("blank prompt", dict(prompt="   \n "), "prompt is empty"),
    ("missing prompt", dict(prompt=None), "prompt is empty"),
    ("prompt not text", dict(prompt=12345), "prompt must be text"),
    ("prompt too long", dict(prompt="x" * 2001), "reads at most 512 tokens"),
    ("negative prompt too long", dict(negative="y" * 2001), "negative prompt is 2001 characters"),
    ("NUL in the prompt", dict(prompt="a fox\x00in snow"), "control character ('\\x00' at position 6)"),
    ("escape sequence in the prompt", dict(prompt="\x1b[2Ja fox"), "control character"),
    ("count above 16", dict(count=17), "Count must be a whole number from 1 to 16"),
    ("count zero", dict(count=0), "Count must be a whole number from 1 to 16"),
    ("negative prompt not text", dict(negative=["a"]), "negative prompt must be text"),
    ("seed below range", dict(seed=-1), "between 0 and 4294967295"),
    ("seed above range", dict(seed=2**32), "between 0 and 4294967295"),
    ("seed far above range", dict(seed=10**30), "between 0 and 4294967295"),
    ("seed fractional", dict(seed=1.5), "must be a whole number"),
    ("seed not numeric", dict(seed="abc"), "must be a whole number"),
    ("seed NaN text", dict(seed="nan"), "must be a whole number"),
    ("seed infinity text", dict(seed="inf"), "must be a whole number"),
    ("seed boolean", dict(seed=True), "must be a whole number"),
    ("seed a list", dict(seed=[1]), "must be a whole number"),
    ("seed missing", dict(seed=None), "Enter a seed"),
    ("random-seed flag not boolean", dict(randomize="yes"), "must be true or false"),
    ("unknown preset", dict(preset="1080x1920x121"), "Unknown preset"),
    ("preset as a path", dict(preset="../../etc/passwd"), "Unknown preset"),
    ("preset missing", dict(preset=None), "No preset was chosen"),
    ("preset not text", dict(preset=480), "must be a preset name"),
]


def test_bad_inputs_through_the_api_get_clear_messages_and_never_reach_the_gpu(app):
    client = app.client(download_files=False)
    rows_before = app.history()
    files_before = listed_files(app.outputs)
    refusals_before = app.log().count("INFO ui.handlers: Check your input: ")
    for label, change, expected in BAD_INPUTS:
        values = {**OK, **change}
        with pytest.raises(AppError) as err:
            client.predict(values["prompt"], values["preset"], values["seed"], values["randomize"],
                           values["negative"], values["count"], api_name="/generate")
        message = str(err.value)
        assert expected in message, f"{label}: {message!r}"
        assert "Traceback" not in message and "Unexpected error" not in message, label
        assert err.value.title == "Check your input", label
    # Each refusal was the server's own (logged once there), not a client-side check.
    wait_for(lambda: app.log().count("INFO ui.handlers: Check your input: ") - refusals_before
             == len(BAD_INPUTS), 5, 0.05, "the refusals in the server log")
    # None reached the lane: no history row (a row is written before the GPU is touched), no file.
    assert app.history() == rows_before
    assert listed_files(app.outputs) == files_before


def test_frames_and_size_cannot_be_passed_through_the_api(app):
    client = app.client(download_files=False)
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == ["prompt_text", "preset_name", "seed_value", "randomize_seed", "negative_prompt",
                     "count", "draft_decode"]
    with pytest.raises(TypeError):
        client.predict(prompt_text="a", frames=999, api_name="/generate")
    # Extra positional values are dropped by Gradio: the clip has the preset's frames and size.
    prompt = _unique("extra values")
    client.predict(prompt, PRESET, 5, False, "", 1, False, 999, 2048, 4096, api_name="/generate")
    (row,) = _rows_for(app, prompt)
    record = json.loads(Path(row["record_path"]).read_text())
    assert record["preset_size"] == {"frames": 81, "height": 480, "width": 832}
    assert (record["frames"], record["height"], record["width"]) == (81, 48, 96)  # the fake's 1/8


# -- faults -----------------------------------------------------------------------------------------

def test_oom_in_every_phase_falls_back_with_the_steps_reported(app):
    client = app.client(download_files=False)
    prompt = _unique("oom ladder")
    status, *_ = client.predict(prompt, "720x1280x81", 9, False, "", api_name="/generate")
    for phase in ("VAE decode", "text encoding"):
        assert f"ran out of GPU memory in {phase}" in status
    # After the 720p block-offload rung the one reload goes to phase offload, and the click stays
    # there: 720p/lean, then 480x832x81/lean (never back to block offload).
    assert "Ran 480x832x81 on the 'lean' memory settings instead" in status
    assert "The weights were loaded again: reloading the weights with offload_granularity=phase" in status
    (row,) = _rows_for(app, prompt)
    assert (row["status"], row["preset_requested"], row["preset_used"]) == ("done", "720x1280x81",
                                                                            "480x832x81")
    attempts = [(a["preset"], a["rung"], a["outcome"], a["phase"]) for a in json.loads(row["attempts"])]
    assert attempts == [
        ("720x1280x81", "chunked-rope", "out of memory", "VAE decode"),
        ("720x1280x81", "chunked-rope+lean-decode", "out of memory", "VAE decode"),
        ("720x1280x81", "lean", "out of memory", "text encoding"),
        ("480x832x81", "lean", "ok", ""),
    ]
    assert read_mp4_record(Path(row["video_path"]))["attempts"][-1]["outcome"] == "ok"

    # Nowhere left to step down to: a clear error, recorded in history, no file.
    prompt = _unique("oom everywhere")
    with pytest.raises(AppError) as err:
        client.predict(prompt, "480x832x49", 9, False, "", api_name="/generate")
    assert err.value.title == "Out of GPU memory"
    assert "Out of GPU memory on every fallback for 480x832x49" in str(err.value)
    (row,) = _rows_for(app, prompt)
    assert row["status"] == "failed" and row["video_path"] is None
    attempts = json.loads(row["attempts"])
    assert len(attempts) == 3 and {a["phase"] for a in attempts} == {"denoising"}


def test_disk_full_while_saving_gives_a_clear_error_and_keeps_history(app):
    client = app.client(download_files=False)
    client.predict(_unique("before disk full"), PRESET, 1, False, "", api_name="/generate")
    rows_before = app.history()
    files_before = listed_files(app.outputs)
    app.fault("disk-full", "")
    try:
        prompt = _unique("disk full")
        with pytest.raises(AppError) as err:
            client.predict(prompt, PRESET, 2, False, "", api_name="/generate")
    finally:
        app.fault("disk-full", None)
    assert err.value.title == "Saving the video failed"
    assert "is full: the video was not saved" in str(err.value)
    rows_after = app.history()
    assert rows_after[:len(rows_before)] == rows_before, "earlier history changed"
    (row,) = rows_after[len(rows_before):]
    assert (row["prompt"], row["status"], row["video_path"]) == (prompt, "failed", None)
    assert "full" in row["error"]
    assert listed_files(app.outputs) == files_before, "a partial file was left behind"
    # The disk has room again: the next job works.
    status, *_ = client.predict(_unique("after disk full"), PRESET, 3, False, "", api_name="/generate")
    assert status.startswith("Done:")


CLIENT_SCRIPT = """
import sys
from gradio_client import Client
client = Client(sys.argv[1], verbose=False, download_files=False)
client.predict(sys.argv[2], sys.argv[3], 11, False, "", api_name="/generate")
"""


def test_a_client_that_disconnects_mid_job_does_not_lose_the_job(app):
    prompt = _unique("disconnecting client")
    app.fault("slow-steps", "0.4")
    proc = subprocess.Popen([PYTHON, "-c", CLIENT_SCRIPT, app.url, prompt, PRESET], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _rows_for(app, prompt), 30, 0.05, "the job to start")
        assert _rows_for(app, prompt)[0]["status"] == "running"
        proc.kill()  # the connection drops mid-job, as when a browser tab closes
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        app.fault("slow-steps", None)
    row = wait_for(lambda: next((r for r in _rows_for(app, prompt) if r["status"] != "running"), None),
                   30, 0.1, "the orphaned job to finish")
    assert row["status"] == "done"
    assert Path(row["video_path"]).is_file()
    gallery, _ = app.client(download_files=False).predict(api_name="/history")
    assert any(item["caption"].startswith(f"#{row['id']} ") for item in gallery)


def test_sigkill_mid_generation_and_mid_write_leaves_consistent_history(tmp_path):
    outputs = tmp_path / "outputs"

    def submit(app, prompt):
        app.client(download_files=False).submit(prompt, PRESET, 1, False, "", api_name="/generate")

    # 1. Killed while denoising.
    first = start_app(tmp_path, faults=True, outputs=outputs, name="first")
    try:
        first.fault("slow-steps", "1.0")
        submit(first, "killed while denoising")
        wait_for(lambda: history_rows(outputs), 30, 0.05, "the job to start")
        first.kill()
    finally:
        first.stop()
    assert [r["status"] for r in history_rows(outputs)] == ["running"]

    # 2. Restart: the job is marked interrupted. Then killed while the mp4 is being written.
    second = start_app(tmp_path, faults=True, outputs=outputs, name="second")
    try:
        assert [r["status"] for r in second.history()] == ["interrupted"]
        second.fault("slow-steps", None)
        second.fault("slow-write", "30")
        submit(second, "killed while writing the mp4")
        wait_for(lambda: any(".partial" in n for n in listed_files(outputs)), 30, 0.05,
                 "the mp4 to be half written")
        second.kill()
    finally:
        second.stop()
    assert any(n.endswith(".mp4") for n in listed_files(outputs))  # the half-written temp file
    (outputs / "notes.json").write_text("{}")  # the user's own file: start-up must not touch it

    # 3. Restart: leftovers removed, both jobs marked, nothing listed; the app works.
    third = start_app(tmp_path, faults=True, outputs=outputs, name="third")
    try:
        third.fault("slow-write", None)
        rows = third.history()
        assert [(r["prompt"], r["status"], r["video_path"]) for r in rows] == [
            ("killed while denoising", "interrupted", None),
            ("killed while writing the mp4", "interrupted", None)]
        assert [n for n in listed_files(outputs)
                if not n.startswith("history.sqlite3") and n != LOCK_NAME] == ["notes.json"]
        client = third.client(download_files=False)
        gallery, _ = client.predict(api_name="/history")
        assert gallery == []
        status, *_ = client.predict("after two crashes", PRESET, 4, False, "", api_name="/generate")
        assert status.startswith("Done:")
        gallery, _ = client.predict(api_name="/history")
        assert [g["caption"].split(" ")[0] for g in gallery] == ["#3"]
    finally:
        third.stop()
    conn = sqlite3.connect(outputs / "history.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    done = [r for r in history_rows(outputs) if r["status"] == "done"]
    assert len(done) == 1 and Path(done[0]["video_path"]).is_file()


def test_a_second_app_on_the_same_outputs_folder_refuses_and_touches_nothing(tmp_path):
    """Started twice by mistake (another port, same folder): the second must not take the first
    one's half-written video for a leftover, nor mark its running job interrupted."""
    outputs = tmp_path / "outputs"
    with running_app(tmp_path, faults=True, outputs=outputs, name="first") as first:
        first.fault("slow-write", "120")  # held until this test has looked; released below
        first.client(download_files=False).submit("written while a second app starts", PRESET, 1, False, "",
                                                   api_name="/generate")
        wait_for(lambda: any(".partial" in n for n in listed_files(outputs)), 30, 0.05,
                 "the mp4 to be half written")
        files_before = listed_files(outputs)

        second = run_app_to_exit(["--backend", "fake", "--outputs-dir", str(outputs), "--port", str(free_port())],
                                 tmp_path)
        assert second.returncode == 2, second.stderr
        assert "already using the outputs folder" in second.stderr
        assert f"pid {first.proc.pid}" in second.stderr and "--outputs-dir" in second.stderr
        assert "Traceback" not in second.stderr
        assert listed_files(outputs) == files_before
        assert [r["status"] for r in history_rows(outputs)] == ["running"]

        first.fault("slow-write", None)
        wait_for(lambda: [r["status"] for r in history_rows(outputs)] == ["done"], 60, 0.1, "the job to finish")
        assert Path(history_rows(outputs)[0]["video_path"]).is_file()
    # The folder is free again once the first app stopped (the operating system drops its lock).
    with running_app(tmp_path, outputs=outputs, name="third") as third:
        assert [r["status"] for r in third.history()] == ["done"]


# -- auth -------------------------------------------------------------------------------------------

def test_requests_without_credentials_are_refused(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    # The same auth that --listen requires; the server still binds loopback only, as tests must.
    with running_app(tmp_path, auth=("alice", "correct horse")) as app:
        refused = [
            raw_get(app.port, "/config"),
            raw_get(app.port, "/gradio_api/info"),
            raw_get(app.port, "/gradio_api/openapi.json"),
            raw_get(app.port, "/gradio_api/file=/etc/passwd"),
            raw_post(app.port, "/gradio_api/queue/join",
                     {"data": ["x", PRESET, 1, False, ""], "fn_index": 0, "session_hash": "s1"}),
            raw_post(app.port, "/gradio_api/call/generate", {"data": ["x", PRESET, 1, False, ""]}),
            raw_post(app.port, "/gradio_api/run/generate", {"data": ["x", PRESET, 1, False, ""]}),
        ]
        assert [status for status, _ in refused] == [401] * len(refused)
        status, _ = raw_post(app.port, "/login", b"username=alice&password=wrong",
                             {"Content-Type": "application/x-www-form-urlencoded"})
        assert status in (400, 401)
        with pytest.raises(AuthenticationError):
            Client(app.url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(app.url, auth=("alice", "wrong"), verbose=False)
        assert app.history() == []
        # With the password everything works (the refusals above were not a broken server).
        status, *_ = app.client(download_files=False).predict("with credentials", PRESET, 1, False,
                                                              "", api_name="/generate")
        assert status.startswith("Done:")
        assert [r["prompt"] for r in app.history()] == ["with credentials"]


# -- file routes ------------------------------------------------------------------------------------

def test_file_routes_serve_outputs_and_nothing_else(app):
    client = app.client(download_files=False)
    client.predict(_unique("served"), PRESET, 8, False, "", api_name="/generate")
    video = Path(app.history()[-1]["video_path"])
    out = app.outputs
    status, body = raw_get(app.port, f"/gradio_api/file={video}")
    assert status == 200 and body == video.read_bytes()  # the route works for what it should serve

    attacks = [
        f"/gradio_api/file={out}/history.sqlite3",
        f"/gradio_api/file={out}/history.sqlite3-wal",
        f"/gradio_api/file={out}/history.sqlite3-shm",
        f"/gradio_api/file={out}/./history.sqlite3",
        f"/gradio_api/file={out}/../{out.name}/history.sqlite3",
        f"/gradio_api/file={out}/%68istory.sqlite3",
        f"/gradio_api/file={out}/../weights/model.safetensors",
        f"/gradio_api/file={out}/%2e%2e/weights/model.safetensors",
        f"/gradio_api/file={out}/%2E%2E%2Fweights%2Fmodel.safetensors",
        "/gradio_api/file=weights/model.safetensors",
        "/gradio_api/file=./weights/model.safetensors",
        f"/gradio_api/file={out}/../../../../../../..{REPO}/app.py",
        f"/gradio_api/file={REPO}/app.py",
        "/gradio_api/file=app.py",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=%2Fetc%2Fpasswd",
        "/gradio_api/file=../../../../../../../etc/passwd",
        "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        f"/gradio_api/file={out}/../../../../../../../etc/passwd",
        "/gradio_api/file/etc/passwd",
        f"/gradio_api/file/{out}/history.sqlite3",
        "/file=/etc/passwd",
        "/static/../../../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/assets/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        f"/gradio_api/proxy=http://127.0.0.1:{app.port}/gradio_api/file=/etc/passwd",
        "/gradio_api/file=http://127.0.0.1:1/etc/passwd",
    ]
    leaks = []
    for path in attacks:
        status, body = raw_get(app.port, path)
        if status < 400 or any(marker in body for marker in (SECRET, b"root:", b"SQLite format 3",
                                                             b"import argparse")):
            leaks.append((path, status, body[:80]))
    assert leaks == [], leaks

    # No upload inputs exist, and Gradio's upload route takes at most 1 MB.
    boundary = "b0undary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
              f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * (2 * 1024**2) + \
        f"\r\n--{boundary}--\r\n".encode()
    status, _ = raw_post(app.port, "/gradio_api/upload", upload,
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_the_real_mp4_encoder_is_caught(tmp_path, monkeypatch):
    """imageio-ffmpeg ignores ffmpeg's exit status: on ENOSPC ffmpeg stops, and the writer returns
    as if all was well, leaving a short or empty file. The store must notice and publish nothing."""
    import numpy as np

    from pipeline.store import outputs as outputs_module
    from pipeline.errors import OutputError
    from pipeline.store.outputs import PARTIAL_MARK, OutputStore

    if not outputs_module._bundled_ffmpeg_available():
        pytest.skip("imageio-ffmpeg's ffmpeg is not installed here: the PyAV writer raises on ENOSPC itself")
    store = OutputStore(tmp_path / "out")
    store.ensure()
    frames = np.random.default_rng(0).integers(0, 256, (9, 48, 96, 3), dtype=np.uint8)

    def doomed_stem(job_id: int) -> str:
        # The temp file the encoder writes is a link to /dev/full: every write fails with ENOSPC.
        stem = store.new_stem(job_id, "480x832x49", 1)
        (store.root / f".{stem}{PARTIAL_MARK}.mp4").symlink_to("/dev/full")
        return stem

    with pytest.raises(OutputError, match="produced 0 of 9 frames"):
        store.save(doomed_stem(1), frames, 16, {"job_id": 1})
    assert listed_files(store.root) == []

    class Usage:  # shutil.disk_usage's answer on a disk that really is full
        total, used, free = 10 * 1024**3, 10 * 1024**3 - 4096, 4096

    monkeypatch.setattr(outputs_module.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(OutputError, match="is full: the video was not saved"):
        store.save(doomed_stem(2), frames, 16, {"job_id": 2})
    assert listed_files(store.root) == []
    monkeypatch.undo()
    video, sidecar = store.save(store.new_stem(3, "480x832x49", 1), frames, 16, {"job_id": 3})
    assert listed_files(store.root) == sorted([video.name, sidecar.name])


def test_start_up_clean_up_removes_only_what_a_killed_save_left(tmp_path):
    """A kill between the two renames in save() leaves the record without its video; start-up
    removes it, and the user's own files in the folder (JSON included) stay."""
    import numpy as np

    from pipeline.store.outputs import PARTIAL_MARK, OutputStore

    store = OutputStore(tmp_path)
    frames = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    kept, _ = store.save(store.new_stem(1, "480x832x49", 1), frames, 16, {"job_id": 1})
    lost, lost_record = store.save(store.new_stem(2, "480x832x49", 2), frames, 16, {"job_id": 2})
    lost.rename(tmp_path / f".{lost.stem}{PARTIAL_MARK}.mp4")  # the video never got its name
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "settings.json").write_text(json.dumps({"video": "elsewhere.mp4"}))
    removed = sorted(p.name for p in store.clean_leftovers())
    assert removed == sorted([f".{lost.stem}{PARTIAL_MARK}.mp4", lost_record.name])
    assert listed_files(tmp_path) == sorted([kept.name, kept.with_suffix(".json").name,
                                             "notes.json", "settings.json"])
