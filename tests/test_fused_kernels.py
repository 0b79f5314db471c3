"""The fused Triton kernels of the DiT block (pipeline/backends/fused_kernels.py) against the eager
chains LightX2V runs, on the CPU through Triton's interpreter, and their installation through the
compat layer. Skipped where triton is not installed (CI's test venv) and on CUDA machines (the GPU
tests, tests/gpu/test_fused_kernels_gpu.py, check the compiled kernels there)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if torch.cuda.is_available():
    pytest.skip("CUDA machine: tests/gpu/test_fused_kernels_gpu.py checks the compiled kernels", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined: they run on host tensors
pytest.importorskip("triton")

from pipeline.backends import fused_kernels as fk  # noqa: E402
from pipeline.backends import lightx2v_compat as compat  # noqa: E402


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


def test_fits_refuses_what_the_kernels_do_not_mirror():
    x = torch.zeros((4, 8), dtype=torch.bfloat16)
    assert not fk.gate_residual_fits(x.half(), x.half(), torch.zeros(8, dtype=torch.float16))
    assert not fk.gate_residual_fits(x, x, torch.zeros((4, 8), dtype=torch.bfloat16))  # per-token gate
    assert not fk.rms_norm_fits(x.float(), None)
    q = torch.zeros((4, 2, 8), dtype=torch.bfloat16)
    assert fk.rope_fits(q, torch.zeros((4, 1, 4), dtype=torch.complex64))
    assert not fk.rope_fits(q, torch.zeros((4, 1, 4), dtype=torch.complex128))
    assert not fk.rope_fits(q, torch.zeros((5, 1, 4), dtype=torch.complex64))


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
