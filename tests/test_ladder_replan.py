"""The OOM ladder re-plans after every OOM on the memory that is really free, keeps rungs that share a
load key together, never goes back to a key it left, and loads the weights at most twice per click
(the first load plus one reload). Fake backend with scripted OOMs, CPU."""

from __future__ import annotations

import pytest

from pipeline.backends.fake import FakeBackend
from pipeline.machine.gpu import oom_bound_gib
from pipeline.planner import Planner, replan
from pipeline.types import GenerationRequest, Phase
from tests.conftest import FakeNvml
from ui.handlers import fallback_summary

GIB = 1024**3


def request(preset="720x1280x81", seed=3):
    return GenerationRequest(prompt="A fox running through snow.", preset=preset, seed=seed)


def granularity(key) -> str:
    return dict(key.build_settings)["offload_granularity"]


def key_runs(loads) -> list[str]:
    """The load keys in the order they were loaded, e.g. ['block', 'phase']."""
    return [granularity(k) for k in loads]


# -- the planner's re-plan, as a pure function -----------------------------------------------------

def test_oom_bound_reads_the_failed_allocation():
    assert oom_bound_gib(4.2, "CUDA out of memory. Tried to allocate 740.00 MiB (GPU 0 ...)") == \
        pytest.approx(4.2 + 740 / 1024)
    assert oom_bound_gib(4.2, "CUDA out of memory. Tried to allocate 2.00 GiB") == pytest.approx(6.2)
    assert oom_bound_gib(4.2, "cuDNN error: CUDNN_STATUS_ALLOC_FAILED") == pytest.approx(4.2)
    assert oom_bound_gib(None, "Tried to allocate 2.00 GiB") is None


def test_replan_skips_what_does_not_fit_groups_keys_and_never_goes_back(presets):
    planner = Planner(presets)
    ladder = planner.ladder("720x1280x81")
    # The load key as the backends build it: the granularity, and the low-RAM rung's DiT read from
    # disk (a build of its own).
    key = lambda r: r.memory.offload_granularity.value + ("+disk" if r.memory.dit_from_disk else "")  # noqa: E731
    names = lambda rungs: [f"{r.preset.name}/{r.memory.name}" for r in rungs]  # noqa: E731
    first = ladder[0]
    tried = {("720x1280x81", "chunked-rope")}
    # No reading: the best rung left (720p/lean) is on phase offload, so the one reload goes there
    # and the block-offload rungs are dropped (going back would be a second reload).
    assert names(replan(ladder, first, tried, None, key, "block", set(), True)) == [
        "720x1280x81/lean", "480x832x81/lean", "480x832x49/lean"]
    # 4.5 GiB really free: 720p/lean (6.2), 480x832x81 fast/tiled (6.6/6.3) and 480x832x49/fast
    # (6.6) are predicted not to fit and skipped.
    assert names(replan(ladder, first, tried, 4.5, key, "block", set(), True)) == [
        "480x832x81/lean", "480x832x49/lean"]
    # The reload is spent: only the current key's rungs remain.
    assert names(replan(ladder, first, tried, 4.5, key, "block", set(), False)) == [
        "480x832x49/tiled-vae"]
    # A key left earlier in the click is never gone back to (the low-RAM build is another key:
    # the longer clip on it comes before the shorter one on the current key).
    assert names(replan(ladder, first, tried, 4.5, key, "block", {"phase"}, True)) == [
        "480x832x81/low-ram", "480x832x49/low-ram"]
    assert names(replan(ladder, first, tried, 4.5, key, "block", {"phase", "phase+disk"}, True)) == [
        "480x832x49/tiled-vae"]
    # When the current key's best rung comes first, all its rungs run before the one reload
    # (480x832x49 fast and tiled-vae before 480x832x81/lean: no reload is worth more than the
    # longer clip).
    lean_first = planner.ladder("480x832x81")
    assert names(replan(lean_first, lean_first[0], {("480x832x81", "fast")}, 7.0, key, "block",
                        set(), True)) == ["480x832x81/tiled-vae", "480x832x49/fast", "480x832x49/tiled-vae",
                                          "480x832x81/lean", "480x832x49/lean"]
    # Nothing predicted to fit: the leanest eligible rung is still tried once.
    assert names(replan(ladder, first, tried, 1.0, key, "block", set(), True)) == ["480x832x49/lean"]
    # skip() rules rungs out before the groups form.
    assert names(replan(ladder, first, tried, None, key, "block", set(), True,
                        skip=lambda r: r.memory.name in ("lean", "low-ram") and r.preset.name == "720x1280x81")) == [
        "480x832x81/fast", "480x832x81/tiled-vae", "480x832x49/fast", "480x832x49/tiled-vae",
        "480x832x81/lean", "480x832x49/lean"]


def test_replan_honours_system_ram_and_the_low_ram_rules(presets):
    planner = Planner(presets)
    ladder = planner.ladder("720x1280x81")
    key = lambda r: r.memory.offload_granularity.value + ("+disk" if r.memory.dit_from_disk else "")  # noqa: E731
    names = lambda rungs: [f"{r.preset.name}/{r.memory.name}" for r in rungs]  # noqa: E731
    first, lean = ladder[0], next(r for r in ladder if r.label == "720x1280x81/lean")
    tried = {("720x1280x81", "chunked-rope")}
    low_ram = ["720x1280x81/low-ram", "480x832x81/low-ram", "480x832x49/low-ram"]
    # 12 GiB of RAM really free: only the low-RAM rungs (9.5 GiB) fit; the one reload goes there.
    assert names(replan(ladder, first, tried, None, key, "block", set(), True, ram_gib=12.0)) == low_ram
    # After a host-memory failure: only rungs that need less RAM than the one that failed.
    assert names(replan(ladder, first, tried, None, key, "block", set(), True,
                        skip=lambda r: planner.skip_after(r, [(first, True)]))) == low_ram
    # After a GPU failure on lean: the same preset's low-RAM rung (lean's GPU settings) is passed over.
    after_lean = names(replan(ladder, lean, tried | {("720x1280x81", "lean")}, None, key, "phase", set(), True,
                              skip=lambda r: planner.skip_after(r, [(lean, False)])))
    assert "720x1280x81/low-ram" not in after_lean and after_lean[0] == "480x832x81/fast"
    # Nothing fits the GPU: the leanest rung is lean where RAM allows, low-RAM where it is short.
    assert names(replan(ladder, first, tried, 1.0, key, "block", set(), True, ram_gib=30.0)) == [
        "480x832x49/lean"]
    assert names(replan(ladder, first, tried, 1.0, key, "block", set(), True, ram_gib=12.0)) == [
        "480x832x49/low-ram"]


# -- the service's ladder walk ------------------------------------------------------------------

@pytest.mark.parametrize("phase", [Phase.TEXT_ENCODING, Phase.DENOISING, Phase.DECODING])
def test_scripted_ooms_in_each_phase_cost_at_most_one_reload(make_service, phase):
    # Everything on block offload fails in `phase`, at every preset: the old ladder alternated
    # block <-> phase offload and loaded the weights at every switch.
    backend = FakeBackend(oom_at={(p, r, phase) for p in ("720x1280x81", "480x832x81", "480x832x49")
                                  for r in ("chunked-rope", "fast", "tiled-vae")})
    service = make_service(backend)
    result = service.generate(request())
    assert len(backend.loads) <= 2
    assert key_runs(backend.loads) == ["block", "phase"]
    assert result.record["rung_used"].startswith("lean")
    assert result.preset_used == "720x1280x81"  # 720p/lean was the best rung left, and it fits
    assert [load["settings"]["offload_granularity"] for load in result.record["loads"]] == [
        "block", "phase"]
    assert "ran out of GPU memory" in result.record["loads"][1]["reason"]


@pytest.mark.parametrize("phase", [Phase.TEXT_ENCODING, Phase.DENOISING, Phase.DECODING])
def test_failures_after_the_reload_stay_on_that_key(make_service, phase):
    backend = FakeBackend(oom_at={("720x1280x81", "*", phase), ("480x832x81", "*", phase)})
    service = make_service(backend)
    result = service.generate(request())
    assert key_runs(backend.loads) == ["block", "phase"]
    assert (result.preset_used, result.record["rung_used"]) == ("480x832x49", "lean")
    # Every rung after the reload was a phase-offload one.
    after = [a for a in result.attempts if a.preset != "720x1280x81" or a.rung.startswith("lean")]
    assert {a.rung.split("+")[0] for a in after} == {"lean"}


def test_a_click_that_starts_on_another_loaded_key_counts_that_as_its_first_load(make_service):
    backend = FakeBackend(oom_at={("720x1280x81", "*", Phase.DENOISING)})
    service = make_service(backend)
    service.generate(request())  # leaves phase offload loaded (it ended on 480x832x81/lean)
    backend.loads.clear()
    result = service.generate(request("480x832x49"))  # starts on block offload: the first load
    assert key_runs(backend.loads) == ["block"] and result.record["rung_used"] == "fast"
    assert result.record["loads"][0]["reason"] == "these settings need another build"


def test_memory_that_vanishes_mid_click_is_read_again_and_rungs_that_cannot_fit_are_skipped(make_service):
    # 11.5 GiB free at the click: 720p starts on chunked-rope (8.6 GiB predicted). During step 2
    # another program takes memory and leaves 4.5 GiB; the step runs out of memory.
    nvml = FakeNvml(total_gib=12.0, used_gib=0.5)
    backend = FakeBackend()
    service = make_service(backend, nvml=nvml)

    def squeeze(spec, step):
        if spec.preset == "720x1280x81" and step == 2:
            nvml.used = int(7.5 * GIB)
            backend.oom_at.add(("720x1280x81", "chunked-rope", Phase.DENOISING))

    backend.on_step_hook = squeeze
    result = service.generate(request())
    tried = [(a.preset, a.rung, a.outcome) for a in result.attempts]
    # 720p/lean (6.2), 480x832x81 fast/tiled (6.6/6.3) cannot fit 4.5 GiB: skipped, not tried.
    assert tried == [("720x1280x81", "chunked-rope", "out of memory"),
                     ("480x832x81", "lean", "ok")]
    assert key_runs(backend.loads) == ["block", "phase"]
    reason = result.record["loads"][1]["reason"]
    assert "offload_granularity=phase" in reason and "about 4.5 GiB is really free" in reason
    assert "reloading the weights" in fallback_summary(result) or result.fell_back


def test_the_status_line_says_when_and_why_the_weights_reload(make_service):
    backend = FakeBackend(oom_at={("720x1280x81", "chunked-rope", Phase.DENOISING)})
    service = make_service(backend)
    events = []
    service.generate(request(), events.append)
    messages = [e.message for e in events if e.phase is Phase.LOADING and e.message]
    assert any(m.startswith("Retrying on 720x1280x81/lean: reloading the weights with "
                            "offload_granularity=phase") and "chunked-rope ran out of GPU memory in "
               "denoising" in m for m in messages), messages
