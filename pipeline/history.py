"""The job history: a SQLite database (WAL) beside the outputs that survives restarts.

A job row is inserted as `running` when the job starts and completed in ONE transaction after its
video and record are in place, so a kill leaves a `running` row that `mark_interrupted` turns into
`interrupted` at the next start, and never a `done` row without a file. The same database keeps
the peak VRAM measured per GPU, preset and memory rung, which supersedes the shipped prediction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
CREATE TABLE IF NOT EXISTS measured_peaks (
    gpu_name TEXT NOT NULL,
    preset TEXT NOT NULL,
    rung TEXT NOT NULL,
    peak_gib REAL NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (gpu_name, preset, rung)
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

    def _rows(self, sql: str, params: tuple = ()) -> list[HistoryEntry]:
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [HistoryEntry(*row) for row in rows]

    _COLUMNS = ("id, created_at, status, prompt, negative_prompt, seed, preset_requested, preset_used,"
                " rung_used, video_path, record_path, error, peak_gib, seconds")

    def recent(self, limit: int = 50, status: str | None = "done") -> list[HistoryEntry]:
        if status is None:
            return self._rows(f"SELECT {self._COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return self._rows(f"SELECT {self._COLUMNS} FROM jobs WHERE status=? ORDER BY id DESC LIMIT ?",
                          (status, limit))

    def get(self, job_id: int) -> HistoryEntry | None:
        rows = self._rows(f"SELECT {self._COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return rows[0] if rows else None

    def record_peak(self, gpu_name: str, preset: str, rung: str, peak_gib: float) -> None:
        self._write("INSERT INTO measured_peaks VALUES (?, ?, ?, ?, ?) ON CONFLICT(gpu_name, preset,"
                    " rung) DO UPDATE SET peak_gib=excluded.peak_gib, measured_at=excluded.measured_at",
                    (gpu_name, preset, rung, peak_gib, time.time()))

    def measured_peaks(self, gpu_name: str) -> dict[tuple[str, str], float]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT preset, rung, peak_gib FROM measured_peaks WHERE gpu_name=?", (gpu_name,)
            ).fetchall()
        return {(p, r): g for p, r, g in rows}
