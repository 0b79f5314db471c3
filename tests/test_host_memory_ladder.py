"""The ladder and the forecast with system RAM as a budget, on the fake backend (issue 15)."""

from __future__ import annotations

import pytest

from pipeline.backends.fake import FakeBackend, fake_backend_from_env
from pipeline.errors import OutOfVRAM
from pipeline.planner import Fit
from pipeline.types import GenerationRequest, Phase
from tests.conftest import FakeNvml
from ui.handlers import fallback_summary


def request(preset="480x832x49", seed=7):
    return GenerationRequest(prompt="A lighthouse at dusk.", preset=preset, seed=seed)


def test_load_running_out_of_ram_steps_down_to_the_low_ram_rung(make_service):
    backend = FakeBackend(host_oom_loads=True)  # no RAM reading: the planner starts on fast
    service = make_service(backend)
    result = service.generate(request())
    tried = [(a.rung, a.outcome) for a in result.attempts]
    # fast fails its load on host memory; tiled-vae and lean need as much RAM and are skipped.
    assert tried == [("fast", "out of host memory"), ("low-ram", "ok")]
    assert result.record["rung_used"] == "low-ram" and result.record["memory_settings"]["dit_from_disk"]
    assert "ran out of system RAM" in fallback_summary(result)
    assert result.video_path.exists()


def test_pinned_memory_failure_at_run_time_steps_down_too(make_service):
    backend = FakeBackend(host_oom_at={("480x832x81", "fast", Phase.TEXT_ENCODING)})
    result = make_service(backend).generate(request("480x832x81"))
    assert [(a.rung, a.outcome) for a in result.attempts] == [("fast", "out of host memory"), ("low-ram", "ok")]


def test_host_failure_does_not_teach_the_gpu_prediction(make_service):
    backend = FakeBackend(host_oom_loads=True)
    service = make_service(backend, nvml=FakeNvml(total_gib=12.0, used_gib=1.0))
    service.generate(request())
    gpu_name, _ = service.available_gib()
    assert ("480x832x49", "fast") not in service.history.measured_peaks(gpu_name)


def test_nothing_fits_in_ram_is_a_clear_message(make_service):
    backend = FakeBackend(host_oom_loads=True,
                          host_oom_at={("480x832x49", "low-ram", Phase.TEXT_ENCODING)})
    with pytest.raises(OutOfVRAM) as info:
        make_service(backend).generate(request())
    text = str(info.value)
    assert "system RAM ran out" in text and "Close large programs" in text and "smaller preset" in text
    assert "about 10 GiB" in text  # what the low-RAM settings need


def test_planner_reads_the_ram_reading_and_starts_low(make_service):
    backend = FakeBackend(ram_gib=13.0)
    service = make_service(backend, nvml=FakeNvml(total_gib=12.0, used_gib=0.5))
    forecast = {f.preset: f for f in service.forecasts()}
    assert forecast["480x832x49"].start.memory.name == "low-ram"
    assert forecast["480x832x49"].ram_available_gib == 13.0
    result = service.generate(request())
    assert [a.rung for a in result.attempts] == ["low-ram"]  # no failed attempt first
    host = result.record["host_memory"]
    assert host["available_at_start_gib"] == 13.0 and host["predicted_must_hold_gib"] == 9.5
    # The sampler measured this (CPU) process: must-hold and file-backed peaks per phase.
    assert host["peak_must_hold_gib"] is None or host["peak_must_hold_gib"] > 0
    assert "step_read_bytes" in result.record["timings_s"]


def test_too_little_ram_for_any_rung_forecasts_wont_fit(make_service):
    service = make_service(FakeBackend(ram_gib=5.0), nvml=FakeNvml(total_gib=12.0, used_gib=0.5))
    for forecast in service.forecasts():
        assert forecast.fit is Fit.WONT_FIT and "system RAM" in forecast.short_of


def test_env_switches(presets):
    names = list(presets)
    backend, _ = fake_backend_from_env({"WAN_STUDIO_FAKE_HOST_OOM": "load,480x832x49:fast:denoising",
                                        "WAN_STUDIO_FAKE_RAM_GIB": "15.5"}, names)
    assert backend.host_oom_loads and backend.ram_gib == 15.5
    assert backend.host_oom_at == {("480x832x49", "fast", Phase.DENOISING)}
    with pytest.raises(ValueError, match="WAN_STUDIO_FAKE_RAM_GIB"):
        fake_backend_from_env({"WAN_STUDIO_FAKE_RAM_GIB": "lots"}, names)


def test_text_encoder_kept_when_the_next_prompt_is_waiting(make_service):
    backend = FakeBackend(ram_gib=13.0)
    service = make_service(backend, nvml=FakeNvml(total_gib=12.0, used_gib=0.5))
    service.generate(request())
    assert backend.generated[-1].memory["release_text_encoder"] is True
    service.prompt_waiting = lambda: True
    result = service.generate(request(seed=8))
    assert backend.generated[-1].memory["release_text_encoder"] is False
    assert result.record["rung_used"] == "low-ram" and len(backend.loads) == 1  # no reload for it


def test_the_job_queue_tells_the_service_when_another_prompt_waits(make_service):
    from pipeline.jobs import JobQueue
    from pipeline.types import FinishRequest

    backend = FakeBackend(ram_gib=13.0)  # the low-RAM rung: it releases its text encoder per call
    service = make_service(backend, nvml=FakeNvml(total_gib=12.0, used_gib=0.5))
    jobs = JobQueue(service)
    try:
        assert service.prompt_waiting() is False
        batch = jobs.submit_all([request(seed=1), request(seed=2)])
        assert all(job.done.wait(10) and job.error is None for job in batch), [j.error for j in batch]
        # A finish waiting behind a prompt has no prompt to encode: it does not count.
        third, finish = jobs.submit_all([request(seed=3), FinishRequest(999)])
        assert third.done.wait(10) and finish.done.wait(10) and third.error is None
    finally:
        jobs.shutdown()
    # The first prompt was encoded while the second waited: the low-RAM rung kept its text encoder
    # for it; the last of the batch, and the one followed only by a finish, released it.
    assert [s.memory["release_text_encoder"] for s in backend.generated] == [False, True, True]
    assert {s.rung for s in backend.generated} == {"low-ram"} and len(backend.loads) == 1
