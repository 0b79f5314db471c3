"""The fused DiT-block kernels (pipeline/backends/fused_kernels.py) compiled on CUDA at the model's
shapes (hidden 5120 = 40 heads x 128; 32,760 tokens at 480x832x81, 75,600 at 720x1280x81) against
LightX2V's own eager code, and the tiny model's frames with the fusions on and off (with block
offload and RoPE chunking of the tiny preset's rungs)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.gpuhelpers import Recorder, loaded_model, spec

pytestmark = pytest.mark.gpu

TOKENS = (32760, 75600)
HEADS, HEAD_DIM, DIM = 40, 128, 5120


def _wan_freqs(torch, tokens):
    """The frequencies LightX2V's WanPreInfer builds for a 21 x H x W latent grid."""
    from lightx2v.models.networks.wan.infer.pre_infer import WanPreInfer

    pre = WanPreInfer.__new__(WanPreInfer)
    pre.head_size, pre.seq_p_group = HEAD_DIM, None
    c = HEAD_DIM // 2
    table = torch.cat([pre.rope_params(1024, HEAD_DIM - 4 * (HEAD_DIM // 6)), pre.rope_params(1024, 2 * (HEAD_DIM // 6)),
                       pre.rope_params(1024, 2 * (HEAD_DIM // 6))], dim=1).cuda()
    grid = {32760: (21, 30, 52), 75600: (21, 45, 80)}[tokens]
    freqs = pre.prepare_cos_sin(grid, table)
    assert freqs.shape == (tokens, 1, c)
    return freqs


@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_bit_identical_to_lightx2v_torch_complex_rope(tokens, gpu_report):
    import torch
    from lightx2v.common.ops.rope.torch_rope import TorchComplexRope
    from pipeline.backends import fused_kernels as fk

    rope = TorchComplexRope(layout="interleaved", compute_dtype=torch.float32)
    form = fk.rope_variant_matching(lambda x, f: rope.apply_single(x, f), "cuda")
    assert form is not None
    forms_differ = len({fk.rope(*_probe(torch), f).sum().item() for f in fk.ROPE_FORMS})
    freqs = _wan_freqs(torch, tokens)
    q = torch.randn((tokens, HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16) * 4
    want_q, want_k = rope.apply(q, q * 0.5, freqs)
    got_q, got_k = fk.rope(q, freqs, form), fk.rope(q * 0.5, freqs, form)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    gpu_report("fused_rope", tokens=tokens, form=form, distinct_forms=forms_differ)


def _probe(torch):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((256, 4, HEAD_DIM), device="cuda", generator=gen).mul_(3).to(torch.bfloat16)
    angles = torch.rand((256, 1, HEAD_DIM // 2), device="cuda", generator=gen) * 1024
    return x, torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_against_lightx2v_and_an_fp32_reference(tokens, gpu_report):
    import torch
    from lightx2v.common.ops.norm import rms_norm_weight
    from pipeline.backends import fused_kernels as fk

    assert rms_norm_weight.sgl_kernel is None  # else LightX2V runs sgl's kernel and we do not fuse
    norm = rms_norm_weight.RMSWeightSgl("n.weight")
    norm.weight = (1 + 0.1 * torch.randn((DIM,), device="cuda")).to(torch.bfloat16)
    x = (torch.randn((tokens, DIM), device="cuda") * 3).to(torch.bfloat16)
    eager = norm.apply(x)
    ours = fk.rms_norm(x, norm._get_actual_weight(), norm.eps)
    rows_identical = (ours == eager).all(-1).float().mean().item()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    def err(a):
        return ((a.double() - exact).norm() / exact.norm()).item()

    gpu_report("fused_rms_norm", tokens=tokens, rows_identical=rows_identical, err_ours=err(ours), err_eager=err(eager))
    assert rows_identical >= 0.99
    assert err(ours) <= err(eager) * 1.01


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("gate_dtype", ["bfloat16", "float32"])
def test_gate_residual_bit_identical(tokens, gate_dtype):
    import torch
    from pipeline.backends import fused_kernels as fk

    x = torch.randn((tokens, DIM), device="cuda", dtype=torch.bfloat16)
    y = torch.randn((tokens, DIM), device="cuda", dtype=torch.bfloat16)
    gate = torch.randn((1, 1, DIM), device="cuda").to(getattr(torch, gate_dtype))
    want = x.clone()
    want.add_(y * gate.squeeze())
    fk.gate_residual_(x, y, gate.squeeze())
    assert torch.equal(x, want)


def test_tiny_model_frames_with_fusions_on_and_off(tiny_service, gpu_report):
    """Bit-identical fusions keep the frames; the RMSNorm fusion (one bf16 ulp in a few rows' mean)
    may move them by a little. Also with RoPE chunking and block offload (the tiny preset's rungs)."""
    model = loaded_model(tiny_service)
    assert {"rope_fused", "qk_rms_norm_fused", "gate_residual_fused"} <= set(model.compat.names)
    for memory in ({}, {"rope_chunk": 500}):  # 1,344 tokens: three RoPE chunks
        run = spec(seed=11, memory=memory)
        fused = model.generate(run, Recorder().hooks())
        with model.compat.disabled("qk_rms_norm_fused"):
            exact_only = model.generate(run, Recorder().hooks())
            with model.compat.disabled("rope_fused"), model.compat.disabled("gate_residual_fused"):
                eager = model.generate(run, Recorder().hooks())
        assert np.array_equal(exact_only, eager), memory
        diff = np.abs(fused.astype(np.int16) - eager.astype(np.int16))
        gpu_report("fused_frames", memory=memory, max_abs=int(diff.max()), mean_abs=float(diff.mean()))
        assert diff.mean() < 1.0, memory
