"""The generation service against the fake backend: OOM ladder, records, cancel, progress."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from pipeline.errors import GenerationCancelled, InvalidRequest, NoGPUError, OutOfVRAM
from pipeline.backends.fake import FakeBackend
from pipeline.store.outputs import read_mp4_record
from pipeline.types import GenerationRequest, Phase
from tests.conftest import FakeNvml
from ui.handlers import fallback_summary, progress_fraction


def request(preset="480x832x49", seed=42, prompt="A man plays a red electric guitar."):
    return GenerationRequest(prompt=prompt, preset=preset, seed=seed)


def read_frames(path):
    import imageio.v3 as iio

    return iio.imread(path, plugin="pyav")


def test_success_writes_video_record_and_history(make_service):
    service = make_service()
    events = []
    result = service.generate(request(), events.append)
    assert result.video_path.exists() and result.record_path.exists()
    frames = read_frames(result.video_path)
    assert frames.shape[0] == 49  # the preset's frame count, at the fake's reduced size
    sidecar = json.loads(result.record_path.read_text())
    embedded = read_mp4_record(result.video_path)
    for record in (sidecar, embedded):
        assert record["prompt"] == "A man plays a red electric guitar."
        assert record["seed"] == 42
        assert record["preset_requested"] == record["preset_used"] == "480x832x49"
        assert record["rung_used"] == "fast"
        assert record["memory_settings"]["vae_tiling"] is False
        assert record["model"]["backend"] == "fake"
        assert set(record["timings_s"]) >= {"text encoding", "denoising", "VAE decode", "steps", "total"}
        assert len(record["timings_s"]["steps"]) == 4
        assert record["versions"]["python"]
    # The encode time is only knowable after the encode: the sidecar has it, the mp4 cannot.
    assert sidecar["timings_s"]["writing mp4"] > 0 and "writing mp4" not in embedded["timings_s"]
    (entry,) = service.history.recent()
    assert entry.status == "done" and entry.video_path == str(result.video_path)
    assert entry.preset_used == "480x832x49" and entry.rung_used == "fast"
    phases = [e.phase for e in events]
    assert phases.index(Phase.TEXT_ENCODING) < phases.index(Phase.DENOISING) < phases.index(
        Phase.DECODING) < phases.index(Phase.ENCODING) < phases.index(Phase.DONE)
    steps = [(e.step, e.total) for e in events
             if e.phase is Phase.DENOISING and e.total and e.preview is None]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # A preview follows every step, and the record says which kind was shown.
    previews = [e.preview for e in events if e.preview is not None]
    assert [(p.step, p.total) for p in previews] == steps
    assert sidecar["preview"]["kind"] == "linear" and sidecar["preview"]["count"] == 4
    assert sidecar["draft"] is False and sidecar["decode"] == "full VAE"
    assert sidecar["latents"] and (result.video_path.parent / sidecar["latents"]).is_file()
    fractions = [progress_fraction(e) for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_oom_steps_down_the_explicit_ladder_and_records_every_rung(make_service):
    backend = FakeBackend(oom_at={("720x1280x81", "*", Phase.DENOISING),
                                  ("480x832x81", "fast", Phase.TEXT_ENCODING)})
    service = make_service(backend)
    result = service.generate(request("720x1280x81"))
    tried = [(a.preset, a.rung, a.outcome, a.phase) for a in result.attempts]
    # After chunked-rope (block offload) the best rung left is 720p/lean (phase offload): the one
    # reload goes there, and from then on only phase-offload rungs run (never back to block).
    assert tried == [
        ("720x1280x81", "chunked-rope", "out of memory", "denoising"),
        ("720x1280x81", "lean", "out of memory", "denoising"),
        ("480x832x81", "lean", "ok", ""),
    ]
    assert result.preset_used == "480x832x81" and result.fell_back
    summary = fallback_summary(result)
    assert "720x1280x81/chunked-rope ran out of GPU memory in denoising" in summary
    assert summary.endswith("Ran 480x832x81 on the 'lean' memory settings instead.")
    record = json.loads(result.record_path.read_text())
    assert [a["rung"] for a in record["attempts"]] == [t[1] for t in tried]
    assert record["memory_settings"]["vae_tiling"] is True
    # The first load plus one reload, and the record lists both with the reason for the second.
    assert len(backend.loads) == 2
    assert [dict(load["settings"])["offload_granularity"] for load in record["loads"]] == ["block", "phase"]
    assert "720x1280x81/chunked-rope ran out of GPU memory" in record["loads"][1]["reason"]


def test_exhausted_ladder_is_a_clear_error_and_a_failed_history_row(make_service):
    backend = FakeBackend(oom_at={(p, "*", Phase.DENOISING)
                                  for p in ("720x1280x81", "480x832x81", "480x832x49")})
    service = make_service(backend)
    with pytest.raises(OutOfVRAM) as err:
        service.generate(request("480x832x81"))
    # fast and tiled-vae share block offload; then the one reload goes to phase offload, whose rungs
    # (480x832x81/lean, 480x832x49/lean) are the leanest there are; the block-offload rungs of
    # 480x832x49 are never gone back to (they need more memory than the lean ones that failed).
    assert [(a.preset, a.rung) for a in err.value.attempts] == [
        ("480x832x81", "fast"), ("480x832x81", "tiled-vae"), ("480x832x81", "lean"),
        ("480x832x49", "lean")]
    assert len(backend.loads) == 2
    assert "Out of GPU memory on every fallback for 480x832x81" in str(err.value)
    assert "480x832x49/lean" in str(err.value)
    (entry,) = service.history.recent(status=None)
    assert entry.status == "failed" and "every fallback" in entry.error
    assert not list(service.outputs.root.glob("*.mp4"))


def test_decode_oom_keeps_latents_and_retries_decode_only(make_service):
    backend = FakeBackend(oom_at={("480x832x49", "fast", Phase.DECODING)})
    service = make_service(backend)
    original_check = backend._maybe_oom

    def only_untiled(spec, phase):  # the untiled decode fails, the tiled one fits
        return original_check(spec, phase) and not spec.memory["vae_tiling"]

    backend._maybe_oom = only_untiled
    result = service.generate(request())
    assert [(a.rung, a.outcome, a.phase) for a in result.attempts] == [
        ("fast", "out of memory", "VAE decode"), ("fast+lean-decode", "ok", "")]
    # The denoising steps ran once: the retry decoded the kept latents.
    assert len(backend.generated) == 1
    assert result.video_path.exists() and result.preset_used == "480x832x49"
    # The record says what really ran: the leanest VAE settings, under the retry's name.
    assert result.record["rung_used"] == "fast+lean-decode"
    assert {k: result.record["memory_settings"][k] for k in ("vae_tiling", "vae_offload")} == {
        "vae_tiling": True, "vae_offload": True}
    assert "only the decode ran again" in fallback_summary(result)
    assert "Ran 480x832x49 on" not in fallback_summary(result)


def test_decode_that_fails_even_lean_skips_rungs_that_differ_only_in_vae(make_service):
    backend = FakeBackend(oom_at={("480x832x81", "*", Phase.DECODING)})
    service = make_service(backend)
    result = service.generate(request("480x832x81"))
    tried = [(a.preset, a.rung, a.outcome) for a in result.attempts]
    # fast and tiled-vae share their DiT settings: once fast's latents could not be decoded even on
    # the leanest VAE settings, tiled-vae is skipped. lean (phase offload) differs and is tried; its
    # own VAE settings are already the leanest, so its failed decode is not retried. After that
    # reload only phase-offload rungs remain: 480x832x49/lean.
    assert tried == [
        ("480x832x81", "fast", "out of memory"),
        ("480x832x81", "fast+lean-decode", "out of memory"),
        ("480x832x81", "lean", "out of memory"),
        ("480x832x49", "lean", "ok"),
    ]
    assert len(backend.generated) == 3  # fast, lean, then 480x832x49/lean: three denoise runs
    assert len(backend.loads) == 2


def test_reload_failing_during_the_decode_retry_steps_down_instead_of_failing(make_service):
    backend = FakeBackend(oom_at={("480x832x49", "fast", Phase.DECODING)})
    service = make_service(backend)
    lean_key = backend.load_key(dict(service.presets["480x832x49"].rung("fast").settings(),
                                     vae_tiling=True, vae_offload=True, clean_cuda_cache=True))
    real_get = service.cache.get
    calls = []

    def get(key, on_phase=lambda p: None):
        calls.append(key)
        if len(calls) == 2:  # the reload for the decode retry runs out of memory
            from pipeline.backends.fake import simulated_oom
            raise simulated_oom("reload for the decode retry")
        return real_get(key, on_phase)

    service.cache.get = get
    result = service.generate(request())
    assert calls[1] == lean_key
    assert [a.outcome for a in result.attempts][-1] == "ok" and result.video_path.exists()
    assert result.attempts[1].rung == "fast+lean-decode" and result.attempts[1].outcome == "out of memory"


def test_a_failed_run_keeps_nothing_alive(make_service):
    import gc
    import weakref

    class Tensor:  # stands in for the GPU tensors a failed LightX2V frame holds
        pass

    backend = FakeBackend()
    service = make_service(backend)
    refs = []

    def fail(spec, step):
        activations = Tensor()
        refs.append(weakref.ref(activations))
        raise RuntimeError("shape mismatch in block 3")

    backend.on_step_hook = fail
    with pytest.raises(RuntimeError) as err:
        service.generate(request())
    gc.collect()
    assert refs[0]() is None, "the failed step's locals are still alive"
    assert "shape mismatch" in str(err.value)
    (entry,) = service.history.recent(status=None)
    assert entry.status == "failed" and "shape mismatch" in entry.error


def test_cancel_while_loading_starts_nothing(make_service):
    backend = FakeBackend()
    service = make_service(backend)
    stop = threading.Event()
    real_load = backend.load

    def load_then_cancel(key, on_phase):
        model = real_load(key, on_phase)
        stop.set()  # the user pressed Cancel during the load
        return model

    backend.load = load_then_cancel
    with pytest.raises(GenerationCancelled, match="while the model loaded"):
        service.generate(request(), should_stop=stop.is_set)
    assert backend.generated == []


def test_an_oom_teaches_the_planner_for_the_next_click(make_service):
    nvml = FakeNvml(total_gib=12.0, used_gib=12.0 - 11.0)  # 11.0 GiB free: "fast" is predicted to fit
    backend = FakeBackend(oom_at={("480x832x81", "fast", Phase.DENOISING)})
    service = make_service(backend, nvml=nvml)
    first = service.generate(request("480x832x81"))
    assert [a.rung for a in first.attempts] == ["fast", "tiled-vae"]
    second = service.generate(request("480x832x81"))
    assert [a.rung for a in second.attempts] == ["tiled-vae"]  # no second OOM on "fast"


def test_a_measurement_that_cannot_be_stored_does_not_fail_a_saved_job(make_service):
    service = make_service(nvml=FakeNvml(total_gib=12.0, used_gib=1.0))

    def locked(*args, **kwargs):
        raise RuntimeError("database is locked")

    service.history.record_measurement = locked
    from pipeline.machine.gpu import TorchReadings

    # A peak reading as on a GPU, so a measurement is taken.
    service.monitor.torch = TorchReadings(memory=lambda i: None, peak_reserved_gib=lambda: 5.0,
                                          reset_peak=lambda: None)
    result = service.generate(request())
    (entry,) = service.history.recent(status=None)
    assert entry.status == "done" and entry.video_path == str(result.video_path)


def test_the_first_run_after_a_software_update_says_when_its_peak_rose(make_service):
    from pipeline.machine.gpu import TorchReadings
    from ui import handlers

    service = make_service(nvml=FakeNvml(total_gib=24.0, used_gib=1.0))
    peak = {"gib": 6.0}
    service.monitor.torch = TorchReadings(memory=lambda i: None, peak_reserved_gib=lambda: peak["gib"],
                                          reset_peak=lambda: None)
    commit = {"lightx2v_commit": "f8aee98b"}
    describe = service.cache.backend.describe
    service.cache.backend.describe = lambda: {**describe(), **commit}

    def run():
        result = service.generate(request("480x832x49"))
        saved = json.loads(result.record_path.read_text(encoding="utf-8"))  # the sidecar beside the clip
        assert saved.get("peak_rose_since_software_changed") == result.record.get("peak_rose_since_software_changed")
        return result.record.get("peak_rose_since_software_changed")

    assert run() is None  # the first measurement: nothing to compare with
    peak["gib"] = 6.4
    assert run() is None  # same software: the planner learns it, no news
    commit["lightx2v_commit"] = "0123456789abcdef"
    peak["gib"] = 6.3
    assert run() is None  # updated, but within the planner's headroom of the 6.4 before
    commit["lightx2v_commit"] = "fedcba9876543210"
    peak["gib"] = 7.2
    rise = run()
    assert rise["before_gib"] == 6.3 and rise["after_gib"] == 7.2 and rise["rung"] == "fast"
    assert "LightX2V 0123456789ab" in rise["before_software"] and "LightX2V fedcba987654" in rise["after_software"]
    assert "driver" in rise["after_software"]  # the NVIDIA driver is part of it
    text = handlers.peak_rise_summary({"peak_rose_since_software_changed": rise})
    assert "peaked at 7.2 GiB" in text and "0.9 GiB more than before the software changed" in text
    assert run() is None  # said once: the next run of the same software compares with nothing


def test_cancel_between_steps_stops_and_the_next_run_works(make_service):
    backend = FakeBackend()
    service = make_service(backend)
    stop = threading.Event()
    backend.on_step_hook = lambda spec, step: stop.set() if step == 2 else None
    events = []
    with pytest.raises(GenerationCancelled):
        service.generate(request(), events.append, stop.is_set)
    steps = [e.step for e in events if e.phase is Phase.DENOISING and e.total and e.preview is None]
    assert steps == [1, 2]  # stopped at the boundary after step 2
    # Cancel right after a preview works as before: the preview of step 2 came, nothing after it.
    assert [e.preview.step for e in events if e.preview is not None] == [1, 2]
    (entry,) = service.history.recent(status=None)
    assert entry.status == "cancelled"
    backend.on_step_hook = None
    result = service.generate(request())  # the model was recovered and is reused
    assert result.video_path.exists() and len(backend.loads) == 1


def test_same_seed_same_frames_also_after_an_oom(make_service):
    backend = FakeBackend()
    service = make_service(backend)
    first = read_frames(service.generate(request(seed=7)).video_path)
    backend.oom_at = {("480x832x49", "fast", Phase.DENOISING)}
    service.generate(request(seed=99))
    backend.oom_at = set()
    again = read_frames(service.generate(request(seed=7)).video_path)
    assert np.array_equal(first, again)
    other = read_frames(service.generate(request(seed=8)).video_path)
    assert not np.array_equal(first, other)


def test_no_gpu_is_a_clear_error_before_any_history(make_service):
    service = make_service(FakeBackend(gpu_present=False))
    with pytest.raises(NoGPUError, match="No NVIDIA GPU"):
        service.generate(request())
    assert service.history.recent(status=None) == []


def test_start_rung_follows_free_memory_and_measured_peaks(make_service):
    nvml = FakeNvml(total_gib=12.0, used_gib=12.0 - 6.0)  # 6.0 GiB free
    backend = FakeBackend()
    service = make_service(backend, nvml=nvml)
    fast, tiled = (service.presets["480x832x49"].rung(n).predicted_peak_gib for n in ("fast", "tiled-vae"))
    assert fast > 6.0 and tiled + 0.5 <= 6.0  # the shipped figures this test relies on
    result = service.generate(request("480x832x49"))
    assert [a.rung for a in result.attempts] == ["tiled-vae"]
    assert result.record["vram"]["gpu"] == "NVIDIA GeForce RTX 3060"
    assert result.record["vram"]["available_at_start_gib"] == pytest.approx(6.0, abs=0.01)
    # A peak measured on this GPU supersedes the shipped figure.
    service.history.record_measurement("NVIDIA GeForce RTX 3060", "480x832x49", "fast", 5.0, 95.0)
    result = service.generate(request("480x832x49"))
    assert [a.rung for a in result.attempts] == ["fast"]
    forecast = {f.preset: f for f in service.forecasts()}["480x832x49"]
    assert forecast.start.measured_here and forecast.eta_s == 95.0


def test_vram_cap_limits_available_memory(make_service):
    service = make_service(nvml=FakeNvml(total_gib=80.0, used_gib=1.0), vram_cap_gib=11.0)
    _, available = service.available_gib()
    assert available == 11.0
    forecasts = {f.preset: f for f in service.forecasts()}
    # 11.0 GiB, not the 79 GiB free on the device: every shipped first rung fits with headroom.
    assert {name: f.fit.value for name, f in forecasts.items()} == {
        "480x832x49": "fits", "480x832x81": "fits", "720x1280x81": "fits"}
    assert forecasts["480x832x49"].available_gib == 11.0


def test_request_validation():
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        GenerationRequest(prompt="   ", preset="480x832x49", seed=1)
    with pytest.raises(InvalidRequest, match="between 0 and 4294967295"):
        GenerationRequest(prompt="x", preset="480x832x49", seed=2**32)
    with pytest.raises(InvalidRequest, match="between 0 and"):
        GenerationRequest(prompt="x", preset="480x832x49", seed=-1)
    with pytest.raises(InvalidRequest, match="whole number"):
        GenerationRequest(prompt="x", preset="480x832x49", seed=1.5)
    with pytest.raises(InvalidRequest, match="limit is 2000"):
        GenerationRequest(prompt="x" * 2001, preset="480x832x49", seed=1)


def test_the_fake_backend_fills_in_the_time_estimate_without_a_gpu(make_service):
    service = make_service()  # no NVML: no GPU name, no peak
    assert {f.preset: f.eta_s for f in service.forecasts()}["480x832x49"] is None
    service.generate(request())
    eta = {f.preset: f.eta_s for f in service.forecasts()}["480x832x49"]
    assert eta is not None and eta > 0
    # A time without a memory reading is not a peak: predictions keep the shipped figures.
    assert service.history.measured_peaks("no GPU reading (fake backend)") == {}


def test_a_model_that_cannot_recover_is_released_and_the_next_rung_loads_afresh(make_service,
                                                                                 monkeypatch, caplog):
    from pipeline.backends.fake import FakeModel

    backend = FakeBackend(oom_at={("480x832x49", "fast", Phase.DENOISING)})
    service = make_service(backend)
    models = []
    real_load = backend.load

    def load(key, on_phase):
        model = real_load(key, on_phase)
        models.append(model)
        return model

    def broken_recover(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(backend, "load", load)
    monkeypatch.setattr(FakeModel, "recover", broken_recover)
    result = service.generate(request())
    # "fast" ran out of memory, its recover() failed: that model was released, not reused, and
    # "tiled-vae" (the same build) ran on a fresh load.
    assert [(a.rung, a.outcome) for a in result.attempts] == [("fast", "out of memory"), ("tiled-vae", "ok")]
    assert len(models) == 2 and getattr(models[0], "released", False) and models[1] is not models[0]
    assert backend.loads[0] == backend.loads[1]
    assert "recover() failed; releasing the model" in caplog.text
    assert result.record["weights_loaded_this_job"] is True
