"""Small files in the real on-disk formats and layout of the INT8 repo, for download and verify tests.

Real formats, tiny sizes: safetensors written byte-for-byte per the spec (u64 header length, JSON header,
data), and torch checkpoints as the zip `torch.save` produces (`archive/data.pkl`, `archive/data/0`).
"""

from __future__ import annotations

import io
import json
import random
import zipfile

REPO_ID = "lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
NUM_LAYERS = 40
T5 = "distill_int8/models_t5_umt5-xxl-enc-int8.pth"
VAE = "distill_int8/Wan2.1_VAE.pth"
CONFIG = {"_class_name": "WanModel", "dim": 64, "eps": 1e-06, "ffn_dim": 128, "freq_dim": 32, "in_dim": 16,
          "model_type": "t2v", "num_heads": 2, "num_layers": NUM_LAYERS, "out_dim": 16, "text_len": 512}
# Files the downloader must leave alone: the bf16 model, LoRAs, the optional tiny VAE, the converter's index.
NOT_NEEDED = ("distill_models/distill_model.safetensors", "loras/Wan21_T2V_14B_lora_rank64.safetensors",
              "distill_int8/taew2_1.pth", "distill_int8/diffusion_pytorch_model.safetensors.index.json",
              "distill_fp8/block_0.safetensors")


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    return len(raw).to_bytes(8, "little") + raw + b"".join(d for _, _, d in tensors.values())


def torch_zip_bytes(payload_len: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/version", b"3\n")
        zf.writestr("archive/data/0", random.Random(seed).randbytes(payload_len))
    return buf.getvalue()


def block_bytes(i: int) -> bytes:
    rnd = random.Random(i)
    return safetensors_bytes({
        f"blocks.{i}.ffn.0.weight": ("I8", [32, 64], rnd.randbytes(32 * 64)),
        f"blocks.{i}.ffn.0.weight_scale": ("F32", [32, 1], rnd.randbytes(32 * 4)),
        f"blocks.{i}.modulation": ("F32", [1, 6, 8], rnd.randbytes(6 * 8 * 4)),
    })


def repo_files(*, t5_payload: int = 64 * 1024, num_layers: int = NUM_LAYERS,
               with_tokenizer: bool = True) -> dict[str, bytes]:
    files: dict[str, bytes] = {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pth filter=lfs diff=lfs -text\n",
        "README.md": b"# fake\n",
        "distill_int8/config.json": json.dumps({**CONFIG, "num_layers": num_layers}).encode(),
        "distill_int8/non_block.safetensors": safetensors_bytes(
            {"patch_embedding.weight": ("F32", [64, 16], random.Random(99).randbytes(64 * 16 * 4))}),
        T5: torch_zip_bytes(t5_payload, seed=1),
        VAE: torch_zip_bytes(8 * 1024, seed=2),
    }
    for i in range(num_layers):
        files[f"distill_int8/block_{i}.safetensors"] = block_bytes(i)
    if with_tokenizer:
        files.update(tokenizer_files())
    for path in NOT_NEEDED:
        files[path] = b"x" * 2048
    return files


def tokenizer_files() -> dict[str, bytes]:
    return {
        "google/umt5-xxl/tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "Unigram"}}).encode(),
        "google/umt5-xxl/tokenizer_config.json": json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}).encode(),
        "google/umt5-xxl/special_tokens_map.json": json.dumps({"pad_token": "<pad>"}).encode(),
        "google/umt5-xxl/spiece.model": random.Random(5).randbytes(4096),
    }


def needed_paths(files: dict[str, bytes]) -> set[str]:
    return {p for p in files if p not in NOT_NEEDED and p not in (".gitattributes", "README.md")}
