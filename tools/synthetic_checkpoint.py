"""Synthetic Wan2.1-T2V-14B checkpoints in LightX2V's `distill_int8` layout, FOR TESTS AND SIZING ONLY.

The files have exactly the names, keys, dtypes and shapes of
`lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v` (the layout of its distill_int8/ folder),
so LightX2V loads them with its real loaders and runs its real kernels on them. The values are
random: the videos are noise. Timings and memory measured on them are real, because kernel speed
and tensor sizes do not depend on the values.

    python -m tools.synthetic_checkpoint --size tiny OUT_DIR      # 2 blocks, dim 256
    python -m tools.synthetic_checkpoint --size full OUT_DIR      # 40 blocks, dim 5120 (~14 GB DiT)

Layout written:

    OUT_DIR/README.txt                                   "for tests and sizing only"
    OUT_DIR/distill_int8/config.json                     the DiT config LightX2V merges in
    OUT_DIR/distill_int8/block_{i}.safetensors           int8 linears + fp32 scales/biases/norms
    OUT_DIR/distill_int8/non_block.safetensors           fp32 embeddings, time projection, head
    OUT_DIR/distill_int8/models_t5_umt5-xxl-enc-int8.pth umt5-xxl encoder, int8 (6.7 GB, any size)
    OUT_DIR/distill_int8/Wan2.1_VAE.pth                  Wan VAE state dict (194 keys, 126.9 M params)
    OUT_DIR/google/umt5-xxl/                             a toy WordLevel tokenizer
    OUT_DIR/distill_int8/taew2_1.pth                     with --tiny-vae: the tiny VAE (taehv for Wan
                                                         2.1; 128 keys, 11.3 M params) for draft
                                                         decodes and previews

The T5 and VAE are the same for `tiny` and `full` (LightX2V hard-codes umt5-xxl and the Wan VAE
architecture), so they cannot be shrunk; `include_t5=False` / `include_vae=False` skip them (CPU
tests), and `share_t5_vae_from` links them from another synthetic checkpoint instead of writing
6.7 GB twice.

This module never imports LightX2V: the VAE key/shape list is generated from the architecture rules
of LightX2V's `WanVAE_` (lightx2v/models/video_encoders/hf/wan/vae.py:202-545 at f8aee98b) and the
T5 list from `umt5_xxl` (t5/model.py:769-783); tests/test_synthetic_checkpoint.py pins the counts.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import math
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.backends import weights_layout

log = logging.getLogger(__name__)

WARNING_TEXT = (
    f"{weights_layout.SYNTHETIC_MARK} - FOR TESTS AND SIZING ONLY.\n"
    "Every weight in this folder is random. It has the exact file layout, tensor names, dtypes and\n"
    "shapes of lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v (distill_int8), so LightX2V\n"
    "loads and runs it, and its speed and memory use are real, but every video it makes is noise.\n"
    "Do not point Wan T2V Studio at this folder for real use.\n"
)

# The names the layout rule looks for (one rule: pipeline/backends/weights_layout.py).
DIT_DIR = weights_layout.DIT_DIR
T5_FILE = weights_layout.T5_FILENAME
VAE_FILE = weights_layout.VAE_FILENAME
TINY_VAE_FILE = weights_layout.TINY_VAE_NAMES[0]
TOKENIZER_DIR = weights_layout.TOKENIZER_DIR

# umt5-xxl as hard-coded by LightX2V (t5/model.py:769-783); the DiT's text_embedding input is this dim.
T5_VOCAB = 256384
T5_DIM = 4096
T5_FFN = 10240
T5_HEADS = 64
T5_LAYERS = 24
T5_BUCKETS = 32

SIZES = ("tiny", "full")


def dit_config(size: str) -> dict[str, Any]:
    """The DiT config.json. `full` is the real 14B config (notes §2.2). `tiny` keeps head_dim 128
    (SageAttention accepts only 64/96/128) and every fixed interface dim (in/out 16, T5 4096 input,
    text_len 512, freq 256)."""
    if size == "full":
        dim, heads, layers, ffn = 5120, 40, 40, 13824
    elif size == "tiny":
        dim, heads, layers, ffn = 256, 2, 2, 1024
    else:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {"_class_name": "WanModel", "dim": dim, "eps": 1e-06, "ffn_dim": ffn, "freq_dim": 256,
            "in_dim": 16, "model_type": "t2v", "num_heads": heads, "num_layers": layers,
            "out_dim": 16, "text_len": 512}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write. `init`: "int8" (uniform [-127, 127]), "scale" (the int8 dequant scale
    1/(127*sqrt(in_features)), so each int8 linear has roughly unit gain), "zeros", "ones", or
    "normal" (std `std`)."""

    name: str
    dtype: str  # "int8" | "float32" | "bfloat16"
    shape: tuple[int, ...]
    init: str
    std: float = 0.0
    fan_in: int = 0  # in_features, for "scale"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * {"int8": 1, "float32": 4, "bfloat16": 2}[self.dtype]


def _int8_linear(prefix: str, out_f: int, in_f: int, bias: bool, bias_dtype: str = "float32") -> list[TensorSpec]:
    specs = [TensorSpec(f"{prefix}.weight", "int8", (out_f, in_f), "int8"),
             TensorSpec(f"{prefix}.weight_scale", "float32", (out_f, 1), "scale", fan_in=in_f)]
    if bias:
        specs.append(TensorSpec(f"{prefix}.bias", bias_dtype, (out_f,), "zeros"))
    return specs


def dit_block_spec(config: dict[str, Any], index: int) -> list[TensorSpec]:
    """Tensors of `block_{index}.safetensors`, in the converter's order (notes §2.3)."""
    dim, ffn, p = config["dim"], config["ffn_dim"], f"blocks.{index}"
    specs: list[TensorSpec] = []
    for attn in ("self_attn", "cross_attn"):
        for proj in ("q", "k", "v", "o"):
            specs += _int8_linear(f"{p}.{attn}.{proj}", dim, dim, bias=True)
        specs += [TensorSpec(f"{p}.{attn}.norm_q.weight", "float32", (dim,), "ones"),
                  TensorSpec(f"{p}.{attn}.norm_k.weight", "float32", (dim,), "ones")]
    specs += [TensorSpec(f"{p}.norm3.weight", "float32", (dim,), "ones"),
              TensorSpec(f"{p}.norm3.bias", "float32", (dim,), "zeros")]
    specs += _int8_linear(f"{p}.ffn.0", ffn, dim, bias=True)
    specs += _int8_linear(f"{p}.ffn.2", dim, ffn, bias=True)
    # Small random modulation: the blocks really change x (so a stale block weight changes the
    # output) while 40 blocks of random weights stay finite.
    specs.append(TensorSpec(f"{p}.modulation", "float32", (1, 6, dim), "normal", std=0.05))
    return specs


def dit_non_block_spec(config: dict[str, Any]) -> list[TensorSpec]:
    """Tensors of `non_block.safetensors` (notes §2.4), fp32 like the real file."""
    dim, freq, in_dim, out_dim = config["dim"], config["freq_dim"], config["in_dim"], config["out_dim"]

    def linear(name: str, out_f: int, in_f: int, init: str = "normal") -> list[TensorSpec]:
        std = 1.0 / math.sqrt(in_f) if init == "normal" else 0.0
        return [TensorSpec(f"{name}.weight", "float32", (out_f, in_f), init, std=std),
                TensorSpec(f"{name}.bias", "float32", (out_f,), "zeros")]

    specs = [TensorSpec("patch_embedding.weight", "float32", (dim, in_dim, 1, 2, 2), "normal",
                        std=1.0 / math.sqrt(in_dim * 4)),
             TensorSpec("patch_embedding.bias", "float32", (dim,), "zeros")]
    specs += linear("text_embedding.0", dim, T5_DIM) + linear("text_embedding.2", dim, dim)
    specs += linear("time_embedding.0", dim, freq) + linear("time_embedding.2", dim, dim)
    # Zero time projection: the modulation alone drives shift/scale/gate, which keeps them small.
    specs += linear("time_projection.1", 6 * dim, dim, init="zeros")
    specs += linear("head.head", out_dim * 4, dim)
    specs.append(TensorSpec("head.modulation", "float32", (1, 2, dim), "normal", std=0.05))
    return specs


def t5_spec() -> list[TensorSpec]:
    """umt5-xxl int8 encoder state dict as LightX2V's converter writes it (notes §2.5). The
    non-offloaded loader is a strict load_state_dict, so this list must be exact."""
    specs = [TensorSpec("token_embedding.weight", "bfloat16", (T5_VOCAB, T5_DIM), "normal", std=0.5)]
    for b in range(T5_LAYERS):
        p = f"blocks.{b}"
        specs.append(TensorSpec(f"{p}.norm1.weight", "bfloat16", (T5_DIM,), "ones"))
        for proj in ("q", "k", "v", "o"):
            specs += _int8_linear(f"{p}.attn.{proj}", T5_DIM, T5_DIM, bias=False)
        specs.append(TensorSpec(f"{p}.norm2.weight", "bfloat16", (T5_DIM,), "ones"))
        specs += _int8_linear(f"{p}.ffn.gate.0", T5_FFN, T5_DIM, bias=False)
        specs += _int8_linear(f"{p}.ffn.fc1", T5_FFN, T5_DIM, bias=False)
        specs += _int8_linear(f"{p}.ffn.fc2", T5_DIM, T5_FFN, bias=False)
        specs.append(TensorSpec(f"{p}.pos_embedding.embedding.weight", "bfloat16",
                                (T5_BUCKETS, T5_HEADS), "normal", std=0.1))
    specs.append(TensorSpec("norm.weight", "bfloat16", (T5_DIM,), "ones"))
    return specs


def vae_spec() -> list[TensorSpec]:
    """The Wan2.1 VAE state dict, generated from WanVAE_'s construction rules with LightX2V's
    arguments (dim 96, z 16, dim_mult [1,2,4,4], 2 res blocks, no attention scales, temporal
    downsample [False, True, True]). fp32 like the released file."""
    specs: list[TensorSpec] = []

    def conv(name: str, out_c: int, in_c: int, kernel: tuple[int, ...]) -> None:
        fan_in = in_c * math.prod(kernel)
        specs.append(TensorSpec(f"{name}.weight", "float32", (out_c, in_c, *kernel), "normal",
                                std=1.0 / math.sqrt(fan_in)))
        specs.append(TensorSpec(f"{name}.bias", "float32", (out_c,), "zeros"))

    def rms(name: str, c: int, images: bool) -> None:
        # RMS_norm(images=False) broadcasts over (t, h, w), images=True over (h, w).
        specs.append(TensorSpec(f"{name}.gamma", "float32", (c, 1, 1, 1) if not images else (c, 1, 1), "ones"))

    def res_block(name: str, in_c: int, out_c: int) -> None:
        rms(f"{name}.residual.0", in_c, images=False)
        conv(f"{name}.residual.2", out_c, in_c, (3, 3, 3))
        rms(f"{name}.residual.3", out_c, images=False)
        conv(f"{name}.residual.6", out_c, out_c, (3, 3, 3))
        if in_c != out_c:
            conv(f"{name}.shortcut", out_c, in_c, (1, 1, 1))

    def attention(name: str, c: int) -> None:
        rms(f"{name}.norm", c, images=True)
        conv(f"{name}.to_qkv", 3 * c, c, (1, 1))
        conv(f"{name}.proj", c, c, (1, 1))

    def resample(name: str, c: int, mode: str) -> None:
        if mode.startswith("upsample"):
            conv(f"{name}.resample.1", c // 2, c, (3, 3))
            if mode == "upsample3d":
                conv(f"{name}.time_conv", 2 * c, c, (3, 1, 1))
        else:
            conv(f"{name}.resample.1", c, c, (3, 3))
            if mode == "downsample3d":
                conv(f"{name}.time_conv", c, c, (3, 1, 1))

    dim, z_dim, dim_mult, n_res = 96, 16, [1, 2, 4, 4], 2
    down = [False, True, True]
    up = down[::-1]

    # Encoder3d (z_dim * 2 outputs: mean and log-variance).
    dims = [dim * u for u in [1] + dim_mult]
    conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    idx = 0
    for i, (in_c, out_c) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(n_res):
            res_block(f"encoder.downsamples.{idx}", in_c, out_c)
            idx += 1
            in_c = out_c
        if i != len(dim_mult) - 1:
            resample(f"encoder.downsamples.{idx}", out_c, "downsample3d" if down[i] else "downsample2d")
            idx += 1
    mid = dims[-1]
    res_block("encoder.middle.0", mid, mid)
    attention("encoder.middle.1", mid)
    res_block("encoder.middle.2", mid, mid)
    rms("encoder.head.0", mid, images=False)
    conv("encoder.head.2", z_dim * 2, mid, (3, 3, 3))

    conv("conv1", z_dim * 2, z_dim * 2, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))

    # Decoder3d.
    dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
    conv("decoder.conv1", dims[0], z_dim, (3, 3, 3))
    res_block("decoder.middle.0", dims[0], dims[0])
    attention("decoder.middle.1", dims[0])
    res_block("decoder.middle.2", dims[0], dims[0])
    idx = 0
    for i, (in_c, out_c) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            in_c //= 2  # the previous upsample's Conv2d halved the channels
        for _ in range(n_res + 1):
            res_block(f"decoder.upsamples.{idx}", in_c, out_c)
            idx += 1
            in_c = out_c
        if i != len(dim_mult) - 1:
            resample(f"decoder.upsamples.{idx}", out_c, "upsample3d" if up[i] else "upsample2d")
            idx += 1
    rms("decoder.head.0", dims[-1], images=False)
    conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return specs


# ----------------------------------------------------------------------------------------------
# Value generation: tile a seeded random pool instead of drawing every value. Kernel speed does not
# depend on the values and the full checkpoint is ~21 GB, so this keeps writing at disk speed.

_POOL_ELEMS = 1 << 22


class _Filler:
    def __init__(self, seed: int):
        import torch

        self._torch = torch
        gen = torch.Generator().manual_seed(seed)
        self._int8 = torch.randint(-127, 128, (_POOL_ELEMS,), dtype=torch.int8, generator=gen)
        self._normal = torch.randn(_POOL_ELEMS, dtype=torch.float32, generator=gen)
        self._offsets = torch.randint(0, _POOL_ELEMS, (1 << 16,), generator=gen).tolist()
        self._next = 0

    def _tile(self, out_flat, pool) -> None:
        # Start each tensor at a different pool offset so tensors are not copies of each other.
        start = self._offsets[self._next % len(self._offsets)]
        self._next += 1
        n, pos = out_flat.numel(), 0
        while pos < n:
            take = min(n - pos, _POOL_ELEMS - start)
            out_flat[pos:pos + take].copy_(pool[start:start + take])
            pos += take
            start = 0

    def make(self, spec: TensorSpec):
        torch = self._torch
        dtype = getattr(torch, spec.dtype)
        out = torch.empty(spec.shape, dtype=dtype)
        flat = out.view(-1)
        if spec.init == "int8":
            self._tile(flat, self._int8)
        elif spec.init == "scale":
            flat.fill_(1.0 / (127.0 * math.sqrt(spec.fan_in)))
        elif spec.init == "zeros":
            flat.zero_()
        elif spec.init == "ones":
            flat.fill_(1.0)
        elif spec.init == "normal":
            pool = self._normal if spec.std == 1.0 else self._normal * spec.std
            self._tile(flat, pool.to(dtype))
        else:
            raise ValueError(f"unknown init {spec.init!r} for {spec.name}")
        return out


def tiny_vae_spec() -> list[TensorSpec]:
    """The tiny VAE for Wan 2.1 (TAEHV with 16 latent channels, patch size 1), generated from the
    construction rules of LightX2V's TAEHV (models/video_encoders/hf/tae.py at f8aee98b): an
    encoder and a decoder of 3x3 convolutions, MemBlocks (three convs over [x, past] plus a 1x1 skip
    when the width changes), TPool/TGrow 1x1 convs that fold time into channels, and bias-free
    strided / post-upsample convs. fp32; what WanVAE_tiny loads with `torch.load(weights_only=True)`."""
    specs: list[TensorSpec] = []

    def conv(name: str, out_c: int, in_c: int, kernel: int = 3, bias: bool = True) -> None:
        fan_in = in_c * kernel * kernel
        specs.append(TensorSpec(f"{name}.weight", "float32", (out_c, in_c, kernel, kernel), "normal",
                                std=1.0 / math.sqrt(fan_in)))
        if bias:
            specs.append(TensorSpec(f"{name}.bias", "float32", (out_c,), "zeros"))

    def mem_block(name: str, n_in: int, n_out: int) -> None:
        conv(f"{name}.conv.0", n_out, n_in * 2)
        conv(f"{name}.conv.2", n_out, n_out)
        conv(f"{name}.conv.4", n_out, n_out)
        if n_in != n_out:
            conv(f"{name}.skip", n_out, n_in, kernel=1, bias=False)

    latent, image = 16, 3
    # encoder: conv, act, then three stages of [TPool, strided conv, 3 MemBlocks], then conv to z.
    conv("encoder.0", 64, image)
    index = 2
    for stride in (2, 2, 1):
        conv(f"encoder.{index}.conv", 64, 64 * stride, kernel=1, bias=False)  # TPool(64, stride)
        conv(f"encoder.{index + 1}", 64, 64, bias=False)  # conv(64, 64, stride=2, bias=False)
        for k in range(3):
            mem_block(f"encoder.{index + 2 + k}", 64, 64)
        index += 5
    conv(f"encoder.{index}", latent, 64)
    # decoder: Clamp, conv, act, 3 MemBlocks, then three stages of [Upsample, TGrow, conv, ...].
    widths = [256, 128, 64, 64]
    conv("decoder.1", widths[0], latent)
    for k in range(3):
        mem_block(f"decoder.{3 + k}", widths[0], widths[0])
    index = 6
    for stage, t_stride in enumerate((1, 2, 2)):
        n_f = widths[stage]
        conv(f"decoder.{index + 1}.conv", n_f * t_stride, n_f, kernel=1, bias=False)  # TGrow
        conv(f"decoder.{index + 2}", widths[stage + 1], n_f, bias=False)
        if stage < 2:
            for k in range(3):
                mem_block(f"decoder.{index + 3 + k}", widths[stage + 1], widths[stage + 1])
            index += 6
    conv(f"decoder.{index + 4}", image, widths[3])  # after the last conv's activation
    return specs


# ----------------------------------------------------------------------------------------------
# Writers


def _write_safetensors(path: Path, specs: Sequence[TensorSpec], filler: _Filler) -> None:
    from safetensors.torch import save_file

    tensors = {s.name: filler.make(s) for s in specs}
    save_file(tensors, str(path))


class _StorageRef:
    """Stands for a tensor's storage in the pickle; `persistent_id` turns it into the record key."""

    def __init__(self, key: str, storage_type: Any, numel: int):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor (`torch._utils._rebuild_tensor_v2`, as
    `Tensor.__reduce_ex__` writes it) without holding its data."""

    def __init__(self, ref: _StorageRef, shape: tuple[int, ...]):
        self.ref, self.shape = ref, shape

    def __reduce_ex__(self, protocol: int):
        import torch

        stride, acc = [], 1
        for dim in reversed(self.shape):
            stride.append(acc)
            acc *= dim
        return (torch._utils._rebuild_tensor_v2,
                (self.ref, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj: Any):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def write_torch_state_dict_streaming(path: Path, specs: Sequence[TensorSpec], filler: _Filler) -> None:
    """Write a `torch.save`-compatible state dict one tensor at a time.

    `torch.save` needs every tensor in memory at once (6.7 GB for the T5). This writes the same
    zip format through torch's own `PyTorchFileWriter`: the pickle of the whole dict first (with
    storage references), then each storage record, generated just before it is written, so host
    memory peaks at the largest single tensor (the 2.1 GB token embedding). `torch.load(...,
    weights_only=True)` reads it back (tests/test_synthetic_checkpoint.py).
    """
    import torch

    storage_types = {"int8": torch.CharStorage, "float32": torch.FloatStorage, "bfloat16": torch.BFloat16Storage}
    state = {}
    for key, spec in enumerate(specs):
        ref = _StorageRef(str(key), storage_types[spec.dtype], spec.numel)
        state[spec.name] = _TensorStub(ref, spec.shape)
    buf = io.BytesIO()
    _StubPickler(buf, protocol=2).dump(state)  # protocol 2 = torch.serialization.DEFAULT_PROTOCOL
    data = buf.getvalue()

    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for key, spec in enumerate(specs):
        tensor = filler.make(spec)
        writer.write_record(f"data/{key}", tensor.untyped_storage(), tensor.untyped_storage().nbytes())
        del tensor
    writer.write_end_of_file()


def write_tokenizer(directory: Path, vocab_words: Iterable[str] = ()) -> None:
    """A toy umt5-like tokenizer: WordLevel over lower-case words, `<pad>`=0, `</s>`=1, `<unk>`=2
    (the umt5 ids), `</s>` appended to every sequence like T5's. LightX2V loads it with
    `AutoTokenizer.from_pretrained` and pads to text_len, so only these files are needed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["a", "an", "the", "man", "woman", "cat", "dog", "with", "short", "gray", "hair", "plays",
             "red", "electric", "guitar", "on", "in", "of", "and", "stage", "street", "city", "night",
             "sunset", "beach", "forest", "running", "walking", "flying", "bird", "car", "blue", "green",
             *vocab_words]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    try:
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                       unk_token="<unk>", model_max_length=512)
        fast.save_pretrained(str(directory))
        return
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - an API change in transformers: write the files ourselves
        log.warning("PreTrainedTokenizerFast.save_pretrained failed; writing the tokenizer files directly",
                    exc_info=True)
    # The two files save_pretrained writes for this tokenizer (CPU CI has no transformers).
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 512, "padding_side": "right"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@dataclass(frozen=True)
class CheckpointPaths:
    root: Path
    dit_dir: Path
    t5: Path | None
    vae: Path | None
    tokenizer: Path


def write_checkpoint(out_dir: Path | str, size: str, *, include_t5: bool = True, include_vae: bool = True,
                     share_t5_vae_from: Path | str | None = None, seed: int = 0,
                     include_tiny_vae: bool = False) -> CheckpointPaths:
    """Write a synthetic checkpoint (see the module doc). Returns its paths.

    `share_t5_vae_from`: another synthetic checkpoint root whose T5 and VAE files are hard-linked
    (or symlinked across file systems) instead of written again.
    """
    root = Path(out_dir)
    config = dit_config(size)
    dit = root / DIT_DIR
    dit.mkdir(parents=True, exist_ok=True)
    log.warning("Writing a SYNTHETIC %s checkpoint to %s: random weights, for tests and sizing only.", size, root)
    (root / "README.txt").write_text(WARNING_TEXT + f"\nsize: {size}\nseed: {seed}\n")
    (dit / "config.json").write_text(json.dumps(config, indent=2))

    filler = _Filler(seed)
    for i in range(config["num_layers"]):
        _write_safetensors(dit / f"block_{i}.safetensors", dit_block_spec(config, i), filler)
    _write_safetensors(dit / "non_block.safetensors", dit_non_block_spec(config), filler)

    t5_path = dit / T5_FILE
    vae_path = dit / VAE_FILE
    for wanted, target, make in ((include_t5, t5_path, t5_spec), (include_vae, vae_path, vae_spec)):
        if not wanted:
            continue
        if share_t5_vae_from is not None:
            _link(Path(share_t5_vae_from) / DIT_DIR / target.name, target)
        else:
            write_torch_state_dict_streaming(target, make(), filler)
    if include_tiny_vae:
        write_tiny_vae(dit / TINY_VAE_FILE, seed)
    write_tokenizer(root / TOKENIZER_DIR)
    return CheckpointPaths(root=root, dit_dir=dit, t5=t5_path if include_t5 else None,
                           vae=vae_path if include_vae else None, tokenizer=root / TOKENIZER_DIR)


def write_tiny_vae(path: Path | str, seed: int = 0) -> Path:
    """A random tiny VAE (taew2_1.pth layout) at `path`; 45 MB."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_torch_state_dict_streaming(path, tiny_vae_spec(), _Filler(seed + 1))
    return path


def _link(source: Path, target: Path) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"cannot share {source.name}: {source} does not exist")
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        target.symlink_to(source.resolve())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.synthetic_checkpoint",
                                     description="Write a random-weight Wan2.1 distill_int8 checkpoint "
                                                 "(FOR TESTS AND SIZING ONLY).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--no-t5", action="store_true", help="skip the 6.7 GB T5 file")
    parser.add_argument("--no-vae", action="store_true", help="skip the 0.5 GB VAE file")
    parser.add_argument("--share-t5-vae-from", type=Path, default=None,
                        help="link T5 and VAE from this synthetic checkpoint instead of writing them")
    parser.add_argument("--tiny-vae", action="store_true",
                        help="also write a random taew2_1.pth (the tiny VAE: draft decodes, previews)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_checkpoint(args.out_dir, args.size, include_t5=not args.no_t5, include_vae=not args.no_vae,
                             share_t5_vae_from=args.share_t5_vae_from, seed=args.seed,
                             include_tiny_vae=args.tiny_vae)
    log.warning("Done: %s (SYNTHETIC, for tests and sizing only; see README.txt there)", paths.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
