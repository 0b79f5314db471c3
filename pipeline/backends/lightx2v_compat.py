"""Workarounds for the LightX2V bugs on the Wan T2V low-VRAM path (docs/lightx2v.md §1).

One function per bug, named after what it fixes. Each first checks whether the installed LightX2V
still has the bug (by its data, signature, behaviour or source) and only then applies the fix, logs
it and records it in `CompatFixes`. A later LightX2V that fixed a bug makes its function a no-op.
Line numbers below are LightX2V f8aee98b.

This module imports neither torch nor LightX2V at import time: the backend passes the modules and
objects in, so `import pipeline.backends.lightx2v_compat` stays cheap and works without a GPU stack.

| fix (name)                          | bug | symptom upstream                                           |
|-------------------------------------|-----|------------------------------------------------------------|
| keep_target_video_length_in_config  | 1   | KeyError: 'target_video_length' in create_generator          |
| explicit_t5_checkpoint_path         | 2   | T5 checkpoint path resolves to False                         |
| t5_offload_linear_bias_default      | 3   | AttributeError: ... no attribute 'bias' in the offloaded T5  |
| t2v_without_image_encoder           | 4   | UnboundLocalError: context_clip with clean_cuda_cache        |
| t5_token_embedding_on_host          | 5   | 2.1 GB T5 token embedding left on the GPU after each prompt  |
| reset_runner_after_exception        | 6   | after any exception the next seed is ignored / stale block 0 |
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

FIX_NAMES = (
    "keep_target_video_length_in_config",
    "explicit_t5_checkpoint_path",
    "t5_offload_linear_bias_default",
    "t2v_without_image_encoder",
    "t5_token_embedding_on_host",
    "reset_runner_after_exception",
)
# Not bugs: memory savings applied the same way (recorded with the fixes for the run records).
OPTIMIZATION_NAMES = ("ffn_chunked_over_tokens", "non_block_weights_kept_for_the_run")
# Not bugs: what the app needs that LightX2V has no hook for (also recorded).
FEATURE_NAMES = ("clean_latents_estimate_after_each_step",)


# Fixes that patch process-wide LightX2V state (a module-level set, a class attribute) stay in effect
# for every later build; later builds must still list them, so remember that we applied them.
_PROCESS_WIDE: set[str] = set()


@dataclass
class AppliedFix:
    name: str
    detail: str
    undo: Callable[[], None] | None = None  # restores the upstream behaviour (tests prove the bug)
    redo: Callable[[], None] | None = None  # applies the fix again after `undo`
    runtime: bool = False  # acts through `CompatFixes.has` at run time (no undo/redo needed)


@dataclass
class CompatFixes:
    """The fixes applied to one loaded pipeline. `skip` names fixes not to apply even when needed:
    only the GPU tests use it, to show each upstream failure."""

    skip: frozenset[str] = frozenset()
    applied: list[AppliedFix] = field(default_factory=list)
    suspended: set[str] = field(default_factory=set)

    @property
    def names(self) -> list[str]:
        return [fix.name for fix in self.applied]

    def has(self, name: str) -> bool:
        """Applied and not temporarily disabled."""
        return name in self.names and name not in self.suspended

    def wanted(self, name: str) -> bool:
        if name not in FIX_NAMES and name not in OPTIMIZATION_NAMES and name not in FEATURE_NAMES:
            raise KeyError(f"unknown compat fix {name!r}")
        if name in self.skip:
            log.warning("LightX2V compat fix %s is DISABLED (test mode)", name)
            return False
        return True

    def record(self, name: str, detail: str, undo: Callable[[], None] | None = None,
               redo: Callable[[], None] | None = None, runtime: bool = False) -> None:
        log.info("LightX2V compat fix applied: %s (%s)", name, detail)
        self.applied.append(AppliedFix(name, detail, undo, redo, runtime))

    @contextlib.contextmanager
    def disabled(self, name: str):
        """Run a block with one applied fix undone, then apply it again (tests that show the
        upstream failure on an already built pipeline)."""
        fix = next((f for f in self.applied if f.name == name), None)
        if fix is None:
            raise KeyError(f"compat fix {name} is not applied")
        if not fix.runtime and (fix.undo is None or fix.redo is None):
            raise ValueError(f"compat fix {name} acts at build time; build without it (compat_skip)")
        self.suspended.add(name)
        if fix.undo is not None:
            fix.undo()
        log.warning("LightX2V compat fix %s temporarily undone", name)
        try:
            yield
        finally:
            if fix.redo is not None:
                fix.redo()
            self.suspended.discard(name)
            log.warning("LightX2V compat fix %s applied again", name)


# -- bug 1 ----------------------------------------------------------------------------------------


def keep_target_video_length_in_config(fixes: CompatFixes, input_info_module: Any) -> None:
    """Bug 1. `set_args2config` drops every pipeline attribute whose name is an InputInfo field
    (utils/set_config.py:62); since S2VInputInfo gained `target_video_length` (input_info.py:128)
    the frame count never reaches the config and WanScheduler.__init__ raises KeyError
    (schedulers/wan/scheduler.py:16). Upstream issue ModelTC/LightX2V#1086.

    Detected by the key being in ALL_INPUT_INFO_KEYS (the very set set_config imported)."""
    name = "keep_target_video_length_in_config"
    keys = getattr(input_info_module, "ALL_INPUT_INFO_KEYS", None)
    if keys is None:
        return
    needed = "target_video_length" in keys or name in _PROCESS_WIDE
    if not needed or not fixes.wanted(name):
        return
    keys.discard("target_video_length")
    _PROCESS_WIDE.add(name)
    fixes.record("keep_target_video_length_in_config",
                 "removed 'target_video_length' from input_info.ALL_INPUT_INFO_KEYS",
                 undo=lambda: keys.add("target_video_length"), redo=lambda: keys.discard("target_video_length"))


# -- bug 2 ----------------------------------------------------------------------------------------


def explicit_t5_checkpoint_path(fixes: CompatFixes, pipeline_cls: Any, quantize_kwargs: dict[str, Any],
                                t5_checkpoint: str) -> None:
    """Bug 2. `enable_quantize(text_encoder_quantized_ckpt=False)` is the default (pipeline.py:323);
    `find_torch_model_path` returns any stored value that is not None (utils/utils.py:446-447), so
    the T5 path becomes `False`. Detected from the signature's default; fixed by passing the path."""
    try:
        default = inspect.signature(pipeline_cls.enable_quantize).parameters["text_encoder_quantized_ckpt"].default
    except (KeyError, TypeError, ValueError):
        return
    if default is None or not fixes.wanted("explicit_t5_checkpoint_path"):
        return
    quantize_kwargs["text_encoder_quantized_ckpt"] = t5_checkpoint
    fixes.record("explicit_t5_checkpoint_path",
                 f"enable_quantize(text_encoder_quantized_ckpt=...) defaults to {default!r}; passing {t5_checkpoint}")


# -- bug 3 ----------------------------------------------------------------------------------------


def t5_offload_linear_bias_default(fixes: CompatFixes, mm_weight_register: Any, scheme: str) -> None:
    """Bug 3. With t5_cpu_offload the T5 linears are registered with bias_name=None
    (input_encoders/hf/wan/t5/model.py:102-143) and the CUDA-buffer branch of load_quantized never
    sets `self.bias` (common/ops/mm/mm_weight.py:497-501), but `apply` reads `self.bias`
    (mm_weight.py:1732 for int8-triton): AttributeError on the first prompt.

    Detected by constructing a bias-less weight of the scheme's class and looking for `bias`; fixed
    with a class-level default `bias = None`, which instances that load a bias shadow."""
    try:
        cls = mm_weight_register[scheme]
    except KeyError:
        return
    name = "t5_offload_linear_bias_default"
    ours = name in _PROCESS_WIDE and cls.__dict__.get("bias", 0) is None
    if not ours:
        try:
            has_bias = hasattr(cls("compat_probe.weight", None), "bias")
        except Exception:  # noqa: BLE001 - a constructor that needs more than names: judge the class
            has_bias = hasattr(cls, "bias")
        if has_bias:
            return
    if not fixes.wanted(name):
        return
    cls.bias = None
    _PROCESS_WIDE.add(name)

    def undo() -> None:
        if "bias" in cls.__dict__:
            delattr(cls, "bias")

    def redo() -> None:
        cls.bias = None

    fixes.record("t5_offload_linear_bias_default", f"{cls.__name__}.bias = None", undo=undo, redo=redo)


# -- bug 4 ----------------------------------------------------------------------------------------


def t2v_without_image_encoder(fixes: CompatFixes, pipe: Any, pre_infer_cls: Any) -> None:
    """Bug 4. With clean_cuda_cache, WanPreInfer.infer deletes `context_clip` whenever
    `use_image_encoder` is true (networks/wan/infer/pre_infer.py:194-196), but T2V never builds it
    (:177 is i2v/flf2v/animate only): UnboundLocalError before the first step. `use_image_encoder`
    defaults to True (utils/set_config.py:32). T2V has no image encoder, so say so in the config.

    Detected from the source of WanPreInfer.infer and the pipeline's setting. Must run before
    create_generator (the attribute is copied into the config there)."""
    if getattr(pipe, "task", None) != "t2v" or getattr(pipe, "use_image_encoder", True) is False:
        return
    try:
        source = inspect.getsource(pre_infer_cls.infer)
    except (OSError, TypeError):
        return
    if "del context_clip" not in source or not fixes.wanted("t2v_without_image_encoder"):
        return
    pipe.use_image_encoder = False

    def setting(value: bool) -> Callable[[], None]:
        def apply() -> None:
            pipe.use_image_encoder = value
            if getattr(pipe, "runner", None) is not None:
                pipe.modify_config({"use_image_encoder": value})  # the runner reads its config per run
        return apply

    fixes.record("t2v_without_image_encoder", "use_image_encoder=False for T2V", undo=setting(True),
                 redo=setting(False))


# -- bug 5 ----------------------------------------------------------------------------------------

_EMBEDDING_TO_DEVICE = re.compile(r"self\.token_embedding\s*=\s*self\.token_embedding\.to\(")
_host_embedding_cls: Any = None


def _host_token_embedding_class() -> Any:
    """Built on first use so this module does not import torch at import time."""
    global _host_embedding_cls
    if _host_embedding_cls is not None:
        return _host_embedding_cls
    import torch
    import torch.nn.functional as F

    class HostTokenEmbedding(torch.nn.Module):
        """The umt5 token embedding (256384 x 4096 bf16, 2.1 GB) kept in host memory.

        It holds its table as a plain attribute, not a parameter, so the `.to(AI_DEVICE)` that
        T5Encoder.forward_with_offload applies to it moves nothing. A lookup gathers the few
        hundred rows on the CPU and copies only those ([1, 512, 4096], 4 MB) to the GPU. With
        `keep_on_device` (the "offload_keep_embedding" rung, LightX2V's own behaviour) the table
        is copied to the GPU once and kept there."""

        def __init__(self, original: torch.nn.Embedding):
            super().__init__()
            self.host_weight = original.weight.detach().to("cpu")
            self.keep_on_device = False
            self._device_weight = None

        @property
        def weight(self):
            return self._device_weight if self.keep_on_device and self._device_weight is not None else self.host_weight

        @property
        def on_device_bytes(self) -> int:
            w = self._device_weight
            return 0 if w is None else w.numel() * w.element_size()

        def drop_device_copy(self) -> None:
            self._device_weight = None

        def forward(self, ids):
            if self.keep_on_device:
                if self._device_weight is None or self._device_weight.device != ids.device:
                    self._device_weight = self.host_weight.to(ids.device)
                return F.embedding(ids, self._device_weight)
            self._device_weight = None
            return F.embedding(ids.to("cpu"), self.host_weight).to(ids.device)

    _host_embedding_cls = HostTokenEmbedding
    return HostTokenEmbedding


def t5_token_embedding_on_host(fixes: CompatFixes, runner: Any, t5_encoder_cls: Any) -> Any:
    """Bug 5. T5Encoder.forward_with_offload does `self.token_embedding =
    self.token_embedding.to(AI_DEVICE)` (input_encoders/hf/wan/t5/model.py:578) and nothing moves
    it back: 2.1 GB stay on the GPU for the whole DiT phase. Replace the embedding with a
    HostTokenEmbedding (lookup on the host). Returns it (the backend switches `keep_on_device`
    per call), or None when not applied.

    Detected from the source of forward_with_offload and the encoder being offloaded."""
    encoders = getattr(runner, "text_encoders", None) or []
    encoder = getattr(encoders[0], "model", None) if encoders else None
    if encoder is None or not getattr(encoder, "cpu_offload", False):
        return None
    try:
        source = inspect.getsource(t5_encoder_cls.forward_with_offload)
    except (OSError, TypeError, AttributeError):
        return None
    if not _EMBEDDING_TO_DEVICE.search(source) or not fixes.wanted("t5_token_embedding_on_host"):
        return None
    original = encoder.token_embedding
    host = _host_token_embedding_class()(original)
    encoder.token_embedding = host

    def undo() -> None:
        host.drop_device_copy()
        encoder.token_embedding = original

    def redo() -> None:
        # Upstream may have moved the original table to the GPU meanwhile: point it back at the
        # shared host table, which frees that copy.
        original.weight.data = host.host_weight
        encoder.token_embedding = host

    fixes.record("t5_token_embedding_on_host", "umt5 token embedding lookup on the host", undo=undo, redo=redo)
    return host


# -- bug 6 ----------------------------------------------------------------------------------------


def reset_runner_after_exception(fixes: CompatFixes, run_path: tuple[tuple[Any, str], ...]) -> None:
    """Bug 6. Nothing on the run path cleans up after an exception (models/runners/
    default_runner.py:449-477, wan/wan_runner.py:512-575 have no try/finally): the scheduler keeps
    its generator and latents, so the next run ignores its seed (schedulers/wan/scheduler.py:111-114),
    and with block offload the two CUDA block buffers stay mid-swap, so the next run's block 0 uses
    another block's weights (common/offload/manager.py:63-101).

    `run_path` is (class, method name) pairs of the run path. Detected from their source having no
    exception handling; the fix itself is `reset_runner_state`, which the backend's recover() calls."""
    sources = []
    for cls, method in run_path:
        try:
            sources.append(inspect.getsource(getattr(cls, method)))
        except (OSError, TypeError, AttributeError):
            return
    if any("finally" in s or "except" in s for s in sources) or not fixes.wanted("reset_runner_after_exception"):
        return
    fixes.record("reset_runner_after_exception",
                 "recover() clears the scheduler and re-initialises the offload buffers", runtime=True)


def reset_runner_state(runner: Any) -> None:
    """The state reset of bug 6: scheduler (generator, latents, timesteps), per-run inputs and the
    block-offload double buffer (re-filled from block 0 on the next pass)."""
    model = getattr(runner, "model", None)
    scheduler = getattr(model, "scheduler", None) or getattr(runner, "scheduler", None)
    if scheduler is not None and hasattr(scheduler, "clear"):
        scheduler.clear()
    manager = getattr(getattr(model, "transformer_infer", None), "offload_manager", None)
    if manager is not None:
        manager.need_init_first_buffer = True
    # WanModel.infer moves the non-block weights (embeddings, time projection, head: 0.47 GB) to the
    # GPU at the start of each step and back at its end (networks/wan/model.py:300-305, 341-346); an
    # exception in between leaves them on the GPU.
    if model is not None and getattr(model, "cpu_offload", False) and getattr(model, "offload_granularity", "block") != "model":
        release_non_block_weights(model)
    if hasattr(runner, "inputs"):
        del runner.inputs
    runner.input_info = None


# -- memory optimisation: FFN over token chunks ---------------------------------------------------


def ffn_chunked_over_tokens(fixes: CompatFixes, transformer_infer: Any, max_tokens: int) -> None:
    """Not a bug: the FFN is the DiT's memory peak. WanTransformerInfer.infer_ffn keeps the
    L x 13824 hidden tensor and its (out-of-place) GELU alive together (networks/wan/infer/
    transformer_infer.py:485-492): 3.9 GiB at 720x1280x81 (L = 75,600), on top of x, y_out and
    attn_out that infer_block still references. The FFN is per token (LayerNorm, modulation,
    two linears), so running infer_ffn on token slices of at most `max_tokens` and writing the
    slices into one output gives the same result (int8 GEMMs accumulate exactly in int32; the
    activation quantisation is per token) with a peak of one slice.

    Below `max_tokens` (480p: L = 32,760) the original runs unchanged. Skipped where the MXFP8
    fused FFN path is active (it writes x itself)."""
    if not fixes.wanted("ffn_chunked_over_tokens") or max_tokens <= 0:
        return
    original = transformer_infer.infer_ffn
    uses_fused = getattr(transformer_infer, "_use_mxfp8_quant_fuse", lambda: False)

    def infer_ffn(phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa=None):
        n = x.shape[0]
        if n <= max_tokens or x.dim() != 2 or uses_fused():
            return original(phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa)
        pieces = -(-n // max_tokens)
        size = -(-n // pieces)  # equal slices, each <= max_tokens
        infer_ffn.sliced_calls += 1
        out = None
        for start in range(0, n, size):
            end = min(n, start + size)
            # original adds attn_out into this slice of x in place, as it would for all of x.
            part = original(phase, x[start:end], attn_out[start:end], c_shift_msa, c_scale_msa, c_gate_msa)
            if out is None:
                out = part.new_empty((n, *part.shape[1:]))
            out[start:end] = part
            del part
        return out

    infer_ffn.sliced_calls = 0  # how often it actually sliced (tests)
    transformer_infer.infer_ffn = infer_ffn

    def undo() -> None:
        transformer_infer.infer_ffn = original

    def redo() -> None:
        transformer_infer.infer_ffn = infer_ffn

    fixes.record("ffn_chunked_over_tokens", f"infer_ffn over slices of at most {max_tokens} tokens",
                 undo=undo, redo=redo)


# -- speed: non-block weights stay on the GPU for the steps of one run ----------------------------


def non_block_weights_kept_for_the_run(fixes: CompatFixes, model: Any) -> None:
    """Not a bug: with block or phase offload WanModel.infer copies the non-block weights
    (embeddings, time projection, head: 0.47 GB) to the GPU at the start of every step and back to
    the host at its end (networks/wan/model.py:300-305, 341-346). Both copies are synchronous, so no
    block computes meanwhile, and the copy back writes unchanged weights over their host copies.
    Measured on an H100: 39 ms of a 1.67 s step at 480x832x49, with identical frames
    (docs/benchmarks/2026-11-27-NVIDIA_H100_80GB_HBM3.md); on a 3060 the copies are as slow or
    slower (PCIe 4.0) but a smaller share of a longer step.

    Upload them at the first step and release them after the last step of a run (the upstream
    to_cpu, once). The peak does not move: they are on the GPU during every step anyway, and between
    two steps nothing else runs. A step that raises (OOM, cancel, anything) releases them before the
    exception leaves it; a run stopped between two steps (LightX2V checks a cancel before each
    step, default_runner.py:241-242) is released by the backend's recover() through
    `release_non_block_weights`. Skipped unless WanModel.infer still moves them per step (the
    source names non_block_weights_to_cpu)."""
    if not getattr(model, "cpu_offload", False) or getattr(model, "offload_granularity", "block") == "model":
        return
    try:
        source = inspect.getsource(type(model).infer)
    except (OSError, TypeError, AttributeError):
        return
    if "non_block_weights_to_cpu" not in source or not fixes.wanted("non_block_weights_kept_for_the_run"):
        return
    pre, blocks = model.pre_weight, model.transformer_weights
    originals = {(pre, "to_cuda"): pre.to_cuda, (pre, "to_cpu"): pre.to_cpu,
                 (blocks, "non_block_weights_to_cuda"): blocks.non_block_weights_to_cuda,
                 (blocks, "non_block_weights_to_cpu"): blocks.non_block_weights_to_cpu}
    original_infer = model.infer
    on_gpu: set[int] = set()  # id() of the holders whose weights are on the GPU
    keeping = [False]  # True inside any step but the last of a run

    def upload(holder: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def to_gpu(*args: Any, **kwargs: Any) -> Any:
            if id(holder) in on_gpu:
                return None
            result = original(*args, **kwargs)
            on_gpu.add(id(holder))
            return result

        return to_gpu

    def release(holder: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def to_host(*args: Any, **kwargs: Any) -> Any:
            # Not on the GPU: upstream's to_cpu would copy the host weights onto themselves.
            if keeping[0] or id(holder) not in on_gpu:
                return None
            on_gpu.discard(id(holder))
            return original(*args, **kwargs)

        return to_host

    def give_back() -> None:
        keeping[0] = False
        release_non_block_weights(model)

    def infer(inputs: Any) -> Any:
        scheduler = model.scheduler
        keeping[0] = scheduler.step_index < scheduler.infer_steps - 1
        try:
            return original_infer(inputs)
        except BaseException:
            try:
                give_back()  # a copy to host memory: needs no GPU memory, also after an OOM
            except Exception:  # noqa: BLE001 - the step's own error is the one to report
                log.warning("could not give the non-block weights back after a failed step", exc_info=True)
            raise
        finally:
            keeping[0] = False

    shims = {(holder, name): (upload if name.endswith("_cuda") else release)(holder, original)
             for (holder, name), original in originals.items()}

    def redo() -> None:
        for (holder, name), shim in shims.items():
            setattr(holder, name, shim)
        model.infer = infer

    def undo() -> None:
        give_back()
        for (holder, name), original in originals.items():
            setattr(holder, name, original)
        model.infer = original_infer

    redo()
    fixes.record("non_block_weights_kept_for_the_run",
                 "non-block weights move to the GPU once per run instead of twice per step",
                 undo=undo, redo=redo)


def release_non_block_weights(model: Any) -> None:
    """After a failed run: give back the non-block weights if a stopped run left them on the GPU.
    With `non_block_weights_kept_for_the_run` applied this only copies what is on the GPU."""
    model.pre_weight.to_cpu()
    model.transformer_weights.non_block_weights_to_cpu()


# -- feature: the model's estimate of the clean latents after each step (previews) ---------------

# step_post computes the clean estimate inline and overwrites the latents with the next noisy
# sample at once: x0 = x_t - sigma_t * v (schedulers/wan/step_distill/scheduler.py:42-49).
_X0_INLINE = re.compile(r"self\.latents[^\n]*-\s*(sigma\s*\*\s*flow_pred|flow_pred\s*\*\s*sigma)")


@dataclass
class StepState:
    """What the scheduler holds after the model ran one step, before step_post moves on:
    x_t (`latents`), the model's velocity (`noise_pred`) and sigma_t. Flow matching: the model's
    estimate of the clean latents is x0 = x_t - sigma_t * v."""

    step_index: int  # 0-based
    total: int
    latents: Any
    noise_pred: Any
    sigma: float

    def x0(self, stride: int = 1) -> Any:
        """The clean-latents estimate [C, T, H, W] in float32, every `stride`-th latent pixel (a
        preview needs no more; the full tensor at 720p is 19 MB and takes three temporaries)."""
        x_t, v = self.latents, self.noise_pred
        if stride > 1:
            x_t, v = x_t[..., ::stride, ::stride], v[..., ::stride, ::stride]
        return x_t.float() - self.sigma * v.float()


@dataclass
class StepTap:
    """The installed wrapper's switch: `callback(StepState)` runs after each step while set."""

    callback: Callable[[StepState], None] | None = None


def clean_latents_estimate_after_each_step(fixes: CompatFixes, scheduler: Any) -> StepTap | None:
    """Not a bug: LightX2V calls back after each step with a percentage only (default_runner.py:
    254-257); the clean-latents estimate exists only inside step_post, which replaces the latents
    with the next noisy sample. Wrap this scheduler instance's step_post: before it runs, hand the
    step's x_t, velocity and sigma to the tap's callback (which derives x0 only when a preview is
    wanted), then run the original unchanged. Nothing is computed while no callback is set.

    Detected from the source of step_post: it must read self.noise_pred and
    self.sigmas[self.step_index] and subtract sigma * flow_pred from self.latents. Returns the tap,
    or None (no previews: a LightX2V whose scheduler works otherwise is not guessed at)."""
    try:
        source = inspect.getsource(type(scheduler).step_post)
    except (OSError, TypeError, AttributeError):
        return None
    if ("self.noise_pred" not in source or "self.sigmas[self.step_index]" not in source
            or not _X0_INLINE.search(source)):
        log.info("LightX2V's step_post does not compute x0 = x_t - sigma * v as expected: no previews")
        return None
    if not fixes.wanted("clean_latents_estimate_after_each_step"):
        return None
    tap = StepTap()
    original = scheduler.step_post

    def step_post(*args: Any, **kwargs: Any) -> Any:
        callback = tap.callback
        if callback is not None:
            index = int(scheduler.step_index)
            callback(StepState(step_index=index, total=int(scheduler.infer_steps),
                               latents=scheduler.latents, noise_pred=scheduler.noise_pred,
                               sigma=float(scheduler.sigmas[index].item())))
        return original(*args, **kwargs)

    scheduler.step_post = step_post

    def undo() -> None:
        scheduler.step_post = original

    def redo() -> None:
        scheduler.step_post = step_post

    fixes.record("clean_latents_estimate_after_each_step",
                 "step_post hands x_t, v and sigma_t to the preview before moving on", undo=undo, redo=redo)
    return tap
