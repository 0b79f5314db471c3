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

Nothing here needs more than a few KB of shared memory or any Hopper-only instruction: the kernels
compile for sm_80/sm_86 and sm_90 alike. This module imports torch and triton at import time; the
compat layer imports it only when it installs a fusion.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch
import triton
import triton.language as tl
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
