"""Triton kernels that fuse the bf16 elementwise chains of LightX2V's Wan DiT block into one pass
each (installed by pipeline/backends/lightx2v_compat.py, each fusion switchable by name).

Every kernel mirrors the rounding points of the eager chain it replaces, so that where the chain is
purely elementwise the output is bit-identical; docs/lightx2v.md §5 lists, per fusion, what the
eager chain computes, where it rounds and whether the fusion is bit-identical.

- rope: LightX2V's TorchComplexRope (q/k in fp32 complex, times complex64 frequencies, back to
  bf16: four full-size temporaries per tensor) in one read and one write of q or k. The complex
  product's rounding depends on how the compiler of the eager kernel contracted it into FMAs, which
  source cannot tell: `rope_variant_matching` tries every single-FMA form against the eager
  function on this device and the compat layer installs the one that is bit-identical (or none).
- rms_norm: the RMSNorm of q and k as LightX2V computes it without sgl_kernel (bf16 square, mean,
  +eps, rsqrt, two bf16 products: seven full-size passes) in one pass, every bf16 rounding kept.
  Only the order of the fp32 sum of squares differs from torch's reduction, so a row whose sum
  lands within that rounding difference of a bf16 boundary gets a mean one bf16 ulp apart.
- gate_residual: `x.add_(y * gate)` (a bf16 product, then a bf16 sum) in place in one pass over x
  and y instead of three; bit-identical.
- norm_modulate: the LayerNorm without affine of the DiT block (torch's CUDA kernel for a bf16 row
  whose width is a multiple of 4) followed by LightX2V's modulate `n * (1 + scale) + shift`, in one
  read of x and one write. The row statistics follow torch's kernel step by step (128 threads, each
  folding its 4-element vectors into a Welford state one element at a time, then the same tree of
  combinations), so the mean and variance are the same fp32 numbers; which of the Welford sums nvcc
  contracted into FMAs, and whether the modulate product is rounded before the sum, cannot be read
  from source: `norm_modulate_form_matching` tries each form against the eager chain on the device
  and the compat layer installs the one that is bit-identical (or none).

- gelu_quant: torch's tanh-GELU of ffn_0's output followed by the per-token INT8 quantisation of
  ffn_2's input (LightX2V's int8_quantize_triton, its Triton operations in its order), in one read
  of the bf16 input and one write of INT8 values and scales; the bf16 GELU tensor is never written.
  Whether nvcc contracted x + kKappa x^3 into an FMA, and whether CUDA's tanhf is the libdevice tanh
  Triton links, cannot be read from source: `gelu_quant_form_matching` compares each form with
  torch's GELU on every finite bf16 value and with the quantiser on random rows, on the device.

Nothing here needs more than a few KB of shared memory or any Hopper-only instruction: the kernels
compile for sm_80/sm_86 and sm_90 alike. This module imports torch and triton at import time; the
compat layer imports it only when it installs a fusion.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.errors import TritonError as KernelBuildError  # compile, ptxas and out-of-resources errors

# Triton's CPU interpreter (the CPU tests) runs the kernels on host tensors; compiled, they need CUDA.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t: torch.Tensor) -> bool:
    return t.is_cuda or (INTERPRETED and t.device.type == "cpu")


# The rounding forms of the complex product (a + bi)(c + di), real and imaginary part:
# 0: both products rounded, then the sum; 1: fma(first product, -second rounded) ; 2: the other way.
ROPE_FORMS = tuple(itertools.product(range(3), range(3)))


@triton.jit
def _bf16(x):
    """fp32 x rounded to the nearest bf16, ties to even, still as fp32 (what `.to(bfloat16)` does in
    torch and in compiled Triton; spelled out so that Triton's CPU interpreter, which truncates,
    computes the same bits). NaN stays NaN; a value past bf16's range rounds to infinity."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, u.to(tl.float32, bitcast=True))


@triton.jit
def _cmul_part(p, q, r, s, SIGN: tl.constexpr, FORM: tl.constexpr):
    """p*q + SIGN*r*s in the rounding FORM (see ROPE_FORMS)."""
    if FORM == 0:
        out = p * q + SIGN * (r * s)
    elif FORM == 1:
        out = tl.fma(p, q, SIGN * (r * s))
    else:
        out = tl.fma(SIGN * r, s, p * q)
    return out


@triton.jit
def _rope_kernel(x_ptr, f_ptr, out_ptr, pairs_per_row, half_dim, stride_xl, stride_xh, stride_ol, stride_oh,
                 stride_fl, RE_FORM: tl.constexpr, IM_FORM: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < pairs_per_row
    head = p // half_dim
    j = p % half_dim
    x_even = x_ptr + token.to(tl.int64) * stride_xl + head * stride_xh + 2 * j
    a = tl.load(x_even, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_even + 1, mask=mask, other=0.0).to(tl.float32)
    f = f_ptr + token.to(tl.int64) * stride_fl + 2 * j  # complex64 viewed as (re, im) float pairs
    c = tl.load(f, mask=mask, other=0.0)
    d = tl.load(f + 1, mask=mask, other=0.0)
    real = _cmul_part(a, c, b, d, -1.0, RE_FORM)
    imag = _cmul_part(a, d, b, c, 1.0, IM_FORM)
    o = out_ptr + token.to(tl.int64) * stride_ol + head * stride_oh + 2 * j
    tl.store(o, _bf16(real).to(tl.bfloat16), mask=mask)
    tl.store(o + 1, _bf16(imag).to(tl.bfloat16), mask=mask)


ROPE_BLOCK = 1024


def rope(x: torch.Tensor, freqs: torch.Tensor, form: tuple[int, int]) -> torch.Tensor:
    """x [L, H, D] (bf16, last dim contiguous) rotated by complex64 `freqs` [L, 1, D/2] or
    [L, D/2], pairs interleaved; a new tensor of x's dtype, as TorchComplexRope.apply_single."""
    L, H, D = x.shape
    f = torch.view_as_real(freqs.reshape(freqs.shape[0], -1))  # [L, D/2, 2] float32, a view
    out = torch.empty((L, H, D), dtype=x.dtype, device=x.device)
    pairs = H * D // 2
    grid = (L, triton.cdiv(pairs, ROPE_BLOCK))
    # Contraction of the plain form into an FMA would change its rounding: forms 1 and 2 ask for
    # their FMA explicitly.
    _rope_kernel[grid](x, f, out, pairs, D // 2, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                       f.stride(0), RE_FORM=form[0], IM_FORM=form[1], BLOCK=ROPE_BLOCK,
                       enable_fp_fusion=False)
    return out


def rope_fits(x: torch.Tensor, freqs: Any) -> bool:
    """Shapes and dtypes the rope kernel serves exactly as the eager chain does."""
    return (isinstance(freqs, torch.Tensor) and freqs.dtype == torch.complex64 and x.dim() == 3 and runs_on(x)
            and x.dtype == torch.bfloat16 and x.stride(-1) == 1 and x.shape[-1] % 2 == 0
            and freqs.device == x.device and freqs.shape[0] == x.shape[0]
            and freqs.numel() == x.shape[0] * x.shape[-1] // 2
            and freqs.reshape(freqs.shape[0], -1).stride(-1) == 1)


def rope_variant_matching(eager: Any, device: str, tokens: int = 512, heads: int = 4, head_dim: int = 128,
                          seed: int = 0) -> tuple[int, int] | None:
    """The rounding form whose output is bit-identical to `eager(x, freqs)` on `device` for random
    bf16 inputs and Wan-like frequencies (angles up to the 1,024 positions of the model's table),
    or None where no form is."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((tokens, heads, head_dim), generator=gen).mul_(3).to(torch.bfloat16).to(device)
    angles = torch.rand((tokens, 1, head_dim // 2), generator=gen, dtype=torch.float32) * 1024
    freqs = torch.polar(torch.ones_like(angles), angles).to(device)
    want = eager(x, freqs)
    for form in ROPE_FORMS:
        if torch.equal(rope(x, freqs, form), want):
            return form
    return None


# -- RMSNorm over the hidden dim (q and k), LightX2V's fallback chain -------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, stride_x, stride_o, eps, inv_n,
                     MEAN_BY_DIVISION: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    xf = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    sq = _bf16(xf * xf)  # input.pow(2): a bf16 tensor
    total = tl.sum(sq, axis=0)
    if MEAN_BY_DIVISION:
        mean = total / n_cols  # torch's CPU mean: fp32 sum, then a division
    else:
        mean = total * inv_n  # torch's CUDA mean: fp32 sum times fp32(1/N)
    ms = _bf16(_bf16(mean) + eps)  # the bf16 mean, plus eps in fp32, rounded
    r = _bf16(tl.math.rsqrt(ms))
    y = _bf16(xf * r)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = _bf16(y * w)
    tl.store(out_ptr + row * stride_o + cols, y.to(tl.bfloat16), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., C] (bf16) -> x * rsqrt(mean(x^2) + eps) * weight with LightX2V's bf16 roundings."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows, cols = x2.shape
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(cols)
    warps = 8 if block >= 4096 else 4
    _rms_norm_kernel[(rows,)](x2, weight if weight is not None else x2, out, cols, x2.stride(0), out.stride(0),
                              float(eps), 1.0 / cols, MEAN_BY_DIVISION=x.device.type == "cpu",
                              HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=warps,
                              enable_fp_fusion=False)
    return out.view(shape)


def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return (x.dtype == torch.bfloat16 and runs_on(x) and x.dim() >= 1 and x.shape[-1] <= 16384
            and x.stride(-1) == 1 and (x.dim() == 1 or x.reshape(-1, x.shape[-1]).stride(-1) == 1)
            and (weight is None or (weight.dtype == x.dtype and weight.is_contiguous()
                                    and weight.shape == (x.shape[-1],) and weight.device == x.device)))


# -- gate + residual: x += y * gate -----------------------------------------------------------------


@triton.jit
def _gate_residual_kernel(x_ptr, y_ptr, g_ptr, n_cols, stride_x, stride_y,
                          ROUND_PRODUCT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    t = y * g
    if ROUND_PRODUCT:
        t = _bf16(t)  # y * gate is a bf16 tensor in the eager chain
    tl.store(x_ptr + row * stride_x + cols, _bf16(x + t).to(tl.bfloat16), mask=mask)


GATE_BLOCK = 1024


def gate_residual_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x.add_(y * gate) in place, gate broadcast over rows; returns x."""
    cols = x.shape[-1]
    product = torch.promote_types(y.dtype, gate.dtype)
    grid = (x.shape[0], triton.cdiv(cols, GATE_BLOCK))
    _gate_residual_kernel[grid](x, y, gate.reshape(-1), cols, x.stride(0), y.stride(0),
                                ROUND_PRODUCT=product == torch.bfloat16, BLOCK=GATE_BLOCK,
                                enable_fp_fusion=False)
    return x


def gate_residual_fits(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> bool:
    """2-D bf16 x and a y of its shape, rows contiguous, and a gate of one row (bf16 or fp32: the
    product is rounded to bf16 only where eager's y * gate is a bf16 tensor)."""
    return (x.dim() == 2 and runs_on(x) and y.shape == x.shape and x.dtype == torch.bfloat16
            and y.dtype in (torch.bfloat16, torch.float32) and gate.dtype in (torch.bfloat16, torch.float32)
            and gate.numel() == x.shape[1] and gate.is_contiguous() and x.stride(1) == 1 and y.stride(1) == 1
            and x.device == y.device == gate.device)



# -- LayerNorm (no affine) + modulate, as torch's CUDA LayerNorm and LightX2V's modulate compute it --

# torch's vectorized_layer_norm_kernel (a row width that is a multiple of 4, aligned rows): a block of
# 4 warps of 32 threads per row; thread t = 32 * warp + lane folds the 4-element vectors t, t + 128,
# ... into its Welford state one element at a time; lanes are then combined 16, 8, 4, 2, 1 apart
# (shuffle down: the lower lane keeps the result) and warps 2, 1 apart.
LN_WARPS, LN_LANES, LN_VEC = 4, 32, 4
LN_THREADS = LN_WARPS * LN_LANES
# How the Welford arithmetic was contracted into FMAs (nvcc contracts a + b*c by default):
# 0: every such sum fused, the combined mean as fma(nA, meanA, nB * meanB);
# 1: the same with the combined mean as fma(nB, meanB, nA * meanA); 2: nothing fused.
LN_FORMS = (0, 1, 2)
# modulate's n * (1 + scale) + shift on bf16 tensors: 0: the product rounded to bf16, then the sum
# (torch's modulate; Triton computing each bf16 op on its own); 1: one bf16 FMA (a single rounding).
MODULATE_FORMS = (0, 1)
NORM_MODULATE_FORMS = tuple(itertools.product(LN_FORMS, MODULATE_FORMS))
NORM_MODULATE_BLOCK = 1024  # columns per step of the output pass


@triton.jit
def _fma32(a, b, c, FUSED: tl.constexpr, FMA_IN_FP64: tl.constexpr):
    """a * b + c in fp32, one rounding where FUSED (Triton's interpreter has no true FMA: there the
    exact product is formed in fp64), else the product rounded first."""
    if FUSED:
        if FMA_IN_FP64:
            out = (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
        else:
            out = tl.fma(a, b, c)
    else:
        out = a * b + c
    return out


@triton.jit
def _welford_combine(mean_b, m2_b, count_b, mean_a, m2_a, count_a, LN_FORM: tl.constexpr,
                     FMA_IN_FP64: tl.constexpr):
    """torch's cuWelfordCombine(dataB, dataA): B is the state that keeps the result."""
    delta = mean_b - mean_a
    count = count_a + count_b
    nonzero = count > 0
    coef = tl.math.div_rn(tl.full(count.shape, 1.0, tl.float32), tl.where(nonzero, count, 1.0))
    n_a = count_a * coef
    n_b = count_b * coef
    if LN_FORM == 1:
        mean = _fma32(n_b, mean_b, n_a * mean_a, True, FMA_IN_FP64)
    else:
        mean = _fma32(n_a, mean_a, n_b * mean_b, LN_FORM == 0, FMA_IN_FP64)
    m2 = _fma32(delta * delta * count_a, n_b, m2_a + m2_b, LN_FORM != 2, FMA_IN_FP64)
    return tl.where(nonzero, mean, 0.0), tl.where(nonzero, m2, 0.0), count


@triton.jit
def _welford_halves(mean, m2, count, ROWS: tl.constexpr, HALF: tl.constexpr, LN_FORM: tl.constexpr,
                    FMA_IN_FP64: tl.constexpr):
    """[ROWS, 2 * HALF] states -> [ROWS, HALF]: state j combined with state j + HALF."""
    mean_b, mean_a = tl.split(tl.permute(tl.reshape(mean, (ROWS, 2, HALF)), (0, 2, 1)))
    m2_b, m2_a = tl.split(tl.permute(tl.reshape(m2, (ROWS, 2, HALF)), (0, 2, 1)))
    count_b, count_a = tl.split(tl.permute(tl.reshape(count, (ROWS, 2, HALF)), (0, 2, 1)))
    return _welford_combine(mean_b, m2_b, count_b, mean_a, m2_a, count_a, LN_FORM, FMA_IN_FP64)


@triton.jit
def _bf16_of_fma(p, q, r):
    """p * q + r rounded once to bf16, for bf16-valued fp32 p, q, r (p * q is exact in fp32): the
    fp32 sum and its exact error (TwoSum) decide the one case a second rounding would get wrong, a
    sum that lands on a bf16 midpoint."""
    prod = p * q
    s = prod + r
    bv = s - prod
    err = (prod - (s - bv)) + (r - bv)
    u = s.to(tl.uint32, bitcast=True)
    at_midpoint = ((u & 0xFFFF) == 0x8000) & (err != 0.0)
    away = (err > 0.0) == (s > 0.0)  # the exact sum is farther from zero than s
    base = u & 0xFFFF0000
    tied = tl.where(away, base + 0x10000, base).to(tl.float32, bitcast=True)
    return tl.where(at_midpoint, tied, _bf16(s))


@triton.jit
def _norm_modulate_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, stride_x, stride_o, eps, N_COLS: tl.constexpr,
                          LN_FORM: tl.constexpr, MOD_FORM: tl.constexpr, FMA_IN_FP64: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    fused = LN_FORM != 2
    # Per thread: Welford over its vectors, one element at a time (cuWelfordOnlineSum).
    # [warps, lanes] = [4, 32] (LN_WARPS, LN_LANES), vectors of 4 (LN_VEC) elements
    thread = tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]
    mean = tl.zeros((4, 32), tl.float32)
    m2 = tl.zeros((4, 32), tl.float32)
    count = tl.zeros((4, 32), tl.float32)
    one = tl.full((4, 32), 1.0, tl.float32)
    for first in range(0, N_COLS // 4, 128):
        vec = first + thread
        valid = vec < N_COLS // 4
        for ii in tl.static_range(4):
            v = tl.load(x_row + vec * 4 + ii, mask=valid, other=0.0).to(tl.float32)
            delta = v - mean
            new_count = count + 1.0
            new_mean = _fma32(delta, tl.math.div_rn(one, new_count), mean, fused, FMA_IN_FP64)
            new_m2 = _fma32(delta, v - new_mean, m2, fused, FMA_IN_FP64)
            mean = tl.where(valid, new_mean, mean)
            m2 = tl.where(valid, new_m2, m2)
            count = tl.where(valid, new_count, count)
    # Lanes 16, 8, 4, 2, 1 apart, then warps 2 and 1 apart.
    mean, m2, count = _welford_halves(mean, m2, count, 4, 16, LN_FORM, FMA_IN_FP64)
    mean, m2, count = _welford_halves(mean, m2, count, 4, 8, LN_FORM, FMA_IN_FP64)
    mean, m2, count = _welford_halves(mean, m2, count, 4, 4, LN_FORM, FMA_IN_FP64)
    mean, m2, count = _welford_halves(mean, m2, count, 4, 2, LN_FORM, FMA_IN_FP64)
    mean, m2, count = _welford_halves(mean, m2, count, 4, 1, LN_FORM, FMA_IN_FP64)
    mean, m2, count = _welford_halves(tl.reshape(mean, (1, 4)), tl.reshape(m2, (1, 4)), tl.reshape(count, (1, 4)),
                                      1, 2, LN_FORM, FMA_IN_FP64)
    mean, m2, count = _welford_halves(mean, m2, count, 1, 1, LN_FORM, FMA_IN_FP64)  # [1, 1]
    var = tl.math.div_rn(m2, tl.zeros((1, 1), tl.float32) + N_COLS)  # sigma2 / float(N)
    rstd = tl.math.rsqrt(var + eps)
    for start in range(0, N_COLS, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        mask = cols < N_COLS
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        n = _bf16(rstd * (x - mean))  # the LayerNorm's bf16 output
        t = _bf16(1.0 + scale)
        if MOD_FORM == 0:
            y = _bf16(_bf16(n * t) + shift)
        else:
            y = _bf16_of_fma(n, t, shift)
        tl.store(out_ptr + row * stride_o + cols, y.to(tl.bfloat16), mask=mask)


def norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                  form: tuple[int, int]) -> torch.Tensor:
    """x [L, C] (bf16) -> modulate(layer_norm(x, (C,), eps=eps), scale, shift) as a new [L, C]
    tensor, with scale and shift of C elements (bf16) broadcast over the rows."""
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    _norm_modulate_kernel[(rows,)](x, scale.reshape(-1), shift.reshape(-1), out, x.stride(0), out.stride(0), float(eps),
                                   N_COLS=cols, LN_FORM=form[0], MOD_FORM=form[1], FMA_IN_FP64=INTERPRETED,
                                   BLOCK=NORM_MODULATE_BLOCK, num_warps=4, enable_fp_fusion=False)
    return out


def norm_modulate_fits(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """Where torch runs its vectorized LayerNorm (rows contiguous, 8-byte aligned, a width that is a
    multiple of 4 below 2^24) on a 2-D bf16 x of more than one row (modulate's squeeze keeps it 2-D),
    and scale and shift are one bf16 row each."""
    if not (isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)):
        return False
    cols = x.shape[-1]
    return (x.dim() == 2 and x.shape[0] > 1 and runs_on(x) and x.dtype == torch.bfloat16 and x.is_contiguous()
            and cols % LN_VEC == 0 and 0 < cols <= (1 << 24) and x.data_ptr() % (LN_VEC * x.element_size()) == 0
            and scale.dtype == shift.dtype == torch.bfloat16 and scale.numel() == cols == shift.numel()
            and scale.stride(-1) == 1 and shift.stride(-1) == 1 and scale.device == x.device == shift.device)


def norm_modulate_form_matching(eager: Any, device: str, eps: float = 1e-6, widths: tuple[int, ...] = (5120, 1000),
                                rows: int = 256, seed: int = 0) -> tuple[int, int] | None:
    """The form whose output is bit-identical to `eager(x, scale, shift)` (LayerNorm then modulate)
    on `device` for random bf16 rows of several means and spreads, at each of `widths`, or None."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cases = []
    for width in widths:
        spread = torch.exp(torch.randn((rows, 1), generator=gen))
        offset = torch.randn((rows, 1), generator=gen) * 4
        x = (torch.randn((rows, width), generator=gen) * spread + offset).to(torch.bfloat16).to(device)
        scale = (torch.randn((1, 1, width), generator=gen) * 0.5).to(torch.bfloat16).to(device)
        shift = torch.randn((1, 1, width), generator=gen).to(torch.bfloat16).to(device)
        cases.append((x, scale, shift, eager(x, scale, shift)))
    for form in NORM_MODULATE_FORMS:
        if all(torch.equal(norm_modulate(x, scale, shift, eps, form), want) for x, scale, shift, want in cases):
            return form
    return None


# -- GELU (tanh) + the per-token INT8 quantisation of ffn_2's input ---------------------------------

# torch's CUDA GELU with approximate="tanh" (GeluCUDAKernelImpl), per element in fp32:
# 0.5 * x * (1 + tanhf(kBeta * (x + kKappa * x^3))), kBeta = M_SQRT2 * M_2_SQRTPI * 0.5 (computed in
# double, then fp32), kKappa = fp32(0.044715). x^3 of a bf16 x is exact in fp32 (3 x 8 significant
# bits) and 0.5 * x is exact, so the one rounding that source leaves open is whether nvcc contracted
# x + kKappa * x^3 into an FMA (it does by default): 0: one FMA; 1: the product rounded, then the sum.
GELU_FORMS = (0, 1)
GELU_BETA = tl.constexpr(torch.tensor(1.41421356237309504880 * 1.12837916709551257390 * 0.5,
                                      dtype=torch.float32).item())
GELU_KAPPA = tl.constexpr(torch.tensor(0.044715, dtype=torch.float32).item())
GELU_QUANT_MAX_COLS = 16384  # a whole row is held in registers (ffn_2's input: 13,824)


class Int8Rows(NamedTuple):
    """INT8 activations [L, C] and their per-row fp32 scales [L], as LightX2V's int8_quantize_triton
    returns them (the value of a row is values * scales)."""

    values: torch.Tensor
    scales: torch.Tensor


@triton.jit
def _f32_of_bf16(x):
    """bf16 x as fp32 by its bits (bf16 is fp32's upper half): exact for subnormals too, which
    Triton's interpreter's cast is not; compiled, the same value as the cast."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_of_rounded(x):
    """fp32 x that already holds a bf16 value (_bf16) as bf16, by its bits (see _f32_of_bf16)."""
    return (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gelu_tanh(x, FORM: tl.constexpr, TANH_BY_EXP: tl.constexpr, FMA_IN_FP64: tl.constexpr):
    """torch's CUDA tanh-GELU of bf16-valued fp32 x, in fp32 (the bf16 rounding is the caller's)."""
    cube = x * x * x
    kappa = tl.full(x.shape, GELU_KAPPA, tl.float32)
    inner = GELU_BETA * _fma32(kappa, cube, x, FORM == 0, FMA_IN_FP64)
    if TANH_BY_EXP:
        # Triton's interpreter has no libdevice: the CPU tests retrace this stand-in in numpy.
        t = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(inner)) + 1.0)
        t = tl.where(inner < 0, -t, t)
    else:
        t = libdevice.tanh(inner)  # __nv_tanhf: CUDA's tanhf, which torch's kernel calls
    return (0.5 * x) * (1.0 + t)


@triton.jit
def _gelu_quant_kernel(y_ptr, q_ptr, scale_ptr, gelu_ptr, n_cols, stride_y, stride_q, FORM: tl.constexpr,
                       WRITE_GELU: tl.constexpr, TANH_BY_EXP: tl.constexpr, FMA_IN_FP64: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = _f32_of_bf16(tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0))
    x = _bf16(_gelu_tanh(y, FORM, TANH_BY_EXP, FMA_IN_FP64))  # the bf16 GELU output, as fp32
    if WRITE_GELU:
        tl.store(gelu_ptr + row * stride_q + cols, _bf16_of_rounded(x), mask=mask)
    # LightX2V's int8_quantize_kernel, its operations in its order (Triton's `/`, the int8 cast of
    # +-0.5 that adds 0, the store that truncates toward zero): the same instructions compiled.
    # Masked columns hold GELU(0) = 0, as its masked load leaves them 0: the row max is the same.
    x_scale = 127.0 / tl.max(tl.abs(x))
    x_scaled = x * x_scale
    x_scaled += (0.5 * tl.where(x_scaled >= 0, 1, -1)).to(tl.int8)
    tl.store(q_ptr + row * stride_q + cols, x_scaled, mask=mask)
    tl.store(scale_ptr + row, 1 / x_scale)


def gelu_quant(y: torch.Tensor, form: int, gelu_out: torch.Tensor | None = None) -> Int8Rows:
    """int8_quantize_triton(gelu(y, approximate="tanh")) for a contiguous 2-D bf16 y, without the
    bf16 GELU tensor (written into `gelu_out` only where one is given: the probe)."""
    rows, cols = y.shape
    values = torch.empty((rows, cols), dtype=torch.int8, device=y.device)
    scales = torch.empty((rows,), dtype=torch.float32, device=y.device)
    block = triton.next_power_of_2(cols)
    # Fusion of the explicit forms' multiplies and adds by the compiler would change their rounding.
    _gelu_quant_kernel[(rows,)](y, values, scales, values if gelu_out is None else gelu_out, cols, y.stride(0),
                                values.stride(0), FORM=form, WRITE_GELU=gelu_out is not None,
                                TANH_BY_EXP=INTERPRETED, FMA_IN_FP64=INTERPRETED, BLOCK=block,
                                num_warps=16 if block >= 8192 else 8, enable_fp_fusion=False)
    return Int8Rows(values, scales)


def gelu_quant_fits(y: Any) -> bool:
    """A 2-D contiguous bf16 y (ffn_0's output) of at most GELU_QUANT_MAX_COLS columns."""
    return (isinstance(y, torch.Tensor) and y.dim() == 2 and runs_on(y) and y.dtype == torch.bfloat16
            and y.is_contiguous() and y.shape[0] > 0 and 0 < y.shape[1] <= GELU_QUANT_MAX_COLS)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {2: torch.int16, 4: torch.int32}[a.element_size()]
        a, b = a.view(view), b.view(view)
    return bool(torch.equal(a, b))


def every_finite_bf16(width: int) -> torch.Tensor:
    """Each finite bf16 value once, in rows of `width` (the last padded with zeros)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.isfinite(every)]
    return torch.cat([every, every.new_zeros((-every.numel()) % width)]).view(-1, width)


def gelu_quant_form_matching(gelu: Any, quantize: Any, device: str, width: int = 13824, rows: int = 64,
                             seed: int = 0) -> int | None:
    """The form whose GELU is bit-identical to `gelu(y)` for every finite bf16 y (the GELU is
    elementwise: this is all of it) and whose INT8 values and scales are those of
    `quantize(gelu(y))` (LightX2V's int8_quantize_triton) for those rows and for random rows of
    FFN-like spreads, at `width`, on `device`; or None."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    spread = torch.exp(torch.randn((rows, 1), generator=gen))
    random_rows = torch.randn((rows, width), generator=gen) * spread + torch.randn((rows, 1), generator=gen)
    cases = []
    for y in (every_finite_bf16(width), random_rows.to(torch.bfloat16)):
        y = y.to(device)
        want_gelu = gelu(y)
        want_values, want_scales = quantize(want_gelu)
        cases.append((y, want_gelu, want_values, want_scales))

    def matches(form: int) -> bool:
        for y, want_gelu, want_values, want_scales in cases:
            got_gelu = torch.empty_like(y)
            with_gelu, plain = gelu_quant(y, form, gelu_out=got_gelu), gelu_quant(y, form)
            if not (_same_bits(got_gelu, want_gelu) and all(
                    _same_bits(got.values, want_values) and _same_bits(got.scales, want_scales)
                    for got in (with_gelu, plain))):
                return False
        return True

    return next((form for form in GELU_FORMS if matches(form)), None)
