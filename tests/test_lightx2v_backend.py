"""The LightX2V backend's CPU-side logic (its weights layout rule is tests/test_layout.py): the reload
key, the availability check and each compat fix's detection. Running it on a GPU is tests/gpu/."""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import pytest

from pipeline.backends import lightx2v_compat as compat
from pipeline.errors import NoGPUError
from pipeline.backends.lightx2v import LightX2VBackend


def test_importing_the_backend_imports_neither_torch_nor_lightx2v():
    code = ("import sys, pipeline.backends.lightx2v, pipeline.backends.lightx2v_compat; "
            "print(sorted(m for m in ('torch', 'lightx2v') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_key_holds_only_build_time_settings(tmp_path):
    backend = LightX2VBackend(tmp_path, attn_mode="torch_sdpa")
    base = {"offload_granularity": "block", "text_encoder": "offload", "vae_offload": False,
            "vae_tiling": False, "rope_chunk": 0, "clean_cuda_cache": False}
    key = backend.load_key(base)
    for per_call in ({"vae_offload": True}, {"vae_tiling": True}, {"rope_chunk": 100},
                     {"clean_cuda_cache": True}, {"text_encoder": "offload_keep_embedding"}):
        assert backend.load_key(dict(base, **per_call)) == key, per_call
    assert backend.load_key(dict(base, offload_granularity="phase")) != key
    assert backend.load_key(dict(base, text_encoder="gpu")) != key
    assert dict(key.build_settings) == {"attn_mode": "torch_sdpa", "offload_granularity": "block",
                                        "quant_scheme": "int8-triton", "text_encoder_offload": True,
                                        "dit_from_disk": False}


def test_check_available_without_cuda(tmp_path, monkeypatch):
    # Forced, so it holds on a GPU machine too: a CUDA build of torch that sees no device, then a
    # CPU-only build.
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(NoGPUError, match="No NVIDIA GPU is visible to PyTorch"):
        LightX2VBackend(tmp_path).check_available()
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(NoGPUError, match="has no CUDA support"):
        LightX2VBackend(tmp_path).check_available()


def test_fix_1_detected_from_the_input_info_keys():
    fixes = compat.CompatFixes()
    module = types.SimpleNamespace(ALL_INPUT_INFO_KEYS={"seed"})
    compat._PROCESS_WIDE.discard("keep_target_video_length_in_config")
    compat.keep_target_video_length_in_config(fixes, module)
    assert fixes.names == []  # a LightX2V without the bug
    module.ALL_INPUT_INFO_KEYS.add("target_video_length")
    compat.keep_target_video_length_in_config(fixes, module)
    assert fixes.names == ["keep_target_video_length_in_config"]
    assert module.ALL_INPUT_INFO_KEYS == {"seed"}
    with fixes.disabled("keep_target_video_length_in_config"):
        assert "target_video_length" in module.ALL_INPUT_INFO_KEYS
    assert module.ALL_INPUT_INFO_KEYS == {"seed"}
    compat._PROCESS_WIDE.discard("keep_target_video_length_in_config")


def test_fix_2_detected_from_the_signature():
    class Fixed:
        def enable_quantize(self, text_encoder_quantized_ckpt=None): ...

    class Buggy:
        def enable_quantize(self, text_encoder_quantized_ckpt=False): ...

    fixes, kwargs = compat.CompatFixes(), {}
    compat.explicit_t5_checkpoint_path(fixes, Fixed, kwargs, "/w/t5.pth")
    assert kwargs == {} and fixes.names == []
    compat.explicit_t5_checkpoint_path(fixes, Buggy, kwargs, "/w/t5.pth")
    assert kwargs == {"text_encoder_quantized_ckpt": "/w/t5.pth"}
    skipped = compat.CompatFixes(skip=frozenset({"explicit_t5_checkpoint_path"}))
    kwargs = {}
    compat.explicit_t5_checkpoint_path(skipped, Buggy, kwargs, "/w/t5.pth")
    assert kwargs == {} and skipped.names == []


def test_fix_3_detected_on_a_bias_less_weight():
    class WithBias:
        def __init__(self, weight_name, bias_name):
            self.bias = None

    class WithoutBias:
        def __init__(self, weight_name, bias_name):
            self.weight_name = weight_name

    fixes = compat.CompatFixes()
    compat.t5_offload_linear_bias_default(fixes, {"int8-triton": WithBias}, "int8-triton")
    assert fixes.names == []
    compat._PROCESS_WIDE.discard("t5_offload_linear_bias_default")
    compat.t5_offload_linear_bias_default(fixes, {"int8-triton": WithoutBias}, "int8-triton")
    assert fixes.names == ["t5_offload_linear_bias_default"] and WithoutBias("w", None).bias is None
    with fixes.disabled("t5_offload_linear_bias_default"):
        assert not hasattr(WithoutBias("w", None), "bias")
    assert WithoutBias("w", None).bias is None
    compat._PROCESS_WIDE.discard("t5_offload_linear_bias_default")


def test_fix_4_detected_from_the_pre_infer_source():
    class PreInfer:
        def infer(self, clean, use_image_encoder):
            if clean and use_image_encoder:
                del context_clip  # noqa: F821 - the upstream bug, reproduced

    class FixedPreInfer:
        def infer(self):
            return None

    pipe = types.SimpleNamespace(task="t2v")
    fixes = compat.CompatFixes()
    compat.t2v_without_image_encoder(fixes, pipe, FixedPreInfer)
    assert fixes.names == [] and not hasattr(pipe, "use_image_encoder")
    compat.t2v_without_image_encoder(fixes, pipe, PreInfer)
    assert pipe.use_image_encoder is False and fixes.names == ["t2v_without_image_encoder"]
    i2v = types.SimpleNamespace(task="i2v")
    compat.t2v_without_image_encoder(compat.CompatFixes(), i2v, PreInfer)
    assert not hasattr(i2v, "use_image_encoder")  # image tasks need their encoder


def test_fix_6_detected_from_the_run_path_source():
    class NoCleanup:
        def run_main(self):
            return 1

    class Cleanup:
        def run_main(self):
            try:
                return 1
            finally:
                pass

    fixes = compat.CompatFixes()
    compat.reset_runner_after_exception(fixes, ((Cleanup, "run_main"),))
    assert fixes.names == []
    compat.reset_runner_after_exception(fixes, ((NoCleanup, "run_main"),))
    assert fixes.has("reset_runner_after_exception")
    with fixes.disabled("reset_runner_after_exception"):
        assert not fixes.has("reset_runner_after_exception")
    assert fixes.has("reset_runner_after_exception")


class _Holder:
    """Counts the copies a WanModel weight holder makes (fake: no torch here)."""

    def __init__(self, log, name):
        self.log, self.name, self.on_gpu = log, name, False

    def to_cuda(self, non_blocking=False):
        self.log.append(f"{self.name} up")
        self.on_gpu = True

    def to_cpu(self, non_blocking=False):
        self.log.append(f"{self.name} down")
        self.on_gpu = False


class _Blocks(_Holder):
    def non_block_weights_to_cuda(self):
        self.to_cuda()

    def non_block_weights_to_cpu(self):
        self.to_cpu()


class _Scheduler:
    def __init__(self, steps):
        self.step_index, self.infer_steps = 0, steps


class _WanModel:
    """WanModel.infer's offload shape (networks/wan/model.py:299-346): weights up, step, weights down."""

    def __init__(self, log, steps=4, offload=True, granularity="block"):
        self.cpu_offload, self.offload_granularity = offload, granularity
        self.pre_weight, self.transformer_weights = _Holder(log, "pre"), _Blocks(log, "head")
        self.scheduler, self.log, self.fail_at = _Scheduler(steps), log, None

    def infer(self, inputs):
        if self.cpu_offload:
            self.pre_weight.to_cuda()
            self.transformer_weights.non_block_weights_to_cuda()
        assert self.pre_weight.on_gpu and self.transformer_weights.on_gpu, "a step ran without its weights"
        if self.scheduler.step_index == self.fail_at:
            raise RuntimeError("CUDA out of memory (fake)")
        self.log.append(f"step {self.scheduler.step_index}")
        if self.cpu_offload:
            self.pre_weight.to_cpu()
            self.transformer_weights.non_block_weights_to_cpu()

    def run(self):
        for index in range(self.scheduler.infer_steps):
            self.scheduler.step_index = index
            self.infer(None)


def test_non_block_weights_move_once_per_run_not_twice_per_step():
    log = []
    model, fixes = _WanModel(log), compat.CompatFixes()
    compat.non_block_weights_kept_for_the_run(fixes, model)
    assert fixes.has("non_block_weights_kept_for_the_run")
    model.run()
    assert log == ["pre up", "head up", "step 0", "step 1", "step 2", "step 3", "pre down", "head down"]
    assert not model.pre_weight.on_gpu and not model.transformer_weights.on_gpu  # free for the decode
    log.clear()
    model.run()  # the next run uploads them again
    assert log.count("pre up") == 1 and log.count("pre down") == 1 and log[-1] == "head down"


def test_a_step_that_raises_gives_the_kept_weights_back_before_the_error_leaves_it():
    log = []
    model, fixes = _WanModel(log), compat.CompatFixes()
    compat.non_block_weights_kept_for_the_run(fixes, model)
    model.fail_at = 2
    with pytest.raises(RuntimeError):
        model.run()
    assert log == ["pre up", "head up", "step 0", "step 1", "pre down", "head down"]
    assert not model.pre_weight.on_gpu and not model.transformer_weights.on_gpu
    # The backend's reset after the failure (bug 6) asks again: nothing left to copy.
    model.transformer_infer = types.SimpleNamespace(offload_manager=None)
    compat.reset_runner_state(types.SimpleNamespace(model=model, input_info=None))
    model.fail_at = None
    log.clear()
    model.run()
    assert log[:2] == ["pre up", "head up"] and log[-2:] == ["pre down", "head down"]
    assert log.count("pre up") == 1


def test_a_run_stopped_between_steps_is_released_by_the_recovery():
    log = []
    model, fixes = _WanModel(log), compat.CompatFixes()
    compat.non_block_weights_kept_for_the_run(fixes, model)
    for index in range(2):  # LightX2V's cancel check raises before step 3, outside infer
        model.scheduler.step_index = index
        model.infer(None)
    assert model.pre_weight.on_gpu and model.transformer_weights.on_gpu
    compat.release_non_block_weights(model)
    assert not model.pre_weight.on_gpu and not model.transformer_weights.on_gpu
    assert log[-2:] == ["pre down", "head down"]


def test_non_block_weights_upstream_behaviour_comes_back_when_undone():
    log = []
    model, fixes = _WanModel(log, steps=2), compat.CompatFixes()
    compat.non_block_weights_kept_for_the_run(fixes, model)
    with fixes.disabled("non_block_weights_kept_for_the_run"):
        model.run()
        assert log == ["pre up", "head up", "step 0", "pre down", "head down",
                       "pre up", "head up", "step 1", "pre down", "head down"]
    log.clear()
    model.run()
    assert log == ["pre up", "head up", "step 0", "step 1", "pre down", "head down"]


@pytest.mark.parametrize("kwargs", [{"offload": False}, {"granularity": "model"}])
def test_non_block_weights_left_alone_without_per_step_offload(kwargs):
    model, fixes = _WanModel([], **kwargs), compat.CompatFixes()
    compat.non_block_weights_kept_for_the_run(fixes, model)
    assert fixes.names == []
    assert "infer" not in vars(model)


def test_non_block_weights_left_alone_when_upstream_keeps_them():
    class KeepsThem(_WanModel):
        def infer(self, inputs):
            return None

    fixes = compat.CompatFixes()
    compat.non_block_weights_kept_for_the_run(fixes, KeepsThem([]))
    assert fixes.names == []


class _FakeTorch:
    OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {})


def _guarded_model():
    """A LightX2VModel without LightX2V: only what `_guarded` uses. recover() records whether an
    exception was still being handled when it ran (the OOM policy: recover after the except block)."""
    import sys

    from pipeline.backends.lightx2v import LightX2VModel

    model = LightX2VModel.__new__(LightX2VModel)
    model._call, model._dirty, model._torch = None, False, _FakeTorch
    model.recoveries = []
    model.recover = lambda: model.recoveries.append(sys.exc_info()[0])
    return model


def _call():
    from pipeline.backend import RunHooks
    from pipeline.backends.lightx2v import _Call

    return _Call(RunHooks(on_phase=lambda p: None, on_step=lambda i, n: None, should_stop=lambda: False), 4)


def test_a_guarded_call_returns_its_result_and_forgets_the_call():
    model = _guarded_model()
    seen = []
    assert model._guarded(_call(), lambda: seen.append(model._call) or "frames") == "frames"
    assert seen[0] is not None and model._call is None and model.recoveries == [] and not model._dirty


def test_an_oom_is_recovered_outside_the_except_block_and_raised_without_its_traceback():
    model = _guarded_model()

    def work():
        raise RuntimeError("CUDA out of memory. Tried to allocate 740.00 MiB")

    with pytest.raises(_FakeTorch.OutOfMemoryError, match="Tried to allocate 740") as raised:
        model._guarded(_call(), work)
    assert model.recoveries == [None]  # recovered once, with no exception in flight
    assert raised.value.__context__ is None and raised.value.__cause__ is None
    assert model._call is None and not model._dirty


def test_a_cancel_becomes_generation_cancelled_after_recovery():
    from pipeline.errors import GenerationCancelled
    from pipeline.backends.lightx2v import _Cancelled

    model = _guarded_model()

    def work():
        raise _Cancelled()

    with pytest.raises(GenerationCancelled):
        model._guarded(_call(), work)
    assert model.recoveries == [None]


def test_a_decode_oom_hands_back_the_callers_latents_or_the_kept_copy():
    from pipeline.backend import DecodeOutOfMemory

    model = _guarded_model()
    kept, callers = object(), object()

    def decode_runs_out(call):
        def work():
            call.decode_oom = (kept, "CUDA out of memory in the VAE")
            raise RuntimeError("CUDA out of memory in the VAE")
        return work

    call = _call()
    with pytest.raises(DecodeOutOfMemory) as raised:
        model._guarded(call, decode_runs_out(call))
    assert raised.value.latents is kept
    call = _call()
    with pytest.raises(DecodeOutOfMemory) as raised:
        model._guarded(call, decode_runs_out(call), host_latents=callers)
    assert raised.value.latents is callers and model.recoveries == [None, None]


def test_an_unexpected_error_is_reraised_as_is_and_recovery_waits_for_the_next_call():
    model = _guarded_model()

    def work():
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        model._guarded(_call(), work)
    assert model._dirty and model.recoveries == [] and model._call is None


def test_unknown_fix_names_are_rejected():
    with pytest.raises(KeyError):
        compat.CompatFixes().wanted("no_such_fix")


def test_check_available_without_torch_or_gpu_says_no_gpu(tmp_path, monkeypatch):
    # A CPU-only machine set up by ./run.sh has no torch: the message must be about the missing GPU,
    # not about installing GPU packages that would not help.
    import pipeline.backends.lightx2v as backend_module

    from pipeline.errors import BackendUnavailable
    from pipeline.machine.gpu import GpuMonitor
    from tests.conftest import FakeNvml

    monkeypatch.setattr(backend_module, "_has_module", lambda name: name != "torch")
    # The driver's answer is forced both ways, whatever this machine has.
    monkeypatch.setattr(backend_module, "GpuMonitor", lambda: GpuMonitor(nvml=FakeNvml(fail_init=True)))
    with pytest.raises(NoGPUError, match="No NVIDIA GPU was found on this machine"):
        LightX2VBackend(tmp_path).check_available()
    monkeypatch.setattr(backend_module, "GpuMonitor", lambda: GpuMonitor(nvml=FakeNvml()))
    with pytest.raises(BackendUnavailable, match="PyTorch is not installed"):
        LightX2VBackend(tmp_path).check_available()



# -- the real wrappers on a fake LightX2V runner ------------------------------------------------------

class _FakeVae:
    """WanVAE's surface the decode wrapper reads: cpu_offload, model, to_cuda."""

    def __init__(self, torch):
        self.cpu_offload, self.model, self.moves = True, torch.nn.Linear(1, 1), []

    def to_cuda(self):
        self.moves.append("to_cuda")


class _FakeInfer:
    def __init__(self, log):
        self.log = log

    def run_block(self, index):
        self.log.append(f"block {index}")

    def run_phase(self, index):
        self.log.append(f"phase {index}")


class _FakeRunner:
    """What LightX2V's WanRunner does in one generate, in order: text encoder, then per step every
    DiT block through transformer_infer.run_block, then the VAE decode; the methods the backend
    wraps are plain attributes, as on the real runner."""

    def __init__(self, torch, blocks=3, steps=2, decode_error=None):
        self.torch, self.log, self.blocks, self.steps = torch, [], blocks, steps
        self.model = types.SimpleNamespace(transformer_infer=_FakeInfer(self.log))
        self.vae_decoder = _FakeVae(torch)
        self.decode_error = decode_error
        self.latents = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
        self.text_encoders = ["umt5"]  # loaded, as after a build

    def run_text_encoder(self, input_info):
        self.log.append("text")
        return "context"

    def run_vae_decoder(self, latents):
        self.log.append("decode")
        if self.decode_error is not None:
            raise self.decode_error
        return latents * 2

    def run(self):
        self.run_text_encoder(None)
        for step in range(self.steps):
            for block in range(self.blocks):
                self.model.transformer_infer.run_block(block)
        return self.run_vae_decoder(self.latents)


def _wrapped(runner):
    """A LightX2VModel around `runner` with the real _install_wrappers and _guarded; only recover()
    is recorded instead of run (it synchronises CUDA, which CPU torch cannot)."""
    import sys

    from pipeline.backends.lightx2v import LightX2VModel

    model = LightX2VModel.__new__(LightX2VModel)
    model._runner, model._torch, model._call, model._dirty = runner, runner.torch, None, False
    model.arena, model.release_text_encoder = None, False  # per-call state __init__ sets
    model.recoveries = []
    model.recover = lambda: model.recoveries.append(sys.exc_info()[0])
    model._install_wrappers()
    return model


def _hooks(stop_after_blocks=None, log=None):
    from pipeline.backend import RunHooks

    phases = []

    def should_stop():
        done = sum(1 for entry in log if entry.startswith("block")) if log is not None else 0
        return stop_after_blocks is not None and done >= stop_after_blocks

    return RunHooks(on_phase=phases.append, on_step=lambda i, n: None, should_stop=should_stop), phases


def test_cancel_is_checked_before_every_dit_block_not_only_at_step_ends():
    torch = pytest.importorskip("torch")
    from pipeline.backends.lightx2v import _Call
    from pipeline.errors import GenerationCancelled
    from pipeline.types import Phase

    runner = _FakeRunner(torch, blocks=3, steps=2)
    model = _wrapped(runner)
    hooks, phases = _hooks(stop_after_blocks=4, log=runner.log)
    with pytest.raises(GenerationCancelled):
        model._guarded(_Call(hooks, total_steps=2), runner.run)
    # Cancel seen before the 5th block: the second step stopped after its first block.
    assert runner.log == ["text", "block 0", "block 1", "block 2", "block 0"]
    assert phases == [Phase.TEXT_ENCODING, Phase.DENOISING]
    assert model.recoveries == [None] and model._call is None
    # The phase-offload path is guarded the same way.
    call = _Call(_hooks(stop_after_blocks=0, log=[])[0], total_steps=2)
    model._call = call
    with pytest.raises(Exception) as stopped:
        runner.model.transformer_infer.run_phase(0)
    assert type(stopped.value).__name__ == "_Cancelled" and "phase 0" not in runner.log
    model._call = None


def test_a_run_without_cancel_passes_every_block_and_decodes():
    torch = pytest.importorskip("torch")
    from pipeline.backends.lightx2v import _Call
    from pipeline.types import Phase

    runner = _FakeRunner(torch, blocks=2, steps=2)
    runner.vae_decoder.cpu_offload = False  # a resident VAE moves to the GPU at its first decode
    model = _wrapped(runner)
    hooks, phases = _hooks()
    out = model._guarded(_Call(hooks, total_steps=2), runner.run)
    assert torch.equal(out, runner.latents * 2)
    assert runner.log == ["text"] + ["block 0", "block 1"] * 2 + ["decode"]
    assert phases == [Phase.TEXT_ENCODING, Phase.DENOISING, Phase.DECODING]
    assert runner.vae_decoder.moves == ["to_cuda"] and model.recoveries == []


def test_the_denoising_cache_goes_back_before_the_decode():
    # The DiT's freed activations, kept in PyTorch's cache in sizes the VAE does not reuse, made the
    # 480x832x81 fast rung peak at 10.29 GiB in its decode (6.29 after the release, measured).
    torch = pytest.importorskip("torch")
    from pipeline.backends.lightx2v import _Call

    runner = _FakeRunner(torch, blocks=2, steps=1)
    model = _wrapped(runner)
    model._torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        empty_cache=lambda: runner.log.append("empty_cache")))
    hooks, _ = _hooks()
    out = model._guarded(_Call(hooks, total_steps=1), runner.run)
    assert torch.equal(out, runner.latents * 2)
    assert runner.log == ["text", "block 0", "block 1", "empty_cache", "decode"]


def test_a_decode_oom_keeps_a_host_copy_of_the_latents_for_a_decode_only_retry():
    torch = pytest.importorskip("torch")
    from pipeline.backend import DecodeOutOfMemory
    from pipeline.backends.lightx2v import _Call

    runner = _FakeRunner(torch, decode_error=torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                    "allocate 3.10 GiB"))
    model = _wrapped(runner)
    with pytest.raises(DecodeOutOfMemory) as raised:
        model._guarded(_Call(_hooks()[0], total_steps=2), runner.run)
    kept = raised.value.latents
    assert torch.equal(kept, runner.latents) and kept is not runner.latents
    assert kept.device.type == "cpu" and "Tried to allocate 3.10 GiB" in raised.value.cause
    assert runner.log[-1] == "decode" and model.recoveries == [None]


def test_a_decode_error_that_is_not_an_oom_keeps_nothing_and_is_raised_as_is():
    torch = pytest.importorskip("torch")
    from pipeline.backends.lightx2v import _Call

    runner = _FakeRunner(torch, decode_error=ValueError("bad latent shape"))
    model = _wrapped(runner)
    call = _Call(_hooks()[0], total_steps=2)
    with pytest.raises(ValueError, match="bad latent shape"):
        model._guarded(call, runner.run)
    assert call.decode_oom is None and model._dirty and model.recoveries == []


def test_rope_holders_are_found_once_in_blocks_and_offload_buffers():
    from pipeline.backends.lightx2v import _rope_holders

    class Module:
        def __init__(self, **children):
            self._modules = dict(children)

    attn = [Module(rope=Module()) for _ in range(3)]
    shared = attn[0]  # the offload buffer and the first block share a phase object
    weights = Module(blocks=Module(b0=Module(self_attn_1=attn[0]), b1=Module(self_attn_1=attn[1])),
                     offload_buffers=Module(buf=Module(self_attn_1=shared), other=Module(self_attn_1=attn[2])),
                     non_block=Module(head=Module()), nothing=None)
    found = _rope_holders(weights)
    assert sorted(map(id, found)) == sorted(map(id, attn))


@pytest.mark.parametrize("error", [MemoryError("cannot allocate 7 GB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 7516192768 bytes")])
def test_a_host_memory_failure_stays_a_host_memory_failure_through_the_adapter(error):
    torch = pytest.importorskip("torch")
    from pipeline.machine import gpu, hostmem
    from pipeline.backends.lightx2v import _Call

    # During the decode: not a GPU decode OOM (no decode-only retry on leaner GPU settings).
    runner = _FakeRunner(torch, decode_error=error)
    model = _wrapped(runner)
    call = _Call(_hooks()[0], total_steps=2)
    with pytest.raises(hostmem.HostOutOfMemory) as raised:
        model._guarded(call, runner.run)
    assert call.decode_oom is None and model.recoveries == [None]
    # The fresh exception is still an OOM for the ladder, and still a host one.
    assert gpu.is_oom(raised.value) and hostmem.is_host_oom(raised.value)
    assert raised.value.__context__ is None  # raised outside the except block: no failed run kept


def test_a_failure_is_recovered_from_once_even_when_the_service_asks_again():
    torch = pytest.importorskip("torch")
    from pipeline.backends import lightx2v_compat as compat
    from pipeline.backends.lightx2v import LightX2VModel, _Call

    syncs = []
    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(synchronize=lambda: syncs.append("sync"), empty_cache=lambda: None),
        OutOfMemoryError=torch.OutOfMemoryError)
    runner = types.SimpleNamespace(stop_signal=True, set_progress_callback=lambda cb: None,
                                   gen_video=None, gen_video_final=None)
    model = LightX2VModel.__new__(LightX2VModel)
    model._runner, model._torch, model._call, model._dirty = runner, fake_torch, None, False
    model.compat, model._compat, model.host_embedding = compat.CompatFixes(), compat, None
    model._recovered = False  # a run started

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        model._guarded(_Call(_hooks()[0], total_steps=4), oom)
    assert syncs == ["sync"] and runner.stop_signal is False
    model.recover()  # the service's recovery after the same failure: nothing left to do
    assert syncs == ["sync"]
    model._recovered = False  # the next run started
    model.recover()
    assert syncs == ["sync", "sync"]


def test_a_released_model_that_is_still_referenced_keeps_none_of_the_runner_alive():
    # Measured on an H200: a caller holding a released model (a local variable across a ladder
    # step, a test) kept 20 GiB of pinned weights alive through the compat fixes' undo closures.
    import gc
    import weakref

    from pipeline.backends import lightx2v_compat as compat

    torch = pytest.importorskip("torch")
    runner = _FakeRunner(torch)
    model = _wrapped(runner)
    fixes = compat.CompatFixes()
    dit = runner.model.transformer_infer
    fixes.record("non_block_weights_kept_for_the_run", "test", undo=lambda held=dit: held, redo=lambda held=dit: held)
    model.compat, model._compat, model._pipe = fixes, compat, types.SimpleNamespace(runner=runner)
    model._tiny, model.host_embedding, model.attention_selector = None, None, object()
    model._step_tap = compat.StepTap()
    dit_alive = weakref.ref(dit)
    del runner, dit
    model.release()
    gc.collect()
    assert dit_alive() is None
    assert model.compat.names == ["non_block_weights_kept_for_the_run"]  # the record still lists it


def test_a_released_text_encoder_is_not_kept_alive_by_its_embedding_fix():
    # Measured on an H200: on the low-RAM rung the pinned T5 blocks (4.4 GB) stayed after the
    # encoder was released, held by the token-embedding fix's undo/redo closures.
    import gc
    import weakref

    from pipeline.backends import lightx2v_compat as compat

    torch = pytest.importorskip("torch")
    runner = _FakeRunner(torch)
    encoder = _FakeInfer([])  # stands in for the T5 encoder and its pinned blocks
    runner.text_encoders = [encoder]
    model = _wrapped(runner)
    fixes = compat.CompatFixes()
    fixes.record("t5_token_embedding_on_host", "test", undo=lambda held=encoder: held, redo=lambda held=encoder: held)
    fixes.record("non_block_weights_kept_for_the_run", "test", undo=lambda: None, redo=lambda: None)
    model.compat, model._compat, model.host_embedding = fixes, compat, None
    encoder_alive = weakref.ref(encoder)
    del encoder
    model._drop_text_encoder()
    gc.collect()
    assert encoder_alive() is None
    # Only that fix forgot its closures; the others can still be undone (tests, bisecting).
    assert {f.name: f.undo is not None for f in model.compat.applied} == {
        "t5_token_embedding_on_host": False, "non_block_weights_kept_for_the_run": True}


# -- several GPUs: the worker joined its group before LightX2V builds ------------------------------


class _FakeDist:
    def __init__(self, initialized: bool, world: int = 2):
        self.initialized, self.world = initialized, world

    def is_initialized(self) -> bool:
        return self.initialized

    def get_world_size(self) -> int:
        return self.world


def _cuda_device_class(calls: list):
    class CudaDevice:  # lightx2v_platform/base/nvidia.py: init_group, then set_device(rank)
        @staticmethod
        def init_parallel_env():
            calls.append("init_process_group + set_device(rank)")

    return CudaDevice


def _set_config_module(meshes: list):
    """lightx2v.utils.set_config as far as the device mesh goes: its init_device_mesh (torch's)
    makes a new mesh, with new process groups split off the default one, at every call."""
    module = types.ModuleType("lightx2v.utils.set_config")

    def init_device_mesh(device_type, mesh_shape, *, mesh_dim_names=None):
        meshes.append((device_type, tuple(mesh_shape), mesh_dim_names))
        return object()

    module.init_device_mesh = init_device_mesh
    return module


def test_a_rebuild_reuses_the_device_mesh_of_the_first_build(monkeypatch):
    monkeypatch.setattr(compat, "_DEVICE_MESHES", {})
    meshes: list = []
    set_config = _set_config_module(meshes)
    fixes = compat.CompatFixes()
    compat.parallel_env_initialised_once(fixes, {}, _FakeDist(True), set_config=set_config)
    assert fixes.names == ["parallel_env_initialised_once"] and "device mesh" in fixes.applied[0].detail
    builds = [set_config.init_device_mesh("cuda", (1, 2), mesh_dim_names=("cfg_p", "seq_p")) for _ in range(3)]
    assert builds[0] is builds[1] is builds[2] and len(meshes) == 1
    # Each build applies the fix again: it wraps upstream's function, not its own wrapper.
    compat.parallel_env_initialised_once(compat.CompatFixes(), {}, _FakeDist(True), set_config=set_config)
    assert set_config.init_device_mesh("cuda", (1, 2), mesh_dim_names=("cfg_p", "seq_p")) is builds[0]
    assert set_config.init_device_mesh.__wrapped__.__name__ == "init_device_mesh" and len(meshes) == 1
    # Another mesh is its own.
    assert set_config.init_device_mesh("cuda", (2, 1), mesh_dim_names=("cfg_p", "seq_p")) is not builds[0]
    with fixes.disabled("parallel_env_initialised_once"):  # upstream: a new mesh per build
        assert set_config.init_device_mesh("cuda", (1, 2), mesh_dim_names=("cfg_p", "seq_p")) is not builds[0]
    assert len(meshes) == 3
    assert set_config.init_device_mesh("cuda", (1, 2), mesh_dim_names=("cfg_p", "seq_p")) is builds[0]


def test_lightx2vs_parallel_init_is_skipped_once_the_worker_joined_its_group():
    calls: list = []
    device = _cuda_device_class(calls)
    registry, dist = {"cuda": device}, _FakeDist(initialized=True)
    fixes = compat.CompatFixes()
    compat.parallel_env_initialised_once(fixes, registry, dist)
    # What create_generator does on every build with a `parallel` config (pipeline.py:219-223).
    registry.get("cuda").init_parallel_env()
    assert calls == [] and fixes.names == ["parallel_env_initialised_once"]
    # A second build (a rung's reload) wraps the original again, not the wrapper.
    compat.parallel_env_initialised_once(compat.CompatFixes(), registry, dist)
    dist.initialized = False  # outside a worker's group, upstream's own init runs, once
    device.init_parallel_env()
    assert calls == ["init_process_group + set_device(rank)"]
    dist.initialized = True
    with fixes.disabled("parallel_env_initialised_once"):
        device.init_parallel_env()  # upstream again: a second init_process_group, set_device(1)
    assert len(calls) == 2
    device.init_parallel_env()
    assert len(calls) == 2


def test_lightx2vs_parallel_init_left_alone_where_the_platform_has_none():
    fixes = compat.CompatFixes()
    compat.parallel_env_initialised_once(fixes, {"cuda": type("Other", (), {})}, _FakeDist(True))
    compat.parallel_env_initialised_once(fixes, {}, _FakeDist(True))
    assert fixes.names == []


def test_a_sequence_parallel_build_is_ulysses_over_the_group_with_a_whole_vae_decode(monkeypatch):
    torch = pytest.importorskip("torch")
    from pipeline.backends import lightx2v as backend_module
    from pipeline.errors import BackendUnavailable

    calls: list = []
    platform = types.ModuleType("lightx2v_platform.registry_factory")
    platform.PLATFORM_DEVICE_REGISTER = {"cuda": _cuda_device_class(calls)}
    monkeypatch.setitem(sys.modules, "lightx2v_platform", types.ModuleType("lightx2v_platform"))
    monkeypatch.setitem(sys.modules, "lightx2v_platform.registry_factory", platform)
    meshes: list = []
    set_config = _set_config_module(meshes)
    for name, module in (("lightx2v", types.ModuleType("lightx2v")), ("lightx2v.utils", types.ModuleType("lightx2v.utils")),
                         ("lightx2v.utils.set_config", set_config)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(compat, "_DEVICE_MESHES", {})

    class Pipe:  # LightX2VPipeline.enable_parallel (pipeline.py:440-445)
        def enable_parallel(self, cfg_p_size=1, seq_p_size=1, seq_p_attn_type="ulysses"):
            self.parallel = {"cfg_p_size": cfg_p_size, "seq_p_size": seq_p_size, "seq_p_attn_type": seq_p_attn_type}

    lx = types.SimpleNamespace(compat=compat)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(BackendUnavailable, match="--multi-gpu seq"):
        backend_module._enable_sequence_parallel(lx, compat.CompatFixes(), Pipe(), 2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    with pytest.raises(BackendUnavailable):
        backend_module._enable_sequence_parallel(lx, compat.CompatFixes(), Pipe(), 2)  # another group's size
    pipe, fixes = Pipe(), compat.CompatFixes()
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    backend_module._enable_sequence_parallel(lx, fixes, pipe, 2)
    # vae_parallel off: WanRunner.get_vae_parallel defaults it to on for a dict config (wan_runner.py:327-334).
    assert pipe.parallel == {"cfg_p_size": 1, "seq_p_size": 2, "seq_p_attn_type": "ulysses", "vae_parallel": False}
    platform.PLATFORM_DEVICE_REGISTER["cuda"].init_parallel_env()
    assert calls == [] and "parallel_env_initialised_once" in fixes.names
    # What create_generator's set_parallel_config does in this build and in a rebuild (a rung's reload).
    first = set_config.init_device_mesh("cuda", (1, 2), mesh_dim_names=("cfg_p", "seq_p"))
    backend_module._enable_sequence_parallel(lx, compat.CompatFixes(), Pipe(), 2)
    assert set_config.init_device_mesh("cuda", (1, 2), mesh_dim_names=("cfg_p", "seq_p")) is first
    assert len(meshes) == 1  # one mesh, so one set of process groups, for the worker's life


def test_seq_parallel_backend_key_and_attention(tmp_path, caplog):
    backend = LightX2VBackend(tmp_path, attn_mode="torch_sdpa", seq_parallel=2)
    key = backend.load_key({"offload_granularity": "block", "text_encoder": "offload"})
    assert dict(key.build_settings)["seq_p_size"] == 2
    # "auto" is measured on a sequence-parallel group too (rank 0 chooses for every rank): nothing
    # is switched off, and no build warns that a compat change is disabled for a test.
    assert backend.compat_skip == frozenset() and backend.attention == "auto"
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert compat.CompatFixes(skip=backend.compat_skip).wanted("attention_chosen_by_measurement")
    assert "DISABLED" not in caplog.text
    # One GPU: no group to agree with; a sequence-parallel build: the worker's group.
    assert backend._rank_group({"seq_p_size": 1}) is None
    backend.ranks = group = object()
    assert backend._rank_group(dict(key.build_settings)) is group
    assert "seq_p_size" not in dict(LightX2VBackend(tmp_path).load_key({}).build_settings)
    with pytest.raises(ValueError):
        LightX2VBackend(tmp_path, seq_parallel=0)


class _Stream:
    """A CUDA stream as the block-offload path uses it; every call lands in one shared log."""

    def __init__(self, name, log):
        self.name, self.log, self.device = name, log, "cuda:0"

    def synchronize(self):
        self.log.append(f"host waits {self.name}")

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


class _OffloadManager:
    """WeightAsyncStreamManager's block path as upstream writes it (common/offload/manager.py):
    prefetch into buffer 1 on the copy stream, swap after each block with a host sync."""

    def __init__(self, log):
        self.log = log
        self.cuda_load_stream, self.compute_stream = _Stream("copy", log), _Stream("compute", log)
        self.cuda_buffers = ["block 0", None]

    def prefetch_weights(self, block_idx, blocks):
        self.log.append(f"copy block {block_idx}")
        self.cuda_buffers[1] = f"block {block_idx}"

    def swap_blocks(self):
        self.cuda_load_stream.synchronize()
        self.compute_stream.synchronize()
        self.cuda_buffers[0], self.cuda_buffers[1] = (self.cuda_buffers[1], self.cuda_buffers[0])


class _OffloadInfer:
    """WanOffloadTransformerInfer.infer_with_blocks_offload's loop, bound as infer_func at init."""

    def __init__(self, log, blocks=3, lazy_load=False):
        self.log, self.blocks, self.lazy_load = log, blocks, lazy_load
        self.offload_manager = _OffloadManager(log)
        self.infer_func = self.infer_with_blocks_offload

    def infer_with_blocks_offload(self, blocks, x, pre_infer_out):
        for index in range(self.blocks):
            self.offload_manager.prefetch_weights((index + 1) % self.blocks, blocks)
            assert self.offload_manager.cuda_buffers[0] == f"block {index}", "computed with another block's weights"
            self.log.append(f"compute block {index}")
            if x == "raise" and index == 1:
                raise RuntimeError("CUDA out of memory (fake)")
            self.offload_manager.swap_blocks()
        return x


def _streams_torch(log):
    caller = _Stream("caller", log)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(current_stream=lambda device: caller))


def test_streamed_blocks_wait_for_each_other_on_the_gpu_not_on_the_host():
    log = []
    infer, fixes = _OffloadInfer(log), compat.CompatFixes()
    compat.streamed_blocks_ordered_on_the_gpu(fixes, infer, _streams_torch(log))
    assert fixes.has("streamed_blocks_ordered_on_the_gpu")
    assert infer.infer_func(None, "x", None) == "x"
    assert not [entry for entry in log if entry.startswith("host waits")]
    swap = ["compute waits copy", "copy waits compute"]  # the next block's weights; the buffer just used
    assert log == (["compute waits caller", "copy waits caller"]
                   + ["copy block 1", "compute block 0", *swap, "copy block 2", "compute block 1", *swap,
                      "copy block 0", "compute block 2", *swap]
                   + ["caller waits compute", "caller waits copy"])
    # Block 0 is in the first buffer again for the next step, as upstream leaves it.
    assert infer.offload_manager.cuda_buffers == ["block 0", "block 2"]


def test_a_block_that_raises_still_leaves_the_caller_waiting_for_the_streams():
    log = []
    infer, fixes = _OffloadInfer(log), compat.CompatFixes()
    compat.streamed_blocks_ordered_on_the_gpu(fixes, infer, _streams_torch(log))
    with pytest.raises(RuntimeError):
        infer.infer_func(None, "raise", None)
    assert log[-2:] == ["caller waits compute", "caller waits copy"]


def test_streamed_blocks_upstream_host_sync_comes_back_when_undone():
    log = []
    infer, fixes = _OffloadInfer(log, blocks=2), compat.CompatFixes()
    compat.streamed_blocks_ordered_on_the_gpu(fixes, infer, _streams_torch(log))
    with fixes.disabled("streamed_blocks_ordered_on_the_gpu"):
        infer.infer_func(None, "x", None)
        assert log == ["copy block 1", "compute block 0", "host waits copy", "host waits compute",
                       "copy block 0", "compute block 1", "host waits copy", "host waits compute"]
    log.clear()
    infer.infer_func(None, "x", None)
    assert "host waits copy" not in log and log[0] == "compute waits caller"


def test_a_call_that_empties_the_cache_after_the_blocks_keeps_upstreams_host_sync():
    log = []
    infer, fixes = _OffloadInfer(log, blocks=2), compat.CompatFixes()
    compat.streamed_blocks_ordered_on_the_gpu(fixes, infer, _streams_torch(log))
    infer.clean_cuda_cache = True  # a per-call setting: the loop then frees the caller's tensors
    infer.infer_func(None, "x", None)
    assert log == ["compute waits caller", "copy waits caller",
                   "copy block 1", "compute block 0", "host waits copy", "host waits compute",
                   "copy block 0", "compute block 1", "host waits copy", "host waits compute",
                   "caller waits compute", "caller waits copy"]
    log.clear()
    infer.clean_cuda_cache = False
    infer.infer_func(None, "x", None)
    assert "host waits copy" not in log


@pytest.mark.parametrize("case", ["lazy_load", "phase offload", "upstream without a host sync", "skipped"])
def test_streamed_blocks_left_alone_where_the_host_must_wait_or_upstream_changed(case):
    log = []
    infer = _OffloadInfer(log, lazy_load=case == "lazy_load")
    fixes = compat.CompatFixes(skip=frozenset({"streamed_blocks_ordered_on_the_gpu"}) if case == "skipped" else frozenset())
    if case == "phase offload":
        infer.infer_func = lambda blocks, x, pre_infer_out: x
    if case == "upstream without a host sync":
        class Ordered(_OffloadManager):
            def swap_blocks(self):
                self.cuda_buffers.reverse()

        infer.offload_manager = Ordered(log)
    before = (infer.infer_func, infer.offload_manager.swap_blocks)
    compat.streamed_blocks_ordered_on_the_gpu(fixes, infer, _streams_torch(log))
    assert fixes.names == [] and (infer.infer_func, infer.offload_manager.swap_blocks) == before
