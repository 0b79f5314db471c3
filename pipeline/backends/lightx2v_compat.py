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
| sage_attention_on_sm89_sm120        | 7   | RTX 40/50: sage_attn2 is None, the first step fails          |

Speed, applied the same way and listed with the fixes (each can be skipped: the bench's switches):
attention_chosen_by_measurement (the self-attention kernel measured per GPU, pipeline/backends/
kernels.py) and int8_gemm_tiles_for_this_gpu (INT8 GEMM autotune tiles that fit the GPU's shared
memory; bit-identical output).

Fusions of the DiT block's bf16 elementwise chains into Triton kernels (pipeline/backends/
fused_kernels.py; docs/lightx2v.md §5 has the numerics), each a name of its own:

| name                 | chain upstream                                   | output                          |
|----------------------|--------------------------------------------------|---------------------------------|
| rope_fused           | TorchComplexRope: fp32 complex copies of q and k | bit-identical (form checked)    |
| qk_rms_norm_fused    | RMSNorm of q/k without sgl_kernel: 7 bf16 passes | bf16 mean may differ by 1 ulp   |
| gate_residual_fused  | x.add_(y * gate) in cross-attn and post_process  | bit-identical                   |

Host-memory measures (issue 15), applied the same way and recorded with the fixes:

| name                            | what upstream does                                            |
|---------------------------------|---------------------------------------------------------------|
| pinned_weights_packed           | one pinned allocation per weight, rounded up to a power of two |
| checkpoints_memory_mapped       | torch.load of the .pth T5/VAE into anonymous memory (6.7 GB)  |
| dit_streamed_and_kept           | lazy_load rebuilds the DiT, T5 and VAE for every request      |
| streamed_scales_and_biases_match_resident | lazy_load keeps fp32 scales and biases the resident load rounds to bf16 |

Several GPUs (issue 14): parallel_env_initialised_once lets a GPU worker that already joined its
torch.distributed group build (and rebuild) a sequence-parallel pipeline, on the process groups of
its first build. SPLIT_INVARIANT_NAMES make a clip split over N GPUs the clip of one GPU, bit for
bit: sage_keys_smoothed_by_head_groups, seq_cross_attention_in_one_gpu_blocks and
dit_head_in_split_invariant_chunks (the first and the last also on one GPU).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import linecache
import logging
import os
import re
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

FIX_NAMES = (
    "keep_target_video_length_in_config",
    "explicit_t5_checkpoint_path",
    "t5_offload_linear_bias_default",
    "t2v_without_image_encoder",
    "t5_token_embedding_on_host",
    "reset_runner_after_exception",
    "sage_attention_on_sm89_sm120",
)
# Speed: the DiT block's bf16 elementwise chains fused into Triton kernels (pipeline/backends/
# fused_kernels.py, docs/lightx2v.md §5), each switchable by name.
FUSION_NAMES = ("rope_fused", "qk_rms_norm_fused", "gate_residual_fused")
# Not bugs: memory savings applied the same way (recorded with the fixes for the run records).
OPTIMIZATION_NAMES = ("ffn_chunked_over_tokens", "non_block_weights_kept_for_the_run",
                      "attention_chosen_by_measurement", "int8_gemm_tiles_for_this_gpu",
                      "pinned_weights_packed", "checkpoints_memory_mapped", "dit_streamed_and_kept",
                      "streamed_scales_and_biases_match_resident", "streamed_blocks_ordered_on_the_gpu",
                      *FUSION_NAMES)
# Not bugs: what the app needs that LightX2V has no hook for (also recorded).
# Several GPUs: what makes a sequence-parallel run compute what one GPU computes (the first and the
# last also run on one GPU).
SPLIT_INVARIANT_NAMES = ("sage_keys_smoothed_by_head_groups", "seq_cross_attention_in_one_gpu_blocks",
                         "dit_head_in_split_invariant_chunks")
FEATURE_NAMES = ("clean_latents_estimate_after_each_step", "parallel_env_initialised_once", *SPLIT_INVARIANT_NAMES)
# Changes a user opts into: applied only where WAN_STUDIO_OPT_IN (comma-separated) names them. The
# split-invariant changes make N GPUs give one GPU's clip bit for bit (GPU-proven 2026-11-30:
# tests/gpu/test_split_invariant_gpu.py, test_multigpu_gpu.py's sage test), but two of them act on
# one GPU too, where they move SageAttention's key mean and the DiT head off LightX2V's own bits (same
# accuracy). By default one GPU's frames stay LightX2V's bit for bit; a two-GPU clip then differs
# from one GPU's within the accuracy bar (docs/multi-gpu.md). The GPU tests name all of them.
OPT_IN_NAMES = frozenset(SPLIT_INVARIANT_NAMES)
OPT_IN_ENV = "WAN_STUDIO_OPT_IN"


def opt_in_named() -> set[str]:
    """The opt-in changes this process is told to apply (WAN_STUDIO_OPT_IN)."""
    return {part.strip() for part in os.environ.get(OPT_IN_ENV, "").split(",") if part.strip()}


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
        if name in OPT_IN_NAMES and name not in opt_in_named():
            log.info("%s is opt-in: off unless %s names it", name, OPT_IN_ENV)
            return False
        return True

    def record(self, name: str, detail: str, undo: Callable[[], None] | None = None,
               redo: Callable[[], None] | None = None, runtime: bool = False) -> None:
        log.info("LightX2V compat fix applied: %s (%s)", name, detail)
        # Applied again to a rebuilt part (the text encoder, loaded per prompt on the low-RAM rung):
        # the new undo/redo replace the old ones; the fix is listed once.
        self.applied = [fix for fix in self.applied if fix.name != name]
        self.applied.append(AppliedFix(name, detail, undo, redo, runtime))

    def forget(self, *names: str) -> None:
        """Drop the undo/redo of the named fixes (all when none is named); the names stay, for the
        records. Their closures hold the parts they patched: the DiT, its pinned weights, the text
        encoder. Measured on an H200: a released model still referenced by a caller kept 20 GiB of
        host memory through them, and a released text encoder kept its 4.4 GB of pinned blocks."""
        self.applied = [AppliedFix(fix.name, fix.detail, runtime=fix.runtime) if not names or fix.name in names
                        else fix for fix in self.applied]

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

        def __init__(self, original: torch.nn.Embedding, host_weight: torch.Tensor | None = None):
            super().__init__()
            # `host_weight`: the same table memory-mapped from the checkpoint (file-backed pages:
            # a lookup reads only its rows, and the kernel may drop them under pressure).
            self.host_weight = host_weight if host_weight is not None else original.weight.detach().to("cpu")
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


def _mapped_table(checkpoint: str | None, like: Any) -> Any:
    """The token embedding memory-mapped from the T5 checkpoint, if it is there with the loaded
    table's shape, dtype and values (first, middle and last rows compared); else None."""
    if not checkpoint:
        return None
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError) as exc:  # legacy format, unreadable: keep the copy
        log.info("T5 token embedding not memory-mapped: %s", exc)
        return None
    table = state.get("token_embedding.weight") if isinstance(state, dict) else None
    state = None
    if not isinstance(table, torch.Tensor) or table.shape != like.shape or table.dtype != like.dtype:
        return None
    rows = [0, like.shape[0] // 2, like.shape[0] - 1]
    if not torch.equal(table[rows], like.detach().to("cpu")[rows]):
        return None
    return table


def t5_token_embedding_on_host(fixes: CompatFixes, runner: Any, t5_encoder_cls: Any,
                               checkpoint: str | None = None) -> Any:
    """Bug 5. T5Encoder.forward_with_offload does `self.token_embedding =
    self.token_embedding.to(AI_DEVICE)` (input_encoders/hf/wan/t5/model.py:578) and nothing moves
    it back: 2.1 GB stay on the GPU for the whole DiT phase. Replace the embedding with a
    HostTokenEmbedding (lookup on the host). Returns it (the backend switches `keep_on_device`
    per call), or None when not applied.

    With `checkpoint` (the T5 .pth), the host table is the one in the file, memory-mapped, and the
    2.1 GB anonymous copy the encoder loaded is freed: host memory the machine must hold drops by
    that much on every rung (issue 15).

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
    mapped = _mapped_table(checkpoint, original.weight)
    host = _host_token_embedding_class()(original, host_weight=mapped)
    if mapped is not None:
        original.weight.data = mapped  # frees the loaded copy; undo finds the same values here
    encoder.token_embedding = host

    def undo() -> None:
        host.drop_device_copy()
        encoder.token_embedding = original

    def redo() -> None:
        # Upstream may have moved the original table to the GPU meanwhile: point it back at the
        # shared host table, which frees that copy.
        original.weight.data = host.host_weight
        encoder.token_embedding = host

    fixes.record("t5_token_embedding_on_host", "umt5 token embedding lookup on the host"
                 + (" (memory-mapped from the checkpoint)" if mapped is not None else ""), undo=undo, redo=redo)
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
        if getattr(manager, "lazy_load", False):
            refill_streamed_first_block(manager)
    # WanModel.infer moves the non-block weights (embeddings, time projection, head: 0.47 GB) to the
    # GPU at the start of each step and back at its end (networks/wan/model.py:300-305, 341-346); an
    # exception in between leaves them on the GPU.
    if model is not None and getattr(model, "cpu_offload", False) and getattr(model, "offload_granularity", "block") != "model":
        release_non_block_weights(model)
    if hasattr(runner, "inputs"):
        del runner.inputs
    runner.input_info = None


def refill_streamed_first_block(manager: Any) -> None:
    """With lazy_load the first CUDA buffer is filled from the first pinned CPU buffer, which a pass
    stopped midway left holding another block (common/offload/manager.py:63-76, 125-150): wait for
    the disk reads in flight, then read block 0 into it again."""
    for future in list(getattr(manager, "prefetch_futures", []) or []):
        try:
            future.result()
        except Exception:  # noqa: BLE001 - the failed read is replaced right below
            log.warning("a streamed block read failed during recovery", exc_info=True)
    manager.prefetch_futures = []
    first = manager.cpu_buffers[0]
    parts = [first] if getattr(manager, "offload_granularity", "block") == "block" else list(first)
    for part in parts:
        part.load_state_dict_from_disk(0, None)


# -- host memory: pinned weights packed into power-of-two slabs ----------------------------------

# torch's pinned-host allocator rounds every allocation up to a power of two: a 70.8 MB FFN weight
# takes 128 MiB, and the DiT's 14 GB of blocks take ~20.5 GB. A slab of exactly 2**28 bytes is not
# rounded, and first-fit packing of the weights leaves a few percent unused.
PINNED_SLAB_BYTES = 1 << 28
_PIN_ALIGN = 512


class PinnedArena:
    """First-fit packing of pinned tensors into slabs of `slab_bytes`. A tensor is a view of its
    slab; the slab is freed when its last view is. `pinned_bytes` counts the slabs allocated."""

    def __init__(self, torch: Any, slab_bytes: int = PINNED_SLAB_BYTES):
        self.torch = torch
        self.slab_bytes = slab_bytes
        self._slabs: list[list[Any]] = []  # [slab tensor, bytes used]
        self.pinned_bytes = 0
        self.requested_bytes = 0
        self.pinned = True

    def close(self) -> None:
        """Forget the slabs (their views keep them alive); later tensors start new slabs."""
        self._slabs = []

    def _new_slab(self) -> list[Any] | None:
        try:
            slab = self.torch.empty(self.slab_bytes, dtype=self.torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            # As upstream does for one tensor: carry on in pageable memory (slower copies), say so.
            log.warning("pinning a %d MiB slab failed (%s); weights go to pageable memory",
                        self.slab_bytes >> 20, exc)
            self.pinned = False
            return None
        self.pinned_bytes += self.slab_bytes
        entry = [slab, 0]
        self._slabs.append(entry)
        return entry

    def empty(self, shape: Any, dtype: Any) -> Any:
        torch = self.torch
        numel = 1
        for n in shape:
            numel *= int(n)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.requested_bytes += nbytes
        if nbytes == 0 or nbytes > self.slab_bytes or not self.pinned:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pinned and nbytes > 0)
        entry = next((e for e in self._slabs if e[1] + nbytes <= self.slab_bytes), None) or self._new_slab()
        if entry is None:
            return torch.empty(shape, dtype=dtype)
        start = entry[1]
        entry[1] = -(-(start + nbytes) // _PIN_ALIGN) * _PIN_ALIGN
        return entry[0][start:start + nbytes].view(dtype).view(tuple(shape))


def pinned_weights_packed(fixes: CompatFixes, ops_utils: Any, torch: Any) -> PinnedArena | None:
    """Host memory, not a bug: `create_pin_tensor` (common/ops/utils.py:76-98) pins each weight with
    its own `torch.empty(..., pin_memory=True)`, which torch rounds up to a power of two. Replace it
    with one that copies the weight into a view of a packed slab (PinnedArena). Returns the arena
    (the backend reports its bytes and closes it after the load), or None when not applied.

    Detected from the source of create_pin_tensor allocating per tensor with pin_memory=True."""
    name = "pinned_weights_packed"
    original = getattr(ops_utils, "create_pin_tensor", None)
    if original is None:
        return None
    current = getattr(original, "__wrapped_upstream__", original)
    try:
        source = inspect.getsource(current)
    except (OSError, TypeError):
        return None
    if "pin_memory=True" not in source:
        return None
    if not fixes.wanted(name):
        ops_utils.create_pin_tensor = current  # an earlier build's wrapper must not stay in effect
        return None
    arena = PinnedArena(torch)

    def create_pin_tensor(tensor: Any, transpose: bool = False, dtype: Any = None) -> Any:
        pin = arena.empty(tensor.shape, dtype or tensor.dtype)
        pin.copy_(tensor)
        return pin.t() if transpose else pin

    create_pin_tensor.__wrapped_upstream__ = current  # type: ignore[attr-defined]

    def undo() -> None:
        ops_utils.create_pin_tensor = current

    def redo() -> None:
        ops_utils.create_pin_tensor = create_pin_tensor

    redo()
    fixes.record(name, f"pinned weights packed into {PINNED_SLAB_BYTES >> 20} MiB slabs", undo=undo, redo=redo)
    return arena


def release_cached_pinned_memory(torch: Any) -> None:
    """torch keeps freed pinned blocks cached for reuse; hand them back to the system (after a model
    or the text encoder is released), where this torch has a way to. Blocks with copies still in
    flight are not freed, so wait for the device first."""
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            cuda.synchronize()
    except RuntimeError:
        log.debug("synchronize before emptying the pinned cache failed", exc_info=True)
    for call in (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None),
                 getattr(torch._C, "_host_emptyCache", None)):
        if call is not None:
            try:
                call()
                return
            except RuntimeError:
                log.debug("emptying the pinned-memory cache failed", exc_info=True)


# -- host memory: .pth checkpoints memory-mapped -------------------------------------------------


def checkpoints_memory_mapped(fixes: CompatFixes, lx_utils: Any) -> None:
    """Host memory, not a bug: `load_pt_safetensors` reads a .pth with `torch.load(map_location=
    "cpu")` (utils/utils.py:500-524): the 6.7 GB int8 T5 lands in anonymous memory before its blocks
    are pinned and the rest copied into the encoder, a transient the machine must hold. With
    `mmap=True` the same tensors are file-backed pages the kernel can drop. (safetensors files are
    memory-mapped already.) Files saved in the legacy format cannot be mapped: those load as before.

    Detected from the source calling torch.load without mmap."""
    name = "checkpoints_memory_mapped"
    original = getattr(lx_utils, "load_pt_safetensors", None)
    if original is None:
        return
    current = getattr(original, "__wrapped_upstream__", original)
    try:
        source = inspect.getsource(current)
    except (OSError, TypeError):
        return
    if "torch.load(" not in source or "mmap" in source:
        return
    if not fixes.wanted(name):
        lx_utils.load_pt_safetensors = current  # an earlier build's wrapper must not stay in effect
        return
    # The globals the function reads `torch` from (utils/utils.py's module namespace).
    namespace = current.__globals__
    real_torch = namespace["torch"]

    class _MappedLoads:
        """The torch module as load_pt_safetensors sees it while it runs: torch.load maps files."""

        def __getattr__(self, attr: str) -> Any:
            return getattr(real_torch, attr)

        @staticmethod
        def load(f: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return real_torch.load(f, *args, **{**kwargs, "mmap": True})
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return real_torch.load(f, *args, **kwargs)

    mapped = _MappedLoads()

    def load_pt_safetensors(*args: Any, **kwargs: Any) -> Any:
        namespace["torch"] = mapped
        try:
            return current(*args, **kwargs)
        finally:
            namespace["torch"] = real_torch

    load_pt_safetensors.__wrapped_upstream__ = current  # type: ignore[attr-defined]

    def undo() -> None:
        lx_utils.load_pt_safetensors = current

    def redo() -> None:
        lx_utils.load_pt_safetensors = load_pt_safetensors

    redo()
    fixes.record(name, "torch.load(..., mmap=True) for .pth checkpoints", undo=undo, redo=redo)


# -- host memory: the low-RAM rung ---------------------------------------------------------------


def dit_streamed_and_kept(fixes: CompatFixes, pipe: Any, default_runner_cls: Any) -> bool:
    """The low-RAM rung. With `lazy_load` the DiT keeps only its non-block weights and reads each
    block from its block_N.safetensors into two pinned CPU buffers, one block ahead on a thread pool,
    so reading overlaps compute (common/offload/manager.py:125-150, networks/wan/infer/offload/
    transformer_infer.py:40-71). But the runner then builds nothing at init and rebuilds the DiT,
    T5 and VAE for every request, releasing them in end_run (runners/default_runner.py:120-126,
    301-322, 430-436; wan/wan_runner.py:579-606): every click would reload all three, and the
    backend's per-model setup would be lost.

    Build the modules once while `lazy_load` is set (the model captures it at construction), then
    clear it in the runner's config so requests reuse them. Returns whether it applied; call it
    right after create_generator on a pipeline built with lazy_load. Detected from init_run
    loading the transformer per request."""
    runner = pipe.runner
    if not runner.config.get("lazy_load", False) or getattr(runner, "model", None) is not None:
        return False
    try:
        source = inspect.getsource(default_runner_cls.init_run)
    except (OSError, TypeError, AttributeError):
        return False
    if "load_transformer" not in source or not fixes.wanted("dit_streamed_and_kept"):
        return False
    runner.load_model()
    runner.model.set_scheduler(runner.scheduler)
    pipe.modify_config({"lazy_load": False})
    fixes.record("dit_streamed_and_kept", "lazy_load DiT built once; blocks streamed from disk every step")
    return True


# The CPU buffers of a quantized linear that the streamed load fills from the file as stored (fp32).
_STREAMED_FLOATS = ("pin_weight_scale", "pin_bias")


def _round_like_resident(weight: Any) -> None:
    for attr in _STREAMED_FLOATS:
        pin = getattr(weight, attr, None)
        infer_dtype = getattr(weight, "infer_dtype", None)
        if pin is not None and infer_dtype is not None and pin.is_floating_point() and pin.dtype != infer_dtype:
            pin.copy_(pin.to(infer_dtype))


def streamed_scales_and_biases_match_resident(fixes: CompatFixes, mm_weight_cls: Any, transformer_weights: Any
                                              ) -> None:
    """Same frames from disk as from RAM. The resident load converts every float tensor of the
    checkpoint to the inference dtype (bf16) before a quantized linear keeps it (networks/
    base_model.py:533-541): the fp32 weight scales and biases of the real files are rounded to bf16
    (the bias then widened back to fp32, mm_weight.py:455-466). The streamed load copies both from
    the file into fp32 buffers unrounded (mm_weight.py:569-595, common/ops/utils.py:35-65), so every
    INT8 GEMM of a low-RAM run would scale by other values (measured on the device: 3e-3 relative L2
    of the final latents on the tiny checkpoint, with the biases alone rounded). Round both the same
    way: the CPU buffers built now, and every block read later.

    Detected from the source of load_state_dict_from_disk copying the scale or bias without a dtype."""
    name = "streamed_scales_and_biases_match_resident"
    method = getattr(mm_weight_cls, "load_state_dict_from_disk", None)
    current = getattr(method, "__wrapped_upstream__", method)
    try:
        source = inspect.getsource(current)
    except (OSError, TypeError):
        return
    copies_as_stored = ("pin_bias.copy_(bias_tensor)" in source
                        or "pin_weight_scale.copy_(weight_scale_tensor)" in source)
    if not copies_as_stored or not fixes.wanted(name):
        return

    def load_state_dict_from_disk(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = current(self, *args, **kwargs)
        _round_like_resident(self)
        return result

    load_state_dict_from_disk.__wrapped_upstream__ = current  # type: ignore[attr-defined]
    mm_weight_cls.load_state_dict_from_disk = load_state_dict_from_disk
    stack, seen = [transformer_weights], set()
    while stack:  # the CPU buffers filled at construction
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        _round_like_resident(obj)
        modules = getattr(obj, "_modules", None)
        if isinstance(modules, dict):
            stack.extend(m for m in modules.values() if m is not None)
    _PROCESS_WIDE.add(name)

    def undo() -> None:
        mm_weight_cls.load_state_dict_from_disk = current

    def redo() -> None:
        mm_weight_cls.load_state_dict_from_disk = load_state_dict_from_disk

    fixes.record(name, f"{mm_weight_cls.__name__}: streamed fp32 scales and biases rounded through bf16 "
                       "like the resident load",
                 undo=undo, redo=redo)


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
    uses_fused = getattr(transformer_infer, "_use_mxfp8_quant_fuse", lambda: False)

    def infer_ffn(phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa=None):
        n = x.shape[0]
        original = infer_ffn.__wrapped__
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
    # The method it slices; undo puts it back.
    infer_ffn.__wrapped__ = transformer_infer.infer_ffn
    transformer_infer.infer_ffn = infer_ffn

    def undo() -> None:
        transformer_infer.infer_ffn = infer_ffn.__wrapped__

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


def streamed_blocks_ordered_on_the_gpu(fixes: CompatFixes, transformer_infer: Any, torch: Any) -> None:
    """Speed, not a bug: with block offload LightX2V waits on the host after every DiT block
    (WeightAsyncStreamManager.swap_blocks synchronises the copy stream and the compute stream,
    common/offload/manager.py:92-101), so the GPU drains 40 times a step and idles while Python
    queues the next block. Measured on an H200, 480x832x81: the kernels of a step add up to 2.27 s
    of its 2.43 s.

    Keep the same order with waits between the streams, on the GPU: a block's compute waits for its
    weights' copy, the copy into the buffer a block just used waits for that block, and the blocks
    as a whole wait for what the calling stream queued before them (the step's inputs) and are
    waited for by what it queues after (the head, the scheduler). The same kernels read the same
    bytes: the frames are bit-identical. Not with lazy_load (the low-RAM rung), where host threads
    refill the pinned buffers that the copies read: there the host must know a copy has finished;
    nor on a call with clean_cuda_cache (see swap_blocks). The host may now be many blocks ahead
    when a block raises: recover() synchronises the device before anything runs again.
    Detected from swap_blocks synchronising on the host."""
    name = "streamed_blocks_ordered_on_the_gpu"
    manager = getattr(transformer_infer, "offload_manager", None)
    blocks_offloaded = getattr(transformer_infer, "infer_func", None)
    if (manager is None or getattr(blocks_offloaded, "__name__", "") != "infer_with_blocks_offload"
            or getattr(transformer_infer, "lazy_load", False)):
        return
    try:
        source = inspect.getsource(type(manager).swap_blocks)
    except (OSError, TypeError, AttributeError):
        return
    if ".synchronize()" not in source or not fixes.wanted(name):
        return
    upstream_swap = manager.swap_blocks

    def swap_blocks() -> None:
        if getattr(transformer_infer, "clean_cuda_cache", False):
            # After the last block the loop frees the caller's embed0 and context and empties the
            # cache, which unmaps their pages once the caller's stream is done with them, not the
            # compute stream: the host must know every block has run, as upstream makes it.
            upstream_swap()
            return
        manager.compute_stream.wait_stream(manager.cuda_load_stream)  # the next block's weights
        manager.cuda_load_stream.wait_stream(manager.compute_stream)  # the buffer this block used
        manager.cuda_buffers[0], manager.cuda_buffers[1] = manager.cuda_buffers[1], manager.cuda_buffers[0]

    def infer_with_blocks_offload(blocks: Any, x: Any, pre_infer_out: Any) -> Any:
        caller = torch.cuda.current_stream(manager.compute_stream.device)
        manager.compute_stream.wait_stream(caller)
        manager.cuda_load_stream.wait_stream(caller)
        try:
            return blocks_offloaded(blocks, x, pre_infer_out)
        finally:
            caller.wait_stream(manager.compute_stream)
            caller.wait_stream(manager.cuda_load_stream)

    def undo() -> None:
        manager.swap_blocks = upstream_swap
        transformer_infer.infer_func = blocks_offloaded

    def redo() -> None:
        manager.swap_blocks = swap_blocks
        transformer_infer.infer_func = infer_with_blocks_offload

    redo()
    fixes.record(name, "DiT blocks ordered by stream waits on the GPU, not a host sync per block",
                 undo=undo, redo=redo)


def release_non_block_weights(model: Any) -> None:
    """After a failed run: give back the non-block weights if a stopped run left them on the GPU.
    With `non_block_weights_kept_for_the_run` applied this only copies what is on the GPU."""
    model.pre_weight.to_cpu()
    model.transformer_weights.non_block_weights_to_cpu()


# -- bug 7 ----------------------------------------------------------------------------------------


def sage_attention_on_sm89_sm120(fixes: CompatFixes, sage_attn_module: Any, sageattention: Any,
                                 capability: tuple[int, int] | None) -> None:
    """Bug 7. On compute capability 8.9 and 12.0 (RTX 40 and 50) LightX2V imports
    `sageattn_qk_int8_pv_fp16_triton` from sageattention (common/ops/attn/sage_attn.py:24-31);
    SageAttention 1.0.6, the version that installs without compiling CUDA, exports only `sageattn`,
    so the import fails quietly, `sageattn` stays None and sage_attn2's first call raises
    "'NoneType' object is not callable". 1.0.6's `sageattn` is the same Triton INT8-QK kernel.

    Detected by the module's `sageattn` being None while the installed sageattention offers the
    entry point kernels.sage_entry_point picks for this capability; fixed by setting it."""
    from pipeline.backends import kernels

    name = "sage_attention_on_sm89_sm120"
    if sage_attn_module is None or sageattention is None:
        return
    if getattr(sage_attn_module, "sageattn", 0) is not None and name not in _PROCESS_WIDE:
        return
    entry = kernels.sage_entry_point(capability, dir(sageattention))
    if entry is None or not fixes.wanted("sage_attention_on_sm89_sm120"):
        return
    sage_attn_module.sageattn = getattr(sageattention, entry)
    # LightX2V routes through a torch custom op when magi_compiler is installed, registered only if
    # sageattn was importable at import time: without the op, call the function directly.
    if getattr(sage_attn_module, "magi_register_custom_op", None) is not None:
        sage_attn_module.magi_register_custom_op = None
    _PROCESS_WIDE.add("sage_attention_on_sm89_sm120")

    def undo() -> None:
        sage_attn_module.sageattn = None

    def redo() -> None:
        sage_attn_module.sageattn = getattr(sageattention, entry)

    fixes.record("sage_attention_on_sm89_sm120", f"sage_attn2 uses sageattention.{entry} on sm_{capability[0]}{capability[1]}",
                 undo=undo, redo=redo)


# -- speed: self-attention kernel chosen by measurement --------------------------------------------

# LightX2V's dense attention weights whose apply(q, k, v, ...) on [L, H, D] we may replace.
DENSE_ATTENTION_CLASSES = ("SageAttn2Weight", "TorchSDPAWeight", "FlashAttn2Weight", "FlashAttn3Weight")


def weight_module_tree(weights: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Each LightX2V weight module under `weights` (blocks, phases, and the CUDA offload buffers'
    copies of them), once, with its registered sub-modules (`_modules`)."""
    seen, stack = set(), [weights]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        modules = getattr(obj, "_modules", None)
        if not isinstance(modules, dict):
            continue
        yield obj, modules
        stack.extend(m for m in modules.values() if m is not None)


def attention_modules(weights: Any, name: str = "self_attn_1") -> list[Any]:
    """Every attention weight module registered as `name` under `weights`, once each."""
    found = {id(mods[name]): mods[name] for _, mods in weight_module_tree(weights) if mods.get(name) is not None}
    return list(found.values())


def _restore_apply(module: Any, previous: Any) -> None:
    """Give a module back the `apply` it had before a fix replaced it: its own (instance) one, or
    none, so that its class's runs again."""
    if previous is None:
        module.__dict__.pop("apply", None)
    else:
        module.apply = previous


def attention_chosen_by_measurement(fixes: CompatFixes, transformer_weights: Any, selector: Any) -> None:
    """Not a bug: LightX2V runs the attention kernel named in the config for every GPU. Replace the
    `apply` of each DiT self-attention module (an instance attribute: other builds keep theirs) by
    `selector` (kernels.AttentionSelector), which measures the backends at the first call of a
    shape and dispatches to the fastest one that is no less accurate than LightX2V's own kernel.
    Calls it cannot serve (a mask, a batch, sequence parallel's extra arguments) go to the original.

    Skipped where the modules are not LightX2V's dense kernels (sparse or custom attention)."""
    modules = [m for m in attention_modules(transformer_weights) if type(m).__name__ in DENSE_ATTENTION_CLASSES]
    if not modules or not fixes.wanted("attention_chosen_by_measurement"):
        return
    originals = {id(m): m.__dict__.get("apply") for m in modules}

    def routed(module: Any) -> Callable[..., Any]:
        original = type(module).apply.__get__(module)

        def apply(q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
            if q.dim() != 3 or kwargs.get("attn_mask") is not None or k.shape[0] != q.shape[0]:
                return original(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv,
                                max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv, **kwargs)
            return selector(q, k, v)

        return apply

    def redo() -> None:
        for m in modules:
            m.apply = routed(m)

    def undo() -> None:
        for m in modules:
            _restore_apply(m, originals[id(m)])

    redo()
    fixes.record("attention_chosen_by_measurement",
                 f"self-attention of {len(modules)} modules measured per GPU (baseline {selector.baseline}, "
                 f"offered {', '.join(selector.offered)}{', forced ' + selector.force if selector.force else ''})",
                 undo=undo, redo=redo)


# -- speed: INT8 GEMM autotune tiles that fit this GPU -----------------------------------------------

_UPSTREAM_AUTOTUNE: dict[int, list[Any]] = {}


def int8_gemm_tiles_for_this_gpu(fixes: CompatFixes, triton_kernels: Any, smem_limit: int) -> None:
    """Not a bug: LightX2V autotunes its INT8 GEMM over four Hopper-sized tiles (common/ops/mm/
    triton_kernels.py:94-101); two need more shared memory than an sm_86 SM has (144 and 128 KB
    > 99 KB) and fail to compile there, leaving two. kernels.INT8_GEMM_INSTALLED lists tiles of at
    most 96 KB, led by 128x128x64 / 4 stages / 4 warps, measured fastest at every model shape on an
    H200 (docs/benchmarks/kernels-micro-2026-11-30-NVIDIA_H200.json). A tile changes neither the
    int32 accumulation nor the epilogue: outputs are bit-identical (the microbenchmark checks).

    Process-wide (the kernels are module globals): a build that skips it gets upstream's list back."""
    from pipeline.backends import kernels

    targets = [k for k in (getattr(triton_kernels, "int8_gemm_bias_kernel", None),
                           getattr(triton_kernels, "int8_gemm_kernel", None))
               if k is not None and isinstance(getattr(k, "configs", None), list) and hasattr(k, "cache")]
    config_cls = getattr(triton_kernels, "Config", None)
    if not targets or config_cls is None:
        return
    for k in targets:
        _UPSTREAM_AUTOTUNE.setdefault(id(k), list(k.configs))

    def install(configs_for: Callable[[Any], list[Any]]) -> None:
        for k in targets:
            k.configs = configs_for(k)
            k.cache = {}  # autotune results of the previous list

    def upstream() -> None:
        install(lambda k: list(_UPSTREAM_AUTOTUNE[id(k)]))

    if not fixes.wanted("int8_gemm_tiles_for_this_gpu"):
        if "int8_gemm_tiles_for_this_gpu" in _PROCESS_WIDE:
            upstream()
            _PROCESS_WIDE.discard("int8_gemm_tiles_for_this_gpu")
        return
    tiles = kernels.int8_gemm_tiles_for(smem_limit)
    if not tiles:
        return
    ours = [config_cls({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": bk, "SPLIT_K": 1}, num_stages=s, num_warps=w)
            for m, n, bk, s, w in tiles]

    def redo() -> None:
        install(lambda k: list(ours))

    redo()
    _PROCESS_WIDE.add("int8_gemm_tiles_for_this_gpu")
    fixes.record("int8_gemm_tiles_for_this_gpu",
                 f"INT8 GEMM autotune over {', '.join('%dx%dx%d/s%d/w%d' % t for t in tiles)} "
                 f"(<= {smem_limit // 1024} KB shared memory per block)", undo=upstream, redo=redo)


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


# -- speed: the DiT block's bf16 elementwise chains fused -----------------------------------------


class _Switch:
    """On while a fusion is applied; `CompatFixes.disabled` turns it off (the eager chain runs)."""

    def __init__(self) -> None:
        self.on = True

    def record(self, fixes: CompatFixes, name: str, detail: str) -> None:
        """Record the fusion with undo/redo that flip this switch."""
        fixes.record(name, detail, undo=lambda: setattr(self, "on", False), redo=lambda: setattr(self, "on", True))


def _form_matching(name: str, what: str, probe: Callable[[], Any]) -> Any:
    """The rounding form `probe` finds bit-identical to upstream on this GPU, or None (logged) where
    none is or the kernel does not build here: a GPU or Triton the kernel does not build for keeps
    upstream's chain, and the load goes on."""
    from pipeline.backends import fused_kernels

    try:
        form = probe()
    except fused_kernels.KernelBuildError:
        log.warning("the fused %s kernel does not build here: %s off", what, name, exc_info=True)
        return None
    if form is None:
        log.warning("no rounding form of the fused %s matches LightX2V's on this GPU: %s off", what, name)
    return form


def rope_fused(fixes: CompatFixes, transformer_weights: Any, rope_cls: Any, device: str = "cuda") -> None:
    """Not a bug: TorchComplexRope (common/ops/rope/torch_rope.py:59-79, the rope_type LightX2VPipeline
    defaults to) turns q and k into fp32 complex tensors, multiplies by the complex64 frequencies
    and converts back: four full-size temporaries per tensor, ~10 bf16-sized passes each. The fused
    kernel reads bf16 q (or k) and the frequencies once and writes bf16 once.

    Bit-identical by construction except for one thing source cannot tell: whether the compiler of
    the eager complex product fused a multiply and an add. `fused_kernels.rope_variant_matching`
    runs upstream's own apply_single and each rounding form on this device; the fusion installs only
    with the form that matches bit for bit. Each TorchComplexRope of the weights (also the inner one
    of a ChunkedRope, so rope_chunk keeps slicing; the offload buffers' copies included) gets an
    instance `apply`; calls the kernel does not serve (positions, other dtypes) go to the original.
    Detected from the source of apply_single (fp32 complex product, cast back)."""
    name = "rope_fused"
    if not fixes.wanted(name):
        return
    try:
        source = inspect.getsource(rope_cls.apply_single)
    except (OSError, TypeError, AttributeError):
        return
    if not all(part in source for part in ("view_as_complex", "x_complex * freqs", "output.to(x.dtype)")):
        log.info("LightX2V's TorchComplexRope.apply_single is not the fp32 complex product expected: %s off", name)
        return
    modules: dict[int, Any] = {}
    for _, mods in weight_module_tree(transformer_weights):
        rope = mods.get("rope")
        for candidate in (rope, getattr(rope, "inner", None)):
            if (type(candidate) is rope_cls and getattr(candidate, "layout", None) == "interleaved"
                    and str(getattr(candidate, "compute_dtype", "")) == "torch.float32"):
                modules[id(candidate)] = candidate
    if not modules:
        return
    from pipeline.backends import fused_kernels

    probe = next(iter(modules.values()))
    form = _form_matching(name, "RoPE", lambda: fused_kernels.rope_variant_matching(
        lambda x, f: rope_cls.apply_single(probe, x, f), device))
    if form is None:
        return
    switch = _Switch()

    def fused(module: Any) -> Callable[..., Any]:
        original = type(module).apply.__get__(module)

        def apply(q, k, freqs, **kwargs):
            if (switch.on and not kwargs and fused_kernels.rope_fits(q, freqs)
                    and fused_kernels.rope_fits(k, freqs)):
                return fused_kernels.rope(q, freqs, form), fused_kernels.rope(k, freqs, form)
            return original(q, k, freqs, **kwargs)

        return apply

    for module in modules.values():
        module.apply = fused(module)

    switch.record(fixes, name, f"RoPE of q and k: fused_kernels._rope_kernel (complex product form {form}) on "
                  f"{len(modules)} modules")


def qk_rms_norm_fused(fixes: CompatFixes, transformer_weights: Any, rms_module: Any) -> None:
    """Not a bug: without sgl_kernel, RMSWeightSgl.apply (common/ops/norm/rms_norm_weight.py:355-372)
    normalises q and k over the hidden dim in bf16 tensors: square, mean, +eps, rsqrt and two
    products, seven full-size passes each. The fused kernel does it in one, rounding to bf16 at each
    of those steps as the eager chain does. The fp32 sum of squares runs in another order than
    torch's reduction, so a row whose sum falls within that difference of a bf16 rounding boundary
    gets a mean one bf16 ulp apart (docs/lightx2v.md §5: the error against an fp32 reference stays
    LightX2V's). Every RMSWeightSgl of the weights (norm_q/norm_k of self and cross attention, CUDA
    buffers included) gets an instance `apply`.

    Detected from sgl_kernel being absent in LightX2V's norm module (with it, upstream already runs
    a fused kernel) and from the source of the fallback."""
    name = "qk_rms_norm_fused"
    cls = getattr(rms_module, "RMSWeightSgl", None)
    if cls is None or getattr(rms_module, "sgl_kernel", 0) is not None or not fixes.wanted(name):
        return
    try:
        source = inspect.getsource(cls.apply)
    except (OSError, TypeError):
        return
    if ("torch.rsqrt(input_tensor.pow(2).mean(-1, keepdim=True) + self.eps)" not in source
            or "(input_tensor * weight).to(self.infer_dtype)" not in source):
        log.info("LightX2V's RMSWeightSgl fallback is not the bf16 chain expected: %s off", name)
        return
    modules = {id(m): m for _, mods in weight_module_tree(transformer_weights) for m in mods.values()
               if type(m) is cls}
    if not modules:
        return
    from pipeline.backends import fused_kernels

    switch = _Switch()

    def fused(module: Any) -> Callable[..., Any]:
        original = type(module).apply.__get__(module)

        def apply(input_tensor):
            if switch.on and module.sensitive_layer_dtype == module.infer_dtype:
                weight = module._get_actual_weight()
                if weight is not None and fused_kernels.rms_norm_fits(input_tensor, weight):
                    return fused_kernels.rms_norm(input_tensor, weight, module.eps)
            return original(input_tensor)

        return apply

    for module in modules.values():
        module.apply = fused(module)

    switch.record(fixes, name, f"q/k RMSNorm: fused_kernels._rms_norm_kernel on {len(modules)} modules")


_REWRITES = itertools.count(1)


def method_rewritten(cls: Any, name: str, replacements: tuple[tuple[str, str], ...],
                     helpers: dict[str, Any]) -> Callable[..., Any] | None:
    """`cls.name` compiled again from its own source with each `old` line replaced by `new` (each
    must occur exactly once), in its globals plus `helpers`; None where the source is not what the
    replacements expect. Fuses lines inside an upstream method without copying the rest of it: a
    later LightX2V whose method changed elsewhere keeps its changes. The new source is registered
    with linecache, so that tracebacks show it."""
    func = getattr(cls, name, None)
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    if "super()" in source or "__class__" in source:
        return None  # needs the class cell a recompiled function lacks
    for old, new in replacements:
        if source.count(old) != 1:
            return None
        source = source.replace(old, new)
    namespace = dict(func.__globals__)
    namespace.update(helpers)
    filename = f"<{cls.__name__}.{name} rewritten by lightx2v_compat #{next(_REWRITES)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def install_methods_rewritten(obj: Any, lines: dict[str, tuple[tuple[str, str], ...]],
                              helpers: dict[str, Any]) -> list[str] | None:
    """Every method named in `lines` rewritten from its class's source (method_rewritten) and bound
    to obj as its own, all or none: the names installed, or None where one method's source is not
    what its replacements expect (then nothing is installed)."""
    cls = type(obj)
    methods = {}
    for method, replacements in lines.items():
        func = method_rewritten(cls, method, replacements, helpers)
        if func is None:
            return None
        methods[method] = func
    for method, func in methods.items():
        setattr(obj, method, types.MethodType(func, obj))
    return [f"{cls.__name__}.{method}" for method in methods]


# The gate + residual lines of WanTransformerInfer (networks/wan/infer/transformer_infer.py:380, 502).
_GATE_RESIDUAL_LINES = {
    "infer_cross_attn": (("x.add_(y_out * gate_msa.squeeze())", "_fused_gate_residual_(x, y_out, gate_msa)"),),
    "post_process": (("x.add_(y * c_gate_msa.squeeze())", "_fused_gate_residual_(x, y, c_gate_msa)"),),
}


def gate_residual_fused(fixes: CompatFixes, transformer_infer: Any) -> None:
    """Not a bug: after self-attention and after the FFN the residual is updated as
    `x.add_(y * gate.squeeze())` (networks/wan/infer/transformer_infer.py:380, 502): a bf16 product
    written out, then read back for the add, five full-size passes. The fused kernel rounds the
    product to bf16 and adds it into x in place in three; bit-identical.

    Installed on this transformer_infer instance as infer_cross_attn and post_process compiled
    from upstream's own source with that one line replaced (method_rewritten); a LightX2V whose
    lines differ keeps its methods (logged)."""
    name = "gate_residual_fused"
    if not fixes.wanted(name):
        return
    from pipeline.backends import fused_kernels

    switch = _Switch()

    def _fused_gate_residual_(x: Any, y: Any, gate: Any) -> Any:
        gate = gate.squeeze()
        if switch.on and fused_kernels.gate_residual_fits(x, y, gate):
            return fused_kernels.gate_residual_(x, y, gate)
        return x.add_(y * gate)

    installed = install_methods_rewritten(transformer_infer, _GATE_RESIDUAL_LINES,
                                          {"_fused_gate_residual_": _fused_gate_residual_})
    if installed is None:
        log.info("LightX2V's %s has not the gate + residual lines expected: %s off",
                 type(transformer_infer).__name__, name)
        return
    switch.record(fixes, name, "x += y * gate: fused_kernels._gate_residual_kernel in " + ", ".join(installed))


# -- several GPUs ----------------------------------------------------------------------------------


# The device meshes LightX2V asked for in this process, by their arguments (see below).
_DEVICE_MESHES: dict[str, Any] = {}


def parallel_env_initialised_once(fixes: CompatFixes, platform_registry: Any, dist: Any, platform: str = "cuda",
                                  set_config: Any = None) -> None:
    """create_generator calls the platform's init_parallel_env on every build with a `parallel`
    config (pipeline.py:219-223), which calls dist.init_process_group (a second build, after a
    rung's reload, raises "trying to initialize the default process group twice") and then
    torch.cuda.set_device(rank) (lightx2v_platform/base/nvidia.py:33-40: rank 1 has no cuda:1 in a
    worker that sees only its own card). Our GPU workers join their group before any build, so
    the call is skipped whenever the default group exists already.

    It then calls set_parallel_config, which makes a new device mesh on every build
    (utils/set_config.py:453, init_device_mesh over (cfg_p, seq_p)): every mesh splits new process
    groups off the default one (one NCCL communicator per build for the size-1 cfg_p dimension),
    and nothing destroys them, so each rebuild (a rung's reload) leaked one. `set_config` (the
    module): its init_device_mesh gives the mesh of the first build with the same arguments back,
    so a worker's groups are made once, like its default group."""
    name = "parallel_env_initialised_once"
    if not fixes.wanted(name):
        return
    undos: list[Callable[[], None]] = []
    redos: list[Callable[[], None]] = []
    parts: list[str] = []
    device_cls = platform_registry.get(platform, None)
    if device_cls is not None and hasattr(device_cls, "init_parallel_env"):
        current = device_cls.init_parallel_env
        original = getattr(current, "__wrapped__", current)

        def init_parallel_env():
            if dist.is_initialized():
                return None
            return original()

        init_parallel_env.__wrapped__ = original
        device_cls.init_parallel_env = staticmethod(init_parallel_env)
        undos.append(lambda: setattr(device_cls, "init_parallel_env", staticmethod(original)))
        redos.append(lambda: setattr(device_cls, "init_parallel_env", staticmethod(init_parallel_env)))
        parts.append(f"{getattr(device_cls, '__name__', platform)}.init_parallel_env skipped once the worker "
                     f"joined its group")
    make_mesh = getattr(set_config, "init_device_mesh", None)
    if make_mesh is not None:
        upstream = getattr(make_mesh, "__wrapped__", make_mesh)

        def init_device_mesh(device_type, mesh_shape, *args, **kwargs):
            key = repr((device_type, tuple(mesh_shape), args, sorted(kwargs.items())))
            mesh = _DEVICE_MESHES.get(key)
            if mesh is None:
                mesh = _DEVICE_MESHES[key] = upstream(device_type, mesh_shape, *args, **kwargs)
            return mesh

        init_device_mesh.__wrapped__ = upstream
        set_config.init_device_mesh = init_device_mesh
        undos.append(lambda: setattr(set_config, "init_device_mesh", upstream))
        redos.append(lambda: setattr(set_config, "init_device_mesh", init_device_mesh))
        parts.append("the device mesh (and its process groups) made by the first build and reused by the next")
    if not parts:
        return

    def undo() -> None:
        for step in undos:
            step()

    def redo() -> None:
        for step in redos:
            step()

    _PROCESS_WIDE.add(name)
    fixes.record(name, "; ".join(parts), undo=undo, redo=redo)


# -- several GPUs: a sequence-parallel run computes what one GPU computes -------------------------
#
# Ulysses changes no arithmetic in principle: every op but attention works per token, and the
# self-attention after the all-to-all sees every token of its heads. Three kernels still saw the
# split: SageAttention's key mean (one reduction over all heads of the GPU, kernels.
# keys_smoothed_by_head_groups), SageAttention's query blocks in the cross-attention (below), and
# the cuBLAS GEMM of the DiT head, which picks its kernel by the number of rows (below). Each is a
# name of its own; the first and the last also run on one GPU, so that both compute alike.

# Query rows SageAttention quantises with one INT8 scale: BLKQ of its Triton kernels (1.0.6 and the
# sm_89 entry point); the per-warp blocks of its CUDA kernels (64, 16) divide it.
SAGE_QUERY_ROWS = 128


def sage_keys_smoothed_by_head_groups(fixes: CompatFixes, selector: Any, num_heads: int | None) -> None:
    """Not a bug: SageAttention subtracts the keys' mean over the tokens from k (smooth_k) with one
    torch reduction over all the heads it is given, and that reduction's launch depends on their
    number (kernels.keys_smoothed_by_head_groups): the 20-head shard of a 2-GPU Ulysses run gets
    other bits than one GPU's 40 heads. The selector's SageAttention smooths k itself, in groups of
    kernels.split_invariant_head_group(num_heads) heads on every build (one GPU included), and
    calls SageAttention with smooth_k=False. Mean and subtraction stay bf16 as SageAttention's: the
    error against an exact reference is unchanged; on one GPU some keys' means differ from
    upstream's by one bf16 ulp, which the attention's softmax cancels up to the INT8 rounding."""
    from pipeline.backends import kernels

    name = "sage_keys_smoothed_by_head_groups"
    if selector is None or kernels.SAGE not in selector.fns or not num_heads or not fixes.wanted(name):
        return
    heads = kernels.split_invariant_head_group(int(num_heads))
    inner = selector.fns[kernels.SAGE]
    switch = _Switch()

    def sage(q: Any, k: Any, v: Any) -> Any:
        if not switch.on or k.dim() != 3 or k.shape[1] % heads:
            return inner(q, k, v)
        k = kernels.keys_smoothed_by_head_groups(k.contiguous(), heads)
        return inner(q, k, v, smooth_k=False)

    selector.fns[kernels.SAGE] = sage
    switch.record(fixes, name, f"SageAttention's key mean over groups of {heads} of the {num_heads} heads")


def _rows_of_neighbours(q: Any, rows: int, dist: Any, group: Any) -> Any:
    """[ranks, 2 * (rows - 1), H * D]: the first and the last rows - 1 query rows of every rank."""
    flat = q.reshape(q.shape[0], -1)
    edge = rows - 1
    mine = flat.new_empty((2 * edge, flat.shape[1]))
    mine[:edge].copy_(flat[:edge])
    mine[edge:].copy_(flat[flat.shape[0] - edge:])
    gathered = flat.new_empty((dist.get_world_size(group), 2 * edge, flat.shape[1]))
    dist.all_gather_into_tensor(gathered, mine, group=group)
    return gathered


def attention_in_global_query_blocks(attend: Callable[[Any, Any, Any], Any], q: Any, k: Any, v: Any, *,
                                     rank: int, ranks: int, rows: int, neighbours: Any) -> Any:
    """`attend`(q, k, v) -> [len(q), H * D] over this rank's slice of the queries (rows
    [rank * L, rank * L + L) of ranks * L), computed in the query blocks of `rows` rows that one
    GPU quantises: the blocks this rank shares with its neighbours are completed with their rows
    (`neighbours`: _rows_of_neighbours), the others run as they are. Each call gets a fresh copy of
    k (SageAttention subtracts the keys' mean in place). Needs L >= rows."""
    local = q.shape[0]
    first = rank * local
    before = first % rows                              # rows of rank - 1 in our first block
    head = (rows - before) % rows                      # our rows in that block
    tail = (first + local) % rows if rank < ranks - 1 else 0  # our rows in the block rank + 1 ends
    after = rows - tail if tail else 0
    edge = rows - 1
    shape = q.shape[1:]
    out = None
    pieces = []
    if head:
        prev = neighbours[rank - 1, 2 * edge - before:].reshape(before, *shape)
        pieces.append((slice(0, head), before, (prev, q[:head])))
    if local - tail > head:
        pieces.append((slice(head, local - tail), 0, (q[head:local - tail],)))
    if tail:
        nxt = neighbours[rank + 1, :after].reshape(after, *shape)
        pieces.append((slice(local - tail, local), 0, (q[local - tail:], nxt)))
    for index, (target, skip, parts) in enumerate(pieces):
        if len(parts) == 1:
            block_q = parts[0]
        else:
            block_q = q.new_empty((sum(p.shape[0] for p in parts), *shape))
            at = 0
            for p in parts:
                block_q[at:at + p.shape[0]].copy_(p)
                at += p.shape[0]
        last = index == len(pieces) - 1
        result = attend(block_q, k if last else k.clone(), v)
        if out is None:
            out = result.new_empty((local, result.shape[1]))
        out[target] = result[skip:skip + (target.stop - target.start)]
    return out


def seq_cross_attention_in_one_gpu_blocks(fixes: CompatFixes, model: Any, transformer_weights: Any, dist: Any,
                                          group: Any, rows: int = SAGE_QUERY_ROWS) -> None:
    """Not a bug: under Ulysses the cross-attention (text) runs on each rank's slice of the
    tokens, unsplit over heads (networks/wan/infer/transformer_infer.py:400-410). SageAttention
    quantises q in blocks of 128 rows, counted from the rank's first token: where a rank's slice
    does not start on a multiple of 128 (720x1280x81 on 2 GPUs: 37,800 tokens a rank), every
    block of rank 1 and the last of rank 0 hold other rows than one GPU's blocks, so their INT8
    scales and outputs differ. Each rank now runs its cross-attention in one GPU's blocks: the
    blocks it shares with a neighbour are completed with the neighbour's query rows (one
    all-gather of 2 x 127 rows a rank per block; their outputs are dropped). Only for the
    SageAttention cross-attention of a sequence-parallel build whose tokens split evenly (no
    padding) into slices of at least 128 rows; other calls go to upstream's."""
    name = "seq_cross_attention_in_one_gpu_blocks"
    if group is None or not fixes.wanted(name):
        return
    modules = [m for m in attention_modules(transformer_weights, "cross_attn_1") if type(m).__name__ == "SageAttn2Weight"]
    if not modules or not callable(getattr(model, "_seq_parallel_pre_process", None)):
        return
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    if ranks < 2:
        return
    tokens: dict[str, int | None] = {"all": None}
    pre_process = model._seq_parallel_pre_process
    owned_pre_process = "_seq_parallel_pre_process" in vars(model)

    def counted(pre_infer_out: Any) -> Any:
        tokens["all"] = int(pre_infer_out.x.shape[0])  # before the padding to a multiple of the ranks
        return pre_process(pre_infer_out)

    switch = _Switch()

    def blocked(module: Any) -> Callable[..., Any]:
        original = type(module).apply.__get__(module)

        def apply(q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
            local = q.shape[0]
            # The same on every rank (all ranks call the all-gather or none does).
            if not switch.on or kwargs or q.dim() != 3 or local < rows or tokens["all"] != local * ranks:
                return original(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv,
                                max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv, **kwargs)
            neighbours = _rows_of_neighbours(q, rows, dist, group)

            def attend(block_q, block_k, block_v):
                return original(block_q, block_k, block_v, max_seqlen_q=block_q.shape[0], max_seqlen_kv=block_k.shape[0])

            return attention_in_global_query_blocks(attend, q, k, v, rank=rank, ranks=ranks, rows=rows,
                                                    neighbours=neighbours)

        return apply

    originals = {id(m): m.__dict__.get("apply") for m in modules}

    def redo() -> None:
        model._seq_parallel_pre_process = counted
        for m in modules:
            m.apply = blocked(m)

    def undo() -> None:
        if owned_pre_process:
            model._seq_parallel_pre_process = pre_process
        else:
            vars(model).pop("_seq_parallel_pre_process", None)
        for m in modules:
            _restore_apply(m, originals[id(m)])

    redo()
    fixes.record(name, f"SageAttention cross-attention of {len(modules)} modules in one GPU's query blocks of "
                       f"{rows} rows (rank {rank} of {ranks})", undo=undo, redo=redo)


def _rows_in_chunks(apply: Callable[[Any], Any], x: Any, chunk: int) -> Any:
    out = None
    for start in range(0, x.shape[0], chunk):
        part = apply(x[start:start + chunk])
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[start:start + chunk] = part
    return out


def dit_head_in_split_invariant_chunks(fixes: CompatFixes, transformer_weights: Any, ranks: int = 1) -> None:
    """Not a bug: the DiT head (a bf16 linear, 5120 -> 64, torch.addmm through cuBLAS) runs on each
    rank's tokens before the gather (networks/wan/infer/transformer_infer.py:214-235 under
    model.py:253-256), and cuBLAS chooses its kernel, and how it splits the sum over the 5120
    inputs, by the number of rows: 37,800 rows on each of 2 GPUs need not give the bits of 75,600
    rows on one. The head runs on slices of tokens/8 rows (tokens/4, /2 where 8 does not divide)
    on every build, one GPU included: each slice sees the same kernel, whatever the split.
    `ranks`: the sequence-parallel group's size (the head sees tokens/ranks rows)."""
    name = "dit_head_in_split_invariant_chunks"
    head = getattr(transformer_weights, "head", None)
    if head is None or not callable(getattr(head, "apply", None)) or not fixes.wanted(name):
        return
    original = type(head).apply.__get__(head)
    previous = head.__dict__.get("apply")

    def apply(x: Any) -> Any:
        if x.dim() == 2:
            tokens = x.shape[0] * ranks
            parts = max(n for n in (1, 2, 4, 8) if tokens % n == 0)
            chunk = tokens // parts
            if chunk < x.shape[0] and x.shape[0] % chunk == 0:
                return _rows_in_chunks(original, x, chunk)
        return original(x)

    head.apply = apply

    fixes.record(name, f"DiT head over slices of tokens/8 rows ({ranks} rank{'s' if ranks > 1 else ''})",
                 undo=lambda: _restore_apply(head, previous), redo=lambda: setattr(head, "apply", apply))
