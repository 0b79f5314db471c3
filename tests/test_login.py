"""The login throttle's policy with a fake clock, and the recorded command line."""

from __future__ import annotations

import logging

from ui.login import LoginThrottle, password_check


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_five_failures_in_a_minute_lock_the_address_for_a_growing_interval():
    clock = Clock()
    throttle = LoginThrottle(max_failures=5, window_s=60, lock_s=30, max_lock_s=100, clock=clock)
    for _ in range(4):
        throttle.failed("10.0.0.9", "alice")
    assert throttle.retry_after("10.0.0.9") == 0
    throttle.failed("10.0.0.9", "alice")
    assert throttle.retry_after("10.0.0.9") == 30 and throttle.retry_after("10.0.0.8") == 0
    clock.now += 31
    for _ in range(5):
        throttle.failed("10.0.0.9", "alice")
    assert throttle.retry_after("10.0.0.9") == 60, "the second lockout is longer"
    clock.now += 61
    for _ in range(5):
        throttle.failed("10.0.0.9", "alice")
    assert throttle.retry_after("10.0.0.9") == 100, "capped"
    clock.now += 101
    throttle.succeeded("10.0.0.9", "alice")
    for _ in range(4):
        throttle.failed("10.0.0.9", "alice")
    assert throttle.retry_after("10.0.0.9") == 0, "a success starts over"


def test_failures_spread_over_more_than_a_minute_do_not_lock():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(20):
        throttle.failed("10.0.0.9", "alice")
        clock.now += 15  # four a minute
    assert throttle.retry_after("10.0.0.9") == 0


def test_the_check_compares_both_parts_and_never_logs_the_password(caplog):
    throttle = LoginThrottle()
    check = password_check("alice", "s3cret-pw", throttle)
    with caplog.at_level(logging.INFO):
        assert check("alice", "s3cret-pw") is True
        assert check("alice", "wrong-pw") is False
        assert check("bob", "s3cret-pw") is False
    assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text
    assert "'bob'" in caplog.text


def test_the_recorded_command_line_hides_the_password_and_keeps_every_flag():
    import app

    argv = ["--listen", "--auth", "alice:pw1", "--port", "8000", "--auth=bob:pw2", "--backend", "fake"]
    assert app.recorded_argv(argv) == ("app.py", "--listen", "--auth", "<hidden>", "--port", "8000",
                                       "--auth=<hidden>", "--backend", "fake")
    settings = app.settings_from_args(["--listen", "--auth", "alice:pw1", "--vram-cap-gib", "9"])
    assert settings.argv == ("app.py", "--listen", "--auth", "<hidden>", "--vram-cap-gib", "9")
    assert "pw1" not in " ".join(settings.argv)


def test_a_browser_opens_only_when_asked():
    import app as app_module

    # The README promises no browser window unless --open is given.
    assert app_module.settings_from_args([]).open_browser is False
    assert app_module.settings_from_args(["--open"]).open_browser is True
