"""The synthetic checkpoint writer (CPU): key/shape specs against the real file sizes, and a tiny
checkpoint without the 6.7 GB T5 and the VAE written and read back."""

from __future__ import annotations

import json
import math
import os

import pytest

from pipeline.backends import weights_layout
from tools import synthetic_checkpoint as sc


def test_dit_configs_keep_the_fixed_interfaces():
    for size in sc.SIZES:
        cfg = sc.dit_config(size)
        assert cfg["dim"] % cfg["num_heads"] == 0
        assert cfg["dim"] // cfg["num_heads"] == 128  # SageAttention: head_dim 64/96/128 only
        assert (cfg["in_dim"], cfg["out_dim"], cfg["text_len"], cfg["freq_dim"]) == (16, 16, 512, 256)
    assert sc.dit_config("full") == {"_class_name": "WanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824,
                                     "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
                                     "num_layers": 40, "out_dim": 16, "text_len": 512}
    with pytest.raises(ValueError):
        sc.dit_config("medium")


def test_full_size_specs_match_the_released_files():
    cfg = sc.dit_config("full")
    block = sc.dit_block_spec(cfg, 7)
    assert len(block) == 37 and all(s.name.startswith("blocks.7.") for s in block)
    # int8 weights 351.3 MB + fp32 extras: the released block_N.safetensors are 0.352 GB.
    assert sum(s.nbytes for s in block) == 351_997_952
    shapes = {s.name: (s.dtype, s.shape) for s in block}
    assert shapes["blocks.7.ffn.0.weight"] == ("int8", (13824, 5120))
    assert shapes["blocks.7.ffn.2.weight_scale"] == ("float32", (5120, 1))
    assert shapes["blocks.7.self_attn.q.bias"] == ("float32", (5120,))
    assert shapes["blocks.7.modulation"] == ("float32", (1, 6, 5120))
    non_block = sc.dit_non_block_spec(cfg)
    assert sum(s.numel for s in non_block) == 232_719_424  # 0.931 GB fp32, as released
    assert {s.name: s.shape for s in non_block}["time_projection.1.weight"] == (30720, 5120)

    t5 = sc.t5_spec()
    assert len(t5) == 2 + 24 * 17
    assert sum(s.nbytes for s in t5) == 6_735_241_216  # released file: 6.733 GB
    assert {s.name: (s.dtype, s.shape) for s in t5}["token_embedding.weight"] == ("bfloat16", (256384, 4096))
    assert not any(s.name.endswith(".bias") for s in t5)  # umt5 linears have none (compat bug 3)


def test_vae_spec_is_the_wan_vae():
    vae = sc.vae_spec()
    assert len(vae) == 194
    assert sum(s.numel for s in vae) == 126_892_531
    shapes = {s.name: s.shape for s in vae}
    assert len(shapes) == 194  # no duplicate names
    assert shapes["encoder.conv1.weight"] == (96, 3, 3, 3, 3)
    assert shapes["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert shapes["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["encoder.head.2.weight"] == (32, 384, 3, 3, 3)
    assert shapes["conv1.weight"] == (32, 32, 1, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.upsamples.11.resample.1.weight"] == (96, 192, 3, 3)
    assert "decoder.upsamples.11.time_conv.weight" not in shapes  # 2-D upsample at the last stage
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)


def test_streamed_state_dict_loads_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    specs = [sc.TensorSpec("a.weight", "int8", (33, 17), "int8"),
             sc.TensorSpec("a.weight_scale", "float32", (33, 1), "scale", fan_in=17),
             sc.TensorSpec("emb", "bfloat16", (5, 4), "normal", std=0.5),
             sc.TensorSpec("norm", "bfloat16", (4,), "ones")]
    path = tmp_path / "state.pth"
    sc.write_torch_state_dict_streaming(path, specs, sc._Filler(3))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert list(loaded) == [s.name for s in specs]
    for s in specs:
        assert str(loaded[s.name].dtype) == f"torch.{s.dtype}" and tuple(loaded[s.name].shape) == s.shape
    assert loaded["a.weight"].abs().max() <= 127 and loaded["a.weight"].float().std() > 30
    assert torch.allclose(loaded["a.weight_scale"], torch.full((33, 1), 1 / (127 * math.sqrt(17))))
    assert torch.equal(loaded["norm"], torch.ones(4, dtype=torch.bfloat16))
    assert torch.isfinite(loaded["emb"].float()).all() and loaded["emb"].float().abs().max() > 0


def test_tiny_checkpoint_without_t5_and_vae(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors.torch")
    tokenizers = pytest.importorskip("tokenizers")
    paths = sc.write_checkpoint(tmp_path / "ckpt", "tiny", include_t5=False, include_vae=False)
    dit = paths.dit_dir
    assert paths.t5 is None and paths.vae is None
    assert "FOR TESTS AND SIZING ONLY" in (paths.root / "README.txt").read_text()
    cfg = json.loads((dit / "config.json").read_text())
    assert cfg == sc.dit_config("tiny")
    assert sorted(p.name for p in dit.iterdir()) == ["block_0.safetensors", "block_1.safetensors", "config.json",
                                                     "non_block.safetensors"]
    for name, spec in [("block_1.safetensors", sc.dit_block_spec(cfg, 1)),
                       ("non_block.safetensors", sc.dit_non_block_spec(cfg))]:
        tensors = safetensors.load_file(str(dit / name))
        assert set(tensors) == {s.name for s in spec}
        for s in spec:
            t = tensors[s.name]
            assert str(t.dtype) == f"torch.{s.dtype}" and tuple(t.shape) == s.shape, s.name
            assert torch.isfinite(t.float()).all(), s.name
    q = safetensors.load_file(str(dit / "block_0.safetensors"))
    assert not torch.equal(q["blocks.0.self_attn.q.weight"], q["blocks.0.self_attn.k.weight"])

    tok = tokenizers.Tokenizer.from_file(str(paths.tokenizer / "tokenizer.json"))
    ids = tok.encode("The man plays a red guitar zzz").ids
    vocab = tok.get_vocab()
    assert ids[-1] == vocab["</s>"] == 1 and vocab["<pad>"] == 0 and vocab["<unk>"] in ids
    config = json.loads((paths.tokenizer / "tokenizer_config.json").read_text())
    assert "<pad>" in json.dumps(config)  # LightX2V pads every prompt to 512 tokens


def test_share_t5_and_vae_links_instead_of_writing(tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    donor = tmp_path / "donor" / sc.DIT_DIR
    donor.mkdir(parents=True)
    (donor / sc.T5_FILE).write_bytes(b"t5")
    (donor / sc.VAE_FILE).write_bytes(b"vae")
    paths = sc.write_checkpoint(tmp_path / "ckpt", "tiny", share_t5_vae_from=tmp_path / "donor")
    assert paths.t5.read_bytes() == b"t5" and paths.vae.read_bytes() == b"vae"
    assert os.path.samefile(paths.t5, donor / sc.T5_FILE)
    found = weights_layout.locate(paths.root)  # the backend's and the doctor's rule finds every file it wrote
    assert found.synthetic and found.t5 == paths.t5 and found.tokenizer == paths.tokenizer
    with pytest.raises(FileNotFoundError):
        sc.write_checkpoint(tmp_path / "other", "tiny", share_t5_vae_from=tmp_path / "missing")


def test_command_line(tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    assert sc.main(["--size", "tiny", "--no-t5", "--no-vae", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / sc.DIT_DIR / "non_block.safetensors").is_file()


def test_tiny_vae_spec_is_taehv_for_wan21_and_loads_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    specs = sc.tiny_vae_spec()
    # TAEHV(latent_channels=16, patch_size=1): 128 tensors, 11,315,539 parameters.
    assert len(specs) == 128 and sum(s.numel for s in specs) == 11_315_539
    shapes = {s.name: s.shape for s in specs}
    assert shapes["encoder.0.weight"] == (64, 3, 3, 3)
    assert shapes["encoder.2.conv.weight"] == (64, 128, 1, 1)  # TPool(64, 2)
    assert shapes["encoder.12.conv.weight"] == (64, 64, 1, 1)  # TPool(64, 1)
    assert shapes["encoder.17.weight"] == (16, 64, 3, 3)
    assert shapes["decoder.1.weight"] == (256, 16, 3, 3)
    assert shapes["decoder.3.conv.0.weight"] == (256, 512, 3, 3)  # MemBlock over [x, past]
    assert shapes["decoder.13.conv.weight"] == (256, 128, 1, 1)  # TGrow(128, 2)
    assert shapes["decoder.22.weight"] == (3, 64, 3, 3) and shapes["decoder.22.bias"] == (3,)
    path = sc.write_tiny_vae(tmp_path / "taew2_1.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert all(v.dtype == torch.float32 for v in state.values())
    assert sc.main([str(tmp_path / "cli"), "--no-t5", "--no-vae", "--tiny-vae"]) == 0
    assert (tmp_path / "cli" / sc.DIT_DIR / sc.TINY_VAE_FILE).is_file()
