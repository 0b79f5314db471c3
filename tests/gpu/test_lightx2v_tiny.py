"""LightX2V end to end on the tiny synthetic checkpoint (2-block DiT, real-size T5 and VAE), under the
11.0 GiB cap. Through VideoService where the service decides (presets, loads, cancel); through the
loaded model where the test needs to reach inside (OOM, compat fixes)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.gpu.gpuhelpers import CAP_GIB, PROMPT, Recorder, loaded_model, set_cap, spec

pytestmark = pytest.mark.gpu

ALL_FIXES = {"keep_target_video_length_in_config", "explicit_t5_checkpoint_path", "t5_offload_linear_bias_default",
             "t2v_without_image_encoder", "t5_token_embedding_on_host", "reset_runner_after_exception",
             "ffn_chunked_over_tokens", "non_block_weights_kept_for_the_run", "attention_chosen_by_measurement",
             "int8_gemm_tiles_for_this_gpu", "clean_latents_estimate_after_each_step",
             # The DiT block's elementwise chains fused (LightX2V without sgl_kernel, its default RoPE).
             "rope_fused", "qk_rms_norm_fused", "gate_residual_fused",
             # Host memory (every build): weights pinned in packed slabs, .pth files memory-mapped.
             "pinned_weights_packed", "checkpoints_memory_mapped"}


def one_gpu_opt_in() -> set[str]:
    """The opt-in changes (lightx2v_compat.OPT_IN_NAMES; on where WAN_STUDIO_OPT_IN names them, off
    by default) that a one-GPU build applies: the cross-attention change acts only on
    sequence-parallel builds."""
    from pipeline.backends import lightx2v_compat as compat

    return {"dit_head_in_split_invariant_chunks", "sage_keys_smoothed_by_head_groups"} & compat.opt_in_named()


# Only where LightX2V's SageAttention import fails (RTX 40 and 50 with sageattention 1.0.6).
CAPABILITY_FIXES = {"sage_attention_on_sm89_sm120"}


def _mp4_size(path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.height, stream.codec_context.width


def test_every_preset_through_the_service_reloading_only_for_another_build(tiny_service, gpu_report):
    from pipeline.store.outputs import count_mp4_frames
    from pipeline.types import GenerationRequest

    backend = tiny_service.cache.backend
    # The session's service may hold a build from an earlier test: count loads from here.
    loads_before, key_before = tiny_service.cache.loads, tiny_service.cache.key
    keys, loads = [], []
    for name in ("480x832x49", "480x832x81", "720x1280x81"):
        preset = tiny_service.presets[name]
        started = time.perf_counter()
        result = tiny_service.generate(GenerationRequest(prompt=PROMPT, preset=name, seed=42))
        keys.append(backend.load_key(preset.rung(result.record["rung_used"]).settings()))
        loads.append(tiny_service.cache.loads)
        assert result.preset_used == name
        assert count_mp4_frames(result.video_path) == preset.frames
        assert _mp4_size(result.video_path) == (preset.height, preset.width)
        assert result.record["rung_used"] in [r.name for r in preset.rungs]
        gpu_report("tiny_preset", preset=name, rung=result.record["rung_used"], seconds=time.perf_counter() - started,
                   peak_reserved_gib=result.record["vram"].get("peak_torch_reserved_gib"),
                   timings=result.record.get("timings_s"), loaded=result.record["weights_loaded_this_job"])
    # Another preset reloads nothing unless its rung needs another build (offload granularity or
    # T5 placement): the planner may start 720p on a phase-offload rung.
    expected = [loads_before + (keys[0] != key_before)]
    for previous, key in zip(keys, keys[1:]):
        expected.append(expected[-1] + (key != previous))
    assert loads == expected, (loads, keys)
    assert loads[1] == loads[0]  # 480x832x81 runs on the build 480x832x49 ran on
    model = tiny_service.cache.backend.describe()
    assert set(model["compat_fixes"]) - CAPABILITY_FIXES == ALL_FIXES | one_gpu_opt_in(), model["compat_fixes"]
    assert model["kernels"]["attention"], model["kernels"]  # the measured choice is in the record
    assert model["quant_scheme"] == "int8-triton" and model["attn_mode"] == "sage_attn2"


def test_same_seed_gives_identical_frames_also_after_an_oom(tiny_service, capped, gpu_report):
    torch = capped
    from pipeline.machine.gpu import is_oom

    model = loaded_model(tiny_service)
    hooks = Recorder().hooks()
    first = model.generate(spec(seed=5), hooks)
    assert first.shape == (9, 256, 448, 3) and first.dtype == np.uint8
    assert np.array_equal(first, model.generate(spec(seed=5), hooks))
    assert not np.array_equal(first, model.generate(spec(seed=6), hooks))  # the seed matters

    torch.cuda.empty_cache()
    set_cap(torch, torch.cuda.memory_allocated() / 2**30 + 0.25)
    with pytest.raises(Exception) as failure:
        model.generate(spec(720, 1280, 81, seed=5), hooks)
    assert is_oom(failure.value), repr(failure.value)
    gpu_report("forced_oom", error=type(failure.value).__name__, message=str(failure.value)[:200])
    failure = None
    set_cap(torch, CAP_GIB)
    assert np.array_equal(first, model.generate(spec(seed=5), hooks))


def test_decode_oom_hands_back_the_latents_and_decode_finishes_the_job(tiny_service, capped):
    torch = capped
    from dataclasses import replace

    from pipeline.backend import DecodeOutOfMemory

    model = loaded_model(tiny_service)
    tiled = spec(720, 1280, 41, seed=8, memory={"vae_tiling": True})
    reference = model.generate(tiled, Recorder().hooks())
    torch.cuda.empty_cache()
    # Room for the tiny DiT's activations, not for an untiled 720p decode (~9 GiB).
    set_cap(torch, torch.cuda.memory_allocated() / 2**30 + 1.5)
    recorder = Recorder()
    with pytest.raises(DecodeOutOfMemory) as failure:
        model.generate(replace(tiled, memory=dict(tiled.memory, vae_tiling=False)), recorder.hooks())
    latents = failure.value.latents
    failure = None
    assert recorder.steps[-1] == (4, 4)  # every step had finished
    assert latents.device.type == "cpu" and tuple(latents.shape) == (16, 11, 90, 160)
    set_cap(torch, CAP_GIB)
    # The service's retry: decode the kept latents on leaner VAE settings, no steps re-run.
    assert np.array_equal(model.decode(latents, tiled, Recorder().hooks()), reference)


def test_cancel_stops_at_the_next_boundary_and_the_next_run_matches(tiny_service):
    from pipeline.errors import GenerationCancelled
    from pipeline.types import GenerationRequest, Phase

    model = loaded_model(tiny_service)
    reference = model.generate(spec(seed=11), Recorder().hooks())

    events = []
    stop = lambda: any(e.phase is Phase.DENOISING and e.step >= 1 for e in events)  # noqa: E731
    with pytest.raises(GenerationCancelled):
        tiny_service.generate(GenerationRequest(prompt=PROMPT, preset="480x832x49", seed=11),
                              on_event=events.append, should_stop=stop)
    steps = [e.step for e in events if e.phase is Phase.DENOISING and e.total]
    assert steps and max(steps) == 1, steps  # stopped inside step 2, long before step 4
    assert not any(e.phase is Phase.DECODING for e in events)

    # Recovery re-initialised the offload double buffer and the scheduler: same seed, same frames.
    assert np.array_equal(reference, model.generate(spec(seed=11), Recorder().hooks()))


def test_progress_phases_and_steps(tiny_service):
    from pipeline.types import Phase

    recorder = Recorder()
    loaded_model(tiny_service).generate(spec(), recorder.hooks())
    assert recorder.phases == [Phase.TEXT_ENCODING, Phase.DENOISING, Phase.DECODING]
    assert recorder.steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_per_call_settings_take_effect_without_a_reload(tiny_service):
    model = loaded_model(tiny_service)
    loads = tiny_service.cache.loads
    base = model.generate(spec(seed=3), Recorder().hooks())

    # Chunked RoPE swaps the rope modules for this call only and is numerically the same.
    chunked = model.generate(spec(seed=3, memory={"rope_chunk": 4096}), Recorder().hooks())
    from lightx2v.common.ops.rope.chunked_rope import ChunkedRope
    from pipeline.backends.lightx2v import _rope_holders

    holders = _rope_holders(model._runner.model.transformer_weights)
    assert holders and all(isinstance(h.rope, ChunkedRope) and h.rope.chunk_size == 4096 for h in holders)
    assert np.array_equal(base, chunked)
    model.generate(spec(seed=3), Recorder().hooks())
    assert not any(isinstance(h.rope, ChunkedRope) for h in holders)

    # VAE placement follows vae_offload per call; tiling runs and changes only the blending.
    model.generate(spec(seed=3, memory={"vae_offload": True, "vae_tiling": True}), Recorder().hooks())
    assert next(model._runner.vae_decoder.model.parameters()).device.type == "cpu"
    model.generate(spec(seed=3), Recorder().hooks())
    assert next(model._runner.vae_decoder.model.parameters()).device.type == "cuda"

    # clean_cuda_cache reaches every object that copied it at init.
    model.generate(spec(seed=3, memory={"clean_cuda_cache": True}), Recorder().hooks())
    assert tiny_service.cache.loads == loads


def test_ffn_over_token_slices_gives_identical_frames(tiny_service):
    # 720x1280x49 is 46,800 tokens: above the 32,768-token slice, so the FFN runs in two slices.
    model = loaded_model(tiny_service)
    big = spec(720, 1280, 49, seed=4, memory={"vae_tiling": True})
    infer = model._runner.model.transformer_infer
    before = infer.infer_ffn.sliced_calls
    sliced = model.generate(big, Recorder().hooks())
    assert infer.infer_ffn.sliced_calls - before == 4 * 2  # 4 steps x 2 blocks
    with model.compat.disabled("ffn_chunked_over_tokens"):
        whole = model.generate(big, Recorder().hooks())
    assert np.array_equal(sliced, whole)


def test_non_block_weights_kept_for_the_run_same_frames_and_given_back(tiny_service):
    import torch

    model = loaded_model(tiny_service)
    kept = model.generate(spec(seed=6), Recorder().hooks())  # also warms every cache
    torch.cuda.synchronize()
    idle = torch.cuda.memory_allocated()
    assert np.array_equal(kept, model.generate(spec(seed=6), Recorder().hooks()))
    assert torch.cuda.memory_allocated() == idle  # released after the last step, as upstream does
    # Cancelled inside step 2: the weights kept since step 1 go back in the reset.
    with pytest.raises(Exception, match="Cancelled"):
        model.generate(spec(seed=6), Recorder(stop_at_check=3).hooks())
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == idle
    with model.compat.disabled("non_block_weights_kept_for_the_run"):
        per_step = model.generate(spec(seed=6), Recorder().hooks())
    assert np.array_equal(kept, per_step)


def test_streamed_blocks_ordered_on_the_gpu_give_the_same_frames_and_survive_a_cancel(tiny_service):
    model = loaded_model(tiny_service)
    assert "streamed_blocks_ordered_on_the_gpu" in model.compat.names  # the tiny preset streams blocks
    ordered = model.generate(spec(seed=8), Recorder().hooks())
    with pytest.raises(Exception, match="Cancelled"):  # stopped between two blocks of step 2
        model.generate(spec(seed=8), Recorder(stop_at_check=3).hooks())
    assert np.array_equal(ordered, model.generate(spec(seed=8), Recorder().hooks()))
    with model.compat.disabled("streamed_blocks_ordered_on_the_gpu"):
        host_synced = model.generate(spec(seed=8), Recorder().hooks())
    assert np.array_equal(ordered, host_synced)


# -- one test per compat fix: the upstream failure with the fix off --------------------------------


def test_fix_1_target_video_length(tiny_ckpt):
    from lightx2v.utils import input_info

    from pipeline.backends.lightx2v import LightX2VBackend

    keys = input_info.ALL_INPUT_INFO_KEYS
    keys.add("target_video_length")  # the state of an untouched LightX2V
    try:
        backend = LightX2VBackend(tiny_ckpt, vram_cap_gib=CAP_GIB, compat_skip={"keep_target_video_length_in_config"})
        with pytest.raises(KeyError, match="target_video_length"):
            backend.load(backend.load_key(dict()), lambda phase: None)
    finally:
        keys.discard("target_video_length")


def test_fix_2_explicit_t5_checkpoint(tiny_ckpt):
    from pipeline.backends.lightx2v import LightX2VBackend

    backend = LightX2VBackend(tiny_ckpt, vram_cap_gib=CAP_GIB, compat_skip={"explicit_t5_checkpoint_path"})
    with pytest.raises((TypeError, AttributeError, FileNotFoundError, ValueError)) as failure:
        backend.load(backend.load_key(dict()), lambda phase: None)
    assert "bool" in str(failure.value) or "False" in str(failure.value), repr(failure.value)


def test_fix_3_t5_offload_bias(tiny_service):
    model = loaded_model(tiny_service)
    with model.compat.disabled("t5_offload_linear_bias_default"):
        with pytest.raises(AttributeError, match="bias"):
            model.generate(spec(), Recorder().hooks())
    assert model.generate(spec(), Recorder().hooks()).shape == (9, 256, 448, 3)


def test_fix_4_t2v_clean_cuda_cache(tiny_service):
    model = loaded_model(tiny_service)
    lean = spec(memory={"clean_cuda_cache": True})
    with model.compat.disabled("t2v_without_image_encoder"):
        with pytest.raises(UnboundLocalError, match="context_clip"):
            model.generate(lean, Recorder().hooks())
    assert model.generate(lean, Recorder().hooks()).shape == (9, 256, 448, 3)


def test_fix_5_t5_embedding_stays_off_the_gpu(tiny_service, gpu_report):
    import torch

    model = loaded_model(tiny_service)
    reference = model.generate(spec(seed=9), Recorder().hooks())
    torch.cuda.synchronize()
    fixed_allocated = torch.cuda.memory_allocated()
    encoder = model._runner.text_encoders[0].model
    with model.compat.disabled("t5_token_embedding_on_host"):
        upstream = model.generate(spec(seed=9), Recorder().hooks())
        torch.cuda.synchronize()
        upstream_allocated = torch.cuda.memory_allocated()
        assert encoder.token_embedding.weight.device.type == "cuda"
    gpu_report("t5_embedding", fixed_allocated_gib=fixed_allocated / 2**30,
               upstream_allocated_gib=upstream_allocated / 2**30)
    # 256384 x 4096 bf16 = 2.1 GB stays allocated upstream; the host lookup gives the same frames.
    assert upstream_allocated - fixed_allocated > 1.9 * 2**30
    assert np.array_equal(reference, upstream)
    # With the fix back on: the same frames again, and the embedding's 2.1 GB gone from the GPU.
    assert np.array_equal(model.generate(spec(seed=9), Recorder().hooks()), reference)
    assert encoder.token_embedding.weight.device.type != "cuda"
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - fixed_allocated < 0.1 * 2**30


def test_fix_6_reset_after_exception(tiny_service):
    from pipeline.errors import GenerationCancelled

    model = loaded_model(tiny_service)
    reference = model.generate(spec(seed=21), Recorder().hooks())
    # Interrupt inside step 1 (between its blocks). LightX2V's own stop_signal path calls end_run()
    # itself; any other exception there (an OOM, an interrupted block) leaves the state dirty.
    with model.compat.disabled("reset_runner_after_exception"):
        with pytest.raises(GenerationCancelled):
            model.generate(spec(seed=21), Recorder(stop_at_check=2).hooks())
        upstream = model.generate(spec(seed=21), Recorder().hooks())
    # Upstream reuses the interrupted run's generator (and a half-swapped block buffer): the seed is
    # not honoured.
    assert not np.array_equal(reference, upstream)
    with pytest.raises(GenerationCancelled):
        model.generate(spec(seed=21), Recorder(stop_at_check=2).hooks())
    assert np.array_equal(reference, model.generate(spec(seed=21), Recorder().hooks()))
