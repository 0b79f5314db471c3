"""Self-attention with INT8 QK and FP8 PV in Triton, for GPUs with FP8 tensor cores (sm_89, sm_90).

Why a kernel of our own: on an H200 the fastest attention installed is PyTorch's cuDNN kernel (bf16,
~560 TFLOPS at 32,760 tokens) and attention is well over half of a DiT step. INT8 and FP8 tensor
work runs at twice bf16's rate on these GPUs. SageAttention 2 does this in CUDA but is not on the
package registry and needs compiling; SageAttention 1.0.6 (LightX2V's kernel here) keeps PV in
FP16. The selector (kernels.py) offers this kernel next to the others and takes it only where it is
measured faster *and* no less accurate than LightX2V's own kernel on the run's own q, k, v.

Numerics, chosen to stay within SageAttention 1's error:
- q and k to INT8 per token and head (scale = amax / 127; SageAttention 1 uses one scale per block
  of 128 or 64 tokens), k minus its mean over the tokens first (each query's logits all shift by
  q.mean(k), which softmax ignores), the softmax scale and log2(e) folded into q's scales. The INT8
  product accumulates exactly in int32.
- P, in [0, 1], times 448 to FP8 e4m3 (the range's top, so that small probabilities keep their
  mantissa); V per channel to FP8 e4m3 (scale = amax / 448), written transposed ([D, L] per head) so
  that both operands of the PV product are K-major, as Hopper's FP8 MMA requires. Each key tile's
  PV product starts from zero and is added to the fp32 accumulator: Hopper's FP8 MMA accumulates
  with fewer bits than fp32, so only 128 products share that accumulator.
- Per-head statistics (k's mean, v's channel maxima) are reduced by one program per head and
  channel block in a fixed order, so a head's result does not depend on how many heads a GPU holds
  (the same bits on one GPU as on each of N sequence-parallel GPUs) or on the head groups below.

Memory: the quantised copies (one byte per element each of q, k and v) are made for a group of
heads at a time, at most QUANT_BUDGET_BYTES, and freed before the next group.

The token count is a compile-time constant (one compilation per preset's shape): the main loop knows
where the last whole key tile ends, and Triton's interpreter (the CPU tests) cannot loop to a
run-time bound. The tile is fixed per compute capability, not autotuned: another tile sums the keys in another
order, and an autotuner that picked differently in another process would give other frames for the
same seed. Imports torch and triton at import time; kernels.py imports this module lazily.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INT8_MAX = 127.0
FP8_MAX = 448.0                 # largest finite float8_e4m3fn
LOG2E = 1.4426950408889634
QUANT_BUDGET_BYTES = 256 << 20  # quantised q, k, v of one head group
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per compute capability. sm_89 has 99 KB of shared memory
# per block (the 128x128 tile's three stages need ~112 KB); sm_90 has 227 KB.
TILES = {(9, 0): (128, 128, 8, 3), (8, 9): (128, 64, 4, 3)}
MIN_CAPABILITY = (8, 9)         # FP8 tensor cores
STATS_BLOCK_D = 16
QUANT_BLOCK_L = 64

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def supported(capability: tuple[int, int] | None) -> bool:
    """FP8 tensor cores and a tile for them (sm_89 Ada, sm_90 Hopper; not sm_86, not sm_100+ until a
    tile is measured there)."""
    return capability is not None and capability in TILES


def heads_per_group(tokens: int, heads: int, head_dim: int, budget: int = QUANT_BUDGET_BYTES) -> int:
    """The most heads (a divisor of `heads`) whose quantised q, k and v (one byte per element each)
    fit `budget`; at least one."""
    per_head = 3 * tokens * head_dim
    best = 1
    for g in range(1, heads + 1):
        if heads % g == 0 and g * per_head <= budget:
            best = g
    return best


@triton.jit
def _column_stats_kernel(k_ptr, v_ptr, kmean_ptr, vmax_ptr, L: tl.constexpr, stride_kl, stride_kh, stride_vl, stride_vh,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per head and channel: k's mean over the tokens and v's largest magnitude, in one fixed order."""
    h = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    vmax = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        mask = rows[:, None] < L
        k = tl.load(k_ptr + rows[:, None].to(tl.int64) * stride_kl + h * stride_kh + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_vl + h * stride_vh + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        total += tl.sum(k, axis=0)
        vmax = tl.maximum(vmax, tl.max(tl.abs(v), axis=0))
    tl.store(kmean_ptr + h * D + cols, total / L)
    tl.store(vmax_ptr + h * D + cols, vmax)


@triton.jit
def _quant_int8_kernel(x_ptr, mean_ptr, out_ptr, scale_ptr, L, stride_xl, stride_xh, stride_ol, stride_oh, mult,
                       HAS_MEAN: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr):
    """x [L, G, D] (minus mean [G, D]) to INT8 per token and head; scale [G, L] = amax / 127 * mult."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, D)
    mask = rows[:, None] < L
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xl + h * stride_xh + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = x - tl.load(mean_ptr + h * D + cols)[None, :]
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30) / 127.0
    y = x / scale[:, None]
    y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_ol + h * stride_oh + cols[None, :], y.to(tl.int8),
             mask=mask)
    tl.store(scale_ptr + h * L + rows, scale * mult, mask=rows < L)


@triton.jit
def _quant_v_kernel(v_ptr, vmax_ptr, out_ptr, L, stride_vl, stride_vh, stride_oh, stride_od, PV_MAX: tl.constexpr,
                    D: tl.constexpr, BLOCK_L: tl.constexpr):
    """v [L, G, D] to the PV dtype per channel (v / (amax / PV_MAX)), transposed: out [G, D, Lpad]."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, D)
    mask = rows[:, None] < L
    v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_vl + h * stride_vh + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    vmax = tl.maximum(tl.load(vmax_ptr + h * D + cols), 1e-30)
    y = v * (PV_MAX / vmax)[None, :]
    tl.store(out_ptr + h * stride_oh + cols[None, :] * stride_od + rows[:, None], y.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _attn_tiles(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, vt_ptrs, start: tl.constexpr, end: tl.constexpr,
                L: tl.constexpr, stride_kl,
                offs_n, P_SCALE: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        if MASKED:
            keys = start_n + offs_n
            k = tl.load(k_ptrs + start_n * stride_kl, mask=keys[:, None] < L, other=0)
            ks = tl.load(ks_ptrs + start_n, mask=keys < L, other=0.0)
            vt = tl.load(vt_ptrs + start_n, mask=keys[None, :] < L, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kl)
            ks = tl.load(ks_ptrs + start_n)
            vt = tl.load(vt_ptrs + start_n)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * qs[:, None] * ks[None, :]
        if MASKED:
            s = tl.where((start_n + offs_n)[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = tl.dot((p * P_SCALE).to(vt.dtype), tl.trans(vt))  # a fresh accumulator per tile
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_kernel(q_ptr, k_ptr, vt_ptr, qs_ptr, ks_ptr, vmax_ptr, o_ptr, L: tl.constexpr, stride_ql, stride_qh, stride_kl,
                 stride_kh, stride_vh, stride_vd, stride_ol, stride_oh, P_SCALE: tl.constexpr,
                 PV_MAX: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_ql + h * stride_qh + cols[None, :],
                mask=rows[:, None] < L, other=0)
    qs = tl.load(qs_ptr + h * L + rows, mask=rows < L, other=0.0)
    k_ptrs = k_ptr + h * stride_kh + offs_n[:, None] * stride_kl + cols[None, :]
    ks_ptrs = ks_ptr + h * L + offs_n
    vt_ptrs = vt_ptr + h * stride_vh + cols[:, None] * stride_vd + offs_n[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    whole: tl.constexpr = (L // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, vt_ptrs, 0, whole, L, stride_kl, offs_n,
                                P_SCALE, False, BLOCK_N)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, vt_ptrs, whole, L, L, stride_kl, offs_n,
                                P_SCALE, True, BLOCK_N)
    vscale = tl.maximum(tl.load(vmax_ptr + h * D + cols), 1e-30) / (PV_MAX * P_SCALE)
    o = acc / l_i[:, None] * vscale[None, :]
    tl.store(o_ptr + rows[:, None].to(tl.int64) * stride_ol + h * stride_oh + cols[None, :],
             o.to(o_ptr.dtype.element_ty), mask=rows[:, None] < L)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tile: tuple[int, int, int, int] | None = None,
              pv_dtype: torch.dtype = torch.float8_e4m3fn, budget: int = QUANT_BUDGET_BYTES) -> torch.Tensor:
    """Non-causal attention of q, k, v [L, H, D] (bf16/fp16, head_dim a power of two >= 16) -> [L, H, D].

    `tile`: (BLOCK_M, BLOCK_N, num_warps, num_stages), default the GPU's from TILES. `pv_dtype`: the
    PV operands' dtype (FP8 e4m3; the CPU tests pass bf16, which Triton's interpreter rounds right)."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [L, H, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    tokens, heads, head_dim = q.shape
    if tile is None:
        capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else (9, 0)
        if capability not in TILES:
            raise RuntimeError(f"no FP8 attention tile for compute capability {capability}")
        tile = TILES[capability]
    block_m, block_n, num_warps, num_stages = tile
    pv_max = FP8_MAX if pv_dtype == torch.float8_e4m3fn else 1.0
    p_scale = FP8_MAX if pv_dtype == torch.float8_e4m3fn else 1.0
    out = torch.empty_like(q)
    group = heads_per_group(tokens, heads, head_dim, budget)
    padded = -(-tokens // 16) * 16  # each transposed v row 16-byte aligned
    q_mult = head_dim ** -0.5 * LOG2E
    quant_grid = (triton.cdiv(tokens, QUANT_BLOCK_L), group)
    for h0 in range(0, heads, group):
        qg, kg, vg = q[:, h0:h0 + group], k[:, h0:h0 + group], v[:, h0:h0 + group]
        kmean = torch.empty((group, head_dim), device=q.device, dtype=torch.float32)
        vmax = torch.empty_like(kmean)
        _column_stats_kernel[(group, head_dim // STATS_BLOCK_D)](
            kg, vg, kmean, vmax, tokens, kg.stride(0), kg.stride(1), vg.stride(0), vg.stride(1),
            D=head_dim, BLOCK_D=STATS_BLOCK_D, BLOCK_L=256)
        q8 = torch.empty((tokens, group, head_dim), device=q.device, dtype=torch.int8)
        k8 = torch.empty_like(q8)
        qs = torch.empty((group, tokens), device=q.device, dtype=torch.float32)
        ks = torch.empty_like(qs)
        _quant_int8_kernel[quant_grid](qg, kmean, q8, qs, tokens, qg.stride(0), qg.stride(1), q8.stride(0),
                                       q8.stride(1), q_mult, HAS_MEAN=False, D=head_dim, BLOCK_L=QUANT_BLOCK_L)
        _quant_int8_kernel[quant_grid](kg, kmean, k8, ks, tokens, kg.stride(0), kg.stride(1), k8.stride(0),
                                       k8.stride(1), 1.0, HAS_MEAN=True, D=head_dim, BLOCK_L=QUANT_BLOCK_L)
        vt = torch.empty((group, head_dim, padded), device=q.device, dtype=pv_dtype)
        _quant_v_kernel[quant_grid](vg, vmax, vt, tokens, vg.stride(0), vg.stride(1), vt.stride(0), vt.stride(1),
                                    PV_MAX=pv_max, D=head_dim, BLOCK_L=QUANT_BLOCK_L)
        og = out[:, h0:h0 + group]
        _attn_kernel[(triton.cdiv(tokens, block_m), group)](
            q8, k8, vt, qs, ks, vmax, og, tokens, q8.stride(0), q8.stride(1), k8.stride(0), k8.stride(1),
            vt.stride(0), vt.stride(1), og.stride(0), og.stride(1), P_SCALE=p_scale, PV_MAX=pv_max, D=head_dim,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
        del q8, k8, vt, qs, ks
    return out
