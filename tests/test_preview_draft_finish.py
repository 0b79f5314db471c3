"""Previews after every step, draft decodes with the tiny VAE, finishing a clip at full quality from
its kept latents (also after a restart), and the latents' life beside the clip. Fake backend, CPU."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from pipeline.backends.fake import FakeBackend
from pipeline.backends import lightx2v_compat as compat
from pipeline.cache import PipelineCache
from pipeline.errors import GenerationCancelled, InvalidRequest, LatentsError, WeightsError
from pipeline.machine.gpu import GpuMonitor
from pipeline.store.history import History
from pipeline.jobs import JobQueue
from pipeline.store.outputs import LATENTS_SUFFIX, OutputStore
from pipeline.backends.latent_preview import WAN21_LATENT_RGB_BIAS, latents_to_rgb, preview_fps
from pipeline.service import VideoService
from pipeline.types import FinishRequest, GenerationRequest, Phase, PreviewKind
from tests.conftest import FakeNvml


def request(preset="480x832x49", seed=42, draft=False, prompt="A red kite over a green hill."):
    return GenerationRequest(prompt=prompt, preset=preset, seed=seed, draft=draft)


def read_frames(path):
    import imageio.v3 as iio

    return iio.imread(path, plugin="pyav")


# -- the linear latent-to-RGB preview ---------------------------------------------------------------

def test_linear_preview_maps_16_channels_to_rgb_with_the_published_bias():
    zeros = np.zeros((16, 3, 6, 10), dtype=np.float32)
    frames = latents_to_rgb(zeros)
    assert frames.shape == (3, 6, 10, 3) and frames.dtype == np.uint8
    expected = np.clip((np.asarray(WAN21_LATENT_RGB_BIAS) + 1) * 127.5, 0, 255).round()
    assert (frames == expected.astype(np.uint8)).all()
    # Channel 14 pushes all three colours up (its factors are all positive).
    bright = zeros.copy()
    bright[14] = 1.0
    assert (latents_to_rgb(bright).astype(int) > frames.astype(int)).all()
    with pytest.raises(ValueError, match=r"\[16, T, H, W\]"):
        latents_to_rgb(np.zeros((4, 3, 6, 10), dtype=np.float32))


def test_linear_preview_is_the_same_from_torch_and_numpy_and_stays_small():
    torch = pytest.importorskip("torch")
    x0 = np.random.default_rng(1).standard_normal((16, 21, 90, 160)).astype(np.float32)
    from_numpy = latents_to_rgb(x0)
    from_torch = latents_to_rgb(torch.from_numpy(x0).to(torch.bfloat16).float())
    assert from_numpy.shape == (21, 45, 80, 3)  # 720p's latents, every second pixel
    assert np.abs(from_numpy.astype(int) - from_torch.astype(int)).max() <= 1
    assert preview_fps(16, 81, 21) == pytest.approx(16 * 21 / 81, abs=1e-3)


# -- previews through the service -----------------------------------------------------------------

def test_a_preview_follows_every_step_and_the_record_names_it(make_service):
    service = make_service()
    events = []
    result = service.generate(request(), events.append)
    previews = [e.preview for e in events if e.preview is not None]
    assert [(p.step, p.total) for p in previews] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for p in previews:
        assert p.kind is PreviewKind.LINEAR and p.cost_ms is not None
        assert p.frames.dtype == np.uint8 and p.frames.ndim == 4 and p.frames.shape[-1] == 3
        assert p.frames.shape[0] == (49 - 1) // 4 + 1  # one picture per latent frame
    # Each preview comes right after its step's progress event, before the decode.
    order = [(e.phase, e.step, e.preview is not None) for e in events]
    first_decode = order.index((Phase.DECODING, 0, False))
    assert all(order.index((Phase.DENOISING, s, True)) < first_decode for s in range(1, 5))
    # The estimate sharpens: later previews differ from the first.
    assert not np.array_equal(previews[0].frames, previews[-1].frames)
    assert result.record["preview"]["kind"] == "linear"
    assert "factors" in result.record["preview"]["source"]
    # The UI side writes it as a small animated GIF in the hidden previews folder.
    path = service.outputs.write_preview("job1-step4", previews[-1].frames, previews[-1].fps)
    assert path.parent.name == ".previews" and path.read_bytes()[:6] == b"GIF89a"
    from PIL import Image

    with Image.open(path) as gif:
        assert gif.n_frames == previews[-1].frames.shape[0]


def test_previews_use_the_tiny_vae_when_installed_and_can_be_switched_off(tmp_path, presets):
    def service(backend, preview):
        return VideoService(presets=presets, cache=PipelineCache(backend),
                            outputs=OutputStore(tmp_path / preview / "out"),
                            history=History(tmp_path / preview / "h.sqlite3"),
                            monitor=GpuMonitor(nvml=FakeNvml(fail_init=True)), preview=preview)

    tiny = service(FakeBackend(tiny_vae_installed=True), "auto").generate(request())
    assert tiny.record["preview"]["kind"] == "tiny-vae"
    linear = service(FakeBackend(tiny_vae_installed=True), "linear").generate(request())
    assert linear.record["preview"]["kind"] == "linear"
    events = []
    off = service(FakeBackend(), "off").generate(request(), events.append)
    assert off.record["preview"] is None and not [e for e in events if e.preview is not None]
    with pytest.raises(ValueError):
        service(FakeBackend(), "sometimes")


def test_cancel_right_after_a_preview_stops_at_that_step(make_service):
    backend = FakeBackend()
    service = make_service(backend)
    stop = threading.Event()
    events = []

    def sink(event):
        events.append(event)
        if event.preview is not None and event.preview.step == 1:
            stop.set()  # the user saw the first preview and pressed Cancel

    with pytest.raises(GenerationCancelled):
        service.generate(request(), sink, stop.is_set)
    assert [e.preview.step for e in events if e.preview is not None] == [1]
    (row,) = service.history.recent(status=None)
    assert row.status == "cancelled"
    assert not list(service.outputs.root.glob(f"*{LATENTS_SUFFIX}"))
    assert service.generate(request()).video_path.exists()  # the next run is fine


# -- draft decode, then finish at full quality ------------------------------------------------------

def test_draft_then_finish_equals_the_full_decode_and_runs_no_step(make_service, tmp_path, presets):
    backend = FakeBackend(tiny_vae_installed=True)
    service = make_service(backend)
    draft = service.generate(request(draft=True))
    assert draft.record["draft"] is True and draft.record["decode"].startswith("draft: tiny VAE")
    kept = service.outputs.latents_of(draft.video_path)
    assert kept.is_file() and draft.record["latents"] == kept.name
    from ui import handlers as h

    captions = [c for _, c in h.gallery_items(service.history)]
    assert captions == [f"#{draft.record['job_id']} · 480x832x49 · seed 42 · draft"]

    steps_before = len(backend.generated)
    finished = service.finish(FinishRequest(draft.record["job_id"]))
    assert len(backend.generated) == steps_before  # no denoising step ran again
    assert [spec.draft for spec in backend.decoded] == [False]
    assert finished.record["draft"] is False and finished.record["decode"] == "full VAE"
    assert finished.record["finished_from_job"] == draft.record["job_id"]
    assert finished.record["preset_requested"] == "480x832x49"
    assert finished.record["rung_used"] == "fast+finish"
    assert "no denoising step ran" in h.result_summary(finished.record)
    # The finished clip is exactly what a normal (full VAE) run with that seed gives.
    normal = VideoService(presets=presets, cache=PipelineCache(FakeBackend()),
                          outputs=OutputStore(tmp_path / "normal"),
                          history=History(tmp_path / "normal" / "h.sqlite3"),
                          monitor=GpuMonitor(nvml=FakeNvml(fail_init=True))).generate(request())
    assert np.array_equal(read_frames(finished.video_path), read_frames(normal.video_path))
    assert not np.array_equal(read_frames(draft.video_path), read_frames(normal.video_path))
    # Both clips stay; the finished one keeps the latents too and is not marked draft.
    assert draft.video_path.exists() and service.outputs.latents_of(finished.video_path).is_file()
    assert [c.endswith("draft") for _, c in h.gallery_items(service.history)] == [False, True]


def test_draft_without_a_tiny_vae_is_refused_at_the_border(make_service, presets):
    from ui import handlers as h

    service = make_service(FakeBackend(tiny_vae_installed=False))
    assert service.tiny_vae_installed() is False
    values = dict(prompt="a", preset="480x832x49", seed=1, randomize_seed=False, draft=True)
    with pytest.raises(InvalidRequest, match="tiny VAE"):
        h.make_request(presets, **values, draft_available=service.tiny_vae_installed())
    assert h.make_request(presets, **values, draft_available=True).draft is True
    assert h.make_request(presets, **dict(values, draft=None)).draft is False
    with pytest.raises(InvalidRequest, match="Draft decode"):
        h.make_request(presets, **dict(values, draft="yes"), draft_available=True)
    # Behind the border the backend trusts the request: a tiny VAE gone since is a setup fault.
    with pytest.raises(WeightsError, match="tiny VAE"):
        service.generate(request(draft=True))
    with pytest.raises(InvalidRequest, match="Draft decode"):
        GenerationRequest(prompt="a", preset="480x832x49", seed=1, draft="yes")


def test_latents_survive_a_restart_and_finish_then(tmp_path, presets):
    def start():
        backend = FakeBackend(tiny_vae_installed=True)
        outputs = OutputStore(tmp_path / "outputs")
        outputs.clean_leftovers()
        return backend, VideoService(presets=presets, cache=PipelineCache(backend), outputs=outputs,
                                     history=History(tmp_path / "outputs" / "history.sqlite3"),
                                     monitor=GpuMonitor(nvml=FakeNvml(fail_init=True)))

    _, first = start()
    draft = first.generate(request(draft=True, seed=7))
    first.history.close()
    backend, second = start()  # a new process: nothing loaded, nothing in memory
    assert second.outputs.latents_of(draft.video_path).is_file()  # start-up clean-up kept them
    jobs = JobQueue(second)
    try:
        job = jobs.submit(FinishRequest(draft.record["job_id"]))
        assert job.done.wait(20) and job.error is None, job.error
    finally:
        jobs.shutdown()
    assert len(backend.loads) == 1 and backend.generated == []
    assert job.result.record["finished_from_job"] == draft.record["job_id"]
    (done, source) = second.history.recent(2)
    assert done.id == job.result.record["job_id"] and source.id == draft.record["job_id"]


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "foreign"])
def test_a_missing_or_damaged_latents_file_is_a_clear_error_and_loses_nothing(make_service, damage):
    service = make_service(FakeBackend(tiny_vae_installed=True))
    draft = service.generate(request(draft=True))
    kept = service.outputs.latents_of(draft.video_path)
    if damage == "missing":
        kept.unlink()
    elif damage == "truncated":
        kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])
    elif damage == "garbage":
        kept.write_bytes(b"not a safetensors file at all")
    else:  # a valid safetensors file that is not ours
        from safetensors.numpy import save_file

        save_file({"weights": np.zeros(3, np.float32)}, str(kept))
    before = {p.name: p.read_bytes() for p in service.outputs.root.iterdir() if p.is_file()
              and not p.name.startswith("history")}
    rows = service.history.recent(status=None)
    with pytest.raises(LatentsError) as err:
        service.finish(FinishRequest(draft.record["job_id"]))
    message = str(err.value)
    assert f"clip #{draft.record['job_id']}" in message and "untouched" in message
    assert ("missing" in message) if damage == "missing" else ("cannot be read" in message)
    # Nothing changed: no new history row, every file as it was.
    assert service.history.recent(status=None) == rows
    assert {p.name: p.read_bytes() for p in service.outputs.root.iterdir() if p.is_file()
            and not p.name.startswith("history")} == before


def test_finish_refuses_what_cannot_be_finished(make_service):
    service = make_service()
    with pytest.raises(InvalidRequest, match="no finished clip #99"):
        service.check_finish(FinishRequest(99))
    with pytest.raises(InvalidRequest):
        FinishRequest(0)
    from ui import handlers as h

    with pytest.raises(InvalidRequest, match="Select a clip"):
        h.finish_request(service, None)
    with pytest.raises(InvalidRequest):
        h.finish_request(service, "seven")
    with pytest.raises(InvalidRequest):
        h.finish_request(service, 2.5)
    with pytest.raises(InvalidRequest, match="no finished clip #7"):
        h.finish_request(service, "7")
    done = service.generate(request())
    assert h.finish_request(service, str(done.record["job_id"])) == FinishRequest(done.record["job_id"])


def test_latents_are_removed_with_the_clip_and_orphans_at_start(make_service):
    service = make_service()
    result = service.generate(request())
    kept = service.outputs.latents_of(result.video_path)
    assert kept.is_file()
    removed = service.outputs.remove(result.video_path)
    assert kept in removed and result.video_path in removed and not kept.exists()
    assert not result.record_path.exists()
    # A kill between the latents landing and the video landing leaves latents alone: start-up removes them.
    second = service.generate(request(seed=5))
    second.video_path.unlink()
    orphan = service.outputs.latents_of(second.video_path)
    assert orphan.exists()
    service.outputs.clean_leftovers()
    assert not orphan.exists()


# -- the compat tap that sees x_t, v and sigma after each step ------------------------------------

class _StepDistillLike:
    """A scheduler whose step_post reads like LightX2V's step-distill one (flow matching)."""

    def __init__(self, torch):
        self.torch = torch
        self.sigmas = torch.tensor([1.0, 0.9375, 0.8333, 0.625])
        self.step_index = 0
        self.infer_steps = 4
        self.latents = torch.randn(16, 2, 4, 6)
        self.noise_pred = torch.randn(16, 2, 4, 6)

    def step_post(self):
        torch = self.torch
        flow_pred = self.noise_pred.to(torch.float32)
        sigma = self.sigmas[self.step_index].item()
        noisy_image_or_video = self.latents.to(torch.float32) - sigma * flow_pred
        if self.step_index < self.infer_steps - 1:
            sigma_n = self.sigmas[self.step_index + 1].item()
            noisy_image_or_video = noisy_image_or_video + flow_pred * sigma_n
        self.latents = noisy_image_or_video.to(self.latents.dtype)


def test_the_step_tap_hands_over_x0_and_leaves_the_step_unchanged():
    torch = pytest.importorskip("torch")
    plain, tapped = _StepDistillLike(torch), _StepDistillLike(torch)
    tapped.latents, tapped.noise_pred = plain.latents.clone(), plain.noise_pred.clone()
    plain.step_index = tapped.step_index = 1
    fixes = compat.CompatFixes()
    tap = compat.clean_latents_estimate_after_each_step(fixes, tapped)
    assert tap is not None and "clean_latents_estimate_after_each_step" in fixes.names
    seen = []
    tap.callback = seen.append
    x_t, v = tapped.latents.clone(), tapped.noise_pred.clone()
    tapped.step_post()
    plain.step_post()
    assert torch.equal(tapped.latents, plain.latents)  # the step itself is untouched
    (state,) = seen
    assert (state.step_index, state.total) == (1, 4) and state.sigma == pytest.approx(0.9375)
    assert torch.allclose(state.x0(), x_t - 0.9375 * v)
    assert torch.allclose(state.x0(2), (x_t - 0.9375 * v)[..., ::2, ::2])
    tap.callback = None
    tapped.step_post()  # no callback: nothing computed, nothing called
    assert len(seen) == 1


def test_the_step_tap_is_not_installed_on_a_scheduler_that_works_otherwise():
    torch = pytest.importorskip("torch")

    class Other(_StepDistillLike):
        def step_post(self):  # a multistep solver: no inline x0 = x_t - sigma * v
            self.latents = self.latents * 0.5

    fixes = compat.CompatFixes()
    assert compat.clean_latents_estimate_after_each_step(fixes, Other(torch)) is None
    assert fixes.names == []
    assert compat.clean_latents_estimate_after_each_step(
        compat.CompatFixes(skip=frozenset({"clean_latents_estimate_after_each_step"})),
        _StepDistillLike(torch)) is None


def test_records_in_the_sidecar_match_what_was_saved(make_service):
    result = make_service().generate(request())
    sidecar = json.loads(result.record_path.read_text())
    assert sidecar["latents"].endswith(LATENTS_SUFFIX) and sidecar["draft"] is False
    assert sidecar["loads"] and sidecar["loads"][0]["reason"] == "first load"


def test_finish_of_a_clip_decoded_on_the_lean_settings_decodes_on_them_again(make_service):
    # The clip's own decode ran out of memory untiled and was decoded again on the leanest VAE
    # settings (rung "fast+lean-decode"). When it is finished later, memory is freer and the untiled
    # decode would fit, but it gives other frames than the tiled one: the finish must decode with
    # the settings the clip was really decoded with (its record's memory_settings), not its rung's.
    backend = FakeBackend()
    squeezed = [True]
    plain_oom = backend._maybe_oom
    backend._maybe_oom = lambda spec, phase: (squeezed[0] and phase is Phase.DECODING
                                             and not spec.memory["vae_tiling"]) or plain_oom(spec, phase)
    service = make_service(backend)
    clip = service.generate(request())
    assert clip.record["rung_used"] == "fast+lean-decode"
    assert clip.record["memory_settings"]["vae_tiling"] is True
    squeezed[0] = False
    finished = service.finish(FinishRequest(clip.record["job_id"]))
    assert [spec.memory["vae_tiling"] for spec in backend.decoded] == [True, True]  # retry, finish
    assert finished.record["memory_settings"] == clip.record["memory_settings"]
    assert finished.record["rung_used"] == "fast+finish+lean-decode"
    assert len(finished.attempts) == 1
    assert np.array_equal(read_frames(finished.video_path), read_frames(clip.video_path))


def test_a_tiled_decode_gives_other_frames_than_an_untiled_one_in_the_fake_too():
    # What makes the test above able to fail: as LightX2V's tiled decode, the fake's differs.
    from pipeline.backend import RunHooks
    from pipeline.types import RunSpec

    backend = FakeBackend()
    model = backend.load(backend.load_key({"offload_granularity": "block", "text_encoder": "offload"}),
                         lambda phase: None)

    def spec(tiling):
        return RunSpec(preset="480x832x49", rung="fast", prompt="a", negative_prompt="", seed=1,
                       height=480, width=832, frames=49, steps=4, shift=5.0, guidance=1.0,
                       memory={"vae_tiling": tiling}, preview=None)

    hooks = RunHooks(on_phase=lambda p: None, on_step=lambda i, n: None, should_stop=lambda: False)
    latents = np.random.default_rng(3).standard_normal((16, 13, 6, 13)).astype(np.float32)
    untiled, tiled = model.decode(latents, spec(False), hooks), model.decode(latents, spec(True), hooks)
    assert untiled.shape == tiled.shape and not np.array_equal(untiled, tiled)
    assert np.array_equal(untiled, model.decode(latents, spec(False), hooks))
    assert np.array_equal(tiled, model.decode(latents, spec(True), hooks))
