"""The host-memory measures in lightx2v_compat, on CPU with stand-ins of the LightX2V parts."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline.machine import hostmem
from pipeline.backends import lightx2v_compat as compat


class _PinlessTorch:
    """torch for a CPU-only machine: pin_memory=True allocates ordinary memory (as on a GPU box,
    minus the page locking), so the packing logic runs for real."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, pin_memory=False, **kwargs):
        return torch.empty(*args, **kwargs)


def upstream_create_pin_tensor(tensor, transpose=False, dtype=None):
    dtype = dtype or tensor.dtype
    pin_tensor = torch.empty(tensor.shape, pin_memory=True, dtype=dtype)
    pin_tensor = pin_tensor.copy_(tensor)
    return pin_tensor.t() if transpose else pin_tensor


def test_pinned_weights_pack_into_slabs_with_their_values():
    ops_utils = types.SimpleNamespace(create_pin_tensor=upstream_create_pin_tensor)
    fixes = compat.CompatFixes()
    arena = compat.pinned_weights_packed(fixes, ops_utils, _PinlessTorch())
    assert arena is not None and "pinned_weights_packed" in fixes.names
    arena.slab_bytes = 1 << 20  # 1 MiB slabs for the test
    weights = [torch.randint(-128, 127, (300, 1000), dtype=torch.int8) for _ in range(5)]  # 293 KiB each
    scale = torch.rand(1000, dtype=torch.float32)
    pinned = [ops_utils.create_pin_tensor(w) for w in weights] + [ops_utils.create_pin_tensor(scale)]
    for original, copy in zip(weights + [scale], pinned):
        assert torch.equal(original, copy) and copy.dtype == original.dtype
    # 5 x 293 KiB + 4 KiB: two 1 MiB slabs (first fit), not six power-of-two blocks.
    assert arena.pinned_bytes == 2 << 20
    assert pinned[0].untyped_storage().data_ptr() == pinned[1].untyped_storage().data_ptr()
    transposed = ops_utils.create_pin_tensor(weights[0], transpose=True)
    assert torch.equal(transposed, weights[0].t())
    big = torch.zeros(2 << 20, dtype=torch.uint8)  # larger than a slab: its own allocation
    assert torch.equal(ops_utils.create_pin_tensor(big), big) and arena.pinned_bytes == 2 << 20
    with fixes.disabled("pinned_weights_packed"):
        assert ops_utils.create_pin_tensor is upstream_create_pin_tensor


def test_pinned_packing_falls_back_to_pageable_like_upstream_when_pinning_fails():
    class NoPinning(_PinlessTorch):
        @staticmethod
        def empty(*args, pin_memory=False, **kwargs):
            if pin_memory:
                raise RuntimeError("CUDA error: out of memory")
            return torch.empty(*args, **kwargs)

    ops_utils = types.SimpleNamespace(create_pin_tensor=upstream_create_pin_tensor)
    arena = compat.pinned_weights_packed(compat.CompatFixes(), ops_utils, NoPinning())
    w = torch.ones(10, 10)
    assert torch.equal(ops_utils.create_pin_tensor(w), w) and not arena.pinned and arena.pinned_bytes == 0


def test_pinned_packing_left_alone_when_upstream_no_longer_pins_per_tensor():
    def create_pin_tensor(tensor, transpose=False, dtype=None):
        return tensor

    ops_utils = types.SimpleNamespace(create_pin_tensor=create_pin_tensor)
    assert compat.pinned_weights_packed(compat.CompatFixes(), ops_utils, torch) is None
    assert ops_utils.create_pin_tensor is create_pin_tensor


def upstream_load_pt_safetensors(in_path, remove_key=None, include_keys=None):
    state_dict = torch.load(in_path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state_dict.items() if not (remove_key and remove_key in k)}


def test_pth_checkpoints_load_memory_mapped(tmp_path):
    path = tmp_path / "t5.pth"
    torch.save({"blocks.0.w": torch.ones(64 * 1024 * 1024, dtype=torch.int8), "x": torch.zeros(3)}, path)
    lx_utils = types.SimpleNamespace(torch=torch, load_pt_safetensors=upstream_load_pt_safetensors)
    fixes = compat.CompatFixes()
    compat.checkpoints_memory_mapped(fixes, lx_utils)
    assert "checkpoints_memory_mapped" in fixes.names
    before = hostmem.read_process()
    weights = lx_utils.load_pt_safetensors(str(path), remove_key="x")
    assert list(weights) == ["blocks.0.w"] and int(weights["blocks.0.w"][::4096].sum()) == 16384
    after = hostmem.read_process()
    if before is not None:  # mapped: file-backed pages, not anonymous memory
        assert after.anon_bytes - before.anon_bytes < 32 * 1024 * 1024
        assert after.file_bytes - before.file_bytes > 48 * 1024 * 1024
    assert upstream_load_pt_safetensors.__globals__["torch"] is torch  # restored after the call
    with fixes.disabled("checkpoints_memory_mapped"):
        assert lx_utils.load_pt_safetensors is upstream_load_pt_safetensors


def test_legacy_pth_files_still_load(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.arange(4)}, path, _use_new_zipfile_serialization=False)
    lx_utils = types.SimpleNamespace(torch=torch, load_pt_safetensors=upstream_load_pt_safetensors)
    compat.checkpoints_memory_mapped(compat.CompatFixes(), lx_utils)
    assert torch.equal(lx_utils.load_pt_safetensors(str(path))["w"], torch.arange(4))


class _Runner:
    def __init__(self):
        self.config = {"lazy_load": True}
        self.scheduler = object()
        self.built_lazy = None

    def load_model(self):
        self.built_lazy = self.config["lazy_load"]
        scheduler_box = []
        self.model = types.SimpleNamespace(set_scheduler=scheduler_box.append, scheduler_box=scheduler_box)


class _UpstreamDefaultRunner:
    def init_run(self):
        if self.config.get("lazy_load", False) or self.config.get("unload_modules", False):
            self.model = self.load_transformer()


def test_low_ram_build_keeps_the_streamed_dit_between_requests():
    runner = _Runner()
    pipe = types.SimpleNamespace(runner=runner, modify_config=runner.config.update)
    fixes = compat.CompatFixes()
    assert compat.dit_streamed_and_kept(fixes, pipe, _UpstreamDefaultRunner)
    assert runner.built_lazy is True  # the model was built in streaming mode
    assert runner.model.scheduler_box == [runner.scheduler]
    assert runner.config["lazy_load"] is False  # requests reuse it instead of rebuilding
    # Not a lazy build, or a runner that already built its model: nothing to do.
    assert not compat.dit_streamed_and_kept(fixes, pipe, _UpstreamDefaultRunner)


def test_recovery_refills_the_first_streamed_block():
    loads = []

    class Block:
        def __init__(self, name):
            self.name = name

        def load_state_dict_from_disk(self, index, adapter):
            loads.append((self.name, index))

    class Future:
        def __init__(self):
            self.waited = False

        def result(self):
            self.waited = True

    pending = Future()
    manager = types.SimpleNamespace(lazy_load=True, offload_granularity="block", need_init_first_buffer=False,
                                    prefetch_futures=[pending], cpu_buffers=[Block("a"), Block("b")])
    model = types.SimpleNamespace(transformer_infer=types.SimpleNamespace(offload_manager=manager))
    compat.reset_runner_state(types.SimpleNamespace(model=model, input_info=object()))
    assert pending.waited and manager.need_init_first_buffer and loads == [("a", 0)]
    phases = types.SimpleNamespace(lazy_load=True, offload_granularity="phase", prefetch_futures=[],
                                   cpu_buffers=[[Block("p0"), Block("p1"), Block("p2")], []])
    compat.refill_streamed_first_block(phases)
    assert loads[1:] == [("p0", 0), ("p1", 0), ("p2", 0)]


def test_release_cached_pinned_memory_calls_what_torch_offers():
    calls = []
    fake = types.SimpleNamespace(accelerator=types.SimpleNamespace(empty_host_cache=lambda: calls.append(1)),
                                 _C=types.SimpleNamespace())
    compat.release_cached_pinned_memory(fake)
    assert calls == [1]
    compat.release_cached_pinned_memory(types.SimpleNamespace(_C=types.SimpleNamespace()))  # nothing offered


@pytest.mark.parametrize("memory, expected", [({"dit_from_disk": True}, True), ({}, False)])
def test_load_key_carries_dit_from_disk(tmp_path, memory, expected):
    from pipeline.backends.lightx2v import LightX2VBackend

    key = LightX2VBackend(tmp_path).load_key({"offload_granularity": "phase", "text_encoder": "offload",
                                              "release_text_encoder": True, **memory})
    assert dict(key.build_settings).get("dit_from_disk") is expected
    assert "release_text_encoder" not in dict(key.build_settings)  # per call, no reload


class _QuantWeight:
    """The upstream int8 linear's disk path: its weight scale and bias copied into fp32 pinned
    buffers as stored in the file."""

    infer_dtype = torch.bfloat16
    bias_force_fp32 = True

    def __init__(self, file_scale, file_bias):
        self.file_scale, self.file_bias = file_scale, file_bias
        # the CPU buffers as create_cpu_buffers built them
        self.pin_weight_scale, self.pin_bias = file_scale.clone(), file_bias.clone()
        self._modules = {}

    def load_state_dict_from_disk(self, block_index, adapter_block_index=None):
        weight_scale_tensor = self.file_scale
        self.pin_weight_scale = self.pin_weight_scale.copy_(weight_scale_tensor)
        bias_tensor = self.file_bias
        self.pin_bias.copy_(bias_tensor)


def test_streamed_scales_and_biases_are_rounded_like_the_resident_load():
    bias = torch.tensor([1.0 + 2**-12, 3.14159265, -0.1], dtype=torch.float32)
    scale = torch.tensor([[0.0123456], [2.0 ** -7 * (1 + 2**-10)], [0.5]], dtype=torch.float32)
    # what the resident load keeps: every float rounded to bf16 (the bias widened back to fp32)
    resident_bias, resident_scale = (t.to(torch.bfloat16).to(torch.float32) for t in (bias, scale))
    assert not torch.equal(bias, resident_bias) and not torch.equal(scale, resident_scale)
    buffer = _QuantWeight(scale, bias)
    holder = types.SimpleNamespace(_modules={"cpu": buffer})
    cls_before = _QuantWeight.load_state_dict_from_disk
    fixes = compat.CompatFixes()
    try:
        compat.streamed_scales_and_biases_match_resident(fixes, _QuantWeight, holder)
        # the buffers built at construction
        assert torch.equal(buffer.pin_bias, resident_bias) and torch.equal(buffer.pin_weight_scale, resident_scale)
        later = _QuantWeight(scale, bias)
        later.load_state_dict_from_disk(3)
        # every block read afterwards
        assert torch.equal(later.pin_bias, resident_bias) and torch.equal(later.pin_weight_scale, resident_scale)
        with fixes.disabled("streamed_scales_and_biases_match_resident"):
            later.load_state_dict_from_disk(3)
            assert torch.equal(later.pin_bias, bias) and torch.equal(later.pin_weight_scale, scale)
    finally:
        _QuantWeight.load_state_dict_from_disk = cls_before


class _UpstreamT5Encoder(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.cpu_offload = True
        self.token_embedding = torch.nn.Embedding(table.shape[0], table.shape[1], dtype=table.dtype)
        self.token_embedding.weight.data.copy_(table)

    def forward_with_offload(self, ids):
        self.token_embedding = self.token_embedding.to("cuda")
        return self.token_embedding(ids)


@pytest.mark.parametrize("same_values", [True, False])
def test_t5_table_memory_mapped_from_the_checkpoint(tmp_path, same_values):
    table = torch.randn(1000, 64).to(torch.bfloat16)
    path = tmp_path / "t5.pth"
    torch.save({"token_embedding.weight": table if same_values else table + 1, "blocks.0.w": torch.ones(2)}, path)
    encoder = _UpstreamT5Encoder(table)
    loaded = encoder.token_embedding.weight
    loaded_ptr = loaded.data_ptr()
    runner = types.SimpleNamespace(text_encoders=[types.SimpleNamespace(model=encoder)])
    fixes = compat.CompatFixes()
    host = compat.t5_token_embedding_on_host(fixes, runner, _UpstreamT5Encoder, str(path))
    assert encoder.token_embedding is host
    ids = torch.tensor([[0, 5, 999]])
    assert torch.equal(host(ids), torch.nn.functional.embedding(ids, table))
    mapped = host.host_weight.data_ptr() != loaded_ptr
    assert mapped is same_values  # a file that does not hold the loaded values is not used
    detail = next(f.detail for f in fixes.applied if f.name == "t5_token_embedding_on_host")
    assert ("memory-mapped" in detail) is same_values
    if same_values:  # the loaded copy now points at the mapped table: its anonymous memory is free
        assert encoder.token_embedding is host and host.host_weight.data_ptr() == loaded.data_ptr()


def _model_with_text_encoder():
    """A LightX2VModel without LightX2V: a runner whose text encoder can be loaded and counted."""
    from pipeline.backends.lightx2v import LightX2VModel

    events = []
    runner = types.SimpleNamespace(text_encoders=["t5"], loads=0)

    def load_text_encoder():
        runner.loads += 1
        return [f"t5#{runner.loads}"]

    def run_text_encoder(input_info):
        events.append(("encode", list(runner.text_encoders)))
        return {"context": input_info}

    runner.load_text_encoder = load_text_encoder
    runner.run_text_encoder = run_text_encoder
    runner.run_vae_decoder = lambda latents: latents
    runner.model = types.SimpleNamespace(transformer_infer=types.SimpleNamespace(run_block=lambda *a: None))
    model = LightX2VModel.__new__(LightX2VModel)
    model._runner, model._call, model._torch = runner, None, torch
    model.build, model.arena, model.files = {"text_encoder_offload": True}, None, types.SimpleNamespace(t5="t5.pth")
    model.compat, model._t5_encoder_cls, model.host_embedding = compat.CompatFixes(), object, None
    model.release_text_encoder, model.text_encoder_loads = False, 0
    model._compat = types.SimpleNamespace(
        t5_token_embedding_on_host=lambda fixes, r, cls, ckpt: events.append(("host embedding", ckpt)),
        release_cached_pinned_memory=lambda t: events.append(("pinned cache emptied",)))
    model._install_wrappers()
    return model, runner, events


def test_text_encoder_released_after_encoding_and_loaded_for_the_next_prompt():
    model, runner, events = _model_with_text_encoder()
    model.release_text_encoder = True  # the low-RAM rung's per-call setting
    assert runner.run_text_encoder("a") == {"context": "a"}
    assert runner.text_encoders is None and ("pinned cache emptied",) in events
    runner.run_text_encoder("b")
    assert runner.loads == 1 and model.text_encoder_loads == 1
    assert ("encode", ["t5#1"]) in events and ("host embedding", "t5.pth") in events
    model.release_text_encoder = False  # another rung on the same build keeps it
    runner.run_text_encoder("c")
    runner.run_text_encoder("d")
    assert runner.loads == 2 and runner.text_encoders == ["t5#2"]


def test_a_later_build_that_skips_the_packing_gets_upstreams_pinning_back():
    ops_utils = types.SimpleNamespace(create_pin_tensor=upstream_create_pin_tensor)
    assert compat.pinned_weights_packed(compat.CompatFixes(), ops_utils, _PinlessTorch()) is not None
    assert ops_utils.create_pin_tensor is not upstream_create_pin_tensor  # the first build's wrapper
    skipping = compat.CompatFixes(skip=frozenset({"pinned_weights_packed"}))
    assert compat.pinned_weights_packed(skipping, ops_utils, _PinlessTorch()) is None
    assert ops_utils.create_pin_tensor is upstream_create_pin_tensor and skipping.names == []
