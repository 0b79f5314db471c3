"""Atomic outputs and the SQLite history."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import OutputError, OutputsInUse
from pipeline.store.history import History
from pipeline.store.outputs import OutputStore, read_mp4_record, write_mp4


def frames(n=9, h=32, w=48):
    return np.random.default_rng(0).integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def test_save_is_atomic_and_embeds_the_record(tmp_path):
    store = OutputStore(tmp_path)
    video, sidecar = store.save("clip", frames(), 16, {"prompt": "p", "seed": 1})
    assert video.name == "clip.mp4" and sidecar.name == "clip.json"
    assert json.loads(sidecar.read_text())["seed"] == 1
    assert read_mp4_record(video) == {"prompt": "p", "seed": 1, "video": "clip.mp4"}
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_pyav_writer_matches(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_imageio_ffmpeg(name, *args, **kwargs):
        if name == "imageio_ffmpeg":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imageio_ffmpeg)
    path = tmp_path / "x.mp4"
    write_mp4(frames(), 16, path, json.dumps({"a": 1}))
    monkeypatch.undo()
    import imageio.v3 as iio

    assert iio.imread(path, plugin="pyav").shape == (9, 32, 48, 3)
    assert read_mp4_record(path) == {"a": 1}


def test_disk_full_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    store = OutputStore(tmp_path)
    store.save("earlier", frames(), 16, {"n": 0})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.store.outputs.os.replace", full)
    with pytest.raises(OutputError, match="is full: the video was not saved"):
        store.save("next", frames(), 16, {"n": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.json", "earlier.mp4"]


def test_clean_leftovers_removes_partials_and_orphan_records(tmp_path):
    store = OutputStore(tmp_path)
    store.save("kept", frames(), 16, {})
    (tmp_path / ".dead.partial.mp4").write_bytes(b"half")
    (tmp_path / "orphan.json").write_text('{"video": "orphan.mp4"}')  # a record save() wrote
    removed = {p.name for p in store.clean_leftovers()}
    assert removed == {".dead.partial.mp4", "orphan.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "kept.mp4"]


def test_unwritable_outputs_dir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file-not-dir"
        target.write_text("x")
        store = OutputStore(target / "sub")  # mkdir under a regular file fails even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        store = OutputStore(locked / "sub")
    with pytest.raises(OutputError):
        store.save("x", frames(), 16, {})


def test_history_lifecycle_and_restart(tmp_path):
    db = tmp_path / "h.sqlite3"
    history = History(db)
    done = history.start_job(prompt="a", negative_prompt="", seed=1, preset="480x832x49")
    history.finish_job(done, preset_used="480x832x49", rung_used="fast", video_path=tmp_path / "a.mp4",
                       record_path=tmp_path / "a.json", peak_gib=7.1, seconds=3.0, attempts=[])
    failed = history.start_job(prompt="b", negative_prompt="", seed=2, preset="480x832x81")
    history.fail_job(failed, status="failed", error="boom", attempts=[])
    history.start_job(prompt="c", negative_prompt="", seed=3, preset="720x1280x81")  # killed mid-run
    history.close()

    reopened = History(db)
    assert reopened.mark_interrupted() == 1
    statuses = {e.prompt: e.status for e in reopened.recent(status=None)}
    assert statuses == {"a": "done", "b": "failed", "c": "interrupted"}
    assert [e.prompt for e in reopened.recent()] == ["a"]
    assert reopened.get(done).peak_gib == 7.1


def test_measurements_predict_the_highest_recent_peak_and_the_median_time(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    history.record_measurement("RTX 3060", "480x832x81", "fast", 9.9, 200.0)  # oldest: falls out
    for peak, seconds in ((8.6, 190.0), (8.2, 150.0), (8.2, 152.0), (8.3, None), (8.2, 151.0)):
        history.record_measurement("RTX 3060", "480x832x81", "fast", peak, seconds)
    history.record_measurement("H100", "480x832x81", "fast", 9.0, 20.0)
    assert history.measured_peaks("RTX 3060") == {("480x832x81", "fast"): 8.6}
    assert history.measured_seconds("RTX 3060") == {("480x832x81", "fast"): 152.0}
    assert history.measured_peaks("RTX 2060") == {}


def test_the_peak_before_a_software_change_is_asked_once_per_preset_and_rung(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    key = ("RTX 3060", "480x832x81", "fast")
    assert history.peak_before_software_changed(*key, "torch 2.11") is None  # nothing measured yet
    history.record_measurement(*key, 9.9, 200.0, software="torch 2.9")  # older software still
    for peak in (9.6, 9.8, 9.7):
        history.record_measurement(*key, peak, 190.0, software="torch 2.10")
    history.record_measurement(*key, None, 150.0, software="torch 2.10")  # a time alone: no peak
    history.record_measurement("H100", "480x832x81", "fast", 12.0, 20.0, software="torch 2.10")
    # The newest other software's highest recent peak (not the older 9.9, not another GPU's).
    assert history.peak_before_software_changed(*key, "torch 2.11") == (9.8, "torch 2.10")
    assert history.peak_before_software_changed(*key, "torch 2.10") is None  # measured it already
    history.record_measurement(*key, 10.6, 190.0, software="torch 2.11")
    # The new software measured it now: later runs are compared with nothing.
    assert history.peak_before_software_changed(*key, "torch 2.11") is None
    assert history.measured_peaks("RTX 3060") == {("480x832x81", "fast"): 10.6}


def test_a_first_run_after_an_update_is_compared_with_every_run_before_it_not_only_the_warm_ones(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    key = ("RTX 3060", "480x832x81", "fast")
    history.record_measurement(*key, 10.2, None, software="torch 2.10")  # a first run: it loaded the weights
    for _ in range(6):
        history.record_measurement(*key, 9.6, 150.0, software="torch 2.10")  # warm runs
    # The first run after the update loads the weights too: the same peak is no rise.
    assert history.peak_rise(*key, 10.2, "torch 2.11", 0.5) is None
    assert history.peak_rise(*key, 10.8, "torch 2.11", 0.5)["before_gib"] == 10.2


def test_a_history_written_before_measurements_named_their_software_opens_and_keeps_them(tmp_path):
    import sqlite3

    path = tmp_path / "h.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE measurements (id INTEGER PRIMARY KEY AUTOINCREMENT, gpu_name TEXT NOT NULL,"
                      " preset TEXT NOT NULL, rung TEXT NOT NULL, peak_gib REAL NOT NULL, seconds REAL,"
                      " measured_at REAL NOT NULL);"
                      " INSERT INTO measurements (gpu_name, preset, rung, peak_gib, seconds, measured_at)"
                      " VALUES ('RTX 3060', '480x832x49', 'fast', 8.4, 90.0, 0);")
    old.close()
    history = History(path)
    assert history.measured_peaks("RTX 3060") == {("480x832x49", "fast"): 8.4}
    # A measurement of unknown software is no baseline for a comparison.
    assert history.peak_before_software_changed("RTX 3060", "480x832x49", "fast", "torch 2.11") is None
    history.record_measurement("RTX 3060", "480x832x49", "fast", 8.5, 91.0, software="torch 2.11")
    history.close()
    assert History(path).peak_before_software_changed("RTX 3060", "480x832x49", "fast", "torch 2.12") == \
        (8.5, "torch 2.11")


def test_a_job_killed_after_its_video_landed_is_adopted_at_restart(tmp_path):
    store = OutputStore(tmp_path)
    history = History(tmp_path / "h.sqlite3")
    saved_id = history.start_job(prompt="saved", negative_prompt="", seed=1, preset="480x832x49")
    lost_id = history.start_job(prompt="lost", negative_prompt="", seed=2, preset="480x832x49")
    record = {"job_id": saved_id, "preset_used": "480x832x49", "rung_used": "fast",
              "vram": {"peak_torch_reserved_gib": 8.3}, "timings_s": {"total": 12.5},
              "attempts": [{"preset": "480x832x49", "rung": "fast", "outcome": "ok"}]}
    video, sidecar = store.save(store.new_stem(saved_id, "480x832x49", 1), frames(), 16, record)
    history.close()  # the process dies before finish_job

    history = History(tmp_path / "h.sqlite3")
    assert history.mark_interrupted() == 2
    assert history.adopt_saved(store.find_saved) == 1
    entries = {e.prompt: e for e in history.recent(status=None)}
    assert entries["saved"].status == "done" and entries["saved"].video_path == str(video)
    assert entries["saved"].rung_used == "fast" and entries["saved"].peak_gib == 8.3
    assert entries["lost"].status == "interrupted" and entries["lost"].video_path is None
    assert store.find_saved(lost_id) is None


def test_one_outputs_folder_belongs_to_one_app(tmp_path):
    from pipeline.store.outputs import LOCK_NAME

    first, second = OutputStore(tmp_path), OutputStore(tmp_path)
    first.claim()
    first.claim()  # the owner may ask again
    with pytest.raises(OutputsInUse, match=rf"{re.escape(str(tmp_path))}.*pid {os.getpid()}.*--outputs-dir"):
        second.claim()
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}, started ")


def test_a_killed_owner_leaves_no_stale_claim(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.store.outputs import OutputStore; "
         f"store = OutputStore(Path({str(tmp_path)!r})); store.claim(); print('claimed', flush=True); time.sleep(60)"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(OutputsInUse, match=f"pid {holder.pid}"):
            OutputStore(tmp_path).claim()
        holder.kill()
        holder.wait(timeout=10)
        OutputStore(tmp_path).claim()  # no clean-up of the dead owner needed
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_file_system_without_locks_still_runs_the_app(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    OutputStore(tmp_path).claim()  # as on NFS without lockd: warned, not refused
    assert "no file locks" in caplog.text


def test_a_lock_error_of_another_kind_is_a_clear_output_error(tmp_path, monkeypatch):
    import fcntl

    def broken(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OutputError, match="Input/output error"):
        OutputStore(tmp_path).claim()


def test_a_record_that_is_not_a_json_object_reads_as_missing(tmp_path):
    from pipeline.store.outputs import read_record

    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "ok.json").write_text('{"seed": 3}', encoding="utf-8")
    assert read_record(tmp_path / "list.json") is None and read_record(tmp_path / "bad.json") is None
    assert read_record(tmp_path / "gone.json") is None and read_record(None) is None
    assert read_record(str(tmp_path / "ok.json")) == {"seed": 3}
