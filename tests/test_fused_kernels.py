"""The fused Triton kernels of the DiT block (pipeline/backends/fused_kernels.py) against the eager
chains LightX2V runs, on the CPU through Triton's interpreter, and their installation through the
compat layer. Skipped where triton is not installed (CI's test venv) and on CUDA machines (the GPU
tests, tests/gpu/test_fused_kernels_gpu.py, check the compiled kernels there)."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if torch.cuda.is_available():
    pytest.skip("CUDA machine: tests/gpu/test_fused_kernels_gpu.py checks the compiled kernels", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined: they run on host tensors
pytest.importorskip("triton")

from pipeline.backends import fused_kernels as fk  # noqa: E402
from pipeline.backends import lightx2v_compat as compat  # noqa: E402


@pytest.fixture(autouse=True)
def unproven_named(monkeypatch):
    """gelu_quant_fused is not yet proven on a GPU (lightx2v_compat.UNPROVEN_NAMES): off unless
    named. The tests here exercise it, so they name it."""
    monkeypatch.setenv(compat.UNPROVEN_ENV, ",".join(sorted(compat.UNPROVEN_NAMES)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eager_rope(x, freqs):
    """LightX2V's TorchComplexRope.apply_single for a full-width interleaved rotation."""
    x_complex = torch.view_as_complex(x.to(torch.float32).reshape(*x.shape[:-1], -1, 2).contiguous())
    output = torch.view_as_real(x_complex * freqs).flatten(-2)
    return output.to(x.dtype)


def wan_freqs(tokens: int, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    angles = torch.rand((tokens, 1, head_dim // 2), generator=gen) * 1024
    return torch.polar(torch.ones_like(angles), angles)


def eager_rms(x, weight, eps=1e-6):
    """LightX2V's RMSWeightSgl.apply without sgl_kernel (bf16 infer and sensitive dtype) as CUDA
    runs it: each bf16 op computed in fp32 and rounded (torch's CPU bf16 rsqrt rounds otherwise, so
    the chain is spelled out here; the GPU test compares with the real chain on CUDA)."""
    bf = torch.bfloat16
    sq = (x.float() * x.float()).to(bf)
    mean = (sq.float().sum(-1, keepdim=True) / x.shape[-1]).to(bf)
    r = torch.rsqrt((mean.float() + eps).to(bf).float()).to(bf)
    out = (x.float() * r.float()).to(bf)
    return out if weight is None else (out.float() * weight.float()).to(bf)


def cuda_layer_norm(x, eps=1e-6, form=0):
    """torch's CUDA LayerNorm without affine of bf16 rows whose width is a multiple of 4
    (vectorized_layer_norm_kernel: 4 warps x 32 lanes, Welford per thread over its 4-element vectors,
    warp shuffles down 16..1, then warps 2 and 1 apart), transcribed thread by thread in numpy fp32.
    `form` is how the Welford sums were contracted (fused_kernels.LN_FORMS); an FMA is formed in
    fp64, as the kernel does under the interpreter."""
    f32 = np.float32
    xf = x.float().numpy()
    rows, width = xf.shape

    def fma(a, b, c, fused):
        return (a.astype(np.float64) * b + c).astype(f32) if fused else (a * b + c).astype(f32)

    def combine(b, a):  # cuWelfordCombine(dataB=b, dataA=a)
        (mb, sb, cb), (ma, sa, ca) = b, a
        delta, count = mb - ma, ca + cb
        coef = f32(1) / np.where(count > 0, count, f32(1))
        na, nb = ca * coef, cb * coef
        if form == 1:
            mean = fma(nb, mb, na * ma, True)
        else:
            mean = fma(na, ma, nb * mb, form == 0)
        m2 = fma(delta * delta * ca, nb, sa + sb, form != 2)
        return np.where(count > 0, mean, f32(0)), np.where(count > 0, m2, f32(0)), count

    state = [np.zeros((rows, 128), f32) for _ in range(3)]
    n_vec = width // 4
    for first in range(0, n_vec, 128):
        vec = first + np.arange(128)
        valid = vec < n_vec
        for ii in range(4):
            v = xf[:, np.minimum(vec, n_vec - 1) * 4 + ii]
            mean, m2, count = state
            delta = v - mean
            new_count = count + f32(1)
            new_mean = fma(delta, f32(1) / new_count, mean, form != 2)
            new_m2 = fma(delta, v - new_mean, m2, form != 2)
            state = [np.where(valid, new, old) for new, old in zip((new_mean, new_m2, new_count), state)]
    lanes = [s.reshape(rows, 4, 32) for s in state]
    for offset in (16, 8, 4, 2, 1):  # __shfl_down_sync: a lane past the warp reads its own value
        src = np.minimum(np.arange(32) + offset, 31)
        src = np.where(np.arange(32) + offset < 32, src, np.arange(32))
        lanes = list(combine(tuple(lanes), tuple(s[:, :, src] for s in lanes)))
    warps = [s[:, :, 0] for s in lanes]  # lane 0 of each warp
    for offset in (2, 1):
        lower = tuple(s[:, :offset] for s in warps)
        upper = tuple(s[:, offset:2 * offset] for s in warps)
        warps = list(combine(lower, upper))
    mean, m2 = warps[0][:, :1], warps[1][:, :1]
    var = m2 / f32(width)
    rstd = f32(1) / np.sqrt(var + f32(eps))  # the interpreter's rsqrt
    return torch.from_numpy((rstd * (xf - mean)).astype(f32)).to(torch.bfloat16)


def modulate(x, scale, shift):
    """LightX2V's torch modulate (transformer_infer.modulate): three bf16 ops."""
    return x * (1 + scale.squeeze()) + shift.squeeze()


def bf16_of_exact(d):
    """float64 values (exact sums) rounded once to bf16, ties to even."""
    u = d.numpy().view(np.uint64)
    u = (u + (np.uint64((1 << 44) - 1) + ((u >> np.uint64(45)) & np.uint64(1)))) & ~np.uint64((1 << 45) - 1)
    return torch.from_numpy(u.view(np.float64)).to(torch.bfloat16)


def modulate_rows(gen, rows, width):
    spread = torch.exp(torch.randn((rows, 1), generator=gen))
    x = (torch.randn((rows, width), generator=gen) * spread + torch.randn((rows, 1), generator=gen) * 4)
    scale = (torch.randn((1, 1, width), generator=gen) * 0.5).to(torch.bfloat16)
    return x.to(torch.bfloat16), scale, torch.randn((1, 1, width), generator=gen).to(torch.bfloat16)


def rel_l2(a, ref):
    return float((a.double() - ref).norm() / ref.norm())


# -- kernels --------------------------------------------------------------------------------------


def test_a_rope_rounding_form_is_bit_identical_to_the_eager_complex_product():
    form = fk.rope_variant_matching(eager_rope, "cpu", tokens=32, heads=2)
    assert form in fk.ROPE_FORMS
    gen = _gen(1)
    # 3 heads x 128: 192 pairs per token, not a multiple of the kernel's block.
    x = (torch.randn((37, 3, 128), generator=gen) * 4).to(torch.bfloat16)
    freqs = wan_freqs(37, 128, gen)
    assert torch.equal(fk.rope(x, freqs, form), eager_rope(x, freqs))


def test_rope_of_a_view_with_head_stride_reads_the_right_elements():
    gen = _gen(3)
    qkv = (torch.randn((16, 2, 4, 64), generator=gen)).to(torch.bfloat16)
    q = qkv[:, 0]  # [16, 4, 64], rows strided by the fused qkv layout
    freqs = wan_freqs(16, 64, gen)
    assert torch.equal(fk.rope(q, freqs, (0, 0)), eager_rope(q, freqs))


def test_rms_norm_keeps_the_eager_roundings_and_is_no_less_accurate():
    gen = _gen(4)
    x = (torch.randn((48, 5120), generator=gen) * 3).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn((5120,), generator=gen)).to(torch.bfloat16)
    ours, eager = fk.rms_norm(x, w, 1e-6), eager_rms(x, w)
    rows_equal = (ours == eager).all(-1).float().mean().item()
    assert rows_equal >= 0.97, rows_equal  # only a sum-order flip of a row's bf16 mean may differ
    xd = x.double()
    exact = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel_l2(ours, exact) <= rel_l2(eager, exact) * 1.01 + 1e-6


def test_rms_norm_without_weight_and_on_three_dims():
    gen = _gen(5)
    x = torch.randn((4, 6, 256), generator=gen).to(torch.bfloat16)
    out = fk.rms_norm(x, None, 1e-6)
    assert out.shape == x.shape and (out == eager_rms(x, None)).all(-1).float().mean() >= 0.95


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32])
def test_gate_residual_is_bit_identical_and_in_place(gate_dtype):
    gen = _gen(6)
    x = torch.randn((33, 1500), generator=gen).to(torch.bfloat16)
    y = torch.randn((33, 1500), generator=gen).to(torch.bfloat16)
    gate = torch.randn((1, 1, 1500), generator=gen).to(gate_dtype)
    want = x.clone()
    want.add_(y * gate.squeeze())
    out = fk.gate_residual_(x, y, gate.squeeze())
    assert out.data_ptr() == x.data_ptr() and torch.equal(x, want)


@pytest.mark.parametrize("width", [1000, 64, 2560])  # threads with 2 vectors and idle ones; 128 threads x 5
def test_norm_modulate_retraces_torch_cuda_layer_norm_then_modulate(width):
    gen = _gen(10)
    x, scale, shift = modulate_rows(gen, 3, width)
    outs = {}
    for ln_form in fk.LN_FORMS:
        n = cuda_layer_norm(x, 1e-6, ln_form)
        outs[ln_form] = fk.norm_modulate(x, scale, shift, 1e-6, (ln_form, 0))
        assert torch.equal(outs[ln_form], modulate(n, scale, shift)), ln_form
        single = bf16_of_exact(n.double() * (1 + scale.squeeze()).double() + shift.squeeze().double())
        assert torch.equal(fk.norm_modulate(x, scale, shift, 1e-6, (ln_form, 1)), single), ln_form
    # The statistics are torch's to the last bit, not just close: against an fp64 LayerNorm only
    # bf16 roundings differ.
    xd = x.double()
    exact = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)
    assert (cuda_layer_norm(x) == exact.to(torch.bfloat16)).float().mean() > 0.99


def test_norm_modulate_forms_differ_where_torch_would_and_each_is_retraced():
    gen = _gen(12)
    x, scale, shift = modulate_rows(gen, 64, 1000)  # threads with 2 vectors and with 1: unequal counts
    refs = [cuda_layer_norm(x, 1e-6, form) for form in fk.LN_FORMS]
    differ = ((refs[0] != refs[1]).any(-1) | (refs[0] != refs[2]).any(-1)).nonzero().flatten()[:3]
    assert len(differ) > 0  # the FMA contraction shows in the output: the forms are not interchangeable
    rows = x[differ]
    outs = [fk.norm_modulate(rows, scale, shift, 1e-6, (form, 0)) for form in fk.LN_FORMS]
    for form, out in zip(fk.LN_FORMS, outs):
        assert torch.equal(out, modulate(refs[form][differ], scale, shift)), form
    assert not (torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]))


def test_norm_modulate_on_a_row_slice_and_the_form_found_by_probing():
    gen = _gen(11)
    x, scale, shift = modulate_rows(gen, 6, 512)
    part = x[2:5]  # an FFN token slice: rows of a larger tensor
    assert fk.norm_modulate_fits(part, scale, shift)
    assert torch.equal(fk.norm_modulate(part, scale, shift, 1e-6, (0, 0)), modulate(cuda_layer_norm(part), scale, shift))
    probe = dict(widths=(512,), rows=3)
    assert fk.norm_modulate_form_matching(lambda a, s, h: modulate(cuda_layer_norm(a), s, h), "cpu", **probe) == (0, 0)

    def single_rounding(a, s, h):
        n = cuda_layer_norm(a).double()
        return bf16_of_exact(n * (1 + s.squeeze()).double() + h.squeeze().double())

    assert fk.norm_modulate_form_matching(single_rounding, "cpu", **probe) == (0, 1)
    # torch's CPU LayerNorm is another algorithm: no form may claim to be an eager chain it is not.
    assert fk.norm_modulate_form_matching(
        lambda a, s, h: modulate(torch.nn.functional.layer_norm(a.float(), (a.shape[-1],), eps=1e-6).mul(1.01)
                                 .to(torch.bfloat16), s, h), "cpu", **probe) is None


def test_fits_refuses_what_the_kernels_do_not_mirror():
    x = torch.zeros((4, 8), dtype=torch.bfloat16)
    assert not fk.gate_residual_fits(x.half(), x.half(), torch.zeros(8, dtype=torch.float16))
    assert not fk.gate_residual_fits(x, x, torch.zeros((4, 8), dtype=torch.bfloat16))  # per-token gate
    assert not fk.rms_norm_fits(x.float(), None)
    q = torch.zeros((4, 2, 8), dtype=torch.bfloat16)
    assert fk.rope_fits(q, torch.zeros((4, 1, 4), dtype=torch.complex64))
    assert not fk.rope_fits(q, torch.zeros((4, 1, 4), dtype=torch.complex128))
    assert not fk.rope_fits(q, torch.zeros((5, 1, 4), dtype=torch.complex64))
    row = torch.zeros((1, 1, 8), dtype=torch.bfloat16)
    assert fk.norm_modulate_fits(x, row, row)
    assert not fk.norm_modulate_fits(x[:1], row, row)  # modulate's squeeze would drop the token dim
    assert not fk.norm_modulate_fits(torch.zeros((4, 6), dtype=torch.bfloat16), row[..., :6], row[..., :6])  # 6 % 4
    assert not fk.norm_modulate_fits(x.t().contiguous().t(), row, row)  # torch copies it first
    assert not fk.norm_modulate_fits(x.flatten()[1:-3].view(4, 7)[:, :4], row[..., :4], row[..., :4])
    assert not fk.norm_modulate_fits(x, row.float(), row.float())
    assert not fk.norm_modulate_fits(x, torch.zeros((4, 8), dtype=torch.bfloat16), row)  # per-token scale


# -- installation through the compat layer --------------------------------------------------------


class TorchComplexRope:
    """The shape of LightX2V's class: apply_single holds the lines the compat layer detects."""

    def __init__(self):
        self.layout, self.compute_dtype = "interleaved", torch.float32
        self.calls = 0

    def apply_single(self, x, freqs, **kwargs):
        x_complex = torch.view_as_complex(x.to(self.compute_dtype).reshape(*x.shape[:-1], -1, 2).contiguous())
        output = torch.view_as_real(x_complex * freqs).flatten(-2)
        return output.to(x.dtype)

    def apply(self, q, k, freqs, **kwargs):
        self.calls += 1
        return self.apply_single(q, freqs), self.apply_single(k, freqs)


class ChunkedRope:
    def __init__(self, inner, chunk):
        self.inner, self.chunk = inner, chunk

    def apply(self, q, k, freqs, **kwargs):
        outs = [self.inner.apply(q[s:s + self.chunk], k[s:s + self.chunk], freqs[s:s + self.chunk])
                for s in range(0, q.shape[0], self.chunk)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


class Module:
    def __init__(self, **children):
        self._modules = dict(children)


def test_rope_fused_serves_plain_and_chunked_ropes_and_switches_off_by_name():
    plain, inner = TorchComplexRope(), TorchComplexRope()
    weights = Module(blocks=Module(a=Module(rope=plain), b=Module(rope=ChunkedRope(inner, 5))))
    fixes = compat.CompatFixes()
    compat.rope_fused(fixes, weights, TorchComplexRope, device="cpu")
    assert fixes.has("rope_fused") and "2 modules" in fixes.applied[-1].detail
    gen = _gen(7)
    q, k = (torch.randn((12, 2, 32), generator=gen).to(torch.bfloat16) for _ in range(2))
    freqs = wan_freqs(12, 32, gen)
    for rope in (plain, weights._modules["blocks"]._modules["b"]._modules["rope"]):
        fq, fk_ = rope.apply(q, k, freqs)
        assert torch.equal(fq, eager_rope(q, freqs)) and torch.equal(fk_, eager_rope(k, freqs))
    assert plain.calls == 0 and inner.calls == 0  # the kernel ran, not upstream's apply
    with fixes.disabled("rope_fused"):
        plain.apply(q, k, freqs)
    assert plain.calls == 1
    plain.apply(q, k, freqs, positions=torch.arange(12))  # what the kernel does not serve
    assert plain.calls == 2


def test_rope_fused_is_skipped_for_another_rope_and_by_name():
    class OtherRope(TorchComplexRope):
        def apply_single(self, x, freqs, **kwargs):
            return x

    weights = Module(a=Module(rope=OtherRope()))
    fixes = compat.CompatFixes()
    compat.rope_fused(fixes, weights, OtherRope, device="cpu")
    assert not fixes.names
    fixes = compat.CompatFixes(skip=frozenset({"rope_fused"}))
    compat.rope_fused(fixes, Module(a=Module(rope=TorchComplexRope())), TorchComplexRope, device="cpu")
    assert not fixes.names



def test_rope_fused_that_does_not_build_here_leaves_upstreams_rope(monkeypatch):
    def does_not_build(*args, **kwargs):
        raise fk.KernelBuildError("out of resources")

    monkeypatch.setattr(fk, "rope_variant_matching", does_not_build)
    rope = TorchComplexRope()
    fixes = compat.CompatFixes()
    compat.rope_fused(fixes, Module(a=Module(rope=rope)), TorchComplexRope, device="cpu")  # logged, the load goes on
    assert not fixes.names and "apply" not in vars(rope)

class _RmsModule:
    """LightX2V's norm module without sgl_kernel, its RMSWeightSgl with the fallback lines."""

    sgl_kernel = None

    class RMSWeightSgl:
        def __init__(self, weight):
            self.weight, self.eps = weight, 1e-6
            self.infer_dtype = self.sensitive_layer_dtype = torch.bfloat16
            self.calls = 0

        def _get_actual_weight(self):
            return self.weight

        def apply(self, input_tensor):
            self.calls += 1
            weight = self._get_actual_weight()
            input_tensor = input_tensor * torch.rsqrt(input_tensor.pow(2).mean(-1, keepdim=True) + self.eps)
            if weight is not None:
                input_tensor = (input_tensor * weight).to(self.infer_dtype)
            return input_tensor


def test_qk_rms_norm_fused_on_every_norm_module_unless_sgl_kernel_is_there():
    gen = _gen(8)
    w = (1 + 0.1 * torch.randn((512,), generator=gen)).to(torch.bfloat16)
    norm_q, norm_k = _RmsModule.RMSWeightSgl(w), _RmsModule.RMSWeightSgl(w)
    weights = Module(p=Module(self_attn_norm_q=norm_q, self_attn_norm_k=norm_k))
    fixes = compat.CompatFixes()
    compat.qk_rms_norm_fused(fixes, weights, _RmsModule)
    assert fixes.has("qk_rms_norm_fused") and "2 modules" in fixes.applied[-1].detail
    x = torch.randn((16, 512), generator=gen).to(torch.bfloat16)
    out = norm_q.apply(x)
    assert norm_q.calls == 0 and (out == eager_rms(x, w)).all(-1).float().mean() >= 0.9
    with fixes.disabled("qk_rms_norm_fused"):
        norm_k.apply(x)
    assert norm_k.calls == 1

    class WithSgl(_RmsModule):
        sgl_kernel = object()

    fixes = compat.CompatFixes()
    compat.qk_rms_norm_fused(fixes, Module(p=Module(n=WithSgl.RMSWeightSgl(w))), WithSgl)
    assert not fixes.names


class WanTransformerInfer:
    """The two methods of LightX2V's class with the gate + residual lines (and around them)."""

    def infer_cross_attn(self, phase, x, context, y_out, gate_msa):
        x.add_(y_out * gate_msa.squeeze())
        return x, context

    def post_process(self, x, y, c_gate_msa, pre_infer_out=None):
        if y is None:
            return x
        x.add_(y * c_gate_msa.squeeze())
        return x


def test_gate_residual_fused_rewrites_only_the_line_and_is_bit_identical(monkeypatch):
    calls = []
    real = fk.gate_residual_
    monkeypatch.setattr(fk, "gate_residual_", lambda *a: calls.append(1) or real(*a))
    infer = WanTransformerInfer()
    fixes = compat.CompatFixes()
    compat.gate_residual_fused(fixes, infer)
    assert fixes.has("gate_residual_fused")
    gen = _gen(9)
    x = torch.randn((8, 300), generator=gen).to(torch.bfloat16)
    y = torch.randn((8, 300), generator=gen).to(torch.bfloat16)
    gate = torch.randn((1, 1, 300), generator=gen).to(torch.bfloat16)
    want = x.clone()
    want.add_(y * gate.squeeze())
    got, context = infer.infer_cross_attn(None, x.clone(), "ctx", y, gate)
    assert torch.equal(got, want) and context == "ctx" and len(calls) == 1
    assert torch.equal(infer.post_process(x.clone(), y, gate), want) and len(calls) == 2
    assert infer.post_process(x, None, gate) is x
    with fixes.disabled("gate_residual_fused"):
        assert torch.equal(infer.post_process(x.clone(), y, gate), want) and len(calls) == 2
    assert "post_process" in vars(infer) and WanTransformerInfer.post_process.__module__ == __name__  # instance only


def test_gate_residual_fused_leaves_a_changed_upstream_alone():
    class Changed(WanTransformerInfer):
        def post_process(self, x, y, c_gate_msa, pre_infer_out=None):
            return x + y * c_gate_msa

    infer = Changed()
    fixes = compat.CompatFixes()
    compat.gate_residual_fused(fixes, infer)
    assert not fixes.names and "post_process" not in vars(infer) and "infer_cross_attn" not in vars(infer)


class LNWeight:
    """LightX2V's LNWeight ("torch"): apply holds the lines the compat layer detects."""

    def __init__(self):
        self.weight = self.bias = None
        self.eps = 1e-6
        self.infer_dtype = self.sensitive_layer_dtype = torch.bfloat16
        self.calls = 0

    def _get_actual_weight(self):
        return self.weight

    def _get_actual_bias(self):
        return self.bias

    def apply(self, input_tensor):
        self.calls += 1
        if self.sensitive_layer_dtype != self.infer_dtype:
            output_tensor = torch.nn.functional.layer_norm(input_tensor.float(), (input_tensor.shape[-1],),
                                                           self._get_actual_weight(), self._get_actual_bias(),
                                                           self.eps).to(self.infer_dtype)
        else:
            output_tensor = torch.nn.functional.layer_norm(input_tensor, (input_tensor.shape[-1],),
                                                           self._get_actual_weight(), self._get_actual_bias(), self.eps)
        return output_tensor


class WanBlockInfer:
    """The LayerNorm + modulate parts of LightX2V's infer_self_attn and infer_ffn (the rest of each
    method stands in by returning what it would feed the next linear)."""

    def __init__(self):
        self.modulate_func = modulate
        self.infer_dtype = self.sensitive_layer_dtype = torch.bfloat16

    def _use_mxfp8_quant_fuse(self):
        return False

    def infer_self_attn(self, phase, x, shift_msa, scale_msa, grid_sizes=None):
        if hasattr(phase, "smooth_norm1_weight"):
            norm1_out = phase.norm1.apply(x)
            norm1_out.mul_(phase.smooth_norm1_weight)
        else:
            norm1_out = phase.norm1.apply(x)
            if self.sensitive_layer_dtype != self.infer_dtype:
                norm1_out = norm1_out.to(self.sensitive_layer_dtype)
            norm1_out = self.modulate_func(norm1_out, scale=scale_msa, shift=shift_msa).squeeze()
        if self.sensitive_layer_dtype != self.infer_dtype:
            norm1_out = norm1_out.to(self.infer_dtype)
        return norm1_out

    def infer_ffn(self, phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa=None):
        x.add_(attn_out)
        if hasattr(phase, "smooth_norm2_weight"):
            norm2_out = phase.norm2.apply(x)
            norm2_out.mul_(phase.smooth_norm2_weight)
        else:
            norm2_out = phase.norm2.apply(x)
            if self.sensitive_layer_dtype != self.infer_dtype:
                norm2_out = norm2_out.to(self.sensitive_layer_dtype)
            norm2_out = self.modulate_func(norm2_out, scale=c_scale_msa, shift=c_shift_msa).squeeze()
        return norm2_out.float() * 2  # the FFN's linears stand in


def _block(gen, tokens=10, width=256):
    x, scale, shift = modulate_rows(gen, tokens, width)
    attn_out = torch.randn((tokens, width), generator=gen).to(torch.bfloat16)
    return x, attn_out, scale, shift


@pytest.mark.parametrize("chunk_first", [True, False])
def test_norm_modulate_fused_in_self_attn_and_under_the_ffn_slicing(monkeypatch, chunk_first):
    # The CUDA LayerNorm's numerics on the CPU: what the probe compares the kernel's forms with.
    monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda x, shape, w, b, eps: cuda_layer_norm(x, eps))
    _small_probe(monkeypatch)
    calls = []
    real = fk.norm_modulate
    monkeypatch.setattr(fk, "norm_modulate", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    phase = Module(norm1=LNWeight(), norm2=LNWeight())
    norm1, norm2 = phase._modules["norm1"], phase._modules["norm2"]
    phase.norm1, phase.norm2 = norm1, norm2
    infer = WanBlockInfer()
    fixes = compat.CompatFixes()
    if chunk_first:
        compat.ffn_chunked_over_tokens(fixes, infer, max_tokens=4)
    compat.norm_modulate_fused(fixes, infer, Module(blocks=Module(b0=phase)), LNWeight, device="cpu")
    if not chunk_first:
        compat.ffn_chunked_over_tokens(fixes, infer, max_tokens=4)
    assert fixes.has("norm_modulate_fused") and "(form (0, 0))" in fixes.applied[-1 - (not chunk_first)].detail
    calls.clear()
    norm1.calls = 0  # the probe ran upstream's LayerNorm once
    gen = _gen(13)
    x, attn_out, scale, shift = _block(gen)
    want_attn = modulate(cuda_layer_norm(x), scale, shift)
    want_ffn = modulate(cuda_layer_norm(x + attn_out), scale, shift).float() * 2
    assert torch.equal(infer.infer_self_attn(phase, x, shift, scale), want_attn)
    assert norm1.calls == 0 and calls == [10]
    assert torch.equal(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want_ffn)
    assert norm2.calls == 0 and calls == [10, 4, 4, 2]  # each token slice fused
    assert infer.infer_ffn.sliced_calls == 1
    with fixes.disabled("norm_modulate_fused"):
        assert torch.equal(infer.infer_self_attn(phase, x, shift, scale), want_attn)
        assert torch.equal(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want_ffn)
    assert norm1.calls == 1 and norm2.calls == 3 and len(calls) == 4 and infer.infer_ffn.sliced_calls == 2
    with fixes.disabled("ffn_chunked_over_tokens"):
        assert torch.equal(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want_ffn)
    assert calls[-1] == 10 and norm2.calls == 3  # fused, not sliced
    # What the kernel does not serve runs upstream's lines: an fp32 scale, an affine LayerNorm.
    assert torch.equal(infer.infer_self_attn(phase, x, shift.float(), scale.float()),
                       modulate(cuda_layer_norm(x), scale.float(), shift.float()))
    norm1.weight = torch.ones(256, dtype=torch.bfloat16)
    infer.infer_self_attn(phase, x, shift, scale)
    assert norm1.calls == 3 and "infer_self_attn" in vars(infer)
    assert WanBlockInfer.infer_self_attn.__module__ == __name__  # the class keeps upstream's method


def _small_probe(monkeypatch):
    """The install-time probe on a few rows (the interpreter runs a row in ~0.1 s)."""
    probe = fk.norm_modulate_form_matching
    monkeypatch.setattr(fk, "norm_modulate_form_matching",
                        lambda eager, device, eps: probe(eager, device, eps, widths=(256,), rows=3))


def test_norm_modulate_fused_not_installed_where_no_form_matches_or_upstream_changed(monkeypatch):
    _small_probe(monkeypatch)
    phase = Module(norm1=LNWeight(), norm2=LNWeight())
    weights = Module(blocks=Module(b0=phase))
    fixes = compat.CompatFixes()
    # torch's own CPU LayerNorm: no form of the kernel is that algorithm.
    monkeypatch.setattr(torch.nn.functional, "layer_norm",
                        lambda x, shape, w, b, eps: cuda_layer_norm(x, eps).float().mul(1.01).to(torch.bfloat16))
    compat.norm_modulate_fused(fixes, WanBlockInfer(), weights, LNWeight, device="cpu")
    assert not fixes.names
    monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda x, shape, w, b, eps: cuda_layer_norm(x, eps))

    class Changed(WanBlockInfer):
        def infer_ffn(self, phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa=None):
            return self.modulate_func(phase.norm2.apply(x + attn_out), scale=c_scale_msa, shift=c_shift_msa)

    infer = Changed()
    compat.norm_modulate_fused(fixes, infer, weights, LNWeight, device="cpu")
    assert not fixes.names and "infer_self_attn" not in vars(infer)
    skipped, infer = compat.CompatFixes(skip=frozenset({"norm_modulate_fused"})), WanBlockInfer()
    compat.norm_modulate_fused(skipped, infer, weights, LNWeight, device="cpu")
    assert not skipped.names and "infer_ffn" not in vars(infer)

    def does_not_build(*args, **kwargs):
        raise fk.KernelBuildError("out of shared memory")

    monkeypatch.setattr(fk, "norm_modulate_form_matching", does_not_build)
    infer = WanBlockInfer()
    compat.norm_modulate_fused(fixes, infer, weights, LNWeight, device="cpu")  # logged, the load goes on
    assert not fixes.names and "infer_ffn" not in vars(infer)


# -- GELU (tanh) + the INT8 quantisation of ffn_2's input ------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


# LightX2V's int8_quantize_kernel and int8_quantize_triton (common/ops/mm/triton_kernels.py at f8aee98b),
# as upstream writes them: what the fused kernel's quantisation must reproduce.
@triton.jit
def int8_quantize_kernel(X, OUT, SCALES, HDIM, BLOCK_SIZE: tl.constexpr):
    row_idx = tl.program_id(0)
    x_ptr = X + row_idx * HDIM
    out_ptr = OUT + row_idx * HDIM
    h_offset = tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + h_offset, mask=h_offset < HDIM).to(tl.float32)
    x_scale = 127.0 / tl.max(tl.abs(x))
    x_scaled = x * x_scale
    x_scaled += (0.5 * tl.where(x_scaled >= 0, 1, -1)).to(tl.int8)
    tl.store(out_ptr + h_offset, x_scaled, mask=h_offset < HDIM)
    tl.store(SCALES + row_idx, 1 / x_scale)


def int8_quantize_triton(x):
    x_shape_orig = x.shape
    # The one change: the kernel reads x as fp32, because the interpreter's bf16 -> fp32 cast is wrong
    # for subnormals (the GPU's is exact, and the fused kernel converts by the bits).
    x = x.view(-1, x_shape_orig[-1]).float()
    out = torch.empty(x_shape_orig, dtype=torch.int8, device=x.device)
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    BLOCK_SIZE = triton.next_power_of_2(x_shape_orig[-1])
    grid = (x.shape[0],)
    int8_quantize_kernel[grid](x, out, scales, x_shape_orig[-1], BLOCK_SIZE, num_warps=8)
    return out.view(x_shape_orig), scales.view(x_shape_orig[:-1])


# GELU's x^3 and e^2|z| overflow for large bf16 inputs, as on the GPU (where they become inf silently).
interpreter_overflows = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
GELU_BETA = np.float32(1.41421356237309504880 * 1.12837916709551257390 * 0.5)  # M_SQRT2 * M_2_SQRTPI * 0.5
GELU_KAPPA = np.float32(0.044715)


def cuda_gelu(y, form=0, approximate="tanh"):
    """torch's CUDA GeluCUDAKernelImpl (approximate="tanh") of bf16 y, in numpy fp32: `form` is whether
    x + kKappa * x^3 was contracted into an FMA (fused_kernels.GELU_FORMS; formed in fp64 as the kernel
    does under the interpreter), and tanhf is the interpreter's stand-in (1 - 2 / (e^2|z| + 1), signed)
    that the kernel computes where Triton has no libdevice."""
    assert approximate == "tanh"
    f32 = np.float32
    x = y.float().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        cube = x * x * x
        s = (GELU_KAPPA.astype(np.float64) * cube + x).astype(f32) if form == 0 else GELU_KAPPA * cube + x
        inner = GELU_BETA * s
        t = f32(1) - f32(2) / (np.exp(f32(2) * np.abs(inner)) + f32(1))
        t = np.where(inner < 0, -t, t)
        out = (f32(0.5) * x) * (f32(1) + t)
    return torch.from_numpy(out.astype(f32)).to(torch.bfloat16)  # round to nearest even


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def ffn_rows(gen, rows, width):
    spread = torch.exp(torch.randn((rows, 1), generator=gen))
    return (torch.randn((rows, width), generator=gen) * spread + torch.randn((rows, 1), generator=gen)).to(torch.bfloat16)


@pytest.mark.parametrize("form", fk.GELU_FORMS)
@pytest.mark.parametrize("width", [13824, 1000])  # ffn_2's input; a width with masked columns
def test_gelu_quant_is_upstreams_quantisation_of_the_retraced_gelu(form, width):
    y = ffn_rows(_gen(21), 4, width)
    y[1, 7] = 0  # a zero and a row whose GELU is all non-positive
    y[2] = -y[2].abs() - 1
    want_gelu = cuda_gelu(y, form)
    want_values, want_scales = int8_quantize_triton(want_gelu)
    got_gelu = torch.empty_like(y)
    for got in (fk.gelu_quant(y, form, gelu_out=got_gelu), fk.gelu_quant(y, form)):
        assert isinstance(got, fk.Int8Rows)
        assert torch.equal(got.values, want_values)
        assert torch.equal(got.scales.view(torch.int32), want_scales.view(torch.int32))
    assert same_bits(got_gelu, want_gelu)
    # The truncation toward zero and the row max: a value is never past +-127, and each row reaches it.
    assert int(want_values.abs().max(dim=1).values.min()) == 127
    assert want_values.float().mul(want_scales[:, None]).sub(want_gelu.float()).abs().max() < want_scales.max()


@interpreter_overflows
def test_each_gelu_form_over_every_bf16_value():
    every = fk.every_finite_bf16(13824)
    assert every.shape == (5, 13824)
    assert every.flatten().unique().numel() == 65536 - 256 - 1  # all but NaNs and +-inf; +0 == -0 once
    outs = []
    for form in fk.GELU_FORMS:
        got = torch.empty_like(every)
        fk.gelu_quant(every, form, gelu_out=got)
        assert same_bits(got, cuda_gelu(every, form))
        outs.append(got)
    # The FMA contraction changes the fp32 inner value of 448 inputs, but no bf16 output: whichever
    # form nvcc chose, the probe's check over every input decides (the tanh is what may differ).
    assert same_bits(outs[0], outs[1])


def probe(gelu, quantize=int8_quantize_triton):
    return fk.gelu_quant_form_matching(gelu, quantize, "cpu", width=1000, rows=3)


@interpreter_overflows
def test_gelu_quant_probe_picks_the_matching_form_and_nothing_else(monkeypatch):
    for form in fk.GELU_FORMS:
        assert probe(lambda y, form=form: cuda_gelu(y, form)) == fk.GELU_FORMS[0]  # the forms coincide
    real = fk.gelu_quant

    def first_form_off_by_one_step(y, form, gelu_out=None):
        got = real(y, form, gelu_out)
        if form == fk.GELU_FORMS[0]:
            got.values[-1, -1] -= 1
        return got

    monkeypatch.setattr(fk, "gelu_quant", first_form_off_by_one_step)
    assert probe(cuda_gelu) == fk.GELU_FORMS[1]
    monkeypatch.setattr(fk, "gelu_quant", real)
    # torch's CPU GELU (std::tanh): not the kernel's tanh here, so no form may claim to be it.
    assert probe(lambda y: torch.nn.functional.gelu(y, approximate="tanh")) is None

    def rounding_quantize(x):  # round to nearest instead of int8_quantize_kernel's truncation
        scale = 127.0 / x.float().abs().amax(dim=1)
        return (x.float() * scale[:, None]).round().to(torch.int8), 1 / scale

    assert probe(lambda y: cuda_gelu(y, 0), rounding_quantize) is None


def test_gelu_quant_fits_only_what_the_kernel_mirrors():
    y = torch.zeros((4, 1000), dtype=torch.bfloat16)
    assert fk.gelu_quant_fits(y)
    assert not fk.gelu_quant_fits(y.float())
    assert not fk.gelu_quant_fits(y[:, :500])  # not contiguous
    assert not fk.gelu_quant_fits(y.view(2, 2, 1000))
    assert not fk.gelu_quant_fits(y[:0])
    assert not fk.gelu_quant_fits(torch.zeros((2, fk.GELU_QUANT_MAX_COLS + 1), dtype=torch.bfloat16))
    assert not fk.gelu_quant_fits((y, y))


GEMM_CALLS = []


def int8_gemm_triton(a, b, a_scales, b_scales, fuse_gelu=False, output_dtype=None):
    """LightX2V's INT8 GEMM in exact arithmetic (int32 accumulation is exact; fp64 is here)."""
    GEMM_CALLS.append((a.clone(), a_scales.clone()))
    acc = a.double() @ b.double().t()
    return (acc * a_scales.double()[:, None] * b_scales.double()[None, :]).float().to(output_dtype)


def int8_gemm_bias_triton(a, b, bias, a_scales, b_scales, fuse_gelu=False, output_dtype=None):
    GEMM_CALLS.append((a.clone(), a_scales.clone()))
    acc = a.double() @ b.double().t()
    return (acc * a_scales.double()[:, None] * b_scales.double()[None, :] + bias.double()).float().to(output_dtype)


class Int8TritonMM:
    """LightX2V's MMWeightWint8channelAint8channeldynamicTriton ("int8-triton"): its apply as upstream."""

    def __init__(self, gen, n, k, bias=True):
        self.weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        self.weight_scale = torch.full((n,), 1 / (127 * k ** 0.5))
        self.bias = torch.randn((n,), generator=gen) if bias else None
        self.infer_dtype = torch.bfloat16
        self.act_quant_func = int8_quantize_triton
        self.has_lora_branch = False

    def _get_actual_bias(self):
        return self.bias

    def apply_lora(self, input_tensor):
        return input_tensor.float().sum(-1, keepdim=True).to(self.infer_dtype)

    def apply(self, input_tensor):
        input_tensor_quant, input_tensor_scale = self.act_quant_func(input_tensor)
        if self.bias is not None:
            output_tensor = int8_gemm_bias_triton(
                input_tensor_quant,
                self.weight,
                self._get_actual_bias(),
                input_tensor_scale,
                self.weight_scale,
                output_dtype=self.infer_dtype,
            )
        else:
            output_tensor = int8_gemm_triton(
                input_tensor_quant,
                self.weight,
                input_tensor_scale,
                self.weight_scale,
                output_dtype=self.infer_dtype,
            )
        if self.has_lora_branch:
            return output_tensor.squeeze(0) + self.apply_lora(input_tensor) if len(output_tensor.shape) == 3 else output_tensor + +self.apply_lora(input_tensor)

        return output_tensor.squeeze(0) if len(output_tensor.shape) == 3 else output_tensor


class WanFfnInfer(WanBlockInfer):
    """LightX2V's infer_ffn without the MXFP8 branches: the LayerNorm + modulate, ffn_0, the GELU, ffn_2."""

    clean_cuda_cache = False

    def infer_ffn(self, phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa=None):
        x.add_(attn_out)
        if hasattr(phase, "smooth_norm2_weight"):
            norm2_out = phase.norm2.apply(x)
            norm2_out.mul_(phase.smooth_norm2_weight)
        else:
            norm2_out = phase.norm2.apply(x)
            if self.sensitive_layer_dtype != self.infer_dtype:
                norm2_out = norm2_out.to(self.sensitive_layer_dtype)
            norm2_out = self.modulate_func(norm2_out, scale=c_scale_msa, shift=c_shift_msa).squeeze()
        y = phase.ffn_0.apply(norm2_out)
        if self.clean_cuda_cache:
            del norm2_out, x
        y = torch.nn.functional.gelu(y, approximate="tanh")
        if self.clean_cuda_cache:
            pass
        y = phase.ffn_2.apply(y)

        return y


def _ffn_phase(gen, dim=256, hidden=1000, ffn_0_bias=False):
    phase = Module(norm2=LNWeight(), ffn_0=Int8TritonMM(gen, hidden, dim, bias=ffn_0_bias),
                   ffn_2=Int8TritonMM(gen, dim, hidden))
    for key, module in phase._modules.items():
        setattr(phase, key, module)
    return phase


class _Counted:
    """Counts the calls of a function it stands in for."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args[0].shape[0])
        return self.fn(*args, **kwargs)


@pytest.fixture
def cuda_numerics(monkeypatch):
    """torch's CUDA LayerNorm and GELU on the CPU (what the probes compare the kernels with), small
    probes (the interpreter runs a row in milliseconds), and counters on the eager GELU and the kernels."""
    monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda x, shape, w, b, eps: cuda_layer_norm(x, eps))
    gelu = _Counted(cuda_gelu)
    monkeypatch.setattr(torch.nn.functional, "gelu", gelu)
    _small_probe(monkeypatch)
    real_probe = fk.gelu_quant_form_matching
    monkeypatch.setattr(fk, "gelu_quant_form_matching",
                        lambda g, q, device: real_probe(g, q, device, width=1000, rows=3))
    kernels = {name: _Counted(getattr(fk, name)) for name in ("gelu_quant", "norm_modulate")}
    for name, counted in kernels.items():
        monkeypatch.setattr(fk, name, counted)
    GEMM_CALLS.clear()
    return gelu, kernels


def _ffn_case(seed, tokens=10, dim=256):
    gen = _gen(seed)
    x, scale, shift = modulate_rows(gen, tokens, dim)
    return gen, x, torch.randn((tokens, dim), generator=gen).to(torch.bfloat16), scale, shift


@interpreter_overflows
def test_gelu_quant_fused_feeds_ffn_2_the_int8_input_upstream_computes(cuda_numerics):
    gelu, kernels = cuda_numerics
    gen, x, attn_out, scale, shift = _ffn_case(31)
    phase = _ffn_phase(gen)
    want = WanFfnInfer().infer_ffn(phase, x.clone(), attn_out, shift, scale)
    upstream_calls = GEMM_CALLS[:]
    infer = WanFfnInfer()
    fixes = compat.CompatFixes()
    compat.gelu_quant_fused(fixes, infer, Module(blocks=Module(b0=phase)), Int8TritonMM, device="cpu")
    assert fixes.has("gelu_quant_fused") and "(form 0)" in fixes.applied[-1].detail
    gelu.calls.clear()
    kernels["gelu_quant"].calls.clear()  # the probe's
    GEMM_CALLS.clear()
    got = infer.infer_ffn(phase, x.clone(), attn_out, shift, scale)
    assert same_bits(got, want) and got.shape == (10, 256)
    assert gelu.calls == [] and kernels["gelu_quant"].calls == [10]  # the bf16 GELU never ran
    for (a, s), (ua, us) in zip(GEMM_CALLS, upstream_calls, strict=True):  # ffn_0's, then ffn_2's
        assert torch.equal(a, ua) and torch.equal(s.view(torch.int32), us.view(torch.int32))
    with fixes.disabled("gelu_quant_fused"):
        assert same_bits(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want)
    assert gelu.calls == [10] and kernels["gelu_quant"].calls == [10]
    assert same_bits(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want)
    assert kernels["gelu_quant"].calls == [10, 10]  # applied again
    assert "infer_ffn" in vars(infer) and WanFfnInfer.infer_ffn.__module__ == __name__  # instance only
    # ffn_2 without a bias: upstream's other GEMM call.
    phase.ffn_2.bias = None
    want = WanFfnInfer().infer_ffn(phase, x.clone(), attn_out, shift, scale)
    assert same_bits(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want)
    assert kernels["gelu_quant"].calls == [10, 10, 10]


@interpreter_overflows
def test_gelu_quant_fused_leaves_what_it_does_not_mirror_to_upstream(cuda_numerics):
    gelu, kernels = cuda_numerics
    gen, x, attn_out, scale, shift = _ffn_case(32)
    phase = _ffn_phase(gen)
    infer = WanFfnInfer()
    fixes = compat.CompatFixes()
    compat.gelu_quant_fused(fixes, infer, Module(blocks=Module(b0=phase)), Int8TritonMM, device="cpu")
    gelu.calls.clear()
    kernels["gelu_quant"].calls.clear()  # the probe's

    def both():
        return infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), WanFfnInfer().infer_ffn(
            phase, x.clone(), attn_out, shift, scale)

    ffn_2 = phase.ffn_2
    ffn_2.has_lora_branch = True  # apply_lora needs the bf16 GELU output
    got, want = both()
    assert same_bits(got, want) and kernels["gelu_quant"].calls == [] and len(gelu.calls) == 2
    ffn_2.has_lora_branch = False
    ffn_2.act_quant_func = lambda t: int8_quantize_triton(t)  # another quantiser than the one probed
    got, want = both()
    assert same_bits(got, want) and kernels["gelu_quant"].calls == []
    ffn_2.act_quant_func = int8_quantize_triton
    ffn_2.apply = types.MethodType(Int8TritonMM.apply, ffn_2)  # an instance's own apply
    got, want = both()
    assert same_bits(got, want) and kernels["gelu_quant"].calls == []
    del ffn_2.apply

    class OtherMM(Int8TritonMM):
        pass

    phase.ffn_2 = OtherMM(gen, 256, 1000)
    got, want = both()
    assert same_bits(got, want) and kernels["gelu_quant"].calls == []
    phase.ffn_2 = ffn_2
    phase.ffn_0.infer_dtype = torch.float32  # an fp32 GELU input
    got, want = both()
    assert got.dtype == want.dtype and torch.equal(got, want) and kernels["gelu_quant"].calls == []
    assert len(gelu.calls) == 10  # each case ran upstream's GELU, fused and unfused


@interpreter_overflows
@pytest.mark.parametrize("order", [("slice", "norm", "gelu"), ("gelu", "norm", "slice"),
                                   ("norm", "gelu", "slice"), ("gelu", "slice", "norm")])
def test_gelu_quant_fused_with_norm_modulate_and_ffn_slicing_in_any_order(cuda_numerics, order):
    gelu, kernels = cuda_numerics
    gen, x, attn_out, scale, shift = _ffn_case(33)
    phase = _ffn_phase(gen)
    weights = Module(blocks=Module(b0=phase))
    want = WanFfnInfer().infer_ffn(phase, x.clone(), attn_out, shift, scale)
    infer = WanFfnInfer()
    fixes = compat.CompatFixes()
    install = {"slice": lambda: compat.ffn_chunked_over_tokens(fixes, infer, max_tokens=4),
               "norm": lambda: compat.norm_modulate_fused(fixes, infer, weights, LNWeight, device="cpu"),
               "gelu": lambda: compat.gelu_quant_fused(fixes, infer, weights, Int8TritonMM, device="cpu")}
    for step in order:
        install[step]()
    assert {"ffn_chunked_over_tokens", "norm_modulate_fused", "gelu_quant_fused"} <= set(fixes.names)
    for counted in (gelu, *kernels.values()):
        counted.calls.clear()
    phase.norm2.calls = 0
    assert same_bits(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want)
    assert kernels["gelu_quant"].calls == [4, 4, 2] and kernels["norm_modulate"].calls == [4, 4, 2]
    assert gelu.calls == [] and phase.norm2.calls == 0
    with fixes.disabled("norm_modulate_fused"):
        assert same_bits(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want)
    assert phase.norm2.calls == 3 and kernels["gelu_quant"].calls == [4, 4, 2] * 2
    with fixes.disabled("gelu_quant_fused"), fixes.disabled("ffn_chunked_over_tokens"):
        assert same_bits(infer.infer_ffn(phase, x.clone(), attn_out, shift, scale), want)
    assert gelu.calls == [10] and kernels["norm_modulate"].calls == [4, 4, 2, 10]


@interpreter_overflows
def test_gelu_quant_fused_not_installed_where_no_form_matches_or_upstream_changed(cuda_numerics, monkeypatch):
    gelu, kernels = cuda_numerics
    phase = _ffn_phase(_gen(34))
    weights = Module(blocks=Module(b0=phase))
    fixes = compat.CompatFixes()
    infer = WanFfnInfer()
    compat.gelu_quant_fused(fixes, infer, weights, None, device="cpu")  # not the int8-triton scheme
    assert not fixes.names and "infer_ffn" not in vars(infer)
    # torch's own CPU GELU: no form of the kernel is that tanh.
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda y, approximate: torch._C._nn.gelu(y, approximate=approximate))
    compat.gelu_quant_fused(fixes, infer, weights, Int8TritonMM, device="cpu")
    assert not fixes.names and "infer_ffn" not in vars(infer)
    monkeypatch.setattr(torch.nn.functional, "gelu", gelu)

    class ChangedInfer(WanFfnInfer):
        def infer_ffn(self, phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa=None):
            return phase.ffn_2.apply(torch.nn.functional.gelu(phase.ffn_0.apply(x + attn_out), approximate="tanh"))

    class ChangedMM(Int8TritonMM):
        def apply(self, input_tensor):
            return int8_gemm_triton(*int8_quantize_triton(input_tensor), self.weight, output_dtype=self.infer_dtype)

    changed_mm_weights = Module(blocks=Module(b0=Module(ffn_2=ChangedMM(_gen(1), 8, 8))))
    for target, mm_cls, where in ((ChangedInfer(), Int8TritonMM, weights), (infer, ChangedMM, changed_mm_weights),
                                  (infer, Int8TritonMM, Module(blocks=Module(b0=Module(ffn_2=ChangedMM(_gen(1), 8, 8)))))):
        compat.gelu_quant_fused(fixes, target, where, mm_cls, device="cpu")
        assert not fixes.names and "infer_ffn" not in vars(target)
    skipped = compat.CompatFixes(skip=frozenset({"gelu_quant_fused"}))
    compat.gelu_quant_fused(skipped, infer, weights, Int8TritonMM, device="cpu")
    assert not skipped.names and "infer_ffn" not in vars(infer)
    # Not yet proven on a GPU: off where WAN_STUDIO_UNPROVEN does not name it.
    monkeypatch.setenv(compat.UNPROVEN_ENV, "rope_fused")
    compat.gelu_quant_fused(fixes, infer, weights, Int8TritonMM, device="cpu")
    assert not fixes.names and "infer_ffn" not in vars(infer)
    monkeypatch.setenv(compat.UNPROVEN_ENV, "gelu_quant_fused")

    def does_not_build(*args, **kwargs):
        raise fk.KernelBuildError("out of resources")

    monkeypatch.setattr(fk, "gelu_quant_form_matching", does_not_build)
    compat.gelu_quant_fused(fixes, infer, weights, Int8TritonMM, device="cpu")  # logged, the load goes on
    assert not fixes.names and "infer_ffn" not in vars(infer)
