"""A tiny stand-in for the Hugging Face Hub, for tests of the real `huggingface_hub` client.

It serves, on 127.0.0.1 and an ephemeral port, the endpoints huggingface_hub 2.4 calls for our downloads
(read from the installed client: file_download.get_hf_file_metadata / http_get and hf_api.list_repo_tree):

  HEAD /{repo}/resolve/{rev}/{path}   -> X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size, Content-Length
  GET  /{repo}/resolve/{rev}/{path}   -> the bytes, honouring `Range: bytes=N-` with 206 + Content-Range
  GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=...  -> JSON list like the Hub's tree API
  404s carry X-Error-Code (RepoNotFound / RevisionNotFound / EntryNotFound), as the Hub's do, because that is
  how the client tells those cases apart.

With `cdn` on, LFS files are answered as the real Hub answers them: a 302 from `/resolve/` to a signed URL on
another host (a second server on its own port, `/cdn/{repo}/{rev}/{path}`), which serves the bytes; a client
must not send its Hub token there. Every request is recorded with the host role, its Authorization header
and the body bytes sent.

Faults for tests: `cut_once[path] = n` sends n bytes of the body, then drops the connection (once);
`stall_once[path] = n` sends n bytes and then holds the connection without sending more (a process can be
killed mid-file);
`corrupt` serves altered bytes while advertising the true checksum; `hidden` lists a file but 404s it;
`ignore_range` answers Range requests with the whole file.
It is bounded: it stops after `max_requests` or `lifetime_s`, whichever comes first, and on `close()`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_MIN_BYTES = 1024  # files at least this big are served as LFS files (sha256 etag, lfs block in the tree)


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) >= LFS_MIN_BYTES

    def oid(self, path: str) -> str:
        data = self.files[path]
        if self.is_lfs(path):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RequestRecord:
    method: str
    path: str
    range: str | None
    host: str = "hub"  # "hub" or "cdn"
    auth: str | None = None  # the Authorization header as received
    sent: int = 0  # body bytes written
    status: int = 0


@dataclass
class HubState:
    repos: dict[str, FakeRepo]
    cut_once: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    hidden: set[str] = field(default_factory=set)
    ignore_range: bool = False  # answer 200 with the whole file, as some proxies and CDNs do
    cdn: bool = False  # redirect LFS files to the second host, as huggingface.co does
    stall_once: dict[str, int] = field(default_factory=dict)
    unstall: threading.Event = field(default_factory=threading.Event)
    cdn_url: str = ""
    requests: list[RequestRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, path_suffix: str) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(path_suffix)]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<rev>[^/]+)/(?P<path>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")


def _make_handler(state: HubState, role: str = "hub") -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; with Nagle on, each response waits ~40 ms for an ACK.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            return

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self, pattern: re.Pattern[str], path: str) -> tuple[re.Match[str], FakeRepo] | None:
            """The URL's match and its repo at that revision, or None once a 404 has been sent."""
            m = pattern.match(path)
            if not m:
                self._error(404, "RepoNotFound")
                return None
            repo = self._repo_rev(unquote(m["repo"]), unquote(m["rev"]))
            return None if repo is None else (m, repo)

        def _repo_rev(self, repo_id: str, rev: str) -> FakeRepo | None:
            repo = state.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            if rev not in ("main", repo.commit):
                self._error(404, "RevisionNotFound")
                return None
            return repo

        def _record(self) -> None:
            self.record = RequestRecord(self.command, urlparse(self.path).path, self.headers.get("Range"), role,
                                        self.headers.get("Authorization"))
            with state.lock:
                state.requests.append(self.record)

        def send_response(self, code: int, message: str | None = None) -> None:
            if hasattr(self, "record"):
                self.record.status = code
            super().send_response(code, message)

        def _send(self, data: bytes) -> None:
            self.wfile.write(data)
            self.record.sent += len(data)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
            self._record()
            self._resolve(send_body=False)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self._record()
            url = urlparse(self.path)
            if role == "hub" and url.path.startswith("/api/"):
                self._tree(url.path, parse_qs(url.query))
            else:
                self._resolve(send_body=True)

        def _tree(self, path: str, query: dict[str, list[str]]) -> None:
            routed = self._route(_TREE, path)
            if routed is None:
                return
            m, repo = routed
            prefix = unquote(m["path"] or "").strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            base = f"{prefix}/" if prefix else ""
            names = [p for p in repo.files if p.startswith(base)]
            if prefix and not names:
                self._error(404, "EntryNotFound", repo.commit)
                return
            out: list[dict[str, object]] = []
            dirs: set[str] = set()
            for p in sorted(names):
                rest = p[len(base):]
                if "/" in rest and not recursive:
                    dirs.add(base + rest.split("/", 1)[0])
                    continue
                if recursive:
                    parts = rest.split("/")[:-1]
                    for i in range(1, len(parts) + 1):
                        dirs.add(base + "/".join(parts[:i]))
                entry: dict[str, object] = {"type": "file", "oid": repo.oid(p), "size": len(repo.files[p]),
                                            "path": p}
                if repo.is_lfs(p):
                    sha = hashlib.sha256(repo.files[p]).hexdigest()
                    entry["oid"] = hashlib.sha1(b"pointer " + p.encode()).hexdigest()  # git oid of the pointer
                    entry["lfs"] = {"oid": sha, "size": len(repo.files[p]), "pointerSize": 134}
                out.append(entry)
            out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
            body = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self, send_body: bool) -> None:
            routed = self._route(_RESOLVE if role == "hub" else _CDN, urlparse(self.path).path)
            if routed is None:
                return
            m, repo = routed
            path = unquote(m["path"])
            if path not in repo.files or path in state.hidden:
                self._error(404, "EntryNotFound", repo.commit)
                return
            data = repo.files[path]
            if role == "hub" and state.cdn and repo.is_lfs(path):
                # huggingface.co: 302 to a signed URL elsewhere, with the file's metadata on the redirect itself.
                self.send_response(302)
                self.send_header("Location", f"{state.cdn_url}/cdn/{m['repo']}/{repo.commit}/{m['path']}?sig=x")
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{repo.oid(path)}"')
                self.send_header("X-Linked-Etag", f'"{repo.oid(path)}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if send_body and path in state.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            etag = repo.oid(path)
            start = 0
            rng = self.headers.get("Range") if send_body and not state.ignore_range else None
            if rng:
                m_rng = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                start = int(m_rng.group(1)) if m_rng else 0
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{etag}"')
            if repo.is_lfs(path):
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not send_body:
                return
            with state.lock:
                cut = state.cut_once.pop(path, None) if start == 0 else None
                stall = state.stall_once.pop(path, None) if start == 0 else None
            if cut is not None or stall is not None:
                self._send(body[:cut if cut is not None else stall])
                self.wfile.flush()
                if stall is not None:
                    state.unstall.wait(timeout=30)  # until the test has killed the client
                self.close_connection = True  # the client sees a body shorter than Content-Length
                return
            self._send(body)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that stops reading (a cancelled download) breaks the pipe; that is the test, not a failure.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)


class HubServer:
    """Context manager: `with HubServer(state) as hub: os.environ["HF_ENDPOINT"] = hub.url`."""

    def __init__(self, state: HubState, *, max_requests: int = 2000, lifetime_s: float = 60.0):
        self.state = state
        self._httpd = _QuietServer(("127.0.0.1", 0), _make_handler(state))
        # Another host name (all of 127/8 is loopback): clients compare host names, not ports.
        self._cdn = _QuietServer(("127.0.0.2", 0), _make_handler(state, "cdn"))
        state.cdn_url = "http://{}:{}".format(*self._cdn.server_address[:2])
        self._max_requests = max_requests
        self._deadline = time.monotonic() + lifetime_s
        self._thread = threading.Thread(target=self._serve, args=(self._httpd,), name="fake-hub", daemon=True)
        self._cdn_thread = threading.Thread(target=self._serve, args=(self._cdn,), name="fake-cdn", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _serve(self, httpd: ThreadingHTTPServer) -> None:
        httpd.timeout = 0.2
        while time.monotonic() < self._deadline and len(self.state.requests) < self._max_requests:
            httpd.handle_request()
        httpd.server_close()

    def __enter__(self) -> HubServer:
        self._thread.start()
        self._cdn_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._deadline = 0.0
        self.state.unstall.set()
        self._thread.join(timeout=5)
        self._cdn_thread.join(timeout=5)
