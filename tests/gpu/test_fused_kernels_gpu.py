"""The fused DiT-block kernels (pipeline/backends/fused_kernels.py) compiled on CUDA at the model's
shapes (hidden 5120 = 40 heads x 128, FFN 13824; 32,760 tokens at 480x832x81, 75,600 at
720x1280x81) against LightX2V's own eager code, and the tiny model's frames with the fusions on and
off (with block offload, RoPE chunking and the FFN token slicing of the tiny preset's rungs)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.fusions_micro import lightx2v_norm_and_modulate
from tests.gpu.gpuhelpers import Recorder, loaded_model, spec

pytestmark = pytest.mark.gpu

TOKENS = (32760, 75600)
HEADS, HEAD_DIM, DIM, FFN = 40, 128, 5120, 13824


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


def _modulation(torch, tokens):
    """x like the DiT's hidden states (rows of several means and spreads, a few outliers) and one
    scale/shift chunk of modulation + embed0 ([1, 1, C] views of a [1, 6, C] tensor)."""
    spread = torch.exp(torch.randn((tokens, 1), device="cuda"))
    x = torch.randn((tokens, DIM), device="cuda") * spread + torch.randn((tokens, 1), device="cuda") * 4
    x[:, :8] *= 20
    six = (torch.randn((1, 6, DIM), device="cuda") * 0.5).to(torch.bfloat16)
    shift, scale = six.chunk(6, dim=1)[:2]
    return x.to(torch.bfloat16), scale, shift


@pytest.mark.parametrize("tokens", TOKENS)
def test_norm_modulate_bit_identical_to_lightx2v_layer_norm_and_modulate(tokens, gpu_report):
    import torch
    from pipeline.backends import fused_kernels as fk

    norm, eager = lightx2v_norm_and_modulate()
    form = fk.norm_modulate_form_matching(eager, "cuda", eps=norm.eps)
    x, scale, shift = _modulation(torch, tokens)
    assert fk.norm_modulate_fits(x, scale, shift)
    want = eager(x, scale, shift)
    # Which forms agree with LightX2V on the full tensor (the probe's choice must be one of them).
    matching = [f for f in fk.NORM_MODULATE_FORMS if torch.equal(fk.norm_modulate(x, scale, shift, norm.eps, f), want)]
    best = form or fk.NORM_MODULATE_FORMS[0]
    got = fk.norm_modulate(x, scale, shift, norm.eps, best)
    rows_identical = (got == want).all(-1).float().mean().item()
    xd = x.double()
    exact = ((xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + norm.eps)
             * (1 + scale.squeeze().double()) + shift.squeeze().double())

    def err(a):
        return ((a.double() - exact).norm() / exact.norm()).item()

    gpu_report("fused_norm_modulate", tokens=tokens, form=form, matching=matching, rows_identical=rows_identical,
               err_ours=err(got), err_eager=err(want), capability=list(torch.cuda.get_device_capability()))
    assert form is not None and form in matching
    assert torch.equal(got, want)
    # An FFN token slice (ffn_chunked_over_tokens) and LightX2V's torch modulate as well.
    part = x[tokens // 3:tokens // 3 + 4096]
    assert torch.equal(fk.norm_modulate(part, scale, shift, norm.eps, form), eager(part, scale, shift))
    if form[1] == 0:
        from lightx2v.models.networks.wan.infer.transformer_infer import modulate

        assert torch.equal(fk.norm_modulate(x, scale, shift, norm.eps, form), modulate(norm.apply(x), scale, shift))


def _int8_linear(torch, n, k):
    """LightX2V's int8-triton linear (its own class, as the DiT's ffn_0/ffn_2 are) with random INT8
    weights, per-channel scales of roughly unit gain times 2 (ffn_0's outputs spread over the GELU's
    curve) and an fp32 bias."""
    from lightx2v.utils.registry_factory import MM_WEIGHT_REGISTER

    mm = MM_WEIGHT_REGISTER["int8-triton"]("ffn.weight", "ffn.bias")
    mm.weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    mm.weight_scale = (torch.rand((n, 1), device="cuda") + 0.5) * (2 / (127 * k ** 0.5))
    mm.bias = torch.randn((n,), device="cuda") * 0.1
    mm.infer_dtype = torch.bfloat16
    return mm


@pytest.mark.parametrize("tokens", TOKENS)
def test_gelu_quant_ffn_bit_identical_to_lightx2v(tokens, gpu_report):
    """ffn_0 -> GELU -> ffn_2 of LightX2V (int8-triton, 5120 -> 13824 -> 5120) against ffn_0 -> the
    fused GELU + quantisation -> ffn_2's apply as the compat layer rewrites it: the INT8 input, its
    scales and the FFN output bit for bit."""
    import torch
    import triton
    from lightx2v.common.ops.mm import triton_kernels as tk

    from pipeline.backends import fused_kernels as fk
    from pipeline.backends import lightx2v_compat as compat

    def gelu(y):
        return torch.nn.functional.gelu(y, approximate="tanh")

    torch.manual_seed(tokens)
    ffn_0, ffn_2 = _int8_linear(torch, FFN, DIM), _int8_linear(torch, DIM, FFN)
    assert ffn_2.act_quant_func is tk.int8_quantize_triton
    form = fk.gelu_quant_form_matching(gelu, ffn_2.act_quant_func, "cuda")
    # Per form: how many finite bf16 inputs its GELU rounds otherwise than torch's (where none
    # matches, this says whether it is the FMA form or the tanh).
    every = fk.every_finite_bf16(FFN).cuda()
    want_every = gelu(every).view(torch.int16)
    wrong = {}
    for f in fk.GELU_FORMS:
        got_every = torch.empty_like(every)
        fk.gelu_quant(every, f, gelu_out=got_every)
        wrong[f] = int((got_every.view(torch.int16) != want_every).sum())
    x, _, _ = _modulation(torch, tokens)
    y = ffn_0.apply(x)
    g = gelu(y)
    want_values, want_scales = tk.int8_quantize_triton(g)
    want = ffn_2.apply(g)
    del g
    best = form if form is not None else fk.GELU_FORMS[0]
    got = fk.gelu_quant(y, best)
    rows_identical = (got.values == want_values).all(-1).float().mean().item()
    apply_quantized = compat.method_rewritten(type(ffn_2), "apply", compat._QUANTIZED_APPLY_LINES, {})
    out = apply_quantized(ffn_2, got)
    gpu_report("fused_gelu_quant", tokens=tokens, form=form, wrong_gelu_per_form=wrong, rows_identical=rows_identical,
               out_identical=bool(torch.equal(out, want)), capability=list(torch.cuda.get_device_capability()),
               torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__)
    assert form is not None and wrong[form] == 0
    assert torch.equal(got.values, want_values) and torch.equal(got.scales.view(torch.int32), want_scales.view(torch.int32))
    assert out.dtype == want.dtype == torch.bfloat16 and torch.equal(out, want)
    # An FFN token slice (ffn_chunked_over_tokens): its rows as in the whole.
    part = slice(tokens // 3, tokens // 3 + 4096)
    sliced = fk.gelu_quant(y[part], form)
    assert torch.equal(sliced.values, want_values[part]) and torch.equal(sliced.scales, want_scales[part])


def test_tiny_model_frames_with_fusions_on_and_off(tiny_service, gpu_report):
    """Bit-identical fusions keep the frames; the RMSNorm fusion (one bf16 ulp in a few rows' mean)
    may move them by a little. Also with RoPE chunking and block offload (the tiny preset's rungs)."""
    model = loaded_model(tiny_service)
    assert {"rope_fused", "qk_rms_norm_fused", "gate_residual_fused", "norm_modulate_fused",
            "gelu_quant_fused"} <= set(model.compat.names)
    for memory in ({}, {"rope_chunk": 500}):  # 1,344 tokens: three RoPE chunks
        run = spec(seed=11, memory=memory)
        fused = model.generate(run, Recorder().hooks())
        with model.compat.disabled("qk_rms_norm_fused"):
            exact_only = model.generate(run, Recorder().hooks())
            with model.compat.disabled("gelu_quant_fused"):
                without_gelu_quant = model.generate(run, Recorder().hooks())
                with model.compat.disabled("norm_modulate_fused"):
                    without_norm_modulate = model.generate(run, Recorder().hooks())
                    with model.compat.disabled("rope_fused"), model.compat.disabled("gate_residual_fused"):
                        eager = model.generate(run, Recorder().hooks())
        assert np.array_equal(without_norm_modulate, eager), memory
        assert np.array_equal(without_gelu_quant, eager), memory
        assert np.array_equal(exact_only, eager), memory
        diff = np.abs(fused.astype(np.int16) - eager.astype(np.int16))
        gpu_report("fused_frames", memory=memory, max_abs=int(diff.max()), mean_abs=float(diff.mean()))
        assert diff.mean() < 1.0, memory


def test_norm_modulate_and_gelu_quant_under_the_ffn_token_slicing_same_frames(tiny_service):
    """720x1280x49 is 46,800 tokens: the FFN runs in two slices, each with its LayerNorm + modulate
    and its GELU + quantisation fused (the two rewrites of infer_ffn composed)."""
    model = loaded_model(tiny_service)
    infer = model._runner.model.transformer_infer
    sliced = infer.infer_ffn.__wrapped__.__func__.__code__
    assert "rewritten by lightx2v_compat" in sliced.co_filename
    assert {"_fused_norm_modulate_", "_fused_gelu_quant_"} <= set(sliced.co_names)
    assert "rewritten by lightx2v_compat" in infer.infer_self_attn.__func__.__code__.co_filename
    big = spec(720, 1280, 49, seed=4, memory={"vae_tiling": True})
    before = infer.infer_ffn.sliced_calls
    fused = model.generate(big, Recorder().hooks())
    assert infer.infer_ffn.sliced_calls > before
    with model.compat.disabled("gelu_quant_fused"):
        without_gelu_quant = model.generate(big, Recorder().hooks())
        with model.compat.disabled("norm_modulate_fused"):
            eager = model.generate(big, Recorder().hooks())
    assert np.array_equal(fused, without_gelu_quant)
    assert np.array_equal(fused, eager)
