"""A login that resists guessing: failed logins are counted per client address, and an address
with too many failures in a minute is refused for a growing interval.

Gradio checks the password (an auth callable passed to `launch(auth=...)`), but neither that
callable nor Gradio sees the client's address, so the count lives in a small ASGI middleware handed
to Gradio's FastAPI app through `launch(app_kwargs={"middleware": [...]})`: it answers a locked
address's login with 429 before Gradio sees it, and learns each login's outcome from the status
Gradio answers with. Passwords are never logged; user names and addresses are.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

# Gradio's login route (and the same under its API prefix, should a client use that).
LOGIN_PATHS = ("/login", "/login/", "/gradio_api/login", "/gradio_api/login/")

_client: contextvars.ContextVar[str] = contextvars.ContextVar("login_client", default="?")


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0
    lockouts: int = 0


class LoginThrottle:
    """After `max_failures` failed logins within `window_s` seconds from one address, refuse that
    address for `lock_s`, doubling with each further lockout (up to `max_lock_s`). A success
    clears the address's record."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, lock_s: float = 30.0,
                 max_lock_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self.lock_s = lock_s
        self.max_lock_s = max_lock_s
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        with self._lock:
            record = self._records.get(address)
            return max(0.0, record.locked_until - self._clock()) if record else 0.0

    def failed(self, address: str, user: str) -> None:
        now = self._clock()
        with self._lock:
            record = self._records.setdefault(address, _Record())
            record.failures = [t for t in record.failures if now - t < self.window_s] + [now]
            count = len(record.failures)
            if count >= self.max_failures:
                record.lockouts += 1
                lock = min(self.max_lock_s, self.lock_s * 2 ** (record.lockouts - 1))
                record.locked_until = now + lock
                record.failures = []
            else:
                lock = 0.0
        if lock:
            log.warning("login: %d failed logins from %s (last as user %r); refusing that address "
                        "for %.0f s", self.max_failures, address, user, lock)
        else:
            log.warning("login: failed login from %s as user %r (%d in the last %.0f s)", address,
                        user, count, self.window_s)

    def succeeded(self, address: str, user: str) -> None:
        with self._lock:
            self._records.pop(address, None)
        log.info("login: %r logged in from %s", user, address)


def password_check(user: str, password: str, throttle: LoginThrottle) -> Callable[[str, str], bool]:
    """The auth callable for `launch(auth=...)`: a constant-time comparison, with the outcome
    counted for the client address the middleware saw."""

    def check(username: str, given: str) -> bool:
        ok = hmac.compare_digest(username.encode(), user.encode()) & hmac.compare_digest(
            given.encode(), password.encode())
        (throttle.succeeded if ok else throttle.failed)(_client.get(), username)
        return bool(ok)

    return check


class LoginThrottleMiddleware:
    """Pure ASGI middleware (runs in the same task as the route, so the auth callable sees the
    address it sets). Only login requests are looked at."""

    def __init__(self, app: Any, throttle: LoginThrottle):
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                scope.get("path") not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else "?"
        wait = self.throttle.retry_after(address)
        if wait > 0:
            log.warning("login: refused a login from %s (locked for %.0f s more)", address, wait)
            body = json.dumps({"detail": f"Too many failed logins from this address. Try again in "
                                         f"{wait:.0f} s."}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"retry-after", str(int(wait) + 1).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        token = _client.set(address)
        try:
            await self.app(scope, receive, send)
        finally:
            _client.reset(token)
