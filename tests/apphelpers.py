"""Start and stop the real app (`python app.py ...`) as a subprocess for end-to-end tests.

Every server binds 127.0.0.1 on a free port, every wait is bounded in time, and every process is
stopped by its own process-group id (the app's ffmpeg children included) when the test ends.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

# Test clients talk to 127.0.0.1 only: never through a proxy from the CI environment.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
    filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY", "")]))

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app.py"
PYTHON = sys.executable
HISTORY_DB = "history.sqlite3"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def app_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no inherited WAN_STUDIO_* settings, no telemetry, a private Gradio cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WAN_STUDIO_", "GRADIO_"))}
    env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               GRADIO_TEMP_DIR=str(tmp / "gradio-cache"), WAN_STUDIO_FAKE_STEP_SECONDS="0.02",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def run_app_to_exit(args: list[str], tmp: Path, timeout: float = 60, **env: str
                    ) -> subprocess.CompletedProcess:
    """Run app.py with `args` and wait for it to exit (for start-up refusals)."""
    return subprocess.run([PYTHON, str(APP), *args], cwd=tmp, env=app_env(tmp, **env),
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class RunningApp:
    proc: subprocess.Popen
    port: int
    outputs: Path
    log_path: Path
    auth: tuple[str, str] | None = None
    faults: Path | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        # The app leads its own process group (start_new_session): this reaches its ffmpeg too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no clean-up code of the app runs, as in a crash or power cut."""
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_log()

    def stop(self, timeout: float = 10) -> None:
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        else:
            self._signal(signal.SIGKILL)  # any child left behind by a crashed app
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def fault(self, name: str, value: str | None) -> None:
        """Switch one of the fake backend's test faults on (write `value`) or off (None)."""
        assert self.faults is not None, "start the app with faults=True"
        path = self.faults / name
        if value is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(value)

    # -- reading state the app left on disk -------------------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        return history_rows(self.outputs)

    def client(self, **kwargs):
        from gradio_client import Client

        kwargs.setdefault("download_files", str(self.outputs.parent / "downloads"))
        return Client(self.url, auth=self.auth, verbose=False, **kwargs)


def history_rows(outputs: Path) -> list[dict[str, Any]]:
    """Every job row, oldest first, read through SQLite as another process would."""
    db = outputs / HISTORY_DB
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        conn.close()


def listed_files(outputs: Path) -> list[str]:
    """What a directory listing shows, hidden temp files included."""
    return sorted(p.name for p in outputs.iterdir()) if outputs.exists() else []


def _responding(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/")
        status = conn.getresponse().status
        conn.close()
        return status < 500
    except OSError:
        return False


def start_app(tmp: Path, *, args: list[str] = (), backend: str = "fake", outputs: Path | None = None,
              auth: tuple[str, str] | None = None, faults: bool = False, name: str = "app",
              ready_timeout: float = 60, **env: str) -> RunningApp:
    """Start app.py on 127.0.0.1:<free port> and wait until it answers HTTP."""
    outputs = outputs or tmp / "outputs"
    faults_dir = None
    if faults:
        faults_dir = tmp / "faults"
        faults_dir.mkdir(exist_ok=True)
        env["WAN_STUDIO_FAKE_FAULTS_DIR"] = str(faults_dir)
    port = free_port()
    argv = [PYTHON, str(APP), "--backend", backend, "--outputs-dir", str(outputs),
            "--port", str(port), *args]
    if auth:
        argv += ["--auth", f"{auth[0]}:{auth[1]}"]
    log_path = tmp / f"{name}-{port}.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen(argv, cwd=tmp, env=app_env(tmp, **env), stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    app = RunningApp(proc=proc, port=port, outputs=outputs, log_path=log_path, auth=auth,
                     faults=faults_dir, _log_file=log_file)
    try:
        wait_for(lambda: not app.alive() or _responding(port), ready_timeout, 0.1, "the app to start")
        if not app.alive():
            raise RuntimeError(f"app exited with {proc.returncode}:\n{app.log()}")
    except BaseException:
        app.stop()
        raise
    return app


@contextlib.contextmanager
def running_app(tmp: Path, **kwargs: Any) -> Iterator[RunningApp]:
    app = start_app(tmp, **kwargs)
    try:
        yield app
    finally:
        app.stop()


def raw_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `path` exactly as written: no client-side normalisation of '..' or %-escapes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_post(port: int, path: str, body: Any, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=data,
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
