"""The UI border: raw widget/API values become checked requests once (GenerationRequest and the
preset book), batches, the prompt's live hint, alert titles; and the one GPU lane (JobQueue):
positions, the cap, cancel of a waiting job by its own session only."""

from __future__ import annotations

import threading

import pytest

from pipeline.errors import (GenerationCancelled, InvalidRequest, LaneFull, StudioError)
from pipeline.jobs import JobQueue
from pipeline.types import MAX_SEED, GenerationRequest
from ui import handlers as h


def _values(**change):
    values = dict(prompt="a red fox in snow", preset="480x832x49", seed=1, randomize_seed=False,
                  negative_prompt="")
    values.update(change)
    return values


def test_a_request_for_a_preset_outside_the_book_is_refused_at_the_border(presets):
    with pytest.raises(InvalidRequest, match=r"Unknown preset '1080p'; choose one of 480x832x49"):
        h.make_request(presets, **_values(preset="1080p"))
    assert h.make_request(presets, **_values()).preset == "480x832x49"


@pytest.mark.parametrize("text, shown", [("a\x00b", "'\\x00' at position 2"),
                                         ("\x1b[31mred", "'\\x1b' at position 1"),
                                         ("del\x7f", "'\\x7f' at position 4")])
def test_control_characters_are_refused_except_newline_and_tab(presets, text, shown):
    for field in ("prompt", "negative_prompt"):
        with pytest.raises(InvalidRequest, match="control character") as err:
            h.make_request(presets, **_values(**{field: text}))
        assert shown in str(err.value)
    ok = h.make_request(presets, **_values(prompt="line one\n\tline two"))
    assert ok.prompt == "line one\n\tline two"


def test_the_request_checks_live_in_one_place():
    # GenerationRequest itself refuses a bad seed; parse_seed only converts widget values.
    assert h.parse_seed("7", False) == 7 and h.parse_seed(7.0, False) == 7
    assert h.parse_seed(2**40, False) == 2**40  # converted, then refused by the request:
    with pytest.raises(InvalidRequest, match="between 0 and"):
        GenerationRequest(prompt="x", preset="p", seed=h.parse_seed(2**40, False))


def test_a_batch_is_consecutive_seeds_with_the_same_settings(presets):
    batch = h.make_batch(presets, **_values(seed=MAX_SEED - 1), count=3)
    assert [r.seed for r in batch] == [MAX_SEED - 1, MAX_SEED, 0]
    assert {(r.prompt, r.preset, r.negative_prompt) for r in batch} == {("a red fox in snow", "480x832x49", "")}
    assert len(h.make_batch(presets, **_values(), count=None)) == 1
    assert len(h.make_batch(presets, **_values(), count=16.0)) == 16
    for bad in (0, 17, 2.5, "many", True, [2]):
        with pytest.raises(InvalidRequest, match="Count must be a whole number from 1 to 16"):
            h.make_batch(presets, **_values(), count=bad)


def test_the_prompt_hint_counts_characters_up_to_the_refusal():
    assert h.prompt_hint("") == "0 / 2,000 characters"
    assert h.prompt_hint("a cat") == "5 / 2,000 characters"
    at_limit = "x" * 2000
    assert "2,000 / 2,000 characters" in h.prompt_hint(at_limit)
    GenerationRequest(prompt=at_limit, preset="p", seed=1)  # the hint's limit is the refusal's
    over = h.prompt_hint("x" * 2001)
    assert "2,001 / 2,000" in over and "refuses" in over and "by 1." in over
    with pytest.raises(InvalidRequest, match="limit is 2000"):
        GenerationRequest(prompt="x" * 2001, preset="p", seed=1)
    long_words = "word " * 400  # 2,000 characters, ~572 tokens
    assert "reads only the first 512" in h.prompt_hint(long_words)


def test_every_error_the_user_can_see_has_a_specific_title():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    errors = [cls for cls in subclasses(StudioError) if cls is not GenerationCancelled]
    titles = {}
    for cls in errors:
        # Built without __init__: the title depends on the class alone (some take extra arguments).
        titles[cls.__name__] = h.alert_title(cls.__new__(cls))
    assert "Generation failed" not in titles.values() and "Error" not in titles.values(), titles
    assert titles["InvalidRequest"] == "Check your input" and titles["OutOfVRAM"] == "Out of GPU memory"
    assert titles["NoGPUError"] == "No NVIDIA GPU" and titles["OutputError"] == "Saving the video failed"


# -- the one GPU lane -----------------------------------------------------------------------------

class _Gate:
    """A service whose generate blocks until released: the first job holds the lane."""

    def __init__(self):
        self.release = threading.Event()
        self.ran: list[int] = []

    def generate(self, request, on_event, should_stop):
        self.ran.append(request.seed)
        if request.seed == 0:
            assert self.release.wait(10)
        if should_stop():
            raise GenerationCancelled("Cancelled at a step boundary.")
        return f"clip {request.seed}"


def _request(seed):
    return GenerationRequest(prompt="x", preset="480x832x49", seed=seed)


@pytest.fixture
def lane():
    service = _Gate()
    jobs = JobQueue(service, max_waiting=4)
    yield jobs, service
    service.release.set()
    jobs.shutdown()


def test_a_session_withdraws_its_waiting_jobs_and_only_its_own(lane):
    jobs, service = lane
    running = jobs.submit(_request(0), owner="a")
    mine = jobs.submit_all([_request(1), _request(2)], owner="b")
    theirs = jobs.submit(_request(3), owner="c")
    assert [jobs.ahead_of(j) for j in mine + [theirs]] == [1, 2, 3]
    assert jobs.cancel(theirs.id, owner="b") is False  # not b's job
    assert jobs.cancel_owner("b") == (2, 0)
    assert all(j.done.is_set() and isinstance(j.error, GenerationCancelled) for j in mine)
    assert "Withdrawn from the queue" in str(mine[0].error)
    assert jobs.ahead_of(theirs) == 1  # the withdrawn jobs no longer count
    assert jobs.cancel_owner("b") == (0, 0)
    service.release.set()
    assert running.done.wait(10) and theirs.done.wait(10)
    assert service.ran == [0, 3], "a withdrawn job never reached the GPU"
    assert theirs.result == "clip 3" and running.result == "clip 0"


def test_cancel_of_a_running_job_reaches_it_at_its_next_check(lane):
    jobs, service = lane
    running = jobs.submit(_request(0), owner="a")
    import time

    deadline = time.monotonic() + 10
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs.cancel_owner("a") == (0, 1)
    service.release.set()
    assert running.done.wait(10) and isinstance(running.error, GenerationCancelled)


def test_the_cap_counts_every_unfinished_job_and_a_batch_is_all_or_nothing(lane):
    jobs, service = lane
    jobs.submit_all([_request(0), _request(1), _request(2)], owner="a")
    with pytest.raises(LaneFull, match="3 jobs are already waiting"):
        jobs.submit_all([_request(4), _request(5)], owner="b")
    assert jobs.cancel_owner("b") == (0, 0), "nothing of the refused batch was queued"
    jobs.submit(_request(6), owner="b")
    with pytest.raises(LaneFull):
        jobs.submit(_request(7), owner="b")


def test_stopping_the_app_ends_every_job_with_the_reason(lane):
    from pipeline.errors import AppStopped

    jobs, service = lane
    running = jobs.submit(_request(0), owner="a")
    waiting = jobs.submit(_request(1), owner="b")
    import time

    deadline = time.monotonic() + 10
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs.stop_all("the app was stopped") == 2
    service.release.set()
    assert jobs.wait_idle(10)
    for job in (running, waiting):
        assert isinstance(job.error, AppStopped) and str(job.error) == "the app was stopped"
    assert service.ran == [0], "the waiting job never started"
    # A click while the app closes is refused with the same reason and never reaches the GPU.
    with pytest.raises(AppStopped, match="the app was stopped"):
        jobs.submit(_request(2), owner="c")
    assert service.ran == [0]
