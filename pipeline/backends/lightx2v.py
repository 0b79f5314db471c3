"""The real backend: LightX2V's 4-step CFG-free distilled INT8 Wan2.1-T2V-14B.

This is the only module that imports LightX2V, and it does so inside functions: importing it costs
nothing and needs neither torch nor LightX2V (CPU CI, the doctor, the UI without a GPU).

Which rung settings LightX2V fixes when the runner is built (the rule is presets.build_settings),
and which we change per call (LightX2V f8aee98b; docs/lightx2v.md has the background):

build time (part of the LoadKey, a change reloads the weights)
  offload_granularity   WanTransformerWeights.register_offload_buffers allocates 2 CUDA block
                        buffers or 3 phase buffers (networks/wan/weights/transformer_weights.py:162-239)
                        and WanOffloadTransformerInfer.__init__ picks infer_with_blocks_offload or
                        infer_with_phases_offload (networks/wan/infer/offload/transformer_infer.py:13-35).
  dit_from_disk         the low-RAM rung: LightX2V's lazy_load (non-block weights in RAM, blocks read
                        from block_N.safetensors into two pinned buffers a block ahead), built once and
                        kept between requests (lightx2v_compat.dit_streamed_and_kept).
  text_encoder == "gpu" T5Encoder builds either the offload block buffers or resident int8 blocks
                        (input_encoders/hf/wan/t5/model.py:487-511), and T5EncoderModel loads them
                        accordingly (:815-857); "offload" and "offload_keep_embedding" share one build.
per call (set on the built objects before each run)
  text_encoder offload vs offload_keep_embedding: where the token embedding lives, our own
                        HostTokenEmbedding (pipeline/backends/lightx2v_compat.py, bug 5), `keep_on_device`.
  release_text_encoder  the text encoder is dropped after encoding and loaded again for the next prompt
                        (its 4.4 GB of pinned blocks and 2.1 GB embedding go back to the system).
  vae_offload           WanVAE.cpu_offload is read at each decode (video_encoders/hf/wan/vae.py:1566-1597);
                        we move the VAE between host and GPU to match (WanVAE.to_cpu/to_cuda, :1035-1049).
  vae_tiling            WanVAE.use_tiling is read at each decode (vae.py:1590).
  rope_chunk            each WanSelfAttention builds its `rope` (a ChunkedRope around the inner RoPE when
                        rope_chunk is set) at init (transformer_weights.py:365-368) and the blocks call
                        `phase.rope.apply` per step (networks/wan/infer/transformer_infer.py:312-315):
                        we swap that module on every self-attention weight module, CUDA buffers included.
  clean_cuda_cache      copied into attributes at init (networks/base_model.py:89, wan/infer/pre_infer.py:17,
                        post_infer.py:12, transformer_infer.py:45) and read per call (wan/model.py:260,
                        transformer_infer.py:215-506, offload/transformer_infer.py:64-90): we set all four.
  frames                config["target_video_length"] is read per run (wan_runner.py:913-925) ->
                        pipe.modify_config (pipeline.py:533-536).
  size, seed            generate(target_shape=..., seed=...) (pipeline.py:494, 515-516).
  shift                 WanStepDistillScheduler.sample_shift is read at each prepare
                        (schedulers/wan/step_distill/scheduler.py:15, 25-33).
fixed for the life of the runner (not a rung setting): steps (denoising_step_list, captured at
scheduler init, step_distill/scheduler.py:13-14), guidance (enable_cfg, pipeline.py:267-270),
quant scheme, attention backend.

Beyond LightX2V: progress and cancel hook into the runner (run_text_encoder / run_vae_decoder
wrappers, the step progress callback, and a cancel check before every DiT block, so a cancel on a
slow card waits for one block, not one step); a VAE decode that runs out of memory hands its latents
back (DecodeOutOfMemory); failures are cleaned up (recover, bug 6); the FFN runs over token
slices above 32,768 tokens (720p), which cuts 720p's peak by ~2.7 GiB at no cost; and the non-block
weights stay on the GPU from the first to the last step of a run instead of moving twice per step
(docs/benchmarks/2026-11-27-NVIDIA_H100_80GB_HBM3.md). Kernels (pipeline/backends/kernels.py,
hooked in by kernels.install at load): the self-attention kernel is measured per GPU and shape at its first call
and cached in the history database, the INT8 GEMM autotunes over tiles that fit the GPU's shared
memory, and RTX 40/50 cards get SageAttention 1.0.6's kernel; the record's model.kernels says which.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.backend import DecodeOutOfMemory, LoadKey, RunHooks
from pipeline.errors import BackendUnavailable, GenerationCancelled, NoGPUError, WeightsError
from pipeline.machine import hostmem
from pipeline.machine.gpu import GIB, GpuMonitor, is_oom
from pipeline.machine.software import module_present
from pipeline.backends.latent_preview import latents_to_rgb, preview_fps, stride_for
from pipeline.backends.lightx2v_compat import FUSION_NAMES
from pipeline.backends.weights_layout import DIT_DIR, TINY_VAE_NAMES, WeightsLayout, locate
from pipeline.types import Phase, Preview, PreviewKind, RunSpec
from presets import build_settings

log = logging.getLogger(__name__)

MODEL_ID = "lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v (distill_int8)"
LIGHTX2V_PINNED_COMMIT = "f8aee98b5462cca8d7288888146ebd95592bf266"
DENOISING_STEPS = [1000, 750, 500, 250]  # the distilled schedule; LightX2V captures it at init
# A tiny-VAE preview decodes latents of at most this many latent pixels on the longest side
# (8x as many pixels out): 256 px previews.
TINY_PREVIEW_LATENT_SIDE = 32
# 720x1280x81 has 75,600 tokens, 480x832x81 32,760: chunk 720p's FFN (3 slices), leave 480p alone.
FFN_CHUNK_TOKENS = 32768

INSTALL_HINT = ("Install the GPU requirements: `pip install -r requirements-gpu.txt`, then LightX2V itself "
                "(`pip install --no-deps \"lightx2v @ git+https://github.com/ModelTC/LightX2V@"
                f"{LIGHTX2V_PINNED_COMMIT}\"`); ./run.sh does both where nvidia-smi sees the GPU.")

# What `import lightx2v` needs (docs/lightx2v.md §4: `from lightx2v import LightX2VPipeline` imports
# every runner). Module names, checked with find_spec so a check does not import them.
REQUIRED_MODULES = ("lightx2v", "lightx2v_platform", "triton", "torchvision", "torchaudio", "loguru",
                    "diffusers", "transformers", "tokenizers", "safetensors", "accelerate", "einops",
                    "ftfy", "regex", "gguf", "yaml", "imageio", "imageio_ffmpeg", "cv2", "av", "decord",
                    "zmq", "prometheus_client", "pydantic", "requests", "PIL", "tqdm", "packaging")

QUANT_SCHEMES = {"int8-triton": None, "int8-vllm": "vllm", "int8-sgl": "sgl_kernel", "int8-torchao": "torchao"}
ATTN_MODES = {"sage_attn2": "sageattention", "torch_sdpa": None, "flash_attn2": "flash_attn",
              "flash_attn3": "flash_attn_interface"}


_has_module = module_present


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _lightx2v_commit() -> str | None:
    """The commit pip recorded for a `git+https://...@<commit>` install (PEP 610 direct_url.json)."""
    from importlib import metadata

    try:
        text = metadata.distribution("lightx2v").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        return json.loads(text).get("vcs_info", {}).get("commit_id")
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------
# Weights: pipeline/backends/weights_layout.py is the one rule (the tiny VAE is its optional `tiny_vae` field).


def tiny_vae_file(files: WeightsLayout) -> Path | None:
    """The tiny VAE (taehv for Wan 2.1) when it is installed, as the layout rule found it."""
    return files.tiny_vae


# ------------------------------------------------------------------------------------------------
# Backend


class LightX2VBackend:
    """Builds LightX2V's wan2.1_distill T2V runner; see the module doc for what a LoadKey holds."""

    name = "lightx2v"

    def __init__(self, weights_dir: Path | str, quant_scheme: str = "auto", attn_mode: str = "auto",
                 vram_cap_gib: float | None = None, *, compat_skip: frozenset[str] | set[str] = frozenset(),
                 ffn_chunk_tokens: int = FFN_CHUNK_TOKENS, resident: bool = False, attention: str = "auto",
                 kernel_store: Any = None, seq_parallel: int = 1):
        """`vram_cap_gib`: limit this process's PyTorch allocations to that many GiB (emulates a
        smaller card; leaves VRAM to other programs). `compat_skip`: compat fixes NOT to apply, for
        the GPU tests that prove each fix is needed. Never set it in the app. `ffn_chunk_tokens`:
        run the DiT FFN over token slices of at most this many tokens (0 = never; see
        lightx2v_compat.ffn_chunked_over_tokens). `resident`: no offload at all (DiT, T5 and VAE on
        the GPU, ~30 GB): only the benchmark's reference for step times. `attention`: "auto" measures
        the self-attention kernels per GPU (pipeline/backends/kernels.py), a backend name forces one
        (bench, bisecting); `kernel_store`: where measured choices persist (the history database).
        `seq_parallel`: N > 1 builds LightX2V's Ulysses sequence parallelism over N GPUs; only a GPU
        worker of a sequence-parallel group (pipeline/workers), which has joined its
        torch.distributed group, can load such a build. "auto" attention is then chosen by rank 0
        for every rank (`ranks`, which the worker sets to its group; the default group otherwise):
        each rank measuring on its own could pick different kernels for its heads."""
        if quant_scheme != "auto" and quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"quant_scheme must be 'auto' or one of {sorted(QUANT_SCHEMES)}, got {quant_scheme!r}")
        if attn_mode != "auto" and attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be 'auto' or one of {sorted(ATTN_MODES)}, got {attn_mode!r}")
        if vram_cap_gib is not None and vram_cap_gib <= 0:
            raise ValueError(f"vram_cap_gib must be positive, got {vram_cap_gib}")
        self.weights_dir = Path(weights_dir).expanduser()
        self.quant_scheme_requested = quant_scheme
        self.attn_mode_requested = attn_mode
        self.vram_cap_gib = vram_cap_gib
        self.compat_skip = frozenset(compat_skip)
        self.ffn_chunk_tokens = int(ffn_chunk_tokens)
        self.resident = bool(resident)
        from pipeline.backends import kernels

        if attention != "auto" and attention not in kernels.ALL_ATTENTION:
            raise ValueError(f"attention must be 'auto' or one of {list(kernels.ALL_ATTENTION)}, got {attention!r}")
        if int(seq_parallel) < 1:
            raise ValueError(f"seq_parallel must be at least 1, got {seq_parallel}")
        self.seq_parallel = int(seq_parallel)
        self.ranks: Any = None  # kernels.RankGroup of a sequence-parallel worker (set by the worker)
        self.attention = attention
        self.kernel_store = kernel_store
        self._selector: Any = None
        self._last_fixes: list[str] = []
        self._last_fix_details: dict[str, str] = {}

    def use_kernel_store(self, store: Any) -> None:
        """Persist measured kernel choices there (the app passes its History)."""
        self.kernel_store = store
        if self._selector is not None:
            self._selector.store = store

    # -- resolution of "auto" (cheap: find_spec only) --

    @property
    def quant_scheme(self) -> str:
        # int8-triton needs nothing beyond the triton that ships with Linux torch and compiles for
        # sm_86 (docs/lightx2v.md §3); the others are opt-in.
        return "int8-triton" if self.quant_scheme_requested == "auto" else self.quant_scheme_requested

    @property
    def attn_mode(self) -> str:
        if self.attn_mode_requested != "auto":
            return self.attn_mode_requested
        return "sage_attn2" if _has_module("sageattention") else "torch_sdpa"

    def check_available(self) -> None:
        if not _has_module("torch"):
            if GpuMonitor().facts() is None:
                # Installing the GPU packages would not help: say what is really missing.
                raise NoGPUError("No NVIDIA GPU was found on this machine (the NVIDIA driver does not "
                                 "answer), and generating needs one. The UI, the history and the "
                                 "System tab still work; `--backend fake` tries the UI with noise clips.")
            raise BackendUnavailable(f"PyTorch is not installed. {INSTALL_HINT}")
        import torch

        if not torch.version.cuda:
            raise NoGPUError(f"The installed PyTorch ({torch.__version__}) has no CUDA support; this app "
                             f"needs an NVIDIA GPU and a CUDA build of PyTorch. {INSTALL_HINT}")
        if not torch.cuda.is_available():
            raise NoGPUError("No NVIDIA GPU is visible to PyTorch (driver missing, too old for "
                             f"CUDA {torch.version.cuda}, or CUDA_VISIBLE_DEVICES hides it).")
        missing = [m for m in REQUIRED_MODULES if not _has_module(m)]
        quant_module = QUANT_SCHEMES[self.quant_scheme]
        if quant_module and not _has_module(quant_module):
            missing.append(f"{quant_module} (for quant scheme {self.quant_scheme})")
        attn_module = ATTN_MODES[self.attn_mode]
        if attn_module and not _has_module(attn_module):
            missing.append(f"{attn_module} (for attention {self.attn_mode})")
        if missing:
            raise BackendUnavailable(f"LightX2V cannot be imported: missing {', '.join(missing)}. {INSTALL_HINT}")
        locate(self.weights_dir)

    def load_key(self, memory: dict[str, Any]) -> LoadKey:
        # The rung's part (presets.build_settings; the preset book checked its values), and this
        # backend's own build choices.
        build = {"attn_mode": self.attn_mode, "quant_scheme": self.quant_scheme, **build_settings(memory)}
        if self.resident:
            build["resident"] = True
        if self.seq_parallel > 1:
            build["seq_p_size"] = self.seq_parallel
        return LoadKey(backend=self.name, weights_dir=str(self.weights_dir.resolve()),
                       build_settings=tuple(sorted(build.items())))

    def load(self, key: LoadKey, on_phase: Callable[[Phase], None]) -> "LightX2VModel":
        on_phase(Phase.LOADING)
        build = dict(key.build_settings)
        files = locate(key.weights_dir)
        torch = _import_torch_for_cuda()
        _apply_vram_cap(torch, self.vram_cap_gib)
        lx = _import_lightx2v()
        from pipeline.backends import kernels

        fixes = lx.compat.CompatFixes(skip=self.compat_skip)
        # Host memory (issue 15): weights pinned into packed slabs, .pth checkpoints memory-mapped.
        arena = lx.compat.pinned_weights_packed(fixes, lx.ops_utils, torch)
        lx.compat.checkpoints_memory_mapped(fixes, lx.lx_utils)
        started = time.perf_counter()
        pipe = None
        try:
            pipe = _build_pipeline(lx, fixes, files, build)
            if arena is not None:
                arena.close()
                log.info("pinned weights: %.2f GiB in slabs for %.2f GiB of tensors", arena.pinned_bytes / GIB,
                         arena.requested_bytes / GIB)
            model = LightX2VModel(pipe, fixes, build, files, torch, lx, ffn_chunk_tokens=self.ffn_chunk_tokens,
                                  arena=arena)
            self._selector = model.attention_selector = kernels.install(
                lx.compat, fixes, torch, build, model._runner.model.transformer_weights, sage_attn_module=lx.sage_attn_module,
                sageattention=lx.sageattention, triton_kernels=lx.triton_kernels, attention=self.attention,
                store=self.kernel_store, transformer_infer=model._runner.model.transformer_infer,
                rope_cls=lx.torch_complex_rope_cls, rms_module=lx.rms_norm_module,
                ranks=self._rank_group(build))
            _split_invariant(lx.compat, fixes, model._runner.model, build)
        except BaseException:
            # A failed build (OOM while loading, missing kernel...) must not keep pinned host memory
            # or GPU buffers: the cache rolls back to the previous model right after this.
            pipe = None
            if arena is not None:
                arena.close()  # the arena must not keep the failed load's slabs alive
            gc.collect()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            lx.compat.release_cached_pinned_memory(torch)
            raise
        self._last_fixes = fixes.names
        self._last_fix_details = {fix.name: fix.detail for fix in fixes.applied}
        log.info("LightX2V pipeline built in %.1f s (%s); compat fixes: %s", time.perf_counter() - started,
                 ", ".join(f"{k}={v}" for k, v in sorted(build.items())), fixes.names or "none")
        return model

    def _rank_group(self, build: dict[str, Any]) -> Any:
        """The ranks that run one attention kernel: none on one GPU; a sequence-parallel build's
        group (the worker's small gloo group, else the default group it joined)."""
        if build.get("seq_p_size", 1) <= 1:
            return None
        if self.ranks is None:
            import torch.distributed as dist
            from pipeline.backends import kernels

            self.ranks = kernels.rank_group(dist)
        return self.ranks

    def tiny_vae(self) -> str | None:
        try:
            found = tiny_vae_file(locate(self.weights_dir))
        except WeightsError:
            return None
        return found.name if found is not None else None

    def describe(self) -> dict[str, Any]:
        synthetic = None
        try:
            synthetic = locate(self.weights_dir).synthetic
        except WeightsError:
            pass
        return {
            "backend": self.name,
            "model_id": MODEL_ID,
            "weights_dir": str(self.weights_dir),
            "synthetic_weights": synthetic,
            "lightx2v_version": _dist_version("lightx2v"),
            "lightx2v_commit": _lightx2v_commit() or os.environ.get("WAN_STUDIO_LIGHTX2V_COMMIT"),
            "torch": _dist_version("torch"),
            "cuda": _torch_cuda_version(),
            "triton": _dist_version("triton"),
            "sageattention": _dist_version("sageattention"),
            "quant_scheme": self.quant_scheme,
            "attn_mode": self.attn_mode,
            "vram_cap_gib": self.vram_cap_gib,
            **({"seq_parallel": {"seq_p_size": self.seq_parallel, "seq_p_attn_type": "ulysses"}}
               if self.seq_parallel > 1 else {}),
            "compat_fixes": list(self._last_fixes),
            "kernels": {"attention_requested": self.attention,
                        "attention": self._selector.summary() if self._selector is not None else [],
                        **{name: self._last_fix_details[name] for name in _KERNEL_FIXES if name in self._last_fix_details}},
        }


_KERNEL_FIXES = ("attention_chosen_by_measurement", "int8_gemm_tiles_for_this_gpu", "sage_attention_on_sm89_sm120",
                 *FUSION_NAMES)


def _torch_cuda_version() -> str | None:
    torch = sys.modules.get("torch")
    return getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None


def _import_torch_for_cuda():
    # docs/lightx2v.md §2: expandable segments decide whether 720p fits. LightX2V only
    # setdefault()s it when lightx2v.pipeline is imported (pipeline.py:8), which is too late if
    # anything touched CUDA before; the app should export it before Python starts. We set the
    # default here and, if CUDA is already up without it, switch the allocator at runtime.
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" not in conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(filter(None, [conf, "expandable_segments:True"]))
    import torch

    if "expandable_segments" not in conf and torch.cuda.is_initialized():
        try:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
            log.warning("CUDA was initialised before PYTORCH_CUDA_ALLOC_CONF was set; switched the "
                        "allocator to expandable segments at runtime. Export it before starting Python.")
        except (AttributeError, RuntimeError):
            log.warning("could not enable expandable segments; 720p may not fit", exc_info=True)
    return torch


def _apply_vram_cap(torch: Any, cap_gib: float | None) -> None:
    if cap_gib is None:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = cap_gib * GIB / total
    if fraction >= 1.0:
        log.info("VRAM cap %.2f GiB is not below the card's %.2f GiB; not capping", cap_gib, total / GIB)
        return
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    log.info("PyTorch capped at %.2f GiB of %.2f GiB (fraction %.4f)", cap_gib, total / GIB, fraction)


@dataclass
class _LightX2VModules:
    compat: Any
    input_info: Any
    pipeline_cls: Any
    mm_weight_register: Any
    pre_infer_cls: Any
    t5_encoder_cls: Any
    default_runner_cls: Any
    wan_runner_cls: Any
    chunked_rope_cls: Any
    sage_attn_module: Any = None
    sageattention: Any = None
    triton_kernels: Any = None
    ops_utils: Any = None  # lightx2v.common.ops.utils (pinned tensors)
    lx_utils: Any = None  # lightx2v.utils.utils (checkpoint loading)
    torch_complex_rope_cls: Any = None  # the RoPE LightX2VPipeline builds by default (fused)
    rms_norm_module: Any = None  # lightx2v.common.ops.norm.rms_norm_weight (q/k RMSNorm, fused)


def _import_lightx2v() -> _LightX2VModules:
    from pipeline.backends import lightx2v_compat as compat

    try:
        from lightx2v.utils import input_info  # runs lightx2v/__init__: every runner (notes §8)
        from lightx2v import LightX2VPipeline
        from lightx2v.common.ops.rope.chunked_rope import ChunkedRope
        from lightx2v.common.ops.rope.torch_rope import TorchComplexRope
        import lightx2v.common.ops.norm.rms_norm_weight as rms_norm_module
        from lightx2v.models.input_encoders.hf.wan.t5.model import T5Encoder
        from lightx2v.models.networks.wan.infer.pre_infer import WanPreInfer
        from lightx2v.models.runners.default_runner import DefaultRunner
        from lightx2v.models.runners.wan.wan_runner import WanRunner
        from lightx2v.utils.registry_factory import MM_WEIGHT_REGISTER
        import lightx2v.common.ops.utils as ops_utils
        import lightx2v.utils.utils as lx_utils
    except ImportError as exc:
        raise BackendUnavailable(f"LightX2V could not be imported ({exc}). {INSTALL_HINT}") from exc
    kernel_modules = {}
    for field_name, module_name in (("sage_attn_module", "lightx2v.common.ops.attn.sage_attn"),
                                    ("sageattention", "sageattention"),
                                    ("triton_kernels", "lightx2v.common.ops.mm.triton_kernels")):
        try:
            kernel_modules[field_name] = importlib.import_module(module_name)
        except ImportError:
            kernel_modules[field_name] = None  # the hook that needs it does nothing
    return _LightX2VModules(**kernel_modules, compat=compat, input_info=input_info, pipeline_cls=LightX2VPipeline,
                            mm_weight_register=MM_WEIGHT_REGISTER, pre_infer_cls=WanPreInfer,
                            t5_encoder_cls=T5Encoder, default_runner_cls=DefaultRunner,
                            wan_runner_cls=WanRunner, chunked_rope_cls=ChunkedRope, ops_utils=ops_utils,
                            lx_utils=lx_utils, torch_complex_rope_cls=TorchComplexRope,
                            rms_norm_module=rms_norm_module)


def _build_pipeline(lx: _LightX2VModules, fixes: Any, files: WeightsLayout, build: dict[str, Any]) -> Any:
    compat = lx.compat
    compat.keep_target_video_length_in_config(fixes, lx.input_info)
    pipe = lx.pipeline_cls(model_path=str(files.root), model_cls="wan2.1_distill", task="t2v")
    scheme = build["quant_scheme"]
    quantize = {"dit_quantized": True, "dit_quantized_ckpt": str(files.dit_dir), "quant_scheme": scheme,
                "text_encoder_quantized": True}
    compat.explicit_t5_checkpoint_path(fixes, lx.pipeline_cls, quantize, str(files.t5))
    pipe.enable_quantize(**quantize)
    t5_offload = bool(build["text_encoder_offload"])
    if scheme == "int8-sgl" and not t5_offload:
        # The resident T5 uses the q_linear classes, which have no int8-sgl kernel (notes §3).
        pipe.t5_quant_scheme = "int8-triton"
        log.info("T5 resident on the GPU: using int8-triton for it (int8-sgl has no resident T5 kernel)")
    # The VAE is built on the host; vae_offload is applied per call (module doc).
    pipe.enable_offload(cpu_offload=not build.get("resident", False), offload_granularity=build["offload_granularity"],
                        text_encoder_offload=t5_offload, vae_offload=True)
    pipe.vae_path = str(files.vae)
    pipe.t5_tokenizer_path = str(files.tokenizer)
    if build.get("dit_from_disk"):
        pipe.lazy_load = True  # copied into the config by create_generator (set_args2config)
    if build.get("seq_p_size", 1) > 1:
        _enable_sequence_parallel(lx, fixes, pipe, int(build["seq_p_size"]))
    compat.t2v_without_image_encoder(fixes, pipe, lx.pre_infer_cls)
    if t5_offload:
        compat.t5_offload_linear_bias_default(fixes, lx.mm_weight_register, pipe.t5_quant_scheme)
    compat.reset_runner_after_exception(fixes, ((lx.default_runner_cls, "run_main"),
                                                (lx.wan_runner_cls, "_run_pipeline_local"),
                                                (lx.wan_runner_cls, "run_pipeline")))
    if build["attn_mode"] == "torch_sdpa" and _has_module("sageattention") is False:
        log.warning("sageattention is not installed: using torch_sdpa attention (slower). "
                    "`pip install sageattention==1.0.6` enables sage_attn2.")
    pipe.create_generator(attn_mode=build["attn_mode"], infer_steps=len(DENOISING_STEPS), num_frames=81,
                          height=480, width=832, guidance_scale=1.0, sample_shift=5.0,
                          denoising_step_list=list(DENOISING_STEPS))
    if build.get("dit_from_disk"):
        compat.dit_streamed_and_kept(fixes, pipe, lx.default_runner_cls)
        if getattr(pipe.runner, "model", None) is None:
            raise BackendUnavailable("This LightX2V builds the streamed (lazy_load) DiT per request, which the "
                                     "low-RAM settings cannot use; the compat fix dit_streamed_and_kept is off.")
        compat.streamed_scales_and_biases_match_resident(fixes, lx.mm_weight_register[scheme],
                                                         pipe.runner.model.transformer_weights)
    return pipe


def _enable_sequence_parallel(lx: _LightX2VModules, fixes: Any, pipe: Any, size: int) -> None:
    """Ulysses over `size` ranks. The VAE decode stays whole on every rank (vae_parallel off):
    LightX2V's split decode ignores the tiling rungs (vae.py:1566-1590), so the memory ladder's
    decode settings would not apply, and its seams would change the frames against one GPU."""
    import torch.distributed as dist
    import lightx2v.utils.set_config as set_config
    from lightx2v_platform.registry_factory import PLATFORM_DEVICE_REGISTER

    if not dist.is_initialized() or dist.get_world_size() != size:
        raise BackendUnavailable(f"A sequence-parallel build over {size} GPUs loads only inside a GPU worker of "
                                 f"such a group (python app.py --gpus ... --multi-gpu seq).")
    lx.compat.parallel_env_initialised_once(fixes, PLATFORM_DEVICE_REGISTER, dist,
                                            os.environ.get("PLATFORM", "cuda"), set_config=set_config)
    pipe.enable_parallel(seq_p_size=size, seq_p_attn_type="ulysses")
    pipe.parallel["vae_parallel"] = False


def _split_invariant(compat: Any, fixes: Any, wan_model: Any, build: dict[str, Any]) -> None:
    """What makes a clip split over N GPUs the clip of one GPU, bit for bit where the arithmetic
    allows (issue 14; lightx2v_compat.SPLIT_INVARIANT_NAMES): the DiT head in slices every split
    shares (one GPU too), and on a sequence-parallel build the cross-attention in one GPU's query
    blocks. The third, SageAttention's key mean, comes with the attention selector (kernels.install)."""
    ranks = int(build.get("seq_p_size", 1))
    compat.dit_head_in_split_invariant_chunks(fixes, wan_model.transformer_weights, ranks)
    if ranks > 1:
        import torch.distributed as dist

        compat.seq_cross_attention_in_one_gpu_blocks(fixes, wan_model, wan_model.transformer_weights, dist,
                                                     getattr(wan_model.transformer_infer, "seq_p_group", None))


# ------------------------------------------------------------------------------------------------
# Loaded model


class _Cancelled(Exception):
    """Raised by our block wrapper when the user cancelled; never leaves this module."""


@dataclass
class _Call:
    hooks: RunHooks
    total_steps: int
    steps_done: int = 0
    cancel_seen: bool = False
    decode_oom: tuple[Any, str] | None = None  # (latents on the host, message)
    spec: RunSpec | None = None
    preview: PreviewKind | None = None  # what the next preview uses (a failing tiny VAE steps down)
    draft: bool = False  # decode with the tiny VAE
    keep_latents: bool = False  # hand the final latents to hooks.on_latents before decoding

    def should_stop(self) -> bool:
        if not self.cancel_seen and self.hooks.should_stop():
            self.cancel_seen = True
        return self.cancel_seen


class LightX2VModel:
    """A built LightX2V runner plus the per-call plumbing (settings, progress, cancel, OOM)."""

    def __init__(self, pipe: Any, fixes: Any, build: dict[str, Any], files: WeightsLayout, torch: Any,
                 lx: _LightX2VModules, ffn_chunk_tokens: int = 0, arena: Any = None):
        self._pipe = pipe
        self._runner = pipe.runner
        self._torch = torch
        self.compat = fixes
        self.build = dict(build)
        self.files = files
        self._call: _Call | None = None
        self._dirty = False
        self._recovered = True  # nothing has run since the last recover(): a second one is a no-op
        self._compat = lx.compat
        self._chunked_rope_cls = lx.chunked_rope_cls
        self._t5_encoder_cls = lx.t5_encoder_cls
        self.arena = arena  # the packed pinned slabs (None when upstream pins per tensor)
        self.release_text_encoder = False  # per call (the low-RAM rung): drop it after encoding
        self.text_encoder_loads = 0  # loads after the build (tests)
        self.host_embedding = None
        self.attention_selector = None  # set at load (kernels.install) where the measured attention is on
        if build["text_encoder_offload"]:
            self.host_embedding = lx.compat.t5_token_embedding_on_host(fixes, self._runner, lx.t5_encoder_cls,
                                                                       str(files.t5))
        lx.compat.ffn_chunked_over_tokens(fixes, self._runner.model.transformer_infer, ffn_chunk_tokens)
        lx.compat.non_block_weights_kept_for_the_run(fixes, self._runner.model)
        lx.compat.streamed_blocks_ordered_on_the_gpu(fixes, self._runner.model.transformer_infer, torch)
        self._step_tap = lx.compat.clean_latents_estimate_after_each_step(fixes, self._runner.scheduler)
        self._tiny_path = tiny_vae_file(files)
        self._tiny: Any = None  # built at its first use (draft decode or preview)
        self._install_wrappers()

    # -- public protocol --

    @property
    def compat_fixes(self) -> list[str]:
        return self.compat.names

    def generate(self, spec: RunSpec, hooks: RunHooks) -> np.ndarray:
        self._check_build(spec)
        if self._dirty:
            self.recover()
        self._recovered = False  # from here on, a failure leaves something to recover
        runner = self._runner
        self._apply_per_call(spec.memory)
        self._pipe.modify_config({"target_video_length": spec.frames})
        runner.scheduler.sample_shift = float(spec.shift)
        call = _Call(hooks, total_steps=runner.scheduler.infer_steps, spec=spec,
                     preview=self._preview_kind(spec.preview), draft=self._draft(spec), keep_latents=True)
        runner.set_progress_callback(self._progress_callback)
        if self._step_tap is not None and call.preview is not None:
            self._step_tap.callback = self._on_step_state
        try:
            result = self._guarded(call, lambda: self._pipe.generate(
                seed=int(spec.seed), prompt=spec.prompt, negative_prompt=spec.negative_prompt,
                save_result_path=None, return_result_tensor=True, target_shape=[spec.height, spec.width]))
        finally:
            runner.set_progress_callback(None)
            if self._step_tap is not None:
                self._step_tap.callback = None
        video = result["video"]
        result = None
        self._drop_run_outputs()
        frames = _comfy_video_to_uint8(video, self._torch)
        del video
        self._torch.cuda.empty_cache()
        return frames

    def decode(self, latents: Any, spec: RunSpec, hooks: RunHooks) -> np.ndarray:
        """Decode latents kept from a DecodeOutOfMemory with `spec.memory`'s VAE settings."""
        torch = self._torch
        if self._dirty:
            self.recover()
        self._recovered = False  # from here on, a failure leaves something to recover
        self._apply_per_call(spec.memory)
        call = _Call(hooks, total_steps=0, spec=spec, draft=self._draft(spec))
        images = self._guarded(call, lambda: self._runner.run_vae_decoder(latents.to("cuda")),
                               host_latents=latents)
        frames = _vae_output_to_uint8(images, torch)
        del images
        torch.cuda.empty_cache()
        return frames

    def _guarded(self, call: _Call, work: Callable[[], Any], host_latents: Any = None) -> Any:
        """Run one call into LightX2V. An expected failure (cancel, OOM, decode OOM) is recovered
        from once the except block has let go of the traceback, then raised as its own error;
        anything else is re-raised as it is and the runner is recovered before its next call.
        `host_latents`: the caller's host copy of the latents, handed back on a decode OOM."""
        self._call = call
        failure = None
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
            failure = self._classify(exc, call)
            if failure is None:
                self._dirty = True
                raise
        finally:
            self._call = None
        # Outside the except block: the traceback (and the GPU tensors its frames hold) is gone.
        self.recover()
        if host_latents is not None and failure[0] == "decode_oom":
            failure = ("decode_oom", host_latents, failure[2])
        _raise_failure(failure, call, self._torch)

    def recover(self) -> None:
        """Clean state after any exception (bug 6), so the next run honours its seed and starts
        the block-offload double buffer from block 0; then give cached GPU memory back. A no-op
        when nothing ran since the last one: the service recovers after every failure, and a
        cancel or OOM was already recovered from here (each recovery synchronises, collects and,
        on the low-RAM rung, reads the first block from disk again)."""
        torch = self._torch
        runner = self._runner
        self._call = None
        if runner is None or self._recovered:
            return
        if self.compat.has("reset_runner_after_exception"):
            self._compat.reset_runner_state(runner)
        if self.compat.has("non_block_weights_kept_for_the_run"):
            # A run stopped between two steps (a cancel at the step boundary) kept them.
            self._compat.release_non_block_weights(runner.model)
        # Our cancel sets it; LightX2V never resets it (models/runners/base_runner.py:352-389).
        runner.stop_signal = False
        runner.set_progress_callback(None)
        if self.host_embedding is not None and not self.host_embedding.keep_on_device:
            self.host_embedding.drop_device_copy()
        self._drop_run_outputs()
        try:
            # Blocks ordered on the GPU (streamed_blocks_ordered_on_the_gpu) may still be running
            # when one raises: nothing may refill the offload buffers before they are done.
            torch.cuda.synchronize()
        except RuntimeError:
            log.warning("CUDA synchronize failed during recovery", exc_info=True)
        gc.collect()
        torch.cuda.empty_cache()
        self._dirty = False
        self._recovered = True

    def release(self) -> None:
        # LightX2V gc.freeze()s the object graph after its first successful run
        # (base_runner.py:90-107); frozen objects are never collected, so unfreeze first.
        gc.unfreeze()
        self._call = None
        self._tiny = None
        if self.host_embedding is not None:
            self.host_embedding.drop_device_copy()
        self.host_embedding = None
        if self._pipe is not None:
            self._pipe.runner = None
        self._runner = None
        self._pipe = None
        self.arena = None
        # Whoever still holds this model (a caller's local variable during a ladder step, a test)
        # must not keep the weights alive: everything that references the runner's parts goes.
        self.compat.forget()
        self.attention_selector = None
        self._step_tap = None
        gc.collect()
        torch = self._torch
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        # Freed pinned blocks stay cached in torch for reuse; the next load may need that RAM.
        self._compat.release_cached_pinned_memory(torch)

    # -- per call --

    def _check_build(self, spec: RunSpec) -> None:
        # Not a request check (presets are checked when loaded): the cache must have reloaded when
        # the rung's build-time settings changed, and running on the wrong build would be silent.
        if any(self.build.get(k) != v for k, v in build_settings(spec.memory).items()):
            raise ValueError(f"memory settings {spec.memory} need another build than this one ({self.build}); "
                             f"the cache should have reloaded")

    def _apply_per_call(self, memory: dict[str, Any]) -> None:
        runner = self._runner
        model = runner.model
        # clean_cuda_cache (module doc for where it is read)
        clean = bool(memory.get("clean_cuda_cache", False))
        for obj in (model, model.pre_infer, model.post_infer, model.transformer_infer):
            obj.clean_cuda_cache = clean
        self._set_rope_chunk(int(memory.get("rope_chunk", 0) or 0))
        vae = runner.vae_decoder
        vae.use_tiling = bool(memory.get("vae_tiling", False))
        offload_vae = bool(memory.get("vae_offload", False))
        vae.cpu_offload = offload_vae
        if offload_vae and _module_device(vae.model) != "cpu":
            vae.to_cpu()  # off the GPU for the DiT phase; decode moves it in and out
        self.release_text_encoder = bool(memory.get("release_text_encoder", False))
        self._keep_embedding = memory.get("text_encoder", "offload") == "offload_keep_embedding"
        if self.host_embedding is not None:
            self.host_embedding.keep_on_device = self._keep_embedding
            if not self._keep_embedding:
                self.host_embedding.drop_device_copy()

    # -- the text encoder, released after encoding on the low-RAM rung --

    def _ensure_text_encoder(self) -> None:
        runner = self._runner
        if getattr(runner, "text_encoders", None):
            return
        if self.arena is not None:
            self.arena.close()  # its own slabs, freed together when it is released again
        runner.text_encoders = runner.load_text_encoder()
        if self.arena is not None:
            self.arena.close()
        self.text_encoder_loads += 1
        if self.build["text_encoder_offload"]:
            self.host_embedding = self._compat.t5_token_embedding_on_host(self.compat, runner, self._t5_encoder_cls,
                                                                          str(self.files.t5))
            if self.host_embedding is not None:
                self.host_embedding.keep_on_device = getattr(self, "_keep_embedding", False)

    def _drop_text_encoder(self) -> None:
        """Give the text encoder's host memory back (4.4 GB pinned blocks, 2.1 GB embedding)."""
        if self.host_embedding is not None:
            self.host_embedding.drop_device_copy()
        self.host_embedding = None
        # The embedding fix's undo/redo hold the encoder: without this its blocks stay pinned.
        self.compat.forget("t5_token_embedding_on_host")
        self._runner.text_encoders = None
        gc.collect()
        self._compat.release_cached_pinned_memory(self._torch)

    def _set_rope_chunk(self, chunk: int) -> None:
        for holder in _rope_holders(self._runner.model.transformer_weights):
            current = holder.rope
            inner = current.inner if isinstance(current, self._chunked_rope_cls) else current
            wanted = self._chunked_rope_cls(inner=inner, chunk_size=chunk) if chunk > 0 else inner
            if chunk > 0 and isinstance(current, self._chunked_rope_cls) and current.chunk_size == chunk:
                continue
            if chunk <= 0 and current is inner:
                continue
            holder.add_module("rope", wanted)  # WeightModule.add_module sets _modules and the attribute

    def _progress_callback(self, percent: float, total: float) -> None:
        call = self._call
        if call is None:
            return
        n = call.total_steps
        step = min(n, max(0, round(percent / 100.0 * n)))
        call.steps_done = step
        call.hooks.on_step(step, n)
        if call.should_stop():
            # LightX2V checks it at the next step boundary (default_runner.py:241-242).
            self._runner.stop_signal = True

    # -- previews and the tiny VAE --

    def _preview_kind(self, wanted: PreviewKind | None) -> PreviewKind | None:
        if wanted is PreviewKind.TINY_VAE and self._tiny_path is None:
            return PreviewKind.LINEAR
        return wanted

    def _draft(self, spec: RunSpec) -> bool:
        # The border refused drafts without a tiny VAE; this build found none when it was loaded.
        if spec.draft and self._tiny_path is None:
            raise WeightsError(f"'Draft decode' needs the tiny VAE ({' or '.join(TINY_VAE_NAMES)}) in "
                               f"{self.files.root} or its {DIT_DIR}/ folder; this build found none.")
        return bool(spec.draft)

    def _tiny_vae(self) -> Any:
        """LightX2V's tiny VAE (what `use_tae` with `tae_path` builds in WanRunner.load_vae_decoder),
        built once and kept on the GPU: its weights are ~22 MB."""
        if self._tiny is None:
            runner = self._runner
            cls = getattr(runner, "tiny_vae_cls", None)
            if cls is None or self._tiny_path is None:
                raise BackendUnavailable("This LightX2V runner has no tiny VAE; untick 'Draft decode'.")
            self._tiny = cls(vae_path=str(self._tiny_path), device=runner.init_device,
                             need_scaled=False).to("cuda")
            log.info("tiny VAE built from %s", self._tiny_path)
        return self._tiny

    def _on_step_state(self, state: Any) -> None:
        """After each step (the compat tap): a small preview of x0 = x_t - sigma * v. A preview
        must never fail the run: one that fails falls back to the linear factors, then to none."""
        call = self._call
        if call is None or call.preview is None or call.spec is None:
            return
        kind = call.preview
        started = time.perf_counter()
        frames = None
        failed: str | None = None
        try:
            frames = self._preview_frames(kind, state)
        except Exception as exc:  # noqa: BLE001 - any preview failure (OOM included) just stops previews
            failed = f"{type(exc).__name__}: {exc}"
        if failed is not None:
            log.warning("%s preview failed (%s); %s", kind.value, failed[:200],
                        "using the linear factors" if kind is PreviewKind.TINY_VAE else "no more previews")
            call.preview = PreviewKind.LINEAR if kind is PreviewKind.TINY_VAE else None
            self._torch.cuda.empty_cache()
            return
        spec = call.spec
        call.hooks.on_preview(Preview(step=state.step_index + 1, total=state.total, frames=frames,
                                      kind=kind, fps=preview_fps(16, spec.frames, len(frames)),
                                      cost_ms=round((time.perf_counter() - started) * 1000, 3)))

    def _preview_frames(self, kind: PreviewKind, state: Any) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            _, _, height, width = state.latents.shape
            if kind is PreviewKind.LINEAR:
                # x0 only at the pixels the preview shows: a few MB, not the 19 MB tensor at 720p.
                return latents_to_rgb(state.x0(stride_for(height, width)))
            # The tiny VAE on latents of at most 32 pixels a side (256 px out) and every 4th decoded
            # frame: a fraction of a full-size tiny decode.
            x0 = state.x0(stride_for(height, width, TINY_PREVIEW_LATENT_SIDE))
            images = self._tiny_vae().decode(x0.to(torch.bfloat16))  # [1, 3, T, h, w] in [-1, 1]
            del x0
            return _vae_output_to_uint8(images[:, :, ::4], torch)

    # -- wrappers installed once on the runner --

    def _install_wrappers(self) -> None:
        runner = self._runner
        original_text = runner.run_text_encoder
        original_decode = runner.run_vae_decoder
        infer = runner.model.transformer_infer

        def run_text_encoder(input_info):
            call = self._call
            if call is not None:
                call.hooks.on_phase(Phase.TEXT_ENCODING)
            self._ensure_text_encoder()
            out = original_text(input_info)
            if self.release_text_encoder:
                self._drop_text_encoder()
            if call is not None:
                if call.should_stop():
                    raise _Cancelled()
                call.hooks.on_phase(Phase.DENOISING)
            return out

        def run_vae_decoder(latents):
            call = self._call
            if call is not None:
                if call.should_stop():
                    raise _Cancelled()
                if call.keep_latents:
                    # Exactly what the decode receives, on the host (19 MB at 720p): decoding it
                    # again later ("finish at full quality") gives the same frames.
                    call.hooks.on_latents(latents.detach().to("cpu"))
                call.hooks.on_phase(Phase.DECODING)
            vae = runner.vae_decoder
            draft = call is not None and call.draft
            if draft:
                # The tiny VAE stands in for this one decode; the full VAE stays where it is.
                runner.vae_decoder = self._tiny_vae()
            elif not vae.cpu_offload and _module_device(vae.model) == "cpu":
                vae.to_cuda()  # the rung keeps the VAE resident; it moves in at the first decode
            # The denoising pass's freed activations stay in PyTorch's cache, in sizes the VAE's
            # buffers do not reuse: without this the decode's peak is the DiT's cache plus the VAE's
            # (measured 2026-11-30, 480x832x81 fast rung: 6.29 GiB reserved after the steps, 10.29
            # at the decode, where the decode alone peaks at 5.27).
            self._torch.cuda.empty_cache()
            try:
                return original_decode(latents)
            except Exception as exc:
                if call is not None and is_oom(exc) and not hostmem.is_host_oom(exc):
                    # Keep the final latents (small: 16 x T/4 x H/8 x W/8) so the service can decode
                    # them again on a leaner rung without re-running the steps.
                    call.decode_oom = (latents.detach().to("cpu"), f"{type(exc).__name__}: {exc}")
                raise
            finally:
                runner.vae_decoder = vae

        def guard(original):
            def run(*args, **kwargs):
                call = self._call
                if call is not None and call.should_stop():
                    raise _Cancelled()  # between blocks: recover() re-initialises the offload buffers
                return original(*args, **kwargs)

            return run

        runner.run_text_encoder = run_text_encoder
        runner.run_vae_decoder = run_vae_decoder
        infer.run_block = guard(infer.run_block)
        if hasattr(infer, "run_phase"):
            infer.run_phase = guard(infer.run_phase)

    # -- helpers --

    def _classify(self, exc: BaseException, call: _Call) -> tuple[str, Any, str] | None:
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, _Cancelled) or call.cancel_seen or "stop_signal" in str(exc):
            return ("cancel", None, message)
        if call.decode_oom is not None:
            latents, oom_message = call.decode_oom
            call.decode_oom = None
            return ("decode_oom", latents, oom_message)
        if hostmem.is_host_oom(exc):
            # Before is_oom (which also counts it): the ladder steps down by RAM, not by VRAM, and
            # the clues (MemoryError, a pinning frame on the stack) die with this traceback.
            log.warning("system RAM ran out: %s", message)
            return ("host_oom", None, message)
        if is_oom(exc):
            log.warning("GPU out of memory: %s", message)
            return ("oom", None, message)
        log.exception("LightX2V run failed")
        return None

    def _drop_run_outputs(self) -> None:
        # The runner keeps the last VAE output (on the GPU without vae_offload) until the next run
        # (default_runner.py:472-475, base_runner.py:266-267): 0.45 GB at 720p.
        runner = self._runner
        if runner is not None:
            runner.gen_video = None
            runner.gen_video_final = None


def _raise_failure(failure: tuple[str, Any, str], call: _Call, torch: Any) -> None:
    kind, latents, message = failure
    if kind == "cancel":
        raise GenerationCancelled(f"Cancelled after step {call.steps_done} of {call.total_steps}.")
    if kind == "decode_oom":
        raise DecodeOutOfMemory(latents, message)
    if kind == "host_oom":
        raise hostmem.HostOutOfMemory(message)
    # A fresh exception without the failed run's traceback, so holding it keeps no GPU memory.
    raise torch.OutOfMemoryError(message)


def _rope_holders(weights: Any) -> list[Any]:
    """Every weight module that owns a `rope` (the self-attention phase of each block and of the
    CUDA offload buffers)."""
    from pipeline.backends.lightx2v_compat import weight_module_tree

    return [obj for obj, modules in weight_module_tree(weights) if "rope" in modules]


def _module_device(module: Any) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


def _comfy_video_to_uint8(video: Any, torch: Any, chunk: int = 8) -> np.ndarray:
    """[T, H, W, 3] float in [0, 1] (LightX2V's return_result_tensor) -> uint8, a few frames at a
    time so the float copy never holds the whole clip."""
    t, h, w, c = video.shape
    out = np.empty((t, h, w, c), dtype=np.uint8)
    for i in range(0, t, chunk):
        part = video[i:i + chunk].float().mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        out[i:i + chunk] = part.cpu().numpy()
    return out


def _vae_output_to_uint8(images: Any, torch: Any, chunk: int = 8) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] (WanVAE.decode) -> uint8 [T, H, W, 3], with the same arithmetic
    as LightX2V's wan_vae_to_comfy (bf16 (x+1)/2, clamp) so both paths give identical frames."""
    video = images[0]
    _, t, h, w = video.shape
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(0, t, chunk):
        part = video[:, i:i + chunk].clone().add_(1.0).mul_(0.5).clamp_(0.0, 1.0).permute(1, 2, 3, 0)
        out[i:i + chunk] = part.float().mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
    return out
