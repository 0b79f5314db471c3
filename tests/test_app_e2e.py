"""The app as a user starts it: `python app.py ...` as a subprocess on 127.0.0.1, driven with
gradio_client. Generate -> video, history (SQLite and the gallery), record beside the mp4 and inside
it; a forced OOM shows its fallback; start-up refusals; a machine without an NVIDIA GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError

from tests.apphelpers import raw_get, run_app_to_exit, running_app, start_app, wait_for
from pipeline.store.outputs import read_mp4_record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    with running_app(tmp, faults=True, WAN_STUDIO_FAKE_OOM="720x1280x81:*:denoising") as running:
        yield running


def test_generate_returns_the_video_and_records_it_everywhere(app):
    client = app.client()
    prompt = "A lighthouse on a cliff at dusk, waves below"
    status, seed, video, record_text, gallery, _plot, _note, preview = client.predict(
        prompt, "480x832x49", 1234, False, "blurry", api_name="/generate")
    # The API hands out the last step's preview too: a small animated GIF, not the clip.
    assert Path(preview).read_bytes()[:6] in (b"GIF89a", b"GIF87a")

    assert status.startswith("Done: **480x832x49** on 'fast' settings, seed 1234")
    assert seed == 1234
    rows = [r for r in app.history() if r["prompt"] == prompt]
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["seed"], row["negative_prompt"]) == ("done", 1234, "blurry")
    mp4, sidecar = Path(row["video_path"]), Path(row["record_path"])
    assert mp4.parent == app.outputs and sidecar == mp4.with_suffix(".json")
    # What the caller downloaded is the saved file.
    assert Path(video).read_bytes() == mp4.read_bytes()
    # The record: beside the mp4, in the mp4's metadata, and in the result, all the same.
    record = json.loads(sidecar.read_text())
    # The sidecar adds the mp4 encode time, which the copy inside the mp4 cannot know.
    encode_s = record["timings_s"].pop("writing mp4")
    assert encode_s > 0
    assert read_mp4_record(mp4) == record
    record["timings_s"]["writing mp4"] = encode_s
    assert json.loads(record_text) == record
    assert record["video"] == mp4.name
    assert (record["job_id"], record["prompt"], record["seed"]) == (row["id"], prompt, 1234)
    # The record states the file's own pixel size (the fake writes 1/8 of the preset's), and the
    # preset's size beside it; the command line is the one the app was started with.
    import imageio.v3 as iio

    shape = iio.improps(mp4, plugin="pyav").shape
    assert (record["frames"], record["height"], record["width"]) == shape[:3] == (49, 48, 96)
    assert record["preset_size"] == {"height": 480, "width": 832, "frames": 49}
    assert record["preset_used"] == "480x832x49"
    assert record["argv"][0] == "app.py" and record["argv"][1:3] == ["--backend", "fake"]
    assert "--outputs-dir" in record["argv"] and "--port" in record["argv"]
    assert record["model"]["backend"] == "fake"
    # The gallery, from the result and from the history endpoint a freshly opened tab calls.
    caption = f"#{row['id']} · 480x832x49 · seed 1234"
    assert [g["caption"] for g in gallery][0] == caption
    fresh_gallery, _ = client.predict(api_name="/history")
    assert [g["caption"] for g in fresh_gallery][0] == caption
    still = Path(fresh_gallery[0]["image"])  # the clip's first frame, as a JPEG
    assert still.suffix == ".jpg" and still.read_bytes()[:3] == b"\xff\xd8\xff"


def _non_loopback_address() -> str | None:
    # A UDP "connect" sends nothing; it only asks the kernel which local address would be used.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_app_binds_loopback_only_by_default(app):
    import app as app_module

    assert app_module.settings_from_args([]).host == "127.0.0.1"
    assert app_module.settings_from_args(["--listen", "--auth", "u:p"]).host == "0.0.0.0"
    assert f"Running on local URL:  http://127.0.0.1:{app.port}" in app.log()
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with socket.socket() as other:
        other.settimeout(3)
        assert other.connect_ex((address, app.port)) != 0, f"reachable on {address}"


def test_forced_oom_falls_back_and_says_so(app):
    client = app.client(download_files=False)
    prompt = "A city street in the rain at night"
    status, *_ = client.predict(prompt, "720x1280x81", 7, False, "", api_name="/generate")
    assert "Done: **480x832x81**" in status
    from presets import load_presets

    # The low-RAM rung has lean's GPU settings: after lean runs out of GPU memory it is skipped.
    rungs = [r.name for r in load_presets()["720x1280x81"].rungs if not r.dit_from_disk]
    failed = "; ".join(f"720x1280x81/{r} ran out of GPU memory in denoising" for r in rungs)
    # One reload (block -> phase offload) and the click stays on phase offload.
    assert f"{failed}. Ran 480x832x81 on the 'lean' memory settings instead." in status
    (row,) = [r for r in app.history() if r["prompt"] == prompt]
    assert (row["preset_requested"], row["preset_used"], row["rung_used"]) == (
        "720x1280x81", "480x832x81", "lean")
    record = read_mp4_record(Path(row["video_path"]))
    assert [a["outcome"] for a in record["attempts"]] == ["out of memory"] * len(rungs) + ["ok"]


def test_a_prompt_past_the_text_encoders_limit_runs_and_says_what_was_cut(app):
    client = app.client(download_files=False)
    prompt = "A slow pan across a mountain lake at sunrise, mist over the water. " * 28  # ~1900 chars
    status, *_ = client.predict(prompt, "480x832x49", 1, False, "", api_name="/generate")
    assert status.startswith("Done:")
    assert "longer than the text encoder's 512 tokens: only its beginning was used" in status
    (row,) = [r for r in app.history() if r["prompt"] == prompt]
    assert json.loads(Path(row["record_path"]).read_text())["prompt_truncated"] is True


def test_cancel_through_the_api_stops_the_job_at_a_step_boundary(app):
    client = app.client(download_files=False)
    prompt = "A job that will be cancelled"
    app.fault("slow-steps", "0.5")
    try:
        job = client.submit(prompt, "480x832x49", 3, False, "", api_name="/generate")
        wait_for(lambda: any(r["prompt"] == prompt for r in app.history()), 20, 0.05, "the job")
        wait_for(lambda: "Denoising" in (job.outputs() or [[""]])[-1][0], 20, 0.05, "a step")
        assert client.predict(api_name="/cancel") == "Cancelling at the next step boundary…"
        with pytest.raises(AppError) as err:
            job.result(timeout=30)
    finally:
        app.fault("slow-steps", None)
    assert err.value.title == "Cancelled" and "step boundary" in str(err.value)
    assert job.outputs()[-1][0] == "**Cancelled.** Cancelled at a step boundary."
    (row,) = [r for r in app.history() if r["prompt"] == prompt]
    assert (row["status"], row["video_path"]) == ("cancelled", None)
    # With nothing running, Cancel says so.
    assert client.predict(api_name="/cancel") == "Nothing to cancel."


@pytest.mark.parametrize("args, what", [
    (["--share"], "--share"),
    (["--listen"], "binding 0.0.0.0"),
    (["--host", "0.0.0.0"], "binding 0.0.0.0"),
    (["--listen", "--share"], "--share"),
])
def test_exposing_the_app_without_auth_is_refused(tmp_path, args, what):
    result = run_app_to_exit(["--backend", "fake", *args], tmp_path, timeout=60)
    assert result.returncode == 2
    assert "Refusing to start" in result.stderr and what in result.stderr
    assert "--auth user:password" in result.stderr and "WAN_STUDIO_AUTH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists(), "nothing may happen before the refusal"


@pytest.mark.parametrize("args, message", [
    (["--listen", "--auth", "nopassword"], "must be 'user:password'"),
    (["--outputs-dir", "."], "everything in the outputs folder is served"),
    (["--vram-cap-gib", "0"], "must be a positive number"),
])
def test_bad_start_options_are_refused_with_a_message(tmp_path, args, message):
    result = run_app_to_exit(["--backend", "fake", "--weights-dir", str(tmp_path / "w" / "x"), *args],
                             tmp_path, timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_reported_plainly(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_app_to_exit(["--backend", "fake", "--port", str(port),
                                  "--outputs-dir", str(tmp_path / "out")], tmp_path, timeout=90)
    assert result.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr


NO_DRIVER_PYNVML = """
# Stands in for nvidia-ml-py on a machine without the NVIDIA driver: nvmlInit fails as it does there.
class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


def nvmlInit():
    raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
"""


def test_without_an_nvidia_gpu_the_app_starts_and_generate_explains(tmp_path):
    """The real backend on a machine without an NVIDIA GPU must still start the UI. Forced, so that
    it holds on a GPU machine too: NVML answers as without a driver, and CUDA sees no device."""
    stub = tmp_path / "no-driver"
    stub.mkdir()
    (stub / "pynvml.py").write_text(NO_DRIVER_PYNVML)
    # The stub goes in front of whatever PYTHONPATH already holds (an install may rely on it).
    pythonpath = os.pathsep.join(p for p in (str(stub), os.environ.get("PYTHONPATH", "")) if p)
    with running_app(tmp_path, backend="lightx2v", PYTHONPATH=pythonpath, CUDA_VISIBLE_DEVICES="") as app:
        status, body = raw_get(app.port, "/config")
        assert status == 200
        assert re.search(r"No NVIDIA GPU\*\* detected", body.decode()), "the VRAM panel"
        client = app.client(download_files=False)
        with pytest.raises(AppError) as err:
            client.predict("A cat on a windowsill", "480x832x49", 1, False, "", api_name="/generate")
        message = str(err.value)
        # Whichever check answers first (no LightX2V here, or no GPU), it is a sentence, not a trace.
        assert re.search(r"LightX2V|NVIDIA GPU", message), message
        assert err.value.title in ("Generation is not available", "No NVIDIA GPU")
        assert "Traceback" not in message and "Unexpected error" not in message
        assert app.history() == [], "nothing was started"
        # The app is still up and answering after the refusal.
        assert raw_get(app.port, "/config")[0] == 200
    assert "Traceback" not in app.log()


def test_a_backend_module_that_cannot_be_imported_fails_at_generate_not_at_start(tmp_path,
                                                                                 monkeypatch):
    import app as app_module
    from pipeline.errors import BackendUnavailable
    from pipeline.types import GenerationRequest

    # None in sys.modules makes `import pipeline.backends.lightx2v` raise ImportError.
    monkeypatch.setitem(sys.modules, "pipeline.backends.lightx2v", None)
    settings = app_module.settings_from_args(["--outputs-dir", str(tmp_path / "out")])
    _demo, ctx = app_module.build_app(settings)  # the app still builds
    job = ctx.jobs.submit(GenerationRequest(prompt="a cat", preset="480x832x49", seed=1))
    assert job.done.wait(10)
    assert isinstance(job.error, BackendUnavailable)
    assert "The LightX2V backend cannot run here: ModuleNotFoundError" in str(job.error)
    assert "./run.sh" in str(job.error) and "doctor" in str(job.error)
    assert ctx.history.recent(10, status=None) == []
    ctx.jobs.shutdown()
    ctx.history.close()


# -- one GPU lane, reached over the API ------------------------------------------------------------

def _hold_the_gpu(app, prompt):
    """Start a slow job from its own client session and wait until it runs."""
    app.fault("slow-steps", "0.5")
    holder = app.client(download_files=False)
    job = holder.submit(prompt, "480x832x49", 1, False, "", api_name="/generate")
    wait_for(lambda: any(r["prompt"] == prompt for r in app.history()), 20, 0.05, "the first job")
    return job


def _queued(job):
    return any(o[0].startswith("Queued: ") for o in job.outputs() or [])


def test_cancel_over_the_api_withdraws_this_sessions_waiting_job_only(app):
    first = _hold_the_gpu(app, "holds the GPU for the API cancel")
    try:
        mine, other = app.client(download_files=False), app.client(download_files=False)
        waiting = mine.submit("withdrawn over the API", "480x832x49", 2, False, "", api_name="/generate")
        kept = other.submit("another session's job", "480x832x49", 3, False, "", api_name="/generate")
        wait_for(lambda: _queued(waiting) and _queued(kept), 20, 0.05, "both to be queued")
        assert mine.predict(api_name="/cancel") == (
            "Withdrawn: 1 waiting job left the queue before reaching the GPU.")
        with pytest.raises(AppError) as err:
            waiting.result(timeout=20)
        assert err.value.title == "Cancelled" and "Withdrawn from the queue" in str(err.value)
    finally:
        app.fault("slow-steps", None)
    assert first.result(timeout=30)[0].startswith("Done:")
    assert kept.result(timeout=30)[0].startswith("Done:"), "another session's job was not touched"
    prompts = [r["prompt"] for r in app.history()]
    assert "withdrawn over the API" not in prompts and "another session's job" in prompts


def test_gradio_clients_job_cancel_takes_effect(app):
    first = _hold_the_gpu(app, "holds the GPU for Job.cancel")
    try:
        client = app.client(download_files=False)
        waiting = client.submit("cancelled with Job.cancel while waiting", "480x832x49", 4, False, "",
                                api_name="/generate")
        wait_for(lambda: _queued(waiting), 20, 0.05, "the job to be queued")
        assert waiting.cancel() is True
        # Job.cancel() on the running one: it stops at a step boundary.
        assert first.cancel() is True
        wait_for(lambda: next(r for r in app.history() if r["prompt"] == "holds the GPU for Job.cancel")
                 ["status"] == "cancelled", 20, 0.1, "the running job to stop")
    finally:
        app.fault("slow-steps", None)
    time.sleep(1.0)  # the withdrawn job's turn would have come by now
    assert "cancelled with Job.cancel while waiting" not in [r["prompt"] for r in app.history()]


def test_count_queues_a_batch_with_consecutive_seeds_cancellable_together(app):
    client = app.client(download_files=False)
    status, seed, *_ = client.predict("a batch of three", "480x832x49", 100, False, "", 3,
                                      api_name="/generate")
    assert status.startswith("Clip 3 of 3 (seed 102). Done:") and seed == 102
    rows = [r for r in app.history() if r["prompt"] == "a batch of three"]
    assert [(r["seed"], r["status"]) for r in rows] == [(100, "done"), (101, "done"), (102, "done")]
    assert len({r["video_path"] for r in rows}) == 3, "each clip its own history entry"

    app.fault("slow-steps", "0.5")
    try:
        batch = client.submit("a batch cancelled together", "480x832x49", 7, False, "", 4,
                              api_name="/generate")
        wait_for(lambda: any(r["prompt"] == "a batch cancelled together" for r in app.history()),
                 20, 0.05, "the batch to start")
        answer = client.predict(api_name="/cancel")
        assert answer == ("Cancelling at the next step boundary… Withdrawn: 3 waiting jobs left the "
                          "queue before reaching the GPU.")
        with pytest.raises(AppError):
            batch.result(timeout=30)
    finally:
        app.fault("slow-steps", None)
    rows = [r for r in app.history() if r["prompt"] == "a batch cancelled together"]
    assert [(r["seed"], r["status"]) for r in rows] == [(7, "cancelled")]


def test_the_start_up_text_is_the_apps_own(app):
    log = app.log()
    assert "share=True" not in log and "launch()" not in log
    assert "--share --auth user:pass" in log and "--listen --auth user:pass" in log
    assert f"videos and their records are in {app.outputs.resolve()}" in log


def test_fifty_guessed_passwords_are_throttled_and_the_right_one_still_works(tmp_path):
    from tests.apphelpers import raw_post

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with running_app(tmp_path, auth=("alice", "correct horse"), WAN_STUDIO_LOGIN_LOCK_S="2") as app:
        answers = [raw_post(app.port, "/login", f"username=alice&password=guess-{i:02d}".encode(),
                            form)[0] for i in range(50)]
        # Five wrong guesses are checked, then the address is refused without a check.
        assert answers[:5] == [400] * 5 and answers.count(429) >= 40, answers
        assert set(answers) == {400, 429}
        status, body = raw_post(app.port, "/login", b"username=alice&password=correct+horse", form)
        assert status == 429 and b"Too many failed logins" in body, "locked even for the right one"
        time.sleep(2.2)
        status, _ = raw_post(app.port, "/login", b"username=alice&password=correct+horse", form)
        assert status == 200
        assert app.client(download_files=False).predict("after the guesses", "480x832x49", 1, False,
                                                        "", api_name="/generate")[0].startswith("Done:")
        log = app.log()
    assert "guess-" not in log and "correct horse" not in log, "a password reached the log"
    assert "5 failed logins from 127.0.0.1 (last as user 'alice'); refusing that address" in log
    assert "'alice' logged in from 127.0.0.1" in log


def test_stopping_the_app_mid_job_tells_the_client_why(tmp_path):
    app = start_app(tmp_path, faults=True)
    try:
        app.fault("slow-steps", "0.5")
        client = app.client(download_files=False)
        running = client.submit("running when the app stops", "480x832x49", 1, False, "",
                                api_name="/generate")
        waiting = app.client(download_files=False).submit("waiting when the app stops", "480x832x49",
                                                           2, False, "", api_name="/generate")
        wait_for(lambda: any(r["prompt"] == "running when the app stops" for r in app.history()),
                 20, 0.05, "the job to start")
        wait_for(lambda: _queued(waiting), 20, 0.05, "the second job to be queued")
        app.proc.send_signal(signal.SIGTERM)  # as a service manager or Ctrl+C stops it
        for job in (running, waiting):
            with pytest.raises(AppError) as err:
                job.result(timeout=30)
            assert err.value.title == "The app was stopped", err.value
            assert "was stopped (Ctrl+C or shutdown) before this job finished" in str(err.value)
            assert "Start the app again" in str(err.value)
        app.proc.wait(timeout=30)
        assert app.proc.returncode == 0, app.log()
    finally:
        app.stop()
    assert "Traceback" not in app.log()


def test_draft_then_finish_through_the_api(tmp_path):
    from tests.apphelpers import running_app

    with running_app(tmp_path, WAN_STUDIO_FAKE_TINY_VAE="1") as app:
        client = app.client(download_files=False)
        prompt = "A draft of a heron taking off from a pond"
        status, *_ = client.predict(prompt, "480x832x49", 21, False, "", 1, True, api_name="/generate")
        assert status.startswith("Done:") and "**Draft** (tiny VAE)" in status
        (row,) = [r for r in app.history() if r["prompt"] == prompt]
        draft_record = json.loads(Path(row["record_path"]).read_text())
        assert draft_record["draft"] is True
        gallery, _ = client.predict(api_name="/history")
        assert gallery[0]["caption"].endswith("· draft")
        status, video, record_text, gallery, _plot, _note = client.predict(row["id"], api_name="/finish")
        assert "no denoising step ran" in status
        record = json.loads(record_text)
        assert record["finished_from_job"] == row["id"] and record["draft"] is False
        assert not gallery[0]["caption"].endswith("draft") and gallery[1]["caption"].endswith("· draft")
        # A clip that does not exist: a clear error, nothing queued.
        with pytest.raises(AppError) as err:
            client.predict(999, api_name="/finish")
        assert "no finished clip #999" in str(err.value)
