"""The job history: a SQLite database (WAL) beside the outputs that survives restarts.

A job row is inserted as `running` when the job starts and completed in ONE transaction after its
video and record are in place, so a kill leaves a `running` row that `mark_interrupted` turns into
`interrupted` at the next start, and never a `done` row without a file. The same database keeps
the peak VRAM and time measured per GPU, preset and memory rung, which supersede the shipped
prediction and give an honest time estimate before Generate, and the kernel choices measured per
GPU (pipeline/backends/kernels.py: which attention kernel is fastest at a shape), so a GPU measures once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# How many recent runs per GPU, preset and rung a prediction is made from.
MEASUREMENT_WINDOW = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL CHECK (status IN ('running','done','failed','cancelled','interrupted')),
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL DEFAULT '',
    seed INTEGER NOT NULL,
    preset_requested TEXT NOT NULL,
    preset_used TEXT,
    rung_used TEXT,
    video_path TEXT,
    record_path TEXT,
    error TEXT,
    peak_gib REAL,
    seconds REAL,
    attempts TEXT
);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    gpu_name TEXT NOT NULL,
    preset TEXT NOT NULL,
    rung TEXT NOT NULL,
    peak_gib REAL NOT NULL,
    seconds REAL,
    measured_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS measurements_by_key ON measurements (gpu_name, preset, rung, id);
CREATE TABLE IF NOT EXISTS kernel_choices (
    gpu_name TEXT NOT NULL,
    key TEXT NOT NULL,
    choice TEXT NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (gpu_name, key)
);
"""


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    created_at: float
    status: str
    prompt: str
    negative_prompt: str
    seed: int
    preset_requested: str
    preset_used: str | None
    rung_used: str | None
    video_path: str | None
    record_path: str | None
    error: str | None
    peak_gib: float | None
    seconds: float | None


class History:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                     timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        # Databases written before measurements named their software gain the column (NULL: unknown).
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(measurements)")}
        if "software" not in columns:
            self._conn.execute("ALTER TABLE measurements ADD COLUMN software TEXT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, sql: str, params: tuple) -> sqlite3.Cursor:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(sql, params)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return cur

    def start_job(self, *, prompt: str, negative_prompt: str, seed: int, preset: str) -> int:
        cur = self._write(
            "INSERT INTO jobs (created_at, status, prompt, negative_prompt, seed, preset_requested)"
            " VALUES (?, 'running', ?, ?, ?, ?)", (time.time(), prompt, negative_prompt, seed, preset))
        return int(cur.lastrowid)

    def finish_job(self, job_id: int, *, preset_used: str, rung_used: str, video_path: Path,
                   record_path: Path, peak_gib: float | None, seconds: float,
                   attempts: list[dict[str, Any]]) -> None:
        self._write(
            "UPDATE jobs SET status='done', finished_at=?, preset_used=?, rung_used=?, video_path=?,"
            " record_path=?, peak_gib=?, seconds=?, attempts=? WHERE id=?",
            (time.time(), preset_used, rung_used, str(video_path), str(record_path), peak_gib,
             seconds, json.dumps(attempts), job_id))

    def fail_job(self, job_id: int, *, status: str, error: str, attempts: list[dict[str, Any]]) -> None:
        assert status in ("failed", "cancelled")
        self._write("UPDATE jobs SET status=?, finished_at=?, error=?, attempts=? WHERE id=?",
                    (status, time.time(), error, json.dumps(attempts), job_id))

    def mark_interrupted(self) -> int:
        """At start-up: jobs still `running` were killed with the previous process."""
        cur = self._write("UPDATE jobs SET status='interrupted', finished_at=? WHERE status='running'",
                          (time.time(),))
        return cur.rowcount

    def adopt_saved(self, find_saved) -> int:
        """At start-up: an interrupted job whose video and record were already in place (a kill
        between the rename and the history update) is complete; list it as done.

        `find_saved(job_id)` returns (video, record path, record) or None."""
        adopted = 0
        for entry in self._rows(f"SELECT {self._COLUMNS} FROM jobs WHERE status='interrupted'"):
            saved = find_saved(entry.id)
            if saved is None:
                continue
            video, record_path, record = saved
            vram = record.get("vram") or {}
            self._write(
                "UPDATE jobs SET status='done', preset_used=?, rung_used=?, video_path=?, record_path=?,"
                " peak_gib=?, seconds=?, attempts=? WHERE id=? AND status='interrupted'",
                (record.get("preset_used"), record.get("rung_used"), str(video), str(record_path),
                 vram.get("peak_torch_reserved_gib"), (record.get("timings_s") or {}).get("total"),
                 json.dumps(record.get("attempts", [])), entry.id))
            adopted += 1
        return adopted

    def _rows(self, sql: str, params: tuple = ()) -> list[HistoryEntry]:
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [HistoryEntry(*row) for row in rows]

    _COLUMNS = ", ".join(f.name for f in fields(HistoryEntry))

    def recent(self, limit: int = 50, status: str | None = "done") -> list[HistoryEntry]:
        """The newest jobs first; `status` None: of any status."""
        return self._rows(f"SELECT {self._COLUMNS} FROM jobs WHERE ? IS NULL OR status=? ORDER BY id DESC"
                          " LIMIT ?", (status, status, limit))

    def get(self, job_id: int) -> HistoryEntry | None:
        rows = self._rows(f"SELECT {self._COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return rows[0] if rows else None

    def record_measurement(self, gpu_name: str, preset: str, rung: str, peak_gib: float | None,
                           seconds: float | None = None, software: str | None = None) -> None:
        """`peak_gib` None: a time without a memory reading (stored as 0, which no peak can be).
        `software`: what it ran on (records.software_fingerprint)."""
        self._write("INSERT INTO measurements (gpu_name, preset, rung, peak_gib, seconds, measured_at, software)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (gpu_name, preset, rung, peak_gib or 0.0, seconds,
                                                      time.time(), software))

    def peak_before_software_changed(self, gpu_name: str, preset: str, rung: str, software: str
                                     ) -> tuple[float, str] | None:
        """Where `software` has not yet measured this preset and rung on this GPU and other software
        has: the highest peak of every run under the newest other software (a first run after a
        restart, which also loaded the weights, peaks higher than a warm one: the comparison must
        include such runs), with its fingerprint. None otherwise (no earlier measurement, or this
        software measured it already). Each change is compared with the one before it only, so a
        creep below the margin per update goes unreported."""
        with self._lock:
            key = (gpu_name, preset, rung)
            seen = self._conn.execute(
                "SELECT 1 FROM measurements WHERE gpu_name=? AND preset=? AND rung=? AND software=?"
                " AND peak_gib > 0 LIMIT 1", (*key, software)).fetchone()
            previous = self._conn.execute(
                "SELECT software FROM measurements WHERE gpu_name=? AND preset=? AND rung=?"
                " AND software IS NOT NULL AND software != ? AND peak_gib > 0 ORDER BY id DESC LIMIT 1",
                (*key, software)).fetchone()
            if seen is not None or previous is None:
                return None
            (peak,) = self._conn.execute(
                "SELECT MAX(peak_gib) FROM measurements WHERE gpu_name=? AND preset=? AND rung=? AND software=?"
                " AND peak_gib > 0", (*key, previous[0])).fetchone()
        return float(peak), previous[0]

    def _recent_measurements(self, gpu_name: str | None) -> dict[tuple[str, str], list[tuple[float, float | None]]]:
        if not gpu_name:
            return {}  # no GPU reading: nothing was measured on it
        with self._lock:
            # The panel asks once a second: read only the window, not every run ever measured.
            rows = self._conn.execute(
                "SELECT preset, rung, peak_gib, seconds FROM ("
                " SELECT preset, rung, peak_gib, seconds, ROW_NUMBER() OVER ("
                "  PARTITION BY preset, rung ORDER BY id DESC) AS age"
                " FROM measurements WHERE gpu_name=?) WHERE age <= ?",
                (gpu_name, MEASUREMENT_WINDOW)).fetchall()
        out: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
        for preset, rung, peak, seconds in rows:
            out.setdefault((preset, rung), []).append((peak, seconds))
        return out

    def peak_rise(self, gpu_name: str, preset: str, rung: str, peak_gib: float, software: str,
                  margin_gib: float) -> dict[str, Any] | None:
        """The first run of a preset and rung after the software changed (a LightX2V, torch or driver
        update) that peaked more than `margin_gib` above the peaks measured before it: a memory
        regression the user should hear of before a larger clip runs out. None otherwise."""
        before = self.peak_before_software_changed(gpu_name, preset, rung, software)
        if before is None or peak_gib <= before[0] + margin_gib:
            return None
        return {"preset": preset, "rung": rung, "before_gib": round(before[0], 3), "after_gib": round(peak_gib, 3),
                "before_software": before[1], "after_software": software}

    def measured_peaks(self, gpu_name: str | None) -> dict[tuple[str, str], float]:
        """The highest peak of the last few runs per preset and rung on this GPU: a first run that
        also loaded the weights peaks higher than a warm one, and the prediction must cover both."""
        peaks = {key: max(peak for peak, _ in runs)
                 for key, runs in self._recent_measurements(gpu_name).items()}
        return {key: peak for key, peak in peaks.items() if peak > 0}

    def measured_seconds(self, gpu_name: str | None) -> dict[tuple[str, str], float]:
        """The median wall time of the last few runs per preset and rung on this GPU."""
        out = {}
        for key, runs in self._recent_measurements(gpu_name).items():
            seconds = sorted(s for _, s in runs if s is not None)
            if seconds:
                out[key] = seconds[len(seconds) // 2]
        return out

    def kernel_choice(self, gpu_name: str, key: str) -> str | None:
        """The kernel choice measured on this GPU for `key` (a JSON text), or None."""
        with self._lock:
            row = self._conn.execute("SELECT choice FROM kernel_choices WHERE gpu_name=? AND key=?",
                                     (gpu_name, key)).fetchone()
        return None if row is None else row[0]

    def record_kernel_choice(self, gpu_name: str, key: str, value: str) -> None:
        self._write("INSERT INTO kernel_choices (gpu_name, key, choice, measured_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (gpu_name, key) DO UPDATE SET choice=excluded.choice,"
                    " measured_at=excluded.measured_at", (gpu_name, key, value, time.time()))

    def kernel_choices(self, gpu_name: str) -> list[tuple[str, str]]:
        """(key, choice) of every kernel choice measured on this GPU, newest first."""
        with self._lock:
            return [tuple(row) for row in self._conn.execute(
                "SELECT key, choice FROM kernel_choices WHERE gpu_name=? ORDER BY measured_at DESC",
                (gpu_name,)).fetchall()]
